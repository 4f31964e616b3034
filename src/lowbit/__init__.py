"""lowbit: quantize PyTorch models to deployable low-bit models, and measure what it cost."""

from . import numerics, observers
from .numerics import QuantSpec, compute_qparams, dequantize, fake_quantize, quantize

__version__ = "0.1.0"

__all__ = ["numerics", "observers", "QuantSpec", "quantize", "dequantize", "fake_quantize", "compute_qparams"]
