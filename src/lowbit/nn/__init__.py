"""Layer 3: quantized modules, inserted by module replacement, and the registry of layer kinds.

    import lowbit.nn
    lowbit.nn.register(Dense, QuantDense, kernel="gemm", kernel_only=True)   # a layer kind of your own
    lowbit.nn.registered()                                                   # what is quantizable

Everything here imports only ``lowbit.numerics`` and ``lowbit.observers`` (layers below it).
"""

from ._convert import convert, is_qat_model
from .conv_bn import ConvBn2d, QuantConvBn2d
from .integer import IntegerBias, IntegerParams, IntegerTensor
from .modules import (
    QuantAdd,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLayer,
    QuantLinear,
    QuantStub,
    TensorQuant,
    has_quantizers,
    is_quantized,
)
from .quantizer import Quantizer
from .registry import KERNELS, LayerKind, kind_of, register, registered, unregister

__all__ = [
    "KERNELS",
    "ConvBn2d",
    "IntegerBias",
    "IntegerParams",
    "IntegerTensor",
    "LayerKind",
    "QuantAdd",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvBn2d",
    "QuantEmbedding",
    "QuantLayer",
    "QuantLinear",
    "QuantStub",
    "Quantizer",
    "TensorQuant",
    "convert",
    "has_quantizers",
    "is_qat_model",
    "is_quantized",
    "kind_of",
    "register",
    "registered",
    "unregister",
]
