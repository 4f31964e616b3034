"""Observer statistics of the global batch: the per-forward hook and flattened collectives.

``attach_observer_sync(model)``
    installs a ``Quantizer.observe_hook`` on every activation quantizer: in mode ``observing``
    (training) each rank folds its batch into its observer, then the observers are reduced so
    each holds what one observer would after folding the global batch.  That is exact: for
    min-max the batch min / max are all-reduced (MIN / MAX); for the moving average the
    updated states are reduced with MIN / MAX, which equals the update with the global batch's
    min / max bit for bit, because ``m + c * (lo - m)`` rounds monotonically in ``lo`` and every
    rank starts from the same ``m``; for the histogram observers (percentile, MSE, entropy)
    each rank's new counts are summed on the common range (their merge is exact).  Cost: one
    all-reduce of ``2 * rows`` floats per observing quantizer per training forward (two for a
    histogram observer), nothing once the quantizers stop observing (LSQ: after the first
    batch; ``learn=None``: after ``freeze_observers``).  One collective per step cannot give
    this: each quantizer needs the global range before its layer's output exists.
``sync_observers(model, mode="step")``
    the cheaper alternative, called after each optimizer step instead of the hook: one
    flattened all-reduce per step for all observers; states then equal single-process
    observation of the global batch exactly (min-max and moving average), but within a step
    each rank fake-quantizes with its own shard's range.
``sync_observers(model, mode="merge")`` / ``sync_calibration(model)``
    combine observers filled independently on each rank (calibration on shards): min of the
    minima, max of the maxima, the mean of the moving averages, the exact sum of the
    histograms, in at most three flattened collectives whatever the number of quantizers;
    ``sync_calibration`` then re-installs every calibrated range (in place into learned
    Parameters, so optimizers keep them).  For min-max and histogram observers the result is
    what one process calibrating on all shards computes, bit for bit.

Weight quantizers are never reduced: the weights are replicated, not sharded.  Dynamic
activation quantizers (``*-dynamic`` configs) use each rank's own batch range by design.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from ...nn.quantizer import Quantizer
from ...observers import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, Observer
from ..prepare import quantizers_by_role
from ._comm import _comm_device, _GroupRef, _world
from .check import _mismatches

SyncMode = Literal["merge", "step"]

_FAMILIES = (HistogramObserver, MovingAverageMinMaxObserver, MinMaxObserver)  # most specific first
_META = 10  # ints per observer in the layout exchange: has_data, ndim, up to 8 dims
_BIG = 2**62

# -- which quantizers are synchronised -----------------------------------------------------
def _synced_quantizers(model: nn.Module) -> list[Quantizer]:
    """Quantizers whose tensor differs between ranks: every non-weight quantizer with an observer."""
    return [q for _, role, q in quantizers_by_role(model) if role != "weight" and q.observer is not None]


def _family(obs: Observer) -> type[Observer]:
    for cls in _FAMILIES:
        if isinstance(obs, cls):
            return cls
    raise NotImplementedError(
        f"{obs.name}: lowbit.qat.distributed cannot reduce a {type(obs).__name__} across ranks (it knows "
        "min-max, moving-average and histogram observers); all-gather its state_dict and use "
        "Observer.merge, or pick one of lowbit.observers.OBSERVERS")


# -- the per-forward hook (exact) ----------------------------------------------------------
class ObserverSync(_GroupRef):
    """``Quantizer.observe_hook`` that folds the global batch's statistics into every rank's
    observer (see the module docstring for why each reduction is exact).

    The observers must be identical on every rank before each call: ``attach_observer_sync``
    checks that once; the hook keeps it so.
    """

    @torch.no_grad()
    def __call__(self, observer: Observer, x: torch.Tensor) -> None:
        family = _family(observer)
        if _world(self.group) == 1:
            observer(x)
            return
        if family is HistogramObserver:
            self._histogram(observer, x)
            return
        observer(x)
        device = observer.min_val.device
        payload = torch.cat([-observer.min_val, observer.max_val]).to(_comm_device(self.group, device))
        dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=self.group)
        payload = payload.to(device)
        n = observer.min_val.numel()
        observer.min_val = -payload[:n]
        observer.max_val = payload[n:].clone()

    def _histogram(self, observer: HistogramObserver, x: torch.Tensor) -> None:
        before = copy.deepcopy(observer) if observer.has_data else None
        observer(x)
        device = observer.min_val.device
        comm = _comm_device(self.group, device)
        n = observer.min_val.numel()
        ranges = torch.cat([-observer.min_val.double(), observer.max_val.double(),
                            observer.exponent.double()]).to(comm)
        dist.all_reduce(ranges, op=dist.ReduceOp.MAX, group=self.group)
        ranges = ranges.to(device)
        exponent = ranges[2 * n:].to(torch.int64)
        observer.expand_range(exponent)
        if before is None:
            new_counts = observer.counts
        else:
            before.expand_range(exponent)
            new_counts = observer.counts - before.counts
        new_counts = new_counts.to(comm)
        dist.all_reduce(new_counts, op=dist.ReduceOp.SUM, group=self.group)
        new_counts = new_counts.to(device)
        observer.counts = new_counts if before is None else before.counts + new_counts
        observer.min_val = (-ranges[:n]).float()
        observer.max_val = ranges[n:2 * n].float()


def attach_observer_sync(model: nn.Module, group=None, *, check: bool = True) -> int:
    """Make every activation quantizer of ``model`` observe the global batch (exactly), on
    every rank, from now on.  Returns how many quantizers got the hook.

    Args:
        group: the process group (None: the default one).
        check: first verify that the observers already agree across ranks (one exchange of
            hashes); they must, e.g. fresh from ``prepare_qat`` or after ``sync_calibration``.

    Raises:
        RuntimeError: no process group, or ``check`` found observers that differ between ranks.
        NotImplementedError: an observer kind this module cannot reduce.
    """
    _world(group)
    qs = _synced_quantizers(model)
    for q in qs:
        _family(q.observer)
    if check:
        differing = _mismatches({q.name: q.observer for q in qs}, group)
        if differing:
            raise RuntimeError(f"observers differ between ranks before synchronisation ({', '.join(differing[:5])}"
                               f"{'...' if len(differing) > 5 else ''}); call sync_calibration(model) (or "
                               "sync_observers(model, mode='merge')) first")
    hook = ObserverSync(group)
    for q in qs:
        q.observe_hook = hook
    return len(qs)



# -- post-hoc reduction of whole observer states (flattened collectives) ------------------
@dataclass
class _Layout:
    any_data: bool
    all_data: bool
    shape: tuple[int, ...]
    rows: int


def _exchange_layouts(observers: list[Observer], group, comm: torch.device) -> list[_Layout]:
    """Agree on which observers have data anywhere and on their scale layout (one collective)."""
    n = len(observers)
    hi = torch.full((n, _META), -1, dtype=torch.int64)  # MAX over the ranks that have data
    lo = torch.full((n, _META), _BIG, dtype=torch.int64)  # MIN over them (sent negated)
    for i, obs in enumerate(observers):
        if obs.has_data:
            shape = obs._param_shape()
            if len(shape) > _META - 2:
                raise ValueError(f"{obs.name}: scale layouts of more than {_META - 2} dimensions are not supported")
            row = torch.tensor([1, len(shape), *shape, *([0] * (_META - 2 - len(shape)))], dtype=torch.int64)
            hi[i], lo[i] = row, row
        else:
            lo[i, 0] = 0  # has_data: MIN over all ranks says whether every rank has data
    payload = torch.cat([hi.flatten(), -lo.flatten()]).to(comm)
    dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
    payload = payload.cpu()
    hi, lo = payload[: n * _META].view(n, _META), -payload[n * _META:].view(n, _META)
    layouts = []
    for i, obs in enumerate(observers):
        any_data, all_data = bool(hi[i, 0] == 1), bool(lo[i, 0] == 1)
        if any_data and not torch.equal(hi[i, 1:], lo[i, 1:]):
            raise ValueError(f"{obs.name}: the ranks saw tensors with different scale layouts; an observer must "
                             "watch the same tensor on every rank")
        ndim = int(hi[i, 1]) if any_data else 0
        shape = tuple(int(d) for d in hi[i, 2:2 + ndim])
        rows = 1
        for d in shape:
            rows *= d
        layouts.append(_Layout(any_data, all_data, shape, rows))
    return layouts


def _load_state(obs: Observer, shape: tuple[int, ...], num_batches: torch.Tensor, **state: torch.Tensor) -> None:
    """Install a full observer state through the public ``load_state_dict`` (buffers resized)."""
    sd = obs.state_dict()
    device = obs.num_batches.device
    sd["param_shape"] = torch.tensor(shape, dtype=torch.int64)
    sd["num_batches"] = num_batches.to(torch.int64).reshape(())
    for key, value in state.items():
        sd[key] = value.to(device)
    obs.load_state_dict(sd)


@torch.no_grad()
def sync_observers(model: nn.Module, group=None, *, mode: SyncMode = "merge") -> int:
    """Make every activation observer of ``model`` identical across ranks.  Returns how many
    observers hold data after the call.

    Args:
        group: the process group (None: the default one).
        mode: ``"merge"``: the ranks filled their observers independently (calibration on
            shards; uneven batch counts and ranks without data are fine): min / max of the
            extremes, mean of the moving averages, exact sum of the histograms, sum of the
            batch counts (``Observer.merge`` semantics); three collectives.
            ``"step"``: the observers were identical after the last call and every rank has
            folded one batch since (call it after each optimizer step): min-max and moving
            average become exactly single-process observation of the global batch; batch
            counts stay; one collective.  Histogram observers need the hook
            (``attach_observer_sync``) for this.

    Quantizers in mode ``observing`` take the new range at once; frozen or learned ranges are
    left alone (``sync_calibration`` re-installs those).

    Raises:
        ValueError: scale layouts differ between ranks, or ``mode="step"`` with a histogram
            observer or an observer without data on some rank.
        NotImplementedError: an observer kind this module cannot reduce.
    """
    if mode not in ("merge", "step"):
        raise ValueError(f"sync_observers: mode must be 'merge' or 'step', got {mode!r}")
    world = _world(group)
    qs = _synced_quantizers(model)
    observers = [q.observer for q in qs]
    families = [_family(obs) for obs in observers]
    if not observers or world == 1:
        return sum(obs.has_data for obs in observers)
    device = observers[0].num_batches.device
    comm = _comm_device(group, device)
    if mode == "step":
        _sync_step(observers, families, group, comm)
    else:
        _sync_merge(observers, families, group, comm)
    for q in qs:
        if q.mode == "observing" and q.observer.has_data:
            learnable = q.learn is not None
            q.set_qparams(*q.observer.qparams())
            if not learnable:
                q.mode = "observing"  # set_qparams made it static; it keeps observing
    return sum(obs.has_data for obs in observers)


def _sync_step(observers: list[Observer], families: list[type], group, comm: torch.device) -> None:
    active = [obs for obs in observers if obs.has_data]
    for obs, fam in zip(observers, families):
        if fam is HistogramObserver and obs.has_data:
            raise ValueError(f"{obs.name}: sync_observers(mode='step') cannot reduce a histogram observer "
                             "(its counts would be summed with the shared history); use attach_observer_sync")
    sizes = [obs.min_val.numel() for obs in active]
    total = sum(sizes)
    # The first two entries check that every rank sends the same layout.
    payload = torch.cat([torch.tensor([float(total), -float(total)], dtype=torch.float64),
                         *[torch.cat([-obs.min_val.double().cpu(), obs.max_val.double().cpu()]) for obs in active]])
    payload = payload.to(comm)
    dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
    payload = payload.cpu()
    if payload[0] != total or -payload[1] != total:
        raise ValueError("sync_observers(mode='step'): the ranks' observers hold different numbers of rows "
                         "(some rank has an observer without data); use mode='merge' once first")
    offset = 2
    for obs, n in zip(active, sizes):
        device = obs.min_val.device
        obs.min_val = (-payload[offset:offset + n]).float().to(device)
        obs.max_val = payload[offset + n:offset + 2 * n].float().to(device)
        offset += 2 * n


def _sync_merge(observers: list[Observer], families: list[type], group, comm: torch.device) -> None:
    layouts = _exchange_layouts(observers, group, comm)
    items = [(obs, fam, lay) for obs, fam, lay in zip(observers, families, layouts) if lay.any_data]
    if not items:
        return
    # 1. MAX: the extremes of min-max and histogram observers (minima negated), the histogram
    #    exponents; ranks without data send -inf.
    extremes = []
    for obs, fam, lay in items:
        if fam is MovingAverageMinMaxObserver:
            continue
        k = 3 if fam is HistogramObserver else 2
        if obs.has_data:
            parts = [-obs.min_val.double().cpu(), obs.max_val.double().cpu()]
            if fam is HistogramObserver:
                parts.append(obs.exponent.double().cpu())
            extremes.append(torch.cat(parts))
        else:
            extremes.append(torch.full((k * lay.rows,), float("-inf"), dtype=torch.float64))
    maxed = torch.cat(extremes).to(comm) if extremes else torch.zeros(0, dtype=torch.float64)
    if extremes:
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
    maxed = maxed.cpu()
    # 2. SUM: histogram counts on the common range, moving-average states and the number of
    #    ranks holding them, batch counts.  float64 adds integers exactly below 2**53.
    summed, offset = [], 0
    for obs, fam, lay in items:
        if fam is HistogramObserver:
            exponent = maxed[offset + 2 * lay.rows:offset + 3 * lay.rows].to(torch.int64)
            offset += 3 * lay.rows
            if obs.has_data:
                obs.expand_range(exponent.to(obs.exponent.device))
                summed.append(obs.counts.double().cpu().flatten())
            else:
                summed.append(torch.zeros(lay.rows * obs.bins, dtype=torch.float64))
        elif fam is MovingAverageMinMaxObserver:
            if obs.has_data:
                summed.append(torch.cat([obs.min_val.double().cpu(), obs.max_val.double().cpu(),
                                         torch.ones(1, dtype=torch.float64)]))
            else:
                summed.append(torch.zeros(2 * lay.rows + 1, dtype=torch.float64))
        else:
            offset += 2 * lay.rows
        summed.append(obs.num_batches.double().cpu().reshape(1))
    total = torch.cat(summed).to(comm)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    total = total.cpu()
    # 3. Install the merged states, identical on every rank.
    moff = soff = 0
    for obs, fam, lay in items:
        n = lay.rows
        if fam is HistogramObserver:
            counts = total[soff:soff + n * obs.bins].to(torch.int64).view(n, obs.bins)
            soff += n * obs.bins
            _load_state(obs, lay.shape, total[soff], counts=counts,
                        exponent=maxed[moff + 2 * n:moff + 3 * n].to(torch.int64),
                        min_val=(-maxed[moff:moff + n]).float(), max_val=maxed[moff + n:moff + 2 * n].float())
            moff += 3 * n
        elif fam is MovingAverageMinMaxObserver:
            holders = total[soff + 2 * n]
            _load_state(obs, lay.shape, total[soff + 2 * n + 1],
                        min_val=(total[soff:soff + n] / holders).float(),
                        max_val=(total[soff + n:soff + 2 * n] / holders).float())
            soff += 2 * n + 1
        else:
            _load_state(obs, lay.shape, total[soff], min_val=(-maxed[moff:moff + n]).float(),
                        max_val=maxed[moff + n:moff + 2 * n].float())
            moff += 2 * n
        soff += 1


@torch.no_grad()
def sync_calibration(model: nn.Module, group=None) -> int:
    """After ``prepare_qat(model, config, calib_data=<this rank's shard>)`` on every rank: merge
    the activation observers across ranks (``sync_observers(mode="merge")``) and re-install
    every calibrated range from the merged observer (learned ranges in place, so optimizers
    built already keep their Parameters).  Call it once, before training.

    Returns how many ranges were re-installed.  For min-max and histogram observers they are,
    bit for bit, what one process calibrating on the batches of all ranks gets.

    Raises:
        RuntimeError: a quantizer is in different modes on different ranks (e.g. disabled on a
            rank whose shard never reached it): give every rank calibration data that reaches
            every layer.
    """
    qs = _synced_quantizers(model)
    _check_same_modes(qs, group)
    sync_observers(model, group, mode="merge")
    n = 0
    for q in qs:
        if q.mode in ("static", "learned") and q.observer.has_data:
            q.set_qparams(*q.observer.qparams())
            n += 1
    return n


_MODE_CODES = ("calibrating", "observing", "static", "learned", "dynamic", "disabled")


def _check_same_modes(qs: list[Quantizer], group) -> None:
    if not qs or _world(group) == 1:
        return
    codes = torch.tensor([_MODE_CODES.index(q.mode) * 4 + (0 if q.learn is None else 1 + (q.learn == "lsq+"))
                          for q in qs], dtype=torch.int64)
    payload = torch.cat([codes, -codes]).to(_comm_device(group, torch.device("cpu")))
    dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
    payload = payload.cpu()
    bad = [q.name for q, hi, lo in zip(qs, payload[:len(qs)], -payload[len(qs):]) if hi != lo]
    if bad:
        raise RuntimeError(f"quantizers in different modes on different ranks: {', '.join(bad[:5])}; usually a "
                           "rank's calibration shard never reached them (they were disabled there): give every "
                           "rank calibration batches that reach every layer")

