"""Graph edits that follow ONNX Runtime's QDQ fusion rules (observed in ORT 1.32).

ORT's CPU provider turns a "node unit" -- ``DQ -> op -> Q`` -- into one integer
kernel.  lowbit quantizes layer *inputs*, so a layer's output reaches the next
Q only through whatever sits between; these passes close the gaps exactly:

* ``propagate_q_backward``: ``op -> MaxPool/Flatten/Reshape/... -> Q`` gets a copy
  of that Q -> DQ in front of the data-movement op.  The op commutes with the
  (monotone, elementwise) quantizer and ``Q(DQ(Q(x))) == Q(x)``, so the values
  are unchanged, and the producer (a residual Add, a Conv) now ends in a Q.
  ORT then runs the data-movement op on int8 (it drops DQ/Q around it).
* ``dynamic_to_matmul_integer``: dynamic-activation matmuls in the operator form
  ORT's ``quantize_dynamic`` writes, which ORT fuses into DynamicQuantizeMatMul.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ._graph import Graph, attr
from ._passes import const_dq, transpose_dq

# Ops through which a per-tensor quantizer commutes exactly: they move or select
# values (MaxPool selects the max, and quantization is monotone) and never mix them.
_TRANSPARENT = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


def _static_per_tensor_q(g: Graph, node: onnx.NodeProto) -> bool:
    if node.op_type != "QuantizeLinear" or len(node.input) < 3:
        return False
    scale = g.const(node.input[1])
    return scale is not None and scale.ndim == 0 and g.is_const(node.input[2])


def _same_dq_before(g: Graph, name: str, q: onnx.NodeProto) -> bool:
    """True if ``name`` already is ``DQ`` with ``q``'s scale and zero-point (nothing to insert)."""
    dq = g.producer(name)
    return (dq is not None and dq.op_type == "DequantizeLinear"
            and [g.const_key(i) for i in dq.input[1:3]] == [g.const_key(i) for i in q.input[1:3]])


def propagate_q_backward(g: Graph) -> int:
    """Copy per-tensor Q -> DQ in front of data-movement ops that feed a Q; returns the count."""
    inserted = 0
    pending = [n for n in g.nodes() if _static_per_tensor_q(g, n)]
    while pending:
        q = pending.pop()
        op = g.producer(q.input[0])
        if op is None or op.op_type not in _TRANSPARENT or len([o for o in op.output if o]) != 1:
            continue
        if g.sole_consumer(op.output[0]) is not q or _same_dq_before(g, op.input[0], q):
            continue
        source = op.input[0]
        q_out, dq_out = g.unique_name(f"{source}_q"), g.unique_name(f"{source}_dq")
        new_q = helper.make_node("QuantizeLinear", [source, *q.input[1:3]], [q_out],
                                 name=g.unique_name(f"{q.name}@{op.name}"))
        new_dq = helper.make_node("DequantizeLinear", [q_out, *q.input[1:3]], [dq_out],
                                  name=g.unique_name(f"{q.name}@{op.name}/DequantizeLinear"))
        op.input[0] = dq_out
        g.replace_node(op, [new_q, new_dq, op])
        pending.append(new_q)
        inserted += 1
    return inserted


def _dynamic_source(g: Graph, name: str) -> list[str] | None:
    """``[x_q, x_scale, x_zero_point]`` if ``name`` is DQ(DynamicQuantizeLinear(x)), else None."""
    dq = g.producer(name)
    source = None if dq is None or dq.op_type != "DequantizeLinear" else g.producer(dq.input[0])
    if source is None or source.op_type != "DynamicQuantizeLinear" or list(dq.input[:3]) != list(source.output[:3]):
        return None
    return list(source.output[:3])


