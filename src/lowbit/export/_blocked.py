"""Group-wise weights as a blocked DequantizeLinear (ONNX opset 21).

A weight quantized group-wise (``QuantSpec(granularity="group", axis=a, group_size=n)``: one scale
per run of ``n`` consecutive elements along ``a``, for a Linear / Conv weight the input dimension
``a=1``) is written as its integers -- ONNX INT4 / UINT4 for a 4-bit grid (``QuantSpec.onnx_type``),
INT8 / UINT8 otherwise -- and ``DequantizeLinear(axis=a, block_size=n)``, whose scale and
zero-point have the weight's rank with ``ceil(shape[a] / n)`` entries along ``a`` (the last block
shorter when ``n`` does not divide the axis, as ONNX defines it): lowbit's own layout
(``QuantSpec.param_shape``), so the constants are ``layer.integer_params()`` unchanged.  It feeds
the float op (Gemm, MatMul, Conv): weight-only arithmetic, whether the layer's input is float or
quantized per tensor.  The bias stays float, as in the simulation.

The TorchScript exporter stops at opset 20, whose DequantizeLinear has no ``block_size``, so the
symbolic writes a ``lowbit::BlockedDequantizeLinear`` placeholder that the other export passes
leave alone (none of them knows blocked scales); ``lower`` turns it into the standard node at the
end, folding a Transpose after it (Linear on a 3-D input traces as ``MatMul(x, Transpose(W))``),
and export stamps the file at opset 21 or higher (``_opset``).

What ONNX Runtime 1.32 runs for it (measured): Gemm (Linear on a 2-D input) and Conv dequantize the
weight and run the float kernel, equal to the simulation up to float rounding.  For ``DQ -> MatMul``
(Linear on a 3-D input) its graph optimizer (level ``extended`` and above) substitutes MatMulNBits,
which by default (``session.qdq_matmulnbits_accuracy_level`` 4) quantizes the activations to int8
per block: faster, but about 0.5% off the simulation; accuracy level 1 or 0 (float), or
optimization ``basic``, keeps it exact.  A ragged last block runs the same way: ORT's blocked
DequantizeLinear takes it, and its MatMulNBits substitution pads K up to whole blocks (in_features
576 and 32 at block 128 both become MatMulNBits).  With a quantized input, 4-bit blocked weights
stay ``DQ -> float MatMul``; 8-bit ones ORT fuses into MatMulIntegerToFloat / DynamicQuantizeMatMul,
which reject blocked scales at run time, so export refuses that one combination.
"""

from __future__ import annotations

import ml_dtypes  # an onnx dependency; numpy_helper packs its 4-bit types two to a byte
import numpy as np
import onnx
from torch import nn

from ..nn.quantizer import Quantizer
from ..numerics import QuantSpec
from ._graph import Graph, attr, drop_attr, set_attr

DOMAIN = "lowbit"  # the placeholder's domain, gone from the file after ``lower``
PLACEHOLDER = "BlockedDequantizeLinear"
_CONTAINER_TAG = "lowbit_container"  # on the placeholder: QuantSpec.onnx_type of the integers


def check_group(spec: QuantSpec, name: str, *, opset: int | None, role: str) -> None:
    """Raise ValueError (naming the tensor and the fix) for a group-wise spec export cannot write.

    ``role``: ``"weight"`` (a Linear / Conv weight), ``"embedding"`` (a lookup table) or
    ``"activation"``; ``opset``: the file's opset, None for the per-tensor / per-channel layout
    ONNX Runtime's integer kernels read (what ``lowbit.runtime.emulate`` checks against)."""
    if spec.granularity != "group":
        return
    what = f"{name}: {spec.describe()} is blocked (group-wise) quantization"
    if role == "activation":
        raise ValueError(f"{what} of an activation, which export cannot write (ONNX Runtime has no blocked "
                         "QuantizeLinear kernel for activations); use a per-tensor spec such as UINT8_ACTIVATION")
    if role == "embedding":
        raise ValueError(f"{what} of an embedding table, which export cannot write yet (the table is "
                         "dequantized after the Gather, one scale per row); use a per-row spec such as "
                         "INT8_WEIGHT for embeddings, or keep them float")
    if opset is None:
        raise ValueError(f"{what}: ONNX Runtime has no integer kernel (QLinearConv / QGemm) for blocked "
                         "weights and runs this layer in float; use a per-channel spec for integer kernels")
    if opset < 21:
        raise ValueError(f"{what}, which ONNX writes as a blocked DequantizeLinear from opset 21 on; leave "
                         f"opset unset (export then writes 21) or pass opset=21 or higher instead of {opset}")


