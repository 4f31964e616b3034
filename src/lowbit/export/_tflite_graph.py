"""The PT2E graph of a lowbit model, completed so that every integer op writes an int8 output.

``litert_torch.convert`` (static QDQ mode) turns ``DQ -> op [-> fused ReLU / ReLU6] -> Q`` into one
int8 TFLite kernel.  lowbit's simulation quantizes layer *inputs*, so an op's ``Q`` is the one
the next layer reads.  Two cases need a hand here:

* the op's output reaches lowbit's quantizer only through data movement (Flatten, Reshape,
  MaxPool ...): the quantizer is copied in front of the data movement (exact: those ops commute
  with rounding to a grid), so the converter sees the ``op -> Q`` it fuses;
* the op's output is read by no quantizer (a classifier's logits, a Linear feeding a float
  LayerNorm): TFLite still needs an int8 output, so a ``Q -> DQ`` on the uint8 affine grid
  (shifted to int8) is inserted, its range the min / max of that tensor over calibration inputs.

Graph nodes are ATen ops of ``torch.export`` (``aten.conv2d.default`` ...) and
``quantized_decomposed`` ops (``lowbit.export.tflite.litert_mode`` writes them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
from torch import fx, nn

from ..numerics import UINT8_ACTIVATION
from ..observers import make_observer

log = logging.getLogger(__name__)

_QD = torch.ops.quantized_decomposed
_ATEN = torch.ops.aten
Q = _QD.quantize_per_tensor.default
DQ = _QD.dequantize_per_tensor.default
WEIGHT_DQ = (_QD.dequantize_per_channel.default, DQ)

# Ops with a TFLite int8 kernel when every tensor input is dequantized from int8.
INTEGER_OPS = frozenset({
    _ATEN.conv1d.default, _ATEN.conv2d.default, _ATEN.linear.default, _ATEN.add.Tensor, _ATEN.mean.dim,
    _ATEN.adaptive_avg_pool2d.default, _ATEN.avg_pool2d.default, _ATEN.matmul.default, _ATEN.bmm.default,
})
# Activations the converter fuses into the kernel before its output Q.
FUSED = frozenset({_ATEN.relu.default, _ATEN.relu_.default, _ATEN.hardtanh.default, _ATEN.hardtanh_.default,
                   _ATEN.clamp.default})
# Data movement: commutes with rounding to a grid, so a Q may move in front of it.
MOVEMENT = frozenset({
    _ATEN.view.default, _ATEN.reshape.default, _ATEN.flatten.using_ints, _ATEN.permute.default,
    _ATEN.transpose.int, _ATEN.squeeze.dim, _ATEN.squeeze.dims, _ATEN.unsqueeze.default,
    _ATEN.contiguous.default, _ATEN.clone.default, _ATEN.max_pool2d.default, _ATEN.dropout.default,
    _ATEN._unsafe_view.default,
})


@dataclass(frozen=True)
class Placement:
    """What the pass did: copied quantizers, and outputs given a calibrated range (by node name)."""

    copied: tuple[str, ...]
    calibrated: tuple[str, ...]


def _is_dequantized(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in WEIGHT_DQ


def _is_integer_op(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in INTEGER_OPS:
        return False
    inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]  # (bias and other constants)
    return bool(inputs) and all(_is_dequantized(a) for a in inputs)


def _fused_end(node: fx.Node) -> fx.Node:
    """``node``, or the last of a chain of single-use activations after it (fused by the converter)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_function" or user.target not in FUSED:
            break
        node = user
    return node


def _reading_quantizers(node: fx.Node) -> list[fx.Node] | None:
    """The Q nodes that read ``node`` (through data movement), or None when some path reaches anything else."""
    found: list[fx.Node] = []
    for user in node.users:
        if user.op == "call_function" and user.target is Q:
            found.append(user)
        elif user.op == "call_function" and user.target in MOVEMENT:
            below = _reading_quantizers(user)
            if below is None:
                return None
            found += below
        else:
            return None
    return found or None


