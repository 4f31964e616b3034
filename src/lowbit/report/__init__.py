"""Layer 8 (reporting): measured comparisons against FP32, per-layer figures (``layers``), one
self-contained HTML report of them all (``html``), and the perplexity of a causal LM (``perplexity``)."""

from . import layers
from ._html import html
from .compare import Comparison, compare
from .fidelity import fidelity
from .perplexity import Perplexity, perplexity

__all__ = ["Comparison", "Perplexity", "compare", "fidelity", "html", "layers", "perplexity"]
