"""``sensitivity``: where the quantization error comes from, per layer.

The model is quantized once with the analysed choice on every decision layer (or a quantized
model is passed in and reused, calibrated ranges and all); each method then switches single
layers' quantizers on and off (``quantized_only`` / ``float_only``) and measures on a fixed small
set of batches whose FP32 outputs are computed once.  Three methods, one row shape
(``SensitivityReport``; ``cost`` is additive over layers, larger = more sensitive):

=========  ==============================================================  =====================
method     what it measures per layer                                      cost
=========  ==============================================================  =====================
sqnr       output SQNR with only this layer / all but this layer           noise / signal power
           quantized, weight SQNR, input quantizer SQNR (``_sqnr``)        of the output, only
                                                                           this layer quantized
ablation   a metric (``eval_fn``, or the output's KL / NMSE to FP32) with  metric drop (or the
           only this layer / all but this layer quantized (``_ablation``)  divergence), only
                                                                           this layer quantized
hessian    Hutchinson trace of the loss Hessian on the float weights,      1/2 Tr(H)/n ||dW||^2
           times the weight's quantization error (HAWQ-V2, ``_hessian``)   (HAWQ-V2's Omega / 2)
=========  ==============================================================  =====================

A fourth, ``reconstruction``, is for causal LMs only (``_llm_sensitivity``): no quantized model,
one streamed pass of the decoder blocks gives each linear's output error under the choice (round to
nearest), weighted by a diagonal Fisher of its output (predicted rise of the mean NLL, nats).

Without ``eval_fn`` / ``loss_fn`` the three costs estimate the same thing for a non-logit output
(the output's noise-to-signal ratio with this layer quantized); for logits, ablation's and
hessian's cost are both a KL in nats (measured vs second-order estimate).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from ..nn.modules import has_quantizers
from ..ptq import quantize
from ..ptq._parse import resolve_algorithms
from ..ptq.steps import FLOAT, Step
from ..targets import Target
from . import _ablation, _hessian, _sqnr
from ._layers import FLOAT_BITS, Choice, choice_config, choice_name, decision_layers
from .result import LayerSensitivity, SensitivityReport

log = logging.getLogger(__name__)

METHODS = ("sqnr", "ablation", "hessian", "reconstruction")


def sensitivity(model: nn.Module, calib_data=None, config: Choice = "w8a8", method: str = "sqnr", *,
                eval_fn: Callable[[nn.Module], float] | None = None, eval_data: Iterable | None = None,
                loss_fn: Callable | None = None, batches: int = 4, probes: int = 16,
                qmodel: nn.Module | None = None, algorithms=None, target: str | Target = "auto",
                seed: int = 0, progress: bool = False) -> SensitivityReport:
    """How much each layer's quantization under ``config`` costs, one row per layer.

    Args:
        model: float model; never changed (its train/eval mode is restored after each use).
        calib_data: model inputs to calibrate with (an iterable of tensors / tuples / dicts; a
            single tensor is one batch); also the evaluation data unless ``eval_data`` is given.
        config: the choice analysed on every decision layer: a preset name or a QuantConfig
            (position rules such as "@first" dropped: ``analysis.choice_config``).
        method: ``"sqnr"``, ``"ablation"``, ``"hessian"`` or (causal LMs) ``"reconstruction"``
            (see the module docstring).
        eval_fn: ablation only: ``eval_fn(model) -> float``, higher is better, called with the
            model in eval mode under ``torch.no_grad()``, on its own data.  Without it ablation
            measures the output's divergence from FP32 on the evaluation batches.
        eval_data: evaluation inputs (default: ``calib_data``); the first ``batches`` are used.
        loss_fn: hessian only: ``loss_fn(output, batch) -> scalar tensor`` (``output``: the model's
            output tensor, ``batch``: its input).  Default: KL to the float output (logits) or
            squared error over output power (other outputs).
        batches: how many evaluation batches to measure on.
        probes: hessian only: Rademacher probes per layer (more: a tighter ``trace_ci95``).
        qmodel: a model ``lowbit.quantize`` already returned for ``model`` with this choice:
            reused (its calibrated ranges) instead of quantizing again; its quantizers' modes
            are as before when this returns or raises.  It must not have run calibrated-phase
            steps (ValueError).
        algorithms: PTQ algorithms for ``lowbit.quantize`` (ignored with ``qmodel``); only the
            float-phase ones run (``switchable_steps``: AdaRound and BiasCorrection tune a layer
            for its quantized inputs, so they would be measured as noise when it is switched off).
        target: the integer target (``lowbit.targets``) the choice is fitted to.
        seed: seeds the Hessian probes.
        progress: show a progress bar over layers (batches for the Hessian).

    Returns:
        A ``SensitivityReport``: rows in model order for the decision layers the choice
        quantizes, ``baseline`` (model-level figures), ``seconds``, ``settings``.

    Raises:
        ValueError: an unknown method, a bad count, an ``eval_fn`` / ``loss_fn`` with a method
            that does not read it, no or empty data, a float choice.

    Example:
        >>> report = sensitivity(model, calib, "w4a8", method="sqnr")
        >>> report.ranked()[0].name                        # the layer that adds the most noise
        'features.1.conv.0.0'
    """
    start = time.perf_counter()
    _check_args(method, config, eval_fn, loss_fn, batches, probes)
    if method == "reconstruction":  # causal LMs: one streamed pass, no quantized model (batches: calibration items)
        from ._llm_sensitivity import reconstruction_sensitivities

        return reconstruction_sensitivities(model, calib_data, [config], batches=batches, target=target,
                                            progress=progress)[choice_name(config)]
    if calib_data is not None and not isinstance(calib_data, Sequence) and iter(calib_data) is calib_data:
        calib_data = list(calib_data)  # a one-shot iterator: read for calibration and evaluation
    evalset = _sqnr.EvalSet(model, _sqnr.first_batches(eval_data if eval_data is not None else calib_data,
                                                       batches, "evaluation data" if eval_data is not None
                                                       else "calibration data (the evaluation data by default)"))
    reused = qmodel is not None
    if reused:
        _check_switchable(qmodel)
    else:
        qmodel = quantize(model, calib_data, choice_config(config, target), algorithms=switchable_steps(algorithms),
                          progress=False)
    names = _quantized_layers(model, qmodel)
    bar = _bar(progress, method)
    summary = getattr(qmodel, "lowbit_summary", None)
    settings = {"method": method, "batches": len(evalset.batches), "qmodel": "passed in" if reused else "quantized here",
                "target": summary.target if summary else None,
                "algorithms": [str(s) for s in summary.algorithms] if summary else []}
    if method == "sqnr":
        rows, baseline = _sqnr.measure(qmodel, evalset, names, bar)
        unit = _sqnr.COST_UNIT
    elif method == "ablation":
        rows, baseline = _ablation.measure(model, qmodel, evalset, names, eval_fn, bar)
        unit = _ablation.cost_unit(eval_fn)
        settings["metric"] = _ablation.metric_name(evalset, eval_fn)
    else:
        rows, baseline = _hessian.measure(qmodel, evalset, names, loss_fn, probes, seed, bar)
        unit = _hessian.COST_UNIT
        settings.update(probes=probes, seed=seed, loss=_name(loss_fn) if loss_fn else "default (KL / NMSE to FP32)")
    layers = [_row(model, qmodel, name, *rows[name]) for name in names]
    return SensitivityReport(method=method, choice=choice_name(config), cost_unit=unit, layers=layers,
                             baseline=baseline, seconds=time.perf_counter() - start, settings=settings)


def switchable_steps(algorithms) -> list[Step] | None:
    """The steps of ``algorithms`` that keep every layer's float function: the float-phase ones
    (BatchNorm folding, CLE, SmoothQuant) and those that change only ranges (RangeSearch).  Other
    calibrated-phase steps (AdaRound, BiasCorrection) edit a layer's weight or bias to suit its
    QUANTIZED inputs; with the layer switched back to float those edits would stay and be measured
    as that layer's noise, so the analysis leaves them out."""
    if algorithms is None:
        return None
    return [step for step in resolve_algorithms(algorithms) if is_switchable(step)]


