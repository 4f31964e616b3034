"""Layer 1: quantization numerics as pure functions (ONNX QuantizeLinear semantics)."""

from .ops import dequantize, fake_quantize, lsq_grad_scale, quantize
from .qparams import check_finite, compute_qparams, finite_row_ranges, row_ranges, rows_view, tensor_minmax
from .spec import (
    INT4_WEIGHT,
    INT4_WEIGHT_G128,
    INT8_ACTIVATION,
    INT8_WEIGHT,
    INT8_WEIGHT_PER_TENSOR,
    PRESETS,
    SUPPORTED_BITS,
    UINT4_ACTIVATION,
    UINT4_WEIGHT_G128,
    UINT8_ACTIVATION,
    QuantSpec,
    get_spec,
)

__all__ = [
    "INT4_WEIGHT",
    "INT4_WEIGHT_G128",
    "INT8_ACTIVATION",
    "INT8_WEIGHT",
    "INT8_WEIGHT_PER_TENSOR",
    "PRESETS",
    "SUPPORTED_BITS",
    "UINT4_ACTIVATION",
    "UINT4_WEIGHT_G128",
    "UINT8_ACTIVATION",
    "QuantSpec",
    "check_finite",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "finite_row_ranges",
    "get_spec",
    "lsq_grad_scale",
    "quantize",
    "row_ranges",
    "rows_view",
    "tensor_minmax",
]
