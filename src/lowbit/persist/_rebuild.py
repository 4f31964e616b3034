"""Rebuild a saved quantized model's structure on a fresh float model, without data.

``quantize`` records its algorithms (``lowbit.ptq.steps``, with what each did) and its
structural options in ``lowbit_summary``; ``prepare_qat`` its options.  Loading replays only
what changes the module tree (each step's ``rebuild``: BatchNorm folding, ReLU6 -> ReLU,
SmoothQuant's ``SmoothedInput`` wrappers; the fx rewrite for residual adds and pools, conv-BN
fusion, layer swaps); calibration, bias correction and every weight change are skipped, as the
saved tensors overwrite them.  What those steps left that depends on data is then set from the
saved state: each quantizer's observer kind, its learnable Parameters and their shapes, a bias
created by bias correction, a QAT model converted for export (``lowbit.qat.convert``).

A version-1 manifest recorded quantize's algorithms as flags (``options``: fold_bn, equalize,
equalize_relu6, smoothquant, bias_correction; ``smoothing``: SmoothQuant's report);
``upgrade_summary`` turns it into the steps those flags stand for.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import fx, nn

from ..config import QuantConfig
from ..nn.conv_bn import QuantConvBn2d
from ..nn.modules import QuantConv2d
from ..nn.quantizer import Quantizer
from ..nn.swap import SwapReport
from ..nn.walk import set_submodule
from ..numerics import QuantSpec
from ..observers import make_observer
from ._state import EXTRA

log = logging.getLogger(__name__)

PTQ, QAT = "quantize", "prepare_qat"


# -- the summary, as JSON ------------------------------------------------------------------
def summary_to_dict(summary) -> dict:
    """``lowbit_summary`` as plain values (``layers`` is left out: the replay recomputes it).

    Raises:
        ValueError: not a model from ``quantize`` / ``prepare_qat``, or from a lowbit that
            did not record its options.
    """
    from ..ptq import QuantSummary
    from ..qat.prepare import QATSummary

    kinds = {QuantSummary: PTQ, QATSummary: QAT}
    if type(summary) not in kinds:
        raise ValueError("lowbit.save saves models made by lowbit.quantize or lowbit.prepare_qat (their "
                         f"lowbit_summary says how to rebuild them); this model's is {type(summary).__name__}")
    if not summary.options:
        raise ValueError("this model's lowbit_summary has no options (made by an older lowbit, or by hand); "
                         "quantize it again with this version to save it")
    out = {"kind": kinds[type(summary)]}
    for f in dataclasses.fields(summary):
        value = getattr(summary, f.name)
        if f.name == "layers":
            continue
        if f.name == "config":
            value = value.to_dict()
        elif f.name == "algorithms":
            value = [step.to_dict() for step in value]
        elif f.name == "reports":
            value = [step.report_to_json(r) for step, r in zip(summary.algorithms, value, strict=True)]
        out[f.name] = value
    return out


def summary_from_dict(data: dict, layers: SwapReport):
    """The ``lowbit_summary`` that ``summary_to_dict`` wrote, with the replay's swap report."""
    from ..ptq import QuantSummary
    from ..qat.prepare import QATSummary

    data = dict(data)
    cls = {PTQ: QuantSummary, QAT: QATSummary}[data.pop("kind")]
    data["config"] = QuantConfig.from_dict(data["config"])
    if cls is QuantSummary:
        data["algorithms"], data["reports"] = _steps(data)
    return cls(layers=layers, **data)


def _steps(summary: dict) -> tuple[tuple, tuple]:
    """The recorded steps and their reports, as objects."""
    from ..ptq import Step

    steps = tuple(Step.from_dict(d) for d in summary["algorithms"])
    reports = summary["reports"]
    if len(reports) != len(steps):
        raise ValueError(f"{len(steps)} algorithm(s) but {len(reports)} report(s)")
    return steps, tuple(step.report_from_json(r) for step, r in zip(steps, reports, strict=True))


def upgrade_summary(summary: dict, version: int) -> dict:
    """A summary from a manifest of format ``version`` in this version's form (see the module
    docstring); a QAT summary, or a current one, as it is."""
    from ..ptq.steps import SmoothQuant, steps_from_flags

    if version >= 2 or summary.get("kind") != PTQ:
        return summary
    summary = dict(summary)
    options = dict(summary["options"])
    smoothing = summary.pop("smoothing", None)
    steps = steps_from_flags(**{k: options.pop(k) for k in ("fold_bn", "equalize", "equalize_relu6",
                                                            "smoothquant", "bias_correction")})
    summary["options"] = options  # quantize_adds
    summary["algorithms"] = [step.to_dict() for step in steps]
    summary["reports"] = [smoothing if isinstance(step, SmoothQuant) else None for step in steps]
    return summary