def _insert_qdq(graph: fx.Graph, node: fx.Node, qargs: tuple) -> None:
    """``node -> Q -> DQ`` with ``qargs`` = (scale, zero point, qmin, qmax, dtype); every other user reads the DQ."""
    with graph.inserting_after(node):
        q = graph.call_function(Q, (node, *qargs))
    with graph.inserting_after(q):
        dq = graph.call_function(DQ, (q, *qargs))
    node.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not q)


def _chunks(batches: Iterable[Sequence[torch.Tensor]], size: int) -> Iterable[tuple[torch.Tensor, ...]]:
    """Calibration batches cut to the traced batch size (the graph's shapes are static)."""
    for batch in batches:
        n = batch[0].shape[0]
        if n % size:
            raise ValueError(f"calibration: a batch of {n} does not split into the traced batch size {size}; "
                             "give batches whose size is a multiple of example_inputs' batch size")
        for i in range(0, n, size):
            yield tuple(t[i : i + size] for t in batch)


def _observe(gm: fx.GraphModule, nodes: list[fx.Node], batches, batch_size: int, observer: str) -> dict[str, tuple]:
    """int8 qargs of each of ``nodes``' outputs, from a lowbit ``observer`` (uint8 affine grid, shifted by -128)
    fed ``batches`` through ``gm`` (the probes are removed again)."""
    observers = nn.ModuleDict({node.name: make_observer(observer, UINT8_ACTIVATION, node.name) for node in nodes})
    gm.add_module("_lowbit_observers", observers)
    probes = []
    for node in nodes:
        with gm.graph.inserting_after(node):
            probe = gm.graph.call_module(f"_lowbit_observers.{node.name}", (node,))
        node.replace_all_uses_with(probe, delete_user_cb=lambda user, p=probe: user is not p)
        probes.append((node, probe))
    gm.recompile()
    try:
        with torch.no_grad():
            for chunk in _chunks(batches, batch_size):
                gm(*chunk)
        if any(not obs.has_data for obs in observers.values()):
            raise ValueError("calibration: no inputs; give at least one batch (or leave calibration=None to use "
                             "example_inputs)")
        qargs = {}
        for name, obs in observers.items():
            scale, zero_point = obs.qparams()
            qargs[name] = (float(scale), int(zero_point) - 128, -128, 127, torch.int8)
    finally:
        for node, probe in probes:
            probe.replace_all_uses_with(node)
            gm.graph.erase_node(probe)
        delattr(gm, "_lowbit_observers")
    return qargs


def place_output_quantizers(gm: fx.GraphModule, batches, batch_size: int, observer: str = "minmax") -> Placement:
    """Give every integer op of ``gm`` an int8 output (see the module docstring), in place.

    Args:
        gm: ``torch.export``'s module of a model in ``litert_mode``.
        batches: calibration inputs, each a tuple of positional tensors; read only when some
            output has no lowbit quantizer.
        batch_size: the traced batch size (the calibration batches are cut to it).
        observer: the lowbit range estimator (``lowbit.observers.OBSERVERS``) of those outputs.
    """
    copied, observed = [], []
    for node in list(gm.graph.nodes):
        if not _is_integer_op(node):
            continue
        end = _fused_end(node)
        readers = _reading_quantizers(end)
        if readers is None:
            observed.append(end)
        elif any(user.target is not Q for user in end.users):  # data movement before the Q: copy it in front
            _insert_qdq(gm.graph, end, tuple(readers[0].args[1:]))
            copied.append(end.name)
    qargs = _observe(gm, observed, batches, batch_size, observer) if observed else {}
    for node in observed:
        _insert_qdq(gm.graph, node, qargs[node.name])
        log.info("%s: no lowbit quantizer reads this output; int8 scale %.4g, zero point %d from calibration "
                 "(%s)", node.name, *qargs[node.name][:2], observer)
    if observed:
        log.warning("%d integer op output(s) that the simulation leaves float are rounded to int8 in the file "
                    "(TFLite's kernels write int8), with ranges from the export's calibration inputs: the file "
                    "differs from the simulation there. Quantize with target='tflite' so the simulation rounds "
                    "them too", len(observed))
    gm.graph.lint()
    gm.recompile()
    return Placement(copied=tuple(copied), calibrated=tuple(n.name for n in observed))
