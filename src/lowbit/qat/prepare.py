"""prepare_qat: a float model -> a fake-quantized model ready for the user's training loop
(``lowbit.nn.convert`` turns the trained model into the equivalent PTQ-style model that
export understands).

The same quantized layers and Quantizers serve PTQ and QAT; QAT only changes how each
quantizer gets its range:

    weights       learn=None: recomputed from the current weight every step (min-max);
                  learn="lsq"/"lsq+": a learned scale, initialised from the weight by the
                  config's observer (MSE for the int4 presets)
    activations   with calib_data: calibrated first (the config's observer), then fixed
                  (learn=None) or learned; without: observed during training (learn=None,
                  moving average, frozen by the schedule) or learned from the first batch
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import QuantConfig, get_config
from ..nn.conv_bn import ConvBn2d, QuantConvBn2d
from ..nn.modules import QuantAdd, has_quantizers
from ..nn.quantizer import Quantizer
from ..nn.swap import SwapReport
from ..nn.walk import quantizers_by_role, set_submodule
from ..observers import make_observer
from ..passes._graph import find_chains
from ..ptq import (
    as_batches,
    calibrate_activations,
    check_has_data,
    insert_graph_quantizers,
    read_output_quantizers,
    swap_layers,
)
from ..targets import Target, resolve_target

log = logging.getLogger(__name__)

Learn = Literal["lsq", "lsq+"] | None
_LEARN = ("lsq", "lsq+", None)


@dataclass
class QATSummary:
    """Attached to a prepared model as ``model.lowbit_summary``."""

    config: QuantConfig
    layers: SwapReport
    learn: Learn
    conv_bn: list[str]  # convs trained together with their BatchNorm (folded at export)
    calibration_batches: int
    target: str = "x86-vnni"  # the integer target (lowbit.targets) the model is trained for
    # prepare_qat's structural options (fold_bn, quantize_adds), which lowbit.load replays
    options: dict = field(default_factory=dict)


def _weight_source(module: nn.Module) -> torch.Tensor:
    """The tensor a layer's weight quantizer sees (the BN-folded weight for QuantConvBn2d)."""
    if isinstance(module, QuantConvBn2d):
        return module.quantized_weight_source()
    return module.weight


def fuse_conv_bn(model: nn.Module) -> list[str]:
    """Replace each Conv2d directly followed by a BatchNorm2d with a ``ConvBn2d`` (the BatchNorm's
    slot becomes ``nn.Identity``), in place.  Returns the names of the fused convs."""
    chains, _ = find_chains(model, lambda m: type(m) is nn.Conv2d, lambda m: False,
                            lambda m: type(m) is nn.BatchNorm2d)
    fused = []
    for chain in chains:
        conv, bn = model.get_submodule(chain.first), model.get_submodule(chain.second)
        if bn.num_features != conv.out_channels or bn.running_var is None:
            log.warning("prepare_qat: %s stays separate from %s (no running statistics or a channel "
                        "mismatch)", chain.second, chain.first)
            continue
        set_submodule(model, chain.first, ConvBn2d.from_pair(conv, bn))
        set_submodule(model, chain.second, nn.Identity())
        fused.append(chain.first)
    return fused


def _input_quantizer_slots(module: nn.Module, arg_index: int) -> str | None:
    """Attribute name of the quantizer ``module`` applies to its positional input ``arg_index``."""
    if isinstance(module, QuantAdd):
        return ("a_quantizer", "b_quantizer")[arg_index] if arg_index < 2 else None
    if has_quantizers(module) and arg_index == 0 and getattr(module, "input_quantizer", None) is not None:
        return "input_quantizer"
    return None


def shared_input_groups(model: nn.Module) -> list[list[Quantizer]]:
    """Groups of quantizers that quantize one and the same tensor (from the fx graph the
    residual pass made; none when the model was not traced).

    A tensor feeding a residual add and a layer (ResNet's block input) has two quantizers.
    They see the same values, so calibrated or observed ranges agree by construction; learned
    ones would drift apart, and then ONNX Runtime sees two QuantizeLinear nodes after one
    producer and cannot fuse it into an integer kernel: ``tie_learned`` shares them."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return []
    groups = []
    for node in graph.nodes:
        group: list[Quantizer] = []
        for user in node.users:
            if user.op != "call_module":
                continue
            consumer = model.get_submodule(user.target)
            for i, arg in enumerate(user.args):
                attr = _input_quantizer_slots(consumer, i) if arg is node else None
                q = None if attr is None else getattr(consumer, attr)
                if q is not None and all(q is not other for other in group):
                    group.append(q)
        if len(group) > 1 and all(q.spec == group[0].spec for q in group):
            groups.append(group)
    return groups


def tie_learned(groups: list[list[Quantizer]]) -> int:
    """Let each group's learned quantizers train one shared scale (and zero-point) Parameter.
    Returns how many quantizers now use another's Parameters."""
    tied = 0
    for first, *rest in groups:
        for q in rest:
            if first.learn is not None and q.learn == first.learn and q.scale.shape == first.scale.shape:
                q.scale = first.scale
                if isinstance(first.zero_point, nn.Parameter):
                    q.zero_point = first.zero_point
                tied += 1
    return tied


