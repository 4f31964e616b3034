"""Range search: each activation range chosen by what it does to the model's OUTPUT.

Calibration sets every activation range from its own tensor's statistics (min-max, a
percentile, MSE, KL).  What is best for one tensor's own error is not what is best for the
network: a range clipped for the tensor's MSE may cut the few large values a later layer
depends on, and a range stretched to the outliers may waste the grid where the output is
sensitive.  Loss-aware range setting (Nahshan et al. 2019, "Loss Aware Post-training
Quantization") chooses the ranges against the output instead.  This is its greedy form:

    for each static activation quantizer, in the order the graph runs them:
        try its calibrated range [lo, hi] scaled by 2**(k/2), k = -reach .. reach (k != 0),
        and the tensor's whole observed range, each on the first ``batches`` calibration
        batches, every other quantizer as it is now (those before already searched);
        keep the range whose model output is closest to the float model's output.

The float model is the quantized model with every quantizer disabled (BatchNorm folding and the
float-phase steps are in it).  The distance (``objective``): ``"mse"``, the output's squared
error relative to the float output's mean square; ``"kl"``, the KL divergence of the softmax of
the last axis (logits).  The current range is a candidate and wins ties, so the output error on
the searched batches never goes up.

Each candidate re-runs only the part of the torch.fx graph downstream of the quantizer's layer
(``lowbit.nn.replay``), over one recorded run of the model as it is; models fx cannot trace,
and keyword-argument batches, run whole.  Cost per quantizer: one full pass and ``2 * reach + 1``
partial ones per batch.  Export, save and load need nothing new: a range is a scale and a
zero-point, and those are what the quantizer holds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.modules import has_quantizers
from ..nn.quantizer import Quantizer
from ..nn.replay import Replayer
from ..nn.trace import try_trace
from ..nn.walk import first_tensor, fixed_weights, quantizers_by_role, run_model
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


def search_ranges(qmodel: nn.Module, calib_data: Iterable, *, batches: int = 4, reach: int = 2,
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
            references = [_float_output(qmodel, item) for item in items]
            run = _Runs(qmodel, items, references, objective, reach)
            _place(searched, run.replayer)
            before = run.error()
            changed = {}
            for entry in _bar(searched, progress):
                factor = run.choose(entry)
                if factor != 1.0:
                    changed[entry.quantizer.name] = factor
            after = run.error()
    finally:
        qmodel.train(was_training)
    log.info("range_search: output %s %.4g -> %.4g, %d of %d ranges changed", objective, before, after,
             len(changed), len(searched))
    return {"objective": objective, "error_before": before, "error_after": after, "changed": changed}


class _Runs:
    """The searched batches, their float outputs, and the model's runs over them."""

    def __init__(self, qmodel: nn.Module, items: list, references: list[torch.Tensor], objective: str,
                 reach: int) -> None:
        self.qmodel, self.items, self.references, self.objective = qmodel, items, references, objective
        self.reach = reach
        graph_module, _ = try_trace(qmodel)
        self.replayer = None if graph_module is None else Replayer(graph_module)

    def error(self) -> float:
        return sum(self._distance(_model_output(self.qmodel, item), ref)
                   for item, ref in zip(self.items, self.references, strict=True))

    def choose(self, entry: _Searched) -> float | str:
        """Set ``entry``'s quantizer to the candidate range with the least output error; its factor."""
        q = entry.quantizer
        current = (q.scale.clone(), q.zero_point.clone())
        candidates = _candidates(q, current, self.reach)
        errors = [0.0] * len(candidates)
        try:
            for item, ref in zip(self.items, self.references, strict=True):
                replay = self._recorder(item, entry)
                for i, (_, qparams) in enumerate(candidates):
                    q.set_qparams(*qparams)
                    errors[i] += self._distance(replay(), ref)
        finally:
            q.set_qparams(*current)
        best = min(range(len(candidates)), key=lambda i: (errors[i], i))  # the current range (0) wins ties
        q.set_qparams(*candidates[best][1])
        return candidates[best][0]

    def _recorder(self, item, entry: _Searched):
        """``replay()``: the model's output on ``item`` with the quantizer's range as set now."""
        if self.replayer is None or entry.nodes is None or isinstance(item, Mapping):
            return lambda: _model_output(self.qmodel, item)
        values = self.replayer.record(tuple(item) if isinstance(item, (tuple, list)) else (item,))
        return lambda: _as_output(self.replayer.rerun(values, entry.nodes))

    def _distance(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        if self.objective == "kl":
            log_q = F.log_softmax(out.double(), dim=-1)
            log_p = F.log_softmax(ref.double(), dim=-1)
            return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        return float((out.double() - ref.double()).pow(2).mean() / ref.double().pow(2).mean().clamp_min(1e-30))


def _candidates(q: Quantizer, current: tuple[torch.Tensor, torch.Tensor], reach: int) -> list:
    """``[(factor, (scale, zero_point))]``: the current range first (factor 1.0), then it scaled
    by 2**(k/2) within the tensor's observed range, then the whole observed range ("data");
    ranges that give the same grid as an earlier one left out."""
    spec = q.spec
    scale, zero_point = current
    lo = (spec.qmin - zero_point.double()) * scale.double()
    hi = (spec.qmax - zero_point.double()) * scale.double()
    data = _observed_range(q)
    floor = lo if data is None else torch.minimum(lo, data[0])
    ceil = hi if data is None else torch.maximum(hi, data[1])
    ranges: list[tuple[float | str, torch.Tensor, torch.Tensor]] = [
        (round(2 ** (k / 2), 4), torch.maximum(lo * 2 ** (k / 2), floor), torch.minimum(hi * 2 ** (k / 2), ceil))
        for k in range(-reach, reach + 1) if k != 0]
    if data is not None:
        ranges.append(("data", *data))
    out = [(1.0, current)]
    for factor, a, b in ranges:
        qparams = compute_qparams(a.float(), b.float(), spec, q.name)
        if not any(torch.equal(qparams[0], s) and torch.equal(qparams[1], z) for _, (s, z) in out):
            out.append((factor, qparams))
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


@contextlib.contextmanager
def _all_float(qmodel: nn.Module) -> Iterator[None]:
    modes = {id(q): (q, q.mode) for _, _, q in quantizers_by_role(qmodel)}  # a shared quantizer once
    for q, _ in modes.values():
        q.mode = "disabled"
    try:
        yield
    finally:
        for q, mode in modes.values():
            q.mode = mode


def _float_output(qmodel: nn.Module, item) -> torch.Tensor:
    with _all_float(qmodel):
        return _model_output(qmodel, item)


def _model_output(qmodel: nn.Module, item) -> torch.Tensor:
    return _as_output(run_model(qmodel, item))


def _as_output(out) -> torch.Tensor:
    return first_tensor(out).detach()


def _bar(searched: list[_Searched], progress: bool):
    from tqdm.auto import tqdm

    return tqdm(searched, desc="range search", unit="range", disable=not progress)
