"""Layer 1: quantization numerics as pure functions (ONNX QuantizeLinear semantics)."""

from .ops import dequantize, fake_quantize, lsq_grad_scale, quantize
from .qparams import check_finite, compute_qparams, rows_view, tensor_minmax
from .spec import (
    INT4_WEIGHT,
    INT4_WEIGHT_G128,
    INT8_ACTIVATION,
    INT8_WEIGHT,
    INT8_WEIGHT_PER_TENSOR,
    PRESETS,
    SUPPORTED_BITS,
    UINT4_WEIGHT_G128,
    UINT8_ACTIVATION,
    QuantSpec,
    get_spec,
)

__all__ = [
    "QuantSpec",
    "quantize",
    "dequantize",
    "fake_quantize",
    "compute_qparams",
    "tensor_minmax",
    "rows_view",
    "check_finite",
    "lsq_grad_scale",
    "get_spec",
    "PRESETS",
    "SUPPORTED_BITS",
    "INT8_WEIGHT",
    "INT8_WEIGHT_PER_TENSOR",
    "INT8_ACTIVATION",
    "UINT8_ACTIVATION",
    "INT4_WEIGHT",
    "INT4_WEIGHT_G128",
    "UINT4_WEIGHT_G128",
]