def uses_blocked(model: nn.Module) -> bool:
    """True if some enabled quantizer of ``model`` is group-wise (the file then needs opset 21)."""
    return any(isinstance(m, Quantizer) and m.mode != "disabled" and m.spec.granularity == "group"
               for m in model.modules())


def emit(g, w, q, scale, zero_point, spec: QuantSpec, axis: int, name: str):
    """The placeholder node for one blocked weight: ``g`` the TorchScript graph context, ``w`` the
    traced float weight (its type is the output's), ``q`` / ``scale`` / ``zero_point`` the constant
    nodes (8-bit containers), ``axis`` the resolved block axis."""
    out = g.op(f"{DOMAIN}::{PLACEHOLDER}", q, scale, zero_point, axis_i=axis, block_size_i=spec.group_size,
               lowbit_container_s=spec.onnx_type, lowbit_node_s=name)
    out.setType(w.type())
    return out


_NARROW = {"INT4": ml_dtypes.int4, "UINT4": ml_dtypes.uint4}  # written as ONNX INT4 / UINT4


def _to_container(g: Graph, node: onnx.NodeProto, index: int, container: str) -> None:
    """Store ``node.input[index]`` (8-bit integers) as ONNX INT4 / UINT4 for a 4-bit container."""
    if container in _NARROW:
        g.own_const(node, index, g.const(node.input[index]).astype(_NARROW[container]))


def _fold_transpose(g: Graph, node: onnx.NodeProto) -> None:
    """``DQ -> Transpose`` => DQ of the transposed integers, scale and zero-point (axis moved)."""
    t = g.sole_consumer(node.output[0])
    if t is None or t.op_type != "Transpose":
        return
    rank = g.const(node.input[0]).ndim
    perm = list(attr(t, "perm", list(reversed(range(rank)))))
    for index in range(3):
        g.own_const(node, index, np.ascontiguousarray(g.const(node.input[index]).transpose(perm)))
    set_attr(node, "axis", perm.index(attr(node, "axis") % rank))
    node.output[0] = t.output[0]
    g.remove_nodes([t])


def _check_ort_fusion(g: Graph, node: onnx.NodeProto, container: str, weight: str) -> None:
    """ONNX Runtime 1.32 fuses ``MatMul(DQ(x), DQ(8-bit W))`` into MatMulIntegerToFloat (or
    DynamicQuantizeMatMul) without looking at ``block_size``, and that kernel then fails at run
    time ("Per-column quantization parameter of batched matrix ..."); refuse before writing."""
    if container in _NARROW:
        return  # ORT's integer MatMul fusions take no 4-bit weights
    for user in g.consumers(node.output[0]):
        source = g.producer(user.input[0]) if user.op_type == "MatMul" else None
        if source is not None and source.op_type == "DequantizeLinear" and user.input[1] == node.output[0]:
            raise ValueError(
                f"{weight}: an 8-bit group-wise weight on a MatMul (Linear on a 3-D input) whose input is quantized: "
                "ONNX Runtime 1.32 fuses the pair into an integer MatMul that rejects blocked scales and fails at "
                "run time. Use a 4-bit group-wise spec (INT4_WEIGHT_G128), a per-channel INT8 weight, or keep "
                "this layer's input float"
            )


def lower(g: Graph) -> int:
    """Placeholders => ``DequantizeLinear(axis, block_size)`` on INT4 / INT8 ... constants, a
    Transpose after one folded in; drops the placeholder domain.  Returns how many were lowered."""
    lowered = 0
    for node in g.nodes(PLACEHOLDER):
        if node.domain != DOMAIN:
            continue
        _fold_transpose(g, node)  # on the 8-bit containers: numpy transposes them natively
        container = attr(node, _CONTAINER_TAG).decode()
        weight = node.name.removesuffix(f"/{PLACEHOLDER}")
        _check_ort_fusion(g, node, container, weight)
        drop_attr(node, _CONTAINER_TAG)
        _to_container(g, node, 0, container)
        _to_container(g, node, 2, container)
        node.domain, node.op_type = "", "DequantizeLinear"
        node.name = g.unique_name(f"{weight}/DequantizeLinear")
        lowered += 1
    if any(o.domain == DOMAIN for o in g.model.opset_import):
        imports = [o for o in g.model.opset_import if o.domain != DOMAIN]
        del g.model.opset_import[:]
        g.model.opset_import.extend(imports)
    g.changed()
    return lowered
