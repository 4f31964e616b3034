"""Post-processing passes on the exported ONNX graph.

The TorchScript exporter writes the graph the trace saw; these passes turn it
into the QDQ layout ONNX Runtime fuses into integer kernels.  Every pass is
exact (it changes no output bit, up to float re-association noted per pass):

* ``lift_constants``     Constant nodes -> named initializers; export tags stripped.
* ``fold_constants``     Q / Transpose / Clip ... of constants -> the constant they compute
                         (a Q of a constant weight becomes an int8 initializer).
* ``fold_dq_transpose``  DQ(int8 W) -> Transpose  =>  DQ(int8 W^T) with the axis permuted
                         (Linear on 3-D inputs traces as MatMul(x, Transpose(W))).
* ``dedupe_qdq``         identical Q (same input, same constants) -> one Q, so a tensor read
                         by two quantized layers has one Q and its producer can fuse.

Passes that follow ONNX Runtime's fusion rules live in ``_ort_layout`` (Q placement,
dynamic matmuls) and ``_bn_fold`` (BatchNorm after a quantized Conv).  Biases need no
pass: export writes each one as the simulation computes it (``_symbolic._BiasDQ``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from ._graph import Graph, attr, drop_attr, set_attr

log = logging.getLogger(__name__)

_NAME_TAG = "lowbit_name"  # on Constant nodes: the initializer name
_NODE_TAG = "lowbit_node"  # on compute nodes: the quantizer name, names the node

# Ops whose all-constant instances are replaced by their value.  DequantizeLinear is
# deliberately absent: an int8 weight must stay int8 with its DQ for ORT to fuse.
_FOLDABLE = frozenset({"QuantizeLinear", "Transpose", "Clip", "Max", "Min", "Cast", "Reshape",
                       "Squeeze", "Unsqueeze", "Identity"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def lift_constants(g: Graph) -> None:
    """Constant nodes -> initializers named by their ``lowbit_name`` tag (or output name);
    nodes tagged ``lowbit_node`` are named ``<tensor>/<OpType>``.  No tags remain."""
    lifted, renamed = [], {}
    for node in g.nodes():
        tag = attr(node, _NAME_TAG)
        drop_attr(node, _NAME_TAG)
        node_tag = attr(node, _NODE_TAG)
        if node_tag is not None:
            drop_attr(node, _NODE_TAG)
            node.name = g.unique_name(f"{_text(node_tag)}/{node.op_type}")
        value = attr(node, "value")
        if node.op_type != "Constant" or value is None or g.is_graph_output(node.output[0]):
            continue
        name = g.unique_name(_text(tag)) if tag is not None else node.output[0]
        tensor = g.graph.initializer.add()  # one copy of the value (append would copy it twice)
        tensor.CopyFrom(value)
        tensor.name = name
        renamed[node.output[0]] = name
        lifted.append(node)
    g.rename_inputs(renamed)
    g.remove_nodes(lifted)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _evaluate(node: onnx.NodeProto, g: Graph, opset: int) -> list[np.ndarray]:
    feeds = {name: g.const(name) for name in node.input if name}
    # onnx.reference implements QuantizeLinear from version 19 on; for the 8-bit
    # types export emits, versions 13..20 compute the same integers.
    return ReferenceEvaluator(node, opsets={"": max(opset, 19)}).run(None, feeds)


def fold_constants(g: Graph, opset: int) -> int:
    """Replace foldable nodes whose inputs are all initializers by initializers; returns the count."""
    folded = 0
    for node in g.nodes():
        if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx"):
            continue
        if not all(g.is_const(name) for name in node.input if name):
            continue
        if any(g.is_graph_output(out) for out in node.output):
            continue
        for out, value in zip(node.output, _evaluate(node, g, opset)):
            hint = f"{node.input[0]}_quantized" if node.op_type == "QuantizeLinear" else out
            g.replace_uses(out, g.add_const(hint, value))
        g.remove_nodes([node])
        folded += 1
    return folded


def const_dq(g: Graph, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear producing ``name`` from an initializer, if that is what produces it."""
    node = g.producer(name)
    if node is None or node.op_type != "DequantizeLinear" or not g.is_const(node.input[0]):
        return None
    if not all(g.is_const(i) for i in node.input[1:] if i):
        return None
    return node


def transpose_dq(g: Graph, dq: onnx.NodeProto, perm: list[int]) -> None:
    """Permute the integer constant of ``dq`` by ``perm`` and move its channel axis along."""
    q = g.const(dq.input[0])
    g.own_const(dq, 0, np.ascontiguousarray(q.transpose(perm)))
    if g.const(dq.input[1]).ndim == 1:  # per-channel: the channel axis moves with the data
        axis = attr(dq, "axis", 1) % q.ndim
        set_attr(dq, "axis", perm.index(axis))


def fold_dq_transpose(g: Graph) -> int:
    """DQ(int W) -> Transpose  =>  DQ(int W^T) (axis permuted).  Returns the count."""
    folded = 0
    for t in g.nodes("Transpose"):
        dq = const_dq(g, t.input[0])
        if dq is None or g.sole_consumer(dq.output[0]) is not t:
            continue
        rank = g.const(dq.input[0]).ndim
        perm = list(attr(t, "perm", list(reversed(range(rank)))))
        transpose_dq(g, dq, perm)
        dq.output[0] = t.output[0]
        g.remove_nodes([t])
        folded += 1
    return folded


def _qdq_key(g: Graph, node: onnx.NodeProto) -> tuple:
    attrs = tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))
    return (node.op_type, node.domain, tuple(g.const_key(i) for i in node.input), attrs)


def dedupe_qdq(g: Graph) -> int:
    """Merge Q / DQ / DynamicQuantizeLinear nodes that compute the same thing.

    Two quantized layers reading one tensor each trace their own Q; when their
    scales agree (same observer on the same tensor) they become one Q -> DQ, the
    layout ORT needs to fuse the producer (a Conv whose output feeds two Qs stays float).
    """
    seen: dict[tuple, onnx.NodeProto] = {}
    doomed = []
    for node in g.nodes():
        if node.op_type not in _QDQ_OPS or g.is_const(node.input[0]):
            continue  # weight DQs read distinct initializers; hashing them would cost, not merge
        key = _qdq_key(g, node)
        keeper = seen.get(key)
        if keeper is None or any(g.is_graph_output(o) for o in node.output):
            seen.setdefault(key, node)
            continue
        for old, new in zip(node.output, keeper.output):
            g.replace_uses(old, new)
        doomed.append(node)
    g.remove_nodes(doomed)
    _warn_split_quantizers(g)
    return len(doomed)


def _warn_split_quantizers(g: Graph) -> None:
    for name in sorted({n.input[0] for n in g.nodes("QuantizeLinear")}):
        qs = [n for n in g.consumers(name) if n.op_type == "QuantizeLinear" and n.input[0] == name]
        if len(qs) > 1:
            log.warning("tensor %r is quantized with %d different scales (%s); the layer producing it cannot "
                        "fuse into an integer kernel in ONNX Runtime. Give its consumers one shared range "
                        "(same observer on the same tensor)", name, len(qs), ", ".join(n.name for n in qs))


def clear_value_info(g: Graph) -> None:
    """Drop intermediate shape annotations (passes make some stale; ORT re-infers them)."""
    del g.graph.value_info[:]
