"""Range search: each activation range chosen by what it does to the model's OUTPUT.

Calibration sets every activation range from its own tensor's statistics (min-max, a
percentile, MSE, KL).  What is best for one tensor's own error is not what is best for the
network: a range clipped for the tensor's MSE may cut the few large values a later layer
depends on, and a range stretched to the outliers may waste the grid where the output is
sensitive.  Loss-aware range setting (Nahshan et al. 2019, "Loss Aware Post-training
Quantization") chooses the ranges against the output instead.  This is its greedy form:

    for each static activation quantizer, in the order the graph runs them:
        candidates: its calibrated range [lo, hi] scaled by 2**(-k/2) (narrower) and by 2**(k/2)
        (wider, at most to the tensor's whole observed range, the last candidate), k = 1 .. reach;
        walk from the current range down the narrower ones while the output error falls, and,
        if the first narrower one did not help, up the wider ones likewise;
        keep the range whose model output on the first ``batches`` calibration batches is
        closest to the float model's, every other quantizer as it is now (those before already
        searched).

The walk assumes the error has one dip along the range's width, which is what clipping against
rounding error gives; it costs two or three evaluations a quantizer instead of ``2 * reach + 1``.
The float model is the quantized model with every quantizer disabled (BatchNorm folding and the
float-phase steps are in it).  The distance (``objective``): ``"mse"``, the output's squared
error relative to the float output's mean square; ``"kl"``, the KL divergence of the softmax of
the last axis (logits).  The current range wins ties, so the output error on the searched
batches never goes up.

Cost: the model's run over each searched batch is recorded once with every intermediate value
(``lowbit.nn.replay``); a candidate re-runs only the part of the torch.fx graph downstream of
the quantizer's layer, and the chosen candidate's values become the record for the next
quantizer.  Memory: the intermediate values of the ``batches`` searched batches, about twice
(MobileNetV2, 2 batches of 16 photos: about 1.5 GB).  Models fx cannot trace, and
keyword-argument batches, run whole for every candidate.  Export, save and load need nothing
new: a range is a scale and a zero-point, and those are what the quantizer holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.modules import has_quantizers
from ..nn.quantizer import Quantizer
from ..nn.replay import Replayer
from ..nn.trace import try_trace
from ..nn.walk import first_tensor, fixed_weights, quantizers_disabled, run_model
from ..numerics import compute_qparams

log = logging.getLogger(__name__)

OBJECTIVES = ("mse", "kl")


@dataclass
class _Searched:
    """One activation quantizer and where it sits: the layers that own it, the graph nodes a
    change of its range affects (None: run the whole model)."""

    quantizer: Quantizer
    owners: list[str] = field(default_factory=list)
    nodes: list | None = None
    position: int = 0


def search_ranges(qmodel: nn.Module, calib_data: Iterable, *, batches: int = 2, reach: int = 2,
                  objective: str = "mse", progress: bool = True) -> dict:
    """Choose each static activation range of the calibrated ``qmodel`` in place (see the module
    docstring).

    Returns:
        ``{"objective", "error_before", "error_after", "changed": {quantizer: factor}}``: the
        output error (summed over the searched batches) with the calibrated ranges and with the
        chosen ones, and each changed quantizer's factor of its calibrated range
        (``"data"``: the whole observed range).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"range_search: objective must be one of {OBJECTIVES}, got {objective!r}")
    items = _first_items(calib_data, batches)
    searched = _activation_quantizers(qmodel)
    if not searched:
        return {"objective": objective, "error_before": 0.0, "error_after": 0.0, "changed": {}}
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad(), fixed_weights(qmodel):
            run = _Runs(qmodel, items, objective)
            _place(searched, run.replayer)
            before = run.error
            changed = {}
            for entry in _bar(searched, progress):
                factor = run.choose(entry, _candidates(entry.quantizer, reach))
                if factor != 1.0:
                    changed[entry.quantizer.name] = factor
    finally:
        qmodel.train(was_training)
    log.info("range_search: output %s %.4g -> %.4g, %d of %d ranges changed", objective, before, run.error,
             len(changed), len(searched))
    return {"objective": objective, "error_before": before, "error_after": run.error, "changed": changed}