@torch.no_grad()
def _init_weights(model: nn.Module, learn: Learn) -> None:
    for module, role, q in quantizers_by_role(model):
        if role != "weight" or q.mode == "dynamic":
            continue
        if learn is None:
            q.mode = "dynamic"  # the weight changes every step: so does its range
            continue
        q.observer.reset()
        q.observer(_weight_source(module).detach())
        q.freeze()
        q.make_learnable(offset=learn == "lsq+")


def _init_activations(model: nn.Module, calib_data: Iterable | None, learn: Learn, progress: bool) -> int:
    acts = [q for _, role, q in quantizers_by_role(model) if role != "weight" and q.mode != "dynamic"]
    n_batches = 0
    if calib_data is not None and acts:
        n_batches, _ = calibrate_activations(model, acts, calib_data, progress=progress)
    for q in acts:
        if q.mode == "disabled":
            continue
        if learn is not None:
            shape = None if q.is_frozen else _activation_shape(q)
            q.make_learnable(offset=learn == "lsq+", shape=shape)
        elif not q.is_frozen:
            # Watched during training: a moving average is cheap per step and follows the
            # activations as the weights move (torch.ao's default for QAT).
            q.observer = make_observer("moving_average", q.spec, name=q.name)
            q.observer_kind = "moving_average"
            q.mode = "observing"
    return n_batches


def _activation_shape(q: Quantizer) -> tuple[int, ...]:
    if q.spec.granularity != "tensor":
        raise ValueError(f"{q.name}: a learned {q.spec.describe()} range needs calibration data to size it; "
                         "pass calib_data to prepare_qat, or use per-tensor activations")
    return ()


def prepare_qat(
    model: nn.Module,
    config: QuantConfig | str = "w4a8",
    calib_data: Iterable | None = None,
    *,
    learn: Learn = "lsq",
    fold_bn: bool = True,
    quantize_adds: bool = True,
    target: str | Target = "auto",
    progress: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """A fake-quantized copy of ``model`` in training mode, for your own training loop.

    Args:
        model: float model (a copy is made unless ``inplace``).
        config: a preset name (``"w4a8"``, ``"w4a4"``, ``"w8a8"``...) or a QuantConfig.
        calib_data: iterable of model inputs (or a single tensor, taken as ONE batch); when
            given, activation ranges start from PTQ calibration (recommended for 4-bit
            activations).
        learn: ``"lsq"`` learns each scale (per channel for weights), ``"lsq+"`` also the
            zero-points of affine grids, None keeps observer ranges (weights every step,
            activations by moving average until ``freeze_observers``).
        fold_bn: train each Conv2d with its BatchNorm2d as one layer whose folded weight is
            quantized (Krishnamoorthi 2018); the BatchNorm folds away at export.
        quantize_adds: quantize residual adds and average-pool inputs, as PTQ does
            (needs a model torch.fx can trace; otherwise skipped, logged).
        target: the CPU arithmetic the exported model will run on, as for
            ``lowbit.quantize`` (``"auto"``: this machine's CPU); training sees its weight grid.
        progress: progress bar over calibration batches.
        inplace: change ``model`` itself (only where no graph pass rewrites it).

    Returns:
        The prepared model (``.lowbit_summary`` says what was quantized).  Build the
        optimizer after this call: learned scales are Parameters of the model.

    Raises:
        ValueError: the model is on the meta device (no weights), an unknown ``learn``, or
            nothing the config quantizes.

    Example:
        >>> qmodel = lowbit.prepare_qat(model, "w4a8", calib_data=batches[:8])
        >>> opt = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
        >>> for x, y in loader: loss_fn(qmodel(x), y).backward(); opt.step(); opt.zero_grad()
    """
    if learn not in _LEARN:
        raise ValueError(f"learn must be one of {_LEARN}, got {learn!r}")
    check_has_data(model, "prepare_qat")
    calib_data = as_batches(calib_data)
    target = resolve_target(target)
    config = get_config(config).for_target(target)
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()  # BatchNorm keeps its running statistics while ranges are set up
    if quantize_adds:
        qmodel = insert_graph_quantizers(qmodel, config, inplace=inplace)
    fused = fuse_conv_bn(qmodel) if fold_bn else []
    qmodel, report = swap_layers(qmodel, config)
    if not report.quantized:
        if any(True for _ in quantizers_by_role(qmodel)):
            raise ValueError("prepare_qat: the model is already quantized (lowbit.quantize); continue it with "
                             "lowbit.qat.from_ptq(qmodel), which keeps its ranges and weights")
        raise ValueError("prepare_qat: the model has no layer to quantize (no Linear/Conv/Embedding the "
                         "config matches); nothing would be trained with quantization")
    options = {"fold_bn": fold_bn, "quantize_adds": quantize_adds,
               **read_output_quantizers(qmodel, config, calib_data, report)}
    _init_weights(qmodel, learn)
    n_batches = _init_activations(qmodel, calib_data, learn, progress)
    tie_learned(shared_input_groups(qmodel))
    qmodel.train()
    qmodel.lowbit_summary = QATSummary(config=config, layers=report, learn=learn, conv_bn=fused,
                                       calibration_batches=n_batches, target=target.name, options=options)
    return qmodel
