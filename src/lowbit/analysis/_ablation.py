"""Sensitivity by ablation: a task metric (or the output's divergence from FP32) with one layer
quantized alone, and with one layer alone kept float.

* With ``eval_fn``: ``metric = eval_fn(model)``, higher is better, called with the model in eval
  mode under ``torch.no_grad()`` (the quantized model with the layer's quantizers switched, or
  the float model for the FP32 figure); ``eval_fn`` reads its own data.  ``cost`` =
  ``fp32_metric - metric_only`` (the drop this layer alone causes, in the metric's unit).
* Without: ``metric`` = the divergence of the output from FP32 on the evaluation batches, lower
  is better: KL(softmax(FP32) || softmax(output)) in nats per sample for 2-D logits, otherwise
  the squared error normalised by the FP32 output power (sum (y - y32)^2 / sum y32^2).
  ``cost`` = the divergence with only this layer quantized.

values: ``metric_only`` (only this layer quantized), ``metric_without`` (everything quantized
but this layer).  Baseline: ``fp32_metric`` and ``quantized_metric`` (everything quantized).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.walk import fixed_weights
from ._layers import float_only, quantized_only
from ._sqnr import EvalSet, eval_mode, noise_ratio
from ._switch import switched_outputs

EvalFn = Callable[[nn.Module], float]


def is_logits(y: torch.Tensor) -> bool:
    """2-D outputs with more than one column are read as logits (batch, classes)."""
    return y.dim() == 2 and y.shape[1] > 1


def divergence(evalset: EvalSet, outputs: Sequence[torch.Tensor]) -> float:
    """KL(softmax(FP32) || softmax(output)) per sample (nats) for logits, else the squared error
    over the FP32 output power."""
    if all(is_logits(r) for r in evalset.fp32):
        total = sum(F.kl_div(F.log_softmax(y, 1), F.log_softmax(r, 1), log_target=True, reduction="sum").item()
                    for y, r in zip(outputs, evalset.fp32, strict=True))
        return max(total / sum(len(r) for r in evalset.fp32), 0.0)  # (clamp float rounding below 0)
    noise = sum(float(((y - r) ** 2).sum()) for y, r in zip(outputs, evalset.fp32, strict=True))
    return noise_ratio(evalset.signal, noise)


def metric_name(evalset: EvalSet, eval_fn: EvalFn | None) -> str:
    if eval_fn is not None:
        return f"eval_fn {getattr(eval_fn, '__name__', type(eval_fn).__name__)} (higher is better)"
    if all(is_logits(r) for r in evalset.fp32):
        return "KL(softmax(FP32) || softmax(output)), nats per sample (lower is better)"
    return "squared error / FP32 output power (lower is better)"


def cost_unit(eval_fn: EvalFn | None) -> str:
    if eval_fn is not None:
        return "drop of eval_fn's metric with only this layer quantized (fp32_metric - metric_only)"
    return "divergence of the output from FP32 with only this layer quantized (KL in nats for logits, else NMSE)"


def _metric(model: nn.Module, evalset: EvalSet, eval_fn: EvalFn | None) -> float:
    if eval_fn is None:
        return divergence(evalset, evalset.outputs(model))
    with eval_mode(model), torch.no_grad():
        return float(eval_fn(model))


def measure(model: nn.Module, qmodel: nn.Module, evalset: EvalSet, names: Sequence[str], eval_fn: EvalFn | None,
            bar: Callable[[Iterable], Iterable] = iter) -> tuple[dict[str, tuple[float, dict]], dict]:
    """``{layer: (cost, values)}`` and the baseline."""
    if eval_fn is None:  # the divergence of outputs on the evaluation batches: switched runs
        with eval_mode(qmodel), fixed_weights(qmodel):
            outs = switched_outputs(qmodel, evalset.batches, names, bar)
        rows = {}
        for name in names:
            only, without = divergence(evalset, outs.only[name]), divergence(evalset, outs.without[name])
            rows[name] = (only, {"metric_only": only, "metric_without": without})
        return rows, {"fp32_metric": 0.0, "quantized_metric": divergence(evalset, outs.full)}
    fp32 = _metric(model, evalset, eval_fn)
    rows = {}
    for name in bar(names):
        with quantized_only(qmodel, [name]):
            only = _metric(qmodel, evalset, eval_fn)
        with float_only(qmodel, [name]):
            without = _metric(qmodel, evalset, eval_fn)
        rows[name] = (fp32 - only, {"metric_only": only, "metric_without": without})
    return rows, {"fp32_metric": fp32, "quantized_metric": _metric(qmodel, evalset, eval_fn)}
