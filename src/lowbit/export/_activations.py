"""SiLU and GELU on dequantized values, written as the one ONNX Runtime op ORT itself fuses them into.

On a float tensor ORT turns ``x * Sigmoid(x)`` into its contrib ``QuickGelu(alpha=1)`` and the
Erf formula of GELU, ``x * 0.5 * (1 + Erf(x / sqrt 2))``, into ``Gelu``: one pass over the
tensor instead of two to five.  When ``x`` comes out of a DequantizeLinear (a Conv with an
output quantizer before the activation, ``lowbit.passes.activations``), ORT first gives each
reader of that DQ its own copy (every Q/DQ node unit needs its own DQ), the two ``x`` become
different tensors and neither fusion matches, so the activation runs as separate float ops.
``fuse_dq_activations`` writes the fused op directly, only there: what ORT runs for the same
activation on a float input, the same kernel.

Measured (``benchmarks/bench_activations.py``, Intel Xeon with AVX512-VNNI, ORT 1.32, 1 thread,
4 x [Conv 3x3 64 -> 64 + activation] at 56x56, batch 8): SiLU 0.55x -> 0.43x FP32 latency,
GELU 0.66x -> 0.42x.  At opset 20 the exporter writes GELU as the ONNX ``Gelu`` op already.
The file then needs ONNX Runtime (or a runtime with its com.microsoft ops), which lowbit's
QDQ layout targets anyway.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from ._graph import Graph

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops


def _from_dq(g: Graph, name: str) -> bool:
    producer = g.producer(name)
    return producer is not None and producer.op_type == "DequantizeLinear"


def _scalar(g: Graph, name: str) -> float | None:
    value = g.const(name)
    return float(value) if value is not None and value.size == 1 else None


def _other_input(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input ``node`` that is not ``name`` (None unless ``name`` is one of them)."""
    ins = list(node.input)
    if len(ins) != 2 or name not in ins:
        return None
    return ins[1] if ins[0] == name else ins[0]


def _next(g: Graph, node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
    user = g.sole_consumer(node.output[0])
    return user if user is not None and user.op_type == op_type and user.domain in ("", "ai.onnx") else None


def _silu(g: Graph, sigmoid: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """``Sigmoid(x) -> Mul(x, .)`` with ``x`` from a DQ: (nodes to remove, the QuickGelu)."""
    x = sigmoid.input[0]
    mul = _next(g, sigmoid, "Mul")
    if mul is None or not _from_dq(g, x) or _other_input(mul, sigmoid.output[0]) != x:
        return None
    fused = helper.make_node("QuickGelu", [x], [mul.output[0]], name=g.unique_name(f"{mul.name}/QuickGelu"),
                             domain=MS_DOMAIN, alpha=1.0)
    return [sigmoid, mul], fused


def _gelu(g: Graph, div: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """``Div(x, sqrt 2) -> Erf -> Add 1 -> Mul x -> Mul 0.5`` with ``x`` from a DQ (torch's exact GELU)."""
    x = div.input[0]
    if len(div.input) != 2 or not _from_dq(g, x):
        return None
    root2 = _scalar(g, div.input[1])
    if root2 is None or not np.isclose(root2, math.sqrt(2), rtol=1e-6, atol=0):
        return None
    erf = _next(g, div, "Erf")
    add = None if erf is None else _next(g, erf, "Add")
    if add is None or _scalar(g, _other_input(add, erf.output[0]) or "") != 1.0:
        return None
    mul = _next(g, add, "Mul")
    if mul is None or _other_input(mul, add.output[0]) != x:
        return None
    half = _next(g, mul, "Mul")
    if half is None or _scalar(g, _other_input(half, mul.output[0]) or "") != 0.5:
        return None
    fused = helper.make_node("Gelu", [x], [half.output[0]], name=g.unique_name(f"{half.name}/Gelu"),
                             domain=MS_DOMAIN)
    return [div, erf, add, mul, half], fused


def fuse_dq_activations(g: Graph) -> int:
    """SiLU / exact-GELU patterns whose input comes from a DequantizeLinear -> ORT's QuickGelu / Gelu.

    The opset of ORT's contrib domain is added to the model when a node is written.
    Returns the number of activations rewritten."""
    fused = 0
    for node in g.nodes():
        if node.domain not in ("", "ai.onnx"):
            continue
        match = _silu(g, node) if node.op_type == "Sigmoid" else _gelu(g, node) if node.op_type == "Div" else None
        if match is None:
            continue
        doomed, new = match
        g.replace_node(doomed[-1], [new])
        g.remove_nodes(doomed[:-1])
        fused += 1
    if fused and not any(o.domain == MS_DOMAIN for o in g.model.opset_import):
        g.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused
