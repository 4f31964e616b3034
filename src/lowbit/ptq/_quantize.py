"""``quantize``: the PTQ pipeline, and its data-free replay for ``lowbit.load``.

    float steps (in list order) -> residual adds / pool inputs -> layer swap -> calibration
    -> calibrated steps (in list order)

``rebuild`` walks the same pipeline without data, so the order is written down once here.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..config import QuantConfig, get_config
from ..nn.swap import SwapReport
from ..passes.outputs import add_output_quantizers, find_float_read_outputs
from ..passes.smooth import SmoothReport
from ..targets import Target, resolve_target
from ._calibrate import as_batches, calibrate, check_has_data
from ._layers import insert_graph_quantizers, swap_layers
from ._parse import resolve_algorithms
from .steps import CALIBRATED, FLOAT, Step, StepContext

log = logging.getLogger(__name__)


@dataclass
class QuantSummary:
    """Attached to a quantized model as ``model.lowbit_summary``."""

    config: QuantConfig
    layers: SwapReport
    calibration_batches: int
    uncalibrated: list[str]  # quantizers that saw no data and were disabled (tensor stays float)
    target: str = "x86-vnni"  # the integer target (lowbit.targets) the model was quantized for
    # quantize's structural options besides the algorithms (quantize_adds), which lowbit.load replays
    options: dict = field(default_factory=dict)
    algorithms: tuple[Step, ...] = ()  # the steps that ran, in order (lowbit.ptq.steps)
    reports: tuple = ()  # what each step did, one per step (a SmoothReport, names of layers ...)

    @property
    def smoothing(self) -> SmoothReport | None:
        """The last SmoothQuant step's report (None when none ran)."""
        found = [r for r in self.reports if isinstance(r, SmoothReport)]
        return found[-1] if found else None


def _run_phase(model: nn.Module, steps: Sequence[Step], phase: str, ctx: StepContext) -> tuple[nn.Module, list]:
    """Run the ``phase`` steps in order; returns the model and their reports."""
    reports = []
    for step in steps:
        if step.phase == phase:
            log.info("running %s (%s)", step, phase)
            model, report = step.run(model, ctx)
            reports.append(report)
    return model, reports


def _check_data(steps: Sequence[Step], calib_data) -> Iterable | None:
    """``calib_data``, listed when a step reads a one-shot iterator again; ValueError when a
    step needs data and there is none."""
    needing = [str(s) for s in steps if s.needs_data]
    if needing and calib_data is None:
        raise ValueError(f"{', '.join(needing)} needs calibration data (an iterable of model inputs); pass "
                         "calib_data, or leave the algorithm out")
    if needing and iter(calib_data) is calib_data:
        return list(calib_data)  # a one-shot iterator, read more than once
    return calib_data