# -- the replay ----------------------------------------------------------------------------
def replay(model: nn.Module, summary: dict, *, inplace: bool = False) -> tuple[nn.Module, SwapReport]:
    """The module tree ``quantize`` / ``prepare_qat`` built from ``model``, with fresh
    (empty) quantizers: the structural steps of the recorded options, no data."""
    from ..passes.outputs import add_output_quantizers
    from ..ptq import insert_graph_quantizers, rebuild, swap_layers
    from ..qat.prepare import fuse_conv_bn

    config = QuantConfig.from_dict(summary["config"])
    options = summary["options"]
    if summary["kind"] == PTQ:
        steps, reports = _steps(summary)
        return rebuild(model, config, steps, reports, quantize_adds=options["quantize_adds"],
                       quantized_outputs=options.get("quantized_outputs", ()), inplace=inplace)
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    if options["quantize_adds"]:
        qmodel = insert_graph_quantizers(qmodel, config, inplace=inplace)
    if options["fold_bn"]:
        fuse_conv_bn(qmodel)
    qmodel, report = swap_layers(qmodel, config)
    add_output_quantizers(qmodel, config, options.get("quantized_outputs", ()), report)
    return qmodel, report


# -- what the data decided -----------------------------------------------------------------
def conform(model: nn.Module, tensors: dict[str, torch.Tensor], extra: dict, saved_types: dict[str, str]) -> None:
    """Give ``model`` the data-dependent structure of the saved one (see the module docstring)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantConvBn2d) and saved_types.get(name) == QuantConv2d.__name__:
            set_submodule(model, name, module.to_quant_conv())  # saved after lowbit.qat.convert
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Quantizer):
            _conform_quantizer(module, prefix, tensors, extra)
        bias = tensors.get(prefix + "bias")
        if bias is not None and "bias" in module._parameters and module._parameters["bias"] is None:
            module.bias = nn.Parameter(torch.zeros_like(bias))  # created by bias correction


def _conform_quantizer(q: Quantizer, prefix: str, tensors: dict, extra: dict) -> None:
    observer_state = extra.get(f"{prefix}observer.{EXTRA}")
    if observer_state is None and q.observer is not None and f"{prefix}observer.num_batches" not in tensors:
        q.observer = None
    elif isinstance(observer_state, dict) and "kind" in observer_state:
        mine = q.observer.get_extra_state() if q.observer is not None else None
        if mine is None or any(mine.get(k) != observer_state.get(k) for k in ("kind", "options")):
            # prepare_qat watches uncalibrated activations with a moving average instead
            spec = QuantSpec.from_dict(observer_state["spec"])
            q.observer = make_observer(observer_state["kind"], spec, name=q.name, **observer_state["options"])
            q.observer_kind = observer_state["kind"]
    state = extra.get(prefix + EXTRA)
    learn = state.get("learn") if isinstance(state, dict) else None
    if learn is not None and q.learn is None and prefix + "scale" in tensors:
        q.make_learnable(offset=learn == "lsq+", rescale=learn == "rescale",
                         shape=tuple(tensors[prefix + "scale"].shape))


def module_types(model: nn.Module) -> dict[str, str]:
    """``{module name: class name}`` for the structure check (an fx rewrite is "GraphModule",
    whatever name its generated class carries)."""
    return {name: "GraphModule" if isinstance(m, fx.GraphModule) else type(m).__name__
            for name, m in model.named_modules()}


def structure_problem(saved: dict[str, str], model: nn.Module) -> str:
    """Why ``model``'s module tree is not the saved one ('' when it is)."""
    mine = module_types(model)
    for name, kind in saved.items():
        if name not in mine:
            return f"the saved model has a module {name or '<root>'} ({kind}) that the rebuilt one lacks"
        if mine[name] != kind:
            return f"{name or '<root>'} is a {kind} in the saved model but a {mine[name]} here"
    extra = [n for n in mine if n not in saved]
    return f"the rebuilt model has modules the saved one lacks: {extra[:3]}" if extra else ""


def dtype_problem(tensors: dict[str, torch.Tensor], model: nn.Module) -> str:
    """A saved tensor whose dtype differs from the model's (a load would convert it silently)."""
    current = model.state_dict(keep_vars=True)
    for key, t in tensors.items():
        mine = current.get(key)
        if isinstance(mine, torch.Tensor) and mine.dtype != t.dtype:
            return (f"{key} is {t.dtype} in the file but {mine.dtype} in this model; give the float model "
                    f"in the dtype it was quantized in (e.g. model.to({t.dtype}))")
    return ""


def set_training(model: nn.Module, training: bool, differs: list[str]) -> None:
    """The saved train / eval flags: the root's, and the modules that differ from it."""
    model.train(training)
    for name in differs:
        model.get_submodule(name).training = not training


def training_differs(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and m.training != model.training]
