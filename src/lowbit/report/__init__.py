"""Layer 8 (reporting): measured comparisons against FP32, and per-layer figures (``layers``)."""

from . import layers
from .compare import Comparison, compare
from .fidelity import fidelity

__all__ = ["Comparison", "compare", "fidelity", "layers"]
