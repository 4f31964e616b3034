"""Post-training quantization driver: swap layers, calibrate, freeze."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import QuantConfig, get_config
from .nn.quantizer import Quantizer
from .nn.swap import SwapReport, swap_modules, swap_root
from .nn.walk import iter_quantizers, quantizers_by_role, run_model  # noqa: F401 - lowbit.ptq's API
from .targets import Target, resolve_target

log = logging.getLogger(__name__)


@dataclass
class QuantSummary:
    """Attached to a quantized model as ``model.lowbit_summary``."""

    config: QuantConfig
    layers: SwapReport
    calibration_batches: int
    uncalibrated: list[str]  # quantizers that saw no data and were disabled (tensor stays float)
    smoothing: object | None = None  # lowbit.passes.SmoothReport when quantize(smoothquant=...) ran
    target: str = "x86-vnni"  # the integer target (lowbit.targets) the model was quantized for
    # quantize's structural options (fold_bn, equalize, ...), which lowbit.load replays
    options: dict = field(default_factory=dict)


def check_has_data(model: nn.Module, verb: str) -> None:
    """Raise before any work when ``model`` holds tensors on the meta device (no values)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ValueError(
                f"{verb}: the model has no data ({name} is on the meta device, shapes without values); "
                "load real weights first, e.g. model.to_empty(device='cpu') then "
                "model.load_state_dict(torch.load(path, weights_only=True))"
            )


def as_batches(calib_data):
    """Calibration data as an iterable of batches: a single tensor is ONE batch (iterating it
    would give its rows)."""
    return [calib_data] if isinstance(calib_data, torch.Tensor) else calib_data


def calibrate(model: nn.Module, calib_data: Iterable, *, progress: bool = True) -> tuple[int, list[str]]:
    """Observe activations over ``calib_data`` and freeze every static quantizer.

    Weight quantizers observe their weight once.  Returns the number of batches
    and the names of activation quantizers that saw no data (they are disabled,
    so those tensors stay float, and logged).
    """
    activation = []
    weights = []
    for module, role, q in quantizers_by_role(model):
        if q.mode == "dynamic" or q.observer is None:
            continue
        if role == "weight":
            q.observer.reset()
            q.observer(module.weight)
            q.freeze()
            weights.append((module, q))
        else:
            activation.append(q)
    return calibrate_activations(model, activation, calib_data, progress=progress, weights=weights)


def calibrate_activations(model: nn.Module, activation: list[Quantizer], calib_data: Iterable, *,
                          progress: bool = True, weights: list[tuple[nn.Module, Quantizer]] = ()
                          ) -> tuple[int, list[str]]:
    """Observe the ``activation`` quantizers over ``calib_data`` and freeze them; those that saw
    no data are disabled (their tensor stays float), logged and returned by name, with the number
    of batches.  ``weights``: frozen (layer, weight quantizer) pairs whose fake-quantized weight is
    computed once for the whole pass."""
    for q in activation:
        q.observer.reset()
        q.mode = "calibrating"
    n_batches = 0
    if activation:
        with _fixed_weights(list(weights)):
            n_batches = _feed(model, calib_data, progress)

    uncalibrated = []
    for q in activation:
        if q.observer.has_data:
            q.freeze()
        else:
            q.mode = "disabled"
            uncalibrated.append(q.name)
            log.warning("%s saw no calibration data; this tensor stays float", q.name)
    return n_batches, uncalibrated


@contextlib.contextmanager
def _fixed_weights(weights: list[tuple[nn.Module, Quantizer]]) -> Iterator[None]:
    """While calibrating, each frozen weight quantizer returns its fake-quantized weight computed
    once, instead of fake-quantizing the same constant weight again on every batch.

    Instance-level ``forward`` (as export mode patches it), removed afterwards; a quantizer fed
    anything else than its layer's unchanged weight runs its own forward.
    """
    patched = []
    try:
        with torch.no_grad():
            for module, q in weights:
                weight = module.weight
                if not isinstance(weight, torch.Tensor) or q.mode != "static" or weight.is_inference():
                    continue  # (an inference tensor has no version counter to check)
                previous = q.__dict__.get("forward")
                own = previous if previous is not None else q.forward
                value = own(weight)

                def forward(x, _w=weight, _version=weight._version, _value=value, _own=own):
                    return _value if x is _w and x._version == _version else _own(x)

                patched.append((q, previous))
                q.forward = forward
        yield
    finally:
        for q, previous in reversed(patched):
            if previous is None:
                q.__dict__.pop("forward", None)
            else:
                q.forward = previous


