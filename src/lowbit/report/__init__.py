"""Layer 8 (reporting): measured comparisons against FP32."""

from .compare import Comparison, compare
from .fidelity import fidelity

__all__ = ["Comparison", "compare", "fidelity"]