def _integer_weight(g: Graph, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The weight DQ of a MatMul / Gemm, as ``[K, N]`` with its scale per column (or per tensor)."""
    w_dq = const_dq(g, node.input[1])
    if w_dq is None or g.sole_consumer(w_dq.output[0]) is not node or g.const(w_dq.input[0]).ndim != 2:
        return None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return None
        if attr(node, "transB", 0):
            transpose_dq(g, w_dq, [1, 0])
    if g.const(w_dq.input[1]).ndim == 1 and attr(w_dq, "axis", 1) % 2 != 1:
        return None  # per-row (K) scales cannot be applied after the integer matmul
    if len(w_dq.input) < 3 or not w_dq.input[2]:
        w_dq.input.append(g.add_const(f"{w_dq.input[0]}_zero_point", np.zeros((), np.int8)))
    return w_dq


def dynamic_to_matmul_integer(g: Graph) -> int:
    """MatMul / Gemm on DQ(DynamicQuantizeLinear(x)) and DQ(int8 W) => MatMulInteger -> Cast -> Mul [-> Add].

    This is what ORT's own ``quantize_dynamic`` writes, and ORT fuses it (bias
    included) into DynamicQuantizeMatMul for any input rank.  The QDQ form fuses only
    for MatMul without bias: ORT turns a 2-D MatMul + bias Add back into a Gemm first,
    and has no dynamic fusion for Gemm.  Same arithmetic: the int32 sum of
    ``(x_q - x_zp) * (w_q - w_zp)`` times ``x_scale * w_scale``.
    """
    rewritten = 0
    for node in g.nodes():
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        x = _dynamic_source(g, node.input[0])
        w_dq = None if x is None else _integer_weight(g, node)
        if w_dq is None:
            continue
        base, out = node.name or node.output[0], node.output[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        acc, acc_f, scale = (g.unique_name(f"{out}_{k}") for k in ("int32", "float", "scale"))
        y = g.unique_name(f"{out}_nobias") if has_bias else out
        new = [
            helper.make_node("MatMulInteger", [x[0], w_dq.input[0], x[2], w_dq.input[2]], [acc],
                             name=g.unique_name(f"{base}/MatMulInteger")),
            helper.make_node("Cast", [acc], [acc_f], to=onnx.TensorProto.FLOAT, name=g.unique_name(f"{base}/Cast")),
            helper.make_node("Mul", [x[1], w_dq.input[1]], [scale], name=g.unique_name(f"{base}/Scale")),
            helper.make_node("Mul", [acc_f, scale], [y], name=g.unique_name(f"{base}/Rescale")),
        ]
        if has_bias:
            new.append(helper.make_node("Add", [y, node.input[2]], [out], name=g.unique_name(f"{base}/Bias")))
        g.replace_node(node, new)
        rewritten += 1
    return rewritten


_WEIGHT_CONSUMERS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})


def _shift_to_uint8(g: Graph, node: onnx.NodeProto, value: int, zero_point: int | None) -> None:
    """``node.input[value]`` (int8 codes) and ``node.input[zero_point]`` (int8, or absent: 0) as
    uint8 codes + 128: the same real values, ``(q + 128) - (zp + 128) == q - zp``."""
    codes = g.const(node.input[value])
    g.own_const(node, value, (codes.astype(np.int16) + 128).astype(np.uint8))
    if zero_point is None:
        return
    if len(node.input) <= zero_point or not node.input[zero_point]:
        while len(node.input) < zero_point:
            node.input.append("")
        zp = np.zeros((), np.int8)
        node.input.append(g.add_const(f"{node.input[value]}_zero_point", (zp.astype(np.int16) + 128).astype(np.uint8)))
        return
    zp = g.const(node.input[zero_point])
    g.own_const(node, zero_point, (zp.astype(np.int16) + 128).astype(np.uint8))


def weights_to_uint8(g: Graph) -> int:
    """int8 weights of Conv / Gemm / MatMul / MatMulInteger -> uint8 with the zero point moved by 128.

    The ``x86-avx2-u8u8`` target (``lowbit.targets``): on x86 CPUs without VNNI, ONNX Runtime
    runs u8 x u8 matmuls with products widened to int16 and summed in int32 (exact), where its
    u8 x s8 kernels saturate int16 pair sums.  The dequantized values are unchanged.
    Returns the number of weights converted."""
    converted = 0
    for node in g.nodes():
        if node.op_type == "MatMulInteger" and g.is_const(node.input[1]) and g.const(node.input[1]).dtype == np.int8:
            if len(node.input) > 3 and node.input[3] and not g.is_const(node.input[3]):
                continue
            _shift_to_uint8(g, node, 1, 3)
            converted += 1
        elif node.op_type == "DequantizeLinear" and g.is_const(node.input[0]) \
                and g.const(node.input[0]).dtype == np.int8:
            users = g.consumers(node.output[0])
            if not users or not all(u.op_type in _WEIGHT_CONSUMERS and list(u.input).index(node.output[0]) == 1
                                    for u in users):
                continue
            if len(node.input) > 2 and node.input[2] and not g.is_const(node.input[2]):
                continue
            _shift_to_uint8(g, node, 0, 2)
            converted += 1
    return converted