class _Runs:
    """The searched batches, their float outputs, and the quantized model's current run over each
    (every intermediate value, when the graph replays), with its output error."""

    def __init__(self, qmodel: nn.Module, items: list, objective: str) -> None:
        self.qmodel, self.items, self.objective = qmodel, items, objective
        self.references = [_float_output(qmodel, item) for item in items]
        graph_module, _ = try_trace(qmodel)
        replays = graph_module is not None and not any(isinstance(item, Mapping) for item in items)
        self.replayer = Replayer(graph_module) if replays else None
        self.values = self._record()
        self.error = self._error(self._outputs(self.values))

    def choose(self, entry: _Searched, candidates: tuple[list, list]) -> float | str:
        """Walk from the current range down the narrower candidates while the output error falls,
        else up the wider ones; set the best range (the current one wins ties) and return its factor."""
        q = entry.quantizer
        best = (self.error, 1.0, (q.scale.clone(), q.zero_point.clone()), self.values)
        for direction in candidates:
            for factor, qparams in direction:
                q.set_qparams(*qparams)
                values = self._rerun(entry)
                error = self._error(self._outputs(values))
                if error >= best[0]:
                    break
                best = (error, factor, qparams, values)
            if best[1] != 1.0:  # narrower helped: on a one-dip error curve, wider cannot
                break
        self.error, factor, qparams, self.values = best
        q.set_qparams(*qparams)
        return factor

    def _record(self) -> list:
        """Each batch's run as the model is now: every node's value, or (no replay) the output."""
        if self.replayer is None:
            return [run_model(self.qmodel, item) for item in self.items]
        return [self.replayer.record(_args(item)) for item in self.items]

    def _rerun(self, entry: _Searched) -> list:
        """``_record`` with the quantizer's range as set now, re-running only its downstream nodes
        when the graph shows where it is used."""
        if self.replayer is None or entry.nodes is None:
            return self._record()
        return [self.replayer.rerun(values, entry.nodes) for values in self.values]

    def _outputs(self, values: list) -> list[torch.Tensor]:
        if self.replayer is None:
            return [_as_output(v) for v in values]
        return [_as_output(self.replayer.final(v)) for v in values]

    def _error(self, outputs: list[torch.Tensor]) -> float:
        return sum(self._distance(out, ref) for out, ref in zip(outputs, self.references, strict=True))

    def _distance(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        if self.objective == "kl":
            log_q = F.log_softmax(out.double(), dim=-1)
            log_p = F.log_softmax(ref.double(), dim=-1)
            return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        return float((out.double() - ref.double()).pow(2).mean() / ref.double().pow(2).mean().clamp_min(1e-30))


def _candidates(q: Quantizer, reach: int) -> tuple[list, list]:
    """``(narrower, wider)``: lists of ``(factor, (scale, zero_point))``, each going outward from the
    quantizer's current range: it scaled by 2**(-k/2) and by 2**(k/2), k = 1 .. reach, wider ones
    kept within the tensor's observed range, which ends the wider list itself (factor "data");
    a range giving the same grid as the current one or an earlier candidate is left out."""
    spec = q.spec
    lo = (spec.qmin - q.zero_point.double()) * q.scale.double()
    hi = (spec.qmax - q.zero_point.double()) * q.scale.double()
    data = _observed_range(q)
    floor = lo if data is None else torch.minimum(lo, data[0])
    ceil = hi if data is None else torch.maximum(hi, data[1])
    narrower = [(round(2 ** (-k / 2), 4), lo * 2 ** (-k / 2), hi * 2 ** (-k / 2)) for k in range(1, reach + 1)]
    wider = [(round(2 ** (k / 2), 4), torch.maximum(lo * 2 ** (k / 2), floor), torch.minimum(hi * 2 ** (k / 2), ceil))
             for k in range(1, reach + 1)]
    if data is not None:
        wider.append(("data", *data))
    seen = [(q.scale, q.zero_point)]
    out: tuple[list, list] = ([], [])
    for side, ranges in zip(out, (narrower, wider), strict=True):
        for factor, a, b in ranges:
            qparams = compute_qparams(a.float(), b.float(), spec, q.name)
            if not any(torch.equal(qparams[0], s) and torch.equal(qparams[1], z) for s, z in seen):
                seen.append(qparams)
                side.append((factor, qparams))
    return out


def _observed_range(q: Quantizer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The calibration data's true (min, max) as the observer kept it, shaped like the scale."""
    observer = q.observer
    lo, hi = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
    if lo is None or hi is None or not observer.has_data or lo.numel() != q.scale.numel():
        return None
    return lo.double().reshape(q.scale.shape), hi.double().reshape(q.scale.shape)


def _activation_quantizers(qmodel: nn.Module) -> list[_Searched]:
    """Every static, calibrated activation quantizer (input, output, residual add ...) once, with
    the layers that hold it."""
    found: dict[int, _Searched] = {}
    for name, module in qmodel.named_modules():
        if not has_quantizers(module):
            continue
        for role, q in module.quantizers():
            if role == "weight" or q.mode != "static" or q.observer is None or not q.is_frozen:
                continue
            found.setdefault(id(q), _Searched(q)).owners.append(name)
    return list(found.values())


def _place(searched: list[_Searched], replayer: Replayer | None) -> None:
    """Give each entry the nodes downstream of its layers, and sort them in graph order."""
    for i, entry in enumerate(searched):
        entry.position = i
        if replayer is not None:
            entry.nodes = replayer.downstream(entry.owners)
            if entry.nodes:
                entry.position = replayer.order[entry.nodes[0]]
    searched.sort(key=lambda e: e.position)


def _first_items(calib_data: Iterable, batches: int) -> list:
    items = []
    for item in [calib_data] if isinstance(calib_data, torch.Tensor) else calib_data:
        if len(items) == batches:
            break
        items.append(item)
    if not items:
        raise ValueError("range_search: calibration data is empty")
    return items


def _float_output(qmodel: nn.Module, item) -> torch.Tensor:
    with quantizers_disabled(qmodel):
        return _model_output(qmodel, item)


def _model_output(qmodel: nn.Module, item) -> torch.Tensor:
    return _as_output(run_model(qmodel, item))


def _args(item) -> tuple:
    return tuple(item) if isinstance(item, (tuple, list)) else (item,)


def _as_output(out) -> torch.Tensor:
    return first_tensor(out).detach()


def _bar(searched: list[_Searched], progress: bool):
    from tqdm.auto import tqdm

    return tqdm(searched, desc="range search", unit="range", disable=not progress)