def is_switchable(step: Step) -> bool:
    """Whether a layer switched to float drops everything ``step`` did to it (see ``switchable_steps``)."""
    return step.phase == FLOAT or step.ranges_only


def _check_switchable(qmodel: nn.Module) -> None:
    summary = getattr(qmodel, "lowbit_summary", None)
    edits = [str(step) for step in (summary.algorithms if summary else ()) if not is_switchable(step)]
    if edits:
        raise ValueError(f"sensitivity: qmodel ran {', '.join(edits)}, which edit weights or biases for the "
                         "quantized model; with a layer switched to float those edits would be measured as its "
                         "noise. Pass a qmodel quantized without them, or algorithms= (their float-phase steps "
                         "are kept)")


def _check_args(method, config, eval_fn, loss_fn, batches, probes) -> None:
    if method not in METHODS:
        raise ValueError(f"sensitivity: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if config is None:
        raise ValueError("sensitivity: config is None (float): give the choice to analyse, e.g. 'w8a8' or 'w4a8'")
    for label, value in (("batches", batches), ("probes", probes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sensitivity: {label} must be a positive integer, got {value!r}")
    if eval_fn is not None and method != "ablation":
        raise ValueError(f"sensitivity: eval_fn is read by method='ablation' only, not {method!r}")
    if loss_fn is not None and method != "hessian":
        raise ValueError(f"sensitivity: loss_fn is read by method='hessian' only, not {method!r}")


def _quantized_layers(model: nn.Module, qmodel: nn.Module) -> list[str]:
    """The decision layers of ``model`` that ``qmodel`` quantizes, in model order."""
    names = []
    for name in decision_layers(model):
        try:
            layer = qmodel.get_submodule(name)
        except AttributeError:
            log.warning("%s is not in the quantized model; left out of the sensitivity report", name)
            continue
        if has_quantizers(layer) and any(q.mode != "disabled" for _, q in layer.quantizers()):
            names.append(name)
    if not names:
        raise ValueError("sensitivity: the choice quantizes none of the model's compute layers (Linear, Conv ...)")
    return names


def _row(model: nn.Module, qmodel: nn.Module, name: str, cost: float, values: dict) -> LayerSensitivity:
    layer = qmodel.get_submodule(name)
    wq = getattr(layer, "weight_quantizer", None)
    bits = wq.spec.bits if wq is not None and wq.mode != "disabled" else FLOAT_BITS  # = weight_bits(the choice's LayerQuant)
    return LayerSensitivity(name=name, kind=type(model.get_submodule(name)).__name__,
                            params=layer.weight.numel(), weight_bits=bits, cost=float(cost),
                            values={k: float(v) for k, v in values.items()})


def _bar(progress: bool, method: str) -> Callable[[Iterable], Iterable]:
    if not progress:
        return iter
    from tqdm.auto import tqdm

    unit = "batch" if method == "hessian" else "layer-batch"  # ablation with eval_fn: layers
    return lambda items: tqdm(items, desc=f"sensitivity ({method})", unit=unit)


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