def _feed(model: nn.Module, calib_data: Iterable, progress: bool) -> int:
    from tqdm.auto import tqdm

    if calib_data is None:
        raise ValueError("static quantization needs calibration data (an iterable of model inputs); "
                         "pass calib_data, or use a dynamic config such as 'w8a8-dynamic'")
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            total = len(calib_data) if hasattr(calib_data, "__len__") else None
            for batch in tqdm(calib_data, total=total, desc="calibrating", unit="batch", disable=not progress):
                try:
                    run_model(model, batch)
                except ValueError as exc:  # bad data: NaN named by its tensor, or the model's own check
                    raise ValueError(f"calibration batch {n}: {exc}") from exc
                except Exception as exc:
                    raise RuntimeError(f"calibration batch {n} failed in the model: {exc}") from exc
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("calibration data is empty: give at least one batch of model inputs")
    return n


def quantize(
    model: nn.Module,
    calib_data: Iterable | None = None,
    config: QuantConfig | str = "w8a8",
    *,
    fold_bn: bool = True,
    equalize: bool = False,
    equalize_relu6: bool = False,
    quantize_adds: bool = True,
    bias_correction: bool = False,
    smoothquant: float | None = None,
    target: str | Target = "auto",
    progress: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Post-training quantization: a fake-quantized copy of ``model``.

    Args:
        model: float model; untouched unless ``inplace``.
        calib_data: iterable of model inputs (tensors, tuples of args or dicts of
            kwargs; a DataLoader works), or a single tensor, taken as ONE batch.  Needed
            when the config has static activation quantizers; must be re-iterable for
            ``bias_correction``.
        config: a preset name (``"w8a8"``, ``"w8a8-dynamic"``, ``"w8"``) or a QuantConfig.
        fold_bn: fold eval-mode BatchNorm into the preceding Conv/Linear first.
        equalize: cross-layer equalization (Nagel et al. 2019) before quantizing.
        equalize_relu6: let equalization cross ReLU6 by turning it into ReLU (changes
            the float model slightly; see ``lowbit.passes.cross_layer_equalize``).
        quantize_adds: route residual ``tensor + tensor`` adds through ``QuantAdd`` and
            quantize the inputs of average pools (needs a model torch.fx can trace;
            otherwise they stay float, logged), so the runtime keeps them in integers.
            Only with static activations.
        bias_correction: after calibration, remove each layer's mean output error
            from its bias (empirical bias correction).
        smoothquant: SmoothQuant migration strength ``alpha`` (Xiao et al. 2023; e.g. 0.8),
            or None.  Moves activation outliers into the weights before calibration, folding
            ``1 / s`` into the producing layer where exact and otherwise scaling the input
            explicitly (one float Mul per smoothed input in ONNX): see
            ``lowbit.passes.smooth_quant``.  Lifts BERT-style static W8A8 (MiniLM: 0.993 ->
            0.998 embedding cosine).  Reads ``calib_data`` once more.
        target: the CPU arithmetic the exported file will run on (``lowbit.targets``):
            ``"auto"`` (this machine's CPU), ``"x86-vnni"``, ``"x86-avx2"`` (exact on any
            x86, VNNI or not), ``"x86-avx2-w7"``, ``"x86-avx2-u8u8"``, ``"arm64"``.  The
            simulation quantizes as that target computes (e.g. 7-bit weights for
            ``x86-avx2-w7``); recorded as ``lowbit_summary.target`` and followed by export.
        progress: show a progress bar over calibration batches.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The quantized model (fake-quant simulation in PyTorch) with
        ``lowbit_summary`` describing what was quantized and what stayed float
        (``lowbit.save`` writes it, ``lowbit.load`` rebuilds it).

    Raises:
        ValueError: the model is on the meta device (no weights), no or empty calibration
            data for static activations, bad data (named by batch and tensor).

    Example:
        >>> qmodel = quantize(model, [torch.randn(8, 3, 224, 224)], "w8a8")
    """
    from . import passes

    check_has_data(model, "quantize")
    calib_data = as_batches(calib_data)
    target = resolve_target(target)
    config = get_config(config).for_target(target)
    options = {"fold_bn": fold_bn, "equalize": equalize, "equalize_relu6": equalize_relu6,
               "quantize_adds": quantize_adds, "bias_correction": bias_correction, "smoothquant": smoothquant}
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    if fold_bn:
        qmodel, _ = passes.fold_batchnorm(qmodel)
    if equalize or equalize_relu6:
        qmodel, _ = passes.cross_layer_equalize(qmodel, relu6_to_relu=equalize_relu6)
    reread = bias_correction or smoothquant is not None
    if reread and calib_data is not None and iter(calib_data) is calib_data:
        calib_data = list(calib_data)  # a one-shot iterator, read more than once
    smoothing = None
    if smoothquant is not None:
        if calib_data is None:
            raise ValueError("smoothquant needs calibration data (the activations' per-channel ranges)")
        smoothing = passes.smooth_quant(qmodel, calib_data, alpha=smoothquant, insert_scales=True)
    if quantize_adds:
        qmodel = insert_graph_quantizers(qmodel, config, inplace=inplace)
    qmodel, report = swap_layers(qmodel, config)
    n_batches, uncalibrated = calibrate(qmodel, calib_data, progress=progress)
    if bias_correction:
        passes.correct_bias(None, qmodel, calib_data)
    qmodel.lowbit_summary = QuantSummary(config=config, layers=report, calibration_batches=n_batches,
                                         uncalibrated=uncalibrated, smoothing=smoothing, target=target.name,
                                         options=options)
    return qmodel


def insert_graph_quantizers(model: nn.Module, config: QuantConfig, *, inplace: bool = False) -> nn.Module:
    """Route residual ``tensor + tensor`` adds through ``QuantAdd`` and quantize average-pool
    inputs (torch.fx; models it cannot trace stay as they are, logged), with the config's
    default activation quantization.  Only for static activations; returns the (new) model."""
    from . import passes

    act = None if config.default is None else config.default.input
    if act is None or act.dynamic:
        return model
    float_patterns = [r.pattern for r in config.rules if r.layer is None and not r.pattern.startswith("type:")]
    traced, adds = passes.quantize_residual_adds(model, act.spec, observer=act.observer, skip=float_patterns)
    if adds and inplace:
        raise ValueError(
            f"inplace=True cannot quantize the residual adds {adds[:3]}...: torch.fx rewrites the model "
            "into a new module. Pass quantize_adds=False to keep them float, or inplace=False"
        )
    pooled, stubs = passes.quantize_pool_inputs(traced, act.spec, observer=act.observer)
    if stubs and inplace and pooled is not traced:
        raise ValueError("inplace=True cannot quantize average-pool inputs: torch.fx rewrites the model "
                         "into a new module. Pass quantize_adds=False, or inplace=False")
    return pooled


def swap_layers(model: nn.Module, config: QuantConfig) -> tuple[nn.Module, SwapReport]:
    """Swap every layer the config quantizes (the model itself, if it is one layer), and give each
    quantized Conv that feeds a float activation (SiLU, GELU ...) an output quantizer, so ONNX
    Runtime runs it in integers (``lowbit.passes.activations``; ``report.float_kernels`` lists
    the quantized convs it will still run in float)."""
    from .passes.activations import quantize_activation_inputs

    config = config.bind(model)  # "@first" / "@last" -> this model's layer names
    model, report = swap_root(model, config.resolve)
    if report is None:
        report = swap_modules(model, config.resolve)
        quantize_activation_inputs(model, config, report)
    if not report.quantized:
        log.warning("no layer was quantized: the config matched none of the model's Linear/Conv/Embedding layers")
    return model, report