def quantize(
    model: nn.Module,
    calib_data: Iterable | None = None,
    config: QuantConfig | str = "w8a8",
    *,
    algorithms: Sequence[Step | str | dict] | str | None = None,
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
            when the config has static activation quantizers, or an algorithm reads data
            (then it must be re-iterable; a one-shot iterator is listed).
        config: a preset name (``"w8a8"``, ``"w8a8-dynamic"``, ``"w8"``, ``"w4a8"``, the LLM weight-only ``"w4a16-g128"`` ...: ``lowbit.CONFIGS``) or a QuantConfig.
        algorithms: the PTQ algorithms to run, in order (``lowbit.ptq.steps``): steps such as
            ``[CLE(), SmoothQuant(alpha=0.8), BiasCorrection()]``, their short forms
            (``"cle,smoothquant(alpha=0.8),bias_correction"``) or ``to_dict`` mappings.  Each
            runs in its phase: float-model steps before layers are swapped, the others after
            calibration; a list whose phases go back is a ValueError.  BatchNorm folding comes
            first unless the list places ``FoldBatchNorm()`` or ``fold_bn=False``.  Not
            together with ``equalize``, ``equalize_relu6``, ``bias_correction``, ``smoothquant``,
            which are shorthands for ``CLE``, ``CLE(relu6_to_relu=True)``, ``BiasCorrection``,
            ``SmoothQuant(alpha=...)`` in that fixed order (fold, CLE, SmoothQuant, bias).
        fold_bn: fold eval-mode BatchNorm into the preceding Conv/Linear first.
        equalize: cross-layer equalization (Nagel et al. 2019) before quantizing.
        equalize_relu6: let equalization cross ReLU6 by turning it into ReLU (changes
            the float model slightly; see ``lowbit.passes.cross_layer_equalize``).
        quantize_adds: route residual ``tensor + tensor`` adds through ``QuantAdd`` and
            quantize the inputs of average pools (needs a model torch.fx can trace;
            otherwise they stay float, logged), so the runtime keeps them in integers.
            Config rules pick their quantization by name or ``type:QuantAdd`` /
            ``type:QuantStub`` (``lowbit.ptq._layers``).  Only with static activations.
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
        ``lowbit_summary`` describing what was quantized, what stayed float and which
        algorithms ran (``lowbit.save`` writes it, ``lowbit.load`` rebuilds it).

    Raises:
        ValueError: the model is on the meta device (no weights), no or empty calibration
            data for static activations or an algorithm that reads data, bad data (named by
            batch and tensor), algorithms out of order, unknown or given twice.

    Example:
        >>> qmodel = quantize(model, [torch.randn(8, 3, 224, 224)], "w8a8")
        >>> qmodel = quantize(model, calib, "w8a8", algorithms=[CLE(), BiasCorrection()])
    """
    check_has_data(model, "quantize")
    steps = resolve_algorithms(algorithms, fold_bn=fold_bn, equalize=equalize, equalize_relu6=equalize_relu6,
                               smoothquant=smoothquant, bias_correction=bias_correction)
    calib_data = _check_data(steps, as_batches(calib_data))
    target = resolve_target(target)
    config = get_config(config).for_target(target)
    ctx = StepContext(calib_data=calib_data, config=config, progress=progress, steps=tuple(steps))
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    qmodel, reports = _run_phase(qmodel, steps, FLOAT, ctx)
    if quantize_adds:
        qmodel = insert_graph_quantizers(qmodel, config, inplace=inplace)
    qmodel, report = swap_layers(qmodel, config)
    options = {"quantize_adds": quantize_adds, **read_output_quantizers(qmodel, config, calib_data, report)}
    n_batches, uncalibrated = calibrate(qmodel, calib_data, progress=progress)
    qmodel, late = _run_phase(qmodel, steps, CALIBRATED, ctx)
    qmodel.lowbit_summary = QuantSummary(config=config, layers=report, calibration_batches=n_batches,
                                         uncalibrated=uncalibrated, target=target.name,
                                         options=options, algorithms=steps, reports=(*reports, *late))
    return qmodel


def read_output_quantizers(qmodel: nn.Module, config: QuantConfig, calib_data, report: SwapReport) -> dict:
    """For a target whose kernels write quantized outputs (``config.quantized_outputs``: TFLite), an output
    quantizer on each layer whose output anything but a quantizer reads, found on the first calibration
    batch (``lowbit.passes.outputs``); returns the summary options that record them for ``lowbit.load``
    (``{"quantized_outputs": names}``, or ``{}``)."""
    if not config.quantized_outputs:
        return {}
    if not calib_data:
        log.warning("target quantizes the layer outputs its kernels write, found on a calibration batch; with no "
                    "calibration data the export rounds them with ranges the simulation never saw")
        return {}
    outputs = add_output_quantizers(qmodel, config, find_float_read_outputs(qmodel, calib_data[0]), report)
    return {"quantized_outputs": outputs} if outputs else {}


def rebuild(model: nn.Module, config: QuantConfig, steps: Sequence[Step], reports: Sequence, *,
            quantize_adds: bool, quantized_outputs: Sequence[str] = (),
            inplace: bool = False) -> tuple[nn.Module, SwapReport]:
    """The module tree ``quantize`` built from ``model``, with fresh (empty) quantizers: each
    step's structural part (``Step.rebuild``, given its report) in the pipeline's order, the
    graph quantizers, the layer swap and the output quantizers the target needed
    (``quantized_outputs``, as recorded); no data.  For ``lowbit.load``."""
    if len(steps) != len(reports):
        raise ValueError(f"{len(steps)} algorithm(s) but {len(reports)} report(s)")
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    for step, report in zip(steps, reports, strict=True):
        if step.phase == FLOAT:
            qmodel = step.rebuild(qmodel, report)
    if quantize_adds:
        qmodel = insert_graph_quantizers(qmodel, config, inplace=inplace)
    qmodel, swap = swap_layers(qmodel, config)
    add_output_quantizers(qmodel, config, quantized_outputs, swap)
    for step, report in zip(steps, reports, strict=True):
        if step.phase == CALIBRATED:
            qmodel = step.rebuild(qmodel, report)
    return qmodel, swap
