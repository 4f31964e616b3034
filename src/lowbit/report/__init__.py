"""Layer 8 (reporting): measured comparisons against FP32, per-layer figures (``layers``), and one
self-contained HTML report of them all (``html``)."""

from . import layers
from ._html import html
from .compare import Comparison, compare
from .fidelity import fidelity

__all__ = ["Comparison", "compare", "fidelity", "html", "layers"]
