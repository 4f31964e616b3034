"""Observer statistics of the global batch: the per-forward hook and flattened collectives.

Each observer says how its state combines with the same observer's state on other data
(``Observer.reductions``, ``lowbit.observers.reduction``): per state buffer one of MIN, MAX,
SUM or MEAN, the additive buffers re-expressed first in the frame the merged extremes define
(a histogram's counts on the merged range).  This module only runs those reductions as
collectives, for all observers at once; it knows no observer kind.  An observer that merges
pair by pair instead (``Observer._merge_state``) has its state all-gathered and merged.

``attach_observer_sync(model)``
    installs a ``Quantizer.observe_hook`` on every activation quantizer: in mode ``observing``
    (training) each rank folds its shard of the batch into a fresh batch observer
    (``Observer._batch_observer``), the batch observers are merged across ranks (the global
    batch's statistics: exact for min / max and histogram counts), and every rank folds the
    result into its observer (``Observer._fold_batch``).  Every rank then holds what one
    observer folding the global batch would, bit for bit: min-max and histogram observers
    merge the batch in (their merge is exact), the moving average takes one EMA step towards
    the merged batch extremes.  Cost: one all-reduce of ``2 * rows`` floats per observing
    quantizer per training forward (two for a histogram observer: its counts), nothing once
    the quantizers stop observing (LSQ: after the first batch; ``learn=None``: after
    ``freeze_observers``).  One collective per step cannot give this: each quantizer needs
    the global range before its layer's output exists.
``sync_observers(model, mode="step")``
    the cheaper alternative, called after each optimizer step instead of the hook: one
    flattened all-reduce per step for all observers, of each state with the reductions of its
    batch observer.  Exact when those are all MIN / MAX (min-max, moving average: the
    shared history is folded in once whatever the number of ranks, and the EMA
    ``m + c * (lo - m)`` rounds monotonically in ``lo``), so states equal single-process
    observation of the global batch; but within a step each rank fake-quantizes with its own
    shard's range.  Observers whose batch statistics add up (histograms) are refused.
``sync_observers(model, mode="merge")`` / ``sync_calibration(model)``
    combine observers filled independently on each rank (calibration on shards) with
    ``Observer.merge`` semantics, in three flattened collectives whatever the number of
    quantizers (layouts, MAX, SUM); ``sync_calibration`` then re-installs every calibrated
    range (in place into learned Parameters, so optimizers keep them).  For min-max and
    histogram observers the result is what one process calibrating on all shards computes,
    bit for bit.

Weight quantizers are never reduced: the weights are replicated, not sharded.  Dynamic
activation quantizers (``*-dynamic`` configs) use each rank's own batch range by design.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from ...nn.quantizer import Quantizer
from ...observers import Observer
from ...observers.reduction import ADDITIVE_OPS, StateReduction
from ..prepare import quantizers_by_role
from ._comm import _comm_device, _GroupRef, _world
from .check import _mismatches

SyncMode = Literal["merge", "step"]

_META = 10  # ints per observer in the layout exchange: has_data, ndim, up to 8 dims
_BIG = 2**62


# -- which quantizers are synchronised -----------------------------------------------------
def _synced_quantizers(model: nn.Module) -> list[Quantizer]:
    """Quantizers whose tensor differs between ranks: every non-weight quantizer with an observer."""
    return [q for _, role, q in quantizers_by_role(model) if role != "weight" and q.observer is not None]


# -- merging observers across ranks ----------------------------------------------------------
def _all_reduce(parts: list[torch.Tensor], op, group) -> list[torch.Tensor]:
    """All-reduce the float64 vectors ``parts`` as one flattened payload; the reduced parts."""
    if not parts:
        return []
    sizes = [p.numel() for p in parts]
    comm = _comm_device(group, parts[0].device)
    payload = torch.cat([p.to(comm) for p in parts])
    if payload.numel():  # the sizes follow from the layouts, so every rank skips alike
        dist.all_reduce(payload, op=op, group=group)
    return list(payload.split(sizes))


def _merge_across_ranks(observers: list[Observer], shapes: list[tuple[int, ...]], group, *,
                        count_batches: bool) -> None:
    """Merge each observer with its counterparts on the other ranks (``Observer.merge`` semantics,
    ranks without data included); afterwards it is the same on every rank.  ``count_batches``:
    sum the batch counts too (else each keeps its own)."""
    reducible = [obs._reducible() for obs in observers]
    plans = [StateReduction(obs, shape) for obs, shape, r in zip(observers, shapes, reducible) if r]
    extremes = _all_reduce([p.extremes_payload() for p in plans], dist.ReduceOp.MAX, group)
    additive = [p.additive_payload(e) for p, e in zip(plans, extremes)]
    if count_batches:
        additive = [torch.cat([a, p.observer.num_batches.to(a.device, torch.float64).reshape(1)])
                    for p, a in zip(plans, additive)]
    additive = _all_reduce(additive, dist.ReduceOp.SUM, group)
    for p, e, a in zip(plans, extremes, additive):
        p.load(e, a[:p.n_additive], int(a[-1]) if count_batches else None)
    _gather_merge([obs for obs, r in zip(observers, reducible) if not r], group)


def _gather_merge(observers: list[Observer], group) -> None:
    """Observers that merge pair by pair: all-gather their states, merge them in rank order."""
    if not observers:
        return
    mine = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in obs.state_dict().items()}
            for obs in observers]
    gathered: list = [None] * _world(group)
    dist.all_gather_object(gathered, mine, group=group)
    for i, obs in enumerate(observers):
        shards = []
        for states in gathered:
            shard = obs._fresh()
            shard.load_state_dict(states[i])
            shards.append(shard)
        obs.load_state_dict(obs._fresh().merge(shards).state_dict())


# -- the per-forward hook (exact) ----------------------------------------------------------
class ObserverSync(_GroupRef):
    """``Quantizer.observe_hook`` that folds the global batch's statistics into every rank's
    observer (see the module docstring for why it is exact).

    The observers must be identical on every rank before each call: ``attach_observer_sync``
    checks that once; the hook keeps it so.
    """

    @torch.no_grad()
    def __call__(self, observer: Observer, x: torch.Tensor) -> None:
        if _world(self.group) == 1:
            observer(x)
            return
        batch = observer._batch_observer()
        batch(x)
        _merge_across_ranks([batch], [batch._param_shape()], self.group, count_batches=False)
        observer._fold_batch(batch)


def attach_observer_sync(model: nn.Module, group=None, *, check: bool = True) -> int:
    """Make every activation quantizer of ``model`` observe the global batch (exactly), on
    every rank, from now on.  Returns how many quantizers got the hook.

    Args:
        group: the process group (None: the default one).
        check: first verify that the observers already agree across ranks (one exchange of
            hashes); they must, e.g. fresh from ``prepare_qat`` or after ``sync_calibration``.

    Raises:
        RuntimeError: no process group, or ``check`` found observers that differ between ranks.
        NotImplementedError: an observer that says neither how its state reduces nor how it merges.
    """
    _world(group)
    qs = _synced_quantizers(model)
    for q in qs:
        q.observer._reducible()
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
def _exchange_layouts(observers: list[Observer], group, comm: torch.device) -> list[tuple[int, ...] | None]:
    """Agree on each observer's scale layout (None: no rank has data), in one collective."""
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
            lo[i, 0] = 0
    payload = torch.cat([hi.flatten(), -lo.flatten()]).to(comm)
    dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
    payload = payload.cpu()
    hi, lo = payload[: n * _META].view(n, _META), -payload[n * _META:].view(n, _META)
    layouts = []
    for i, obs in enumerate(observers):
        if hi[i, 0] != 1:
            layouts.append(None)
            continue
        if not torch.equal(hi[i, 1:], lo[i, 1:]):
            raise ValueError(f"{obs.name}: the ranks saw tensors with different scale layouts; an observer must "
                             "watch the same tensor on every rank")
        layouts.append(tuple(int(d) for d in hi[i, 2:2 + int(hi[i, 1])]))
    return layouts


@torch.no_grad()
def sync_observers(model: nn.Module, group=None, *, mode: SyncMode = "merge") -> int:
    """Make every activation observer of ``model`` identical across ranks.  Returns how many
    observers hold data after the call.

    Args:
        group: the process group (None: the default one).
        mode: ``"merge"``: the ranks filled their observers independently (calibration on
            shards; uneven batch counts and ranks without data are fine): each observer is
            merged with its counterparts (``Observer.merge`` semantics: min / max of the
            extremes, mean of the moving averages, exact sum of the histograms, sum of the
            batch counts); three collectives.
            ``"step"``: the observers were identical after the last call and every rank has
            folded one batch since (call it after each optimizer step): min-max and moving
            average become exactly single-process observation of the global batch; batch
            counts stay; one collective.  Histogram observers need the hook
            (``attach_observer_sync``) for this.

    Quantizers in mode ``observing`` take the new range at once; frozen or learned ranges are
    left alone (``sync_calibration`` re-installs those).

    Raises:
        ValueError: scale layouts differ between ranks, or ``mode="step"`` with an observer
            whose batch statistics add up (a histogram) or without data on some rank.
        NotImplementedError: an observer that says neither how its state reduces nor how it merges.
    """
    if mode not in ("merge", "step"):
        raise ValueError(f"sync_observers: mode must be 'merge' or 'step', got {mode!r}")
    world = _world(group)
    qs = _synced_quantizers(model)
    observers = [q.observer for q in qs]
    for obs in observers:
        obs._reducible()
    if not observers or world == 1:
        return sum(obs.has_data for obs in observers)
    comm = _comm_device(group, observers[0].num_batches.device)
    if mode == "step":
        _sync_step(observers, group)
    else:
        layouts = _exchange_layouts(observers, group, comm)
        held = [(obs, shape) for obs, shape in zip(observers, layouts) if shape is not None]
        _merge_across_ranks([obs for obs, _ in held], [shape for _, shape in held], group, count_batches=True)
    for q in qs:
        if q.mode == "observing" and q.observer.has_data:
            learnable = q.learn is not None
            q.set_qparams(*q.observer.qparams())
            if not learnable:
                q.mode = "observing"  # set_qparams made it static; it keeps observing
    return sum(obs.has_data for obs in observers)


def _step_reduction(obs: Observer) -> StateReduction:
    """The state reduced with the reductions of its batch observer, which must be MIN / MAX only:
    those fold the ranks' shared history in once, where a SUM would count it once per rank."""
    ops = type(obs._batch_observer()).reductions
    additive = [name for name, op in ops.items() if op in ADDITIVE_OPS]
    if additive or not ops:
        raise ValueError(f"{obs.name}: sync_observers(mode='step') cannot reduce a {type(obs).__name__} (the "
                         f"statistics of its batches add up: {', '.join(additive) or 'pairwise merge'}; summed "
                         "with the shared history); use attach_observer_sync")
    return StateReduction(obs, ops=ops)


def _sync_step(observers: list[Observer], group) -> None:
    plans = [_step_reduction(obs) for obs in observers if obs.has_data]
    total = sum(p.n_extremes for p in plans)
    # The first two entries check that every rank sends the same layout.
    check = torch.tensor([float(total), -float(total)], dtype=torch.float64)
    reduced = _all_reduce([check, *[p.extremes_payload() for p in plans]], dist.ReduceOp.MAX, group)
    if reduced[0][0] != total or -reduced[0][1] != total:
        raise ValueError("sync_observers(mode='step'): the ranks' observers hold different numbers of rows "
                         "(some rank has an observer without data); use mode='merge' once first")
    for p, extremes in zip(plans, reduced[1:]):
        p.load(extremes, extremes[:0])


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
_LEARN_CODES = (None, "lsq", "lsq+", "rescale")


def _check_same_modes(qs: list[Quantizer], group) -> None:
    if not qs or _world(group) == 1:
        return
    codes = torch.tensor([_MODE_CODES.index(q.mode) * len(_LEARN_CODES) + _LEARN_CODES.index(q.learn) for q in qs],
                         dtype=torch.int64)
    payload = torch.cat([codes, -codes]).to(_comm_device(group, torch.device("cpu")))
    dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
    payload = payload.cpu()
    bad = [q.name for q, hi, lo in zip(qs, payload[:len(qs)], -payload[len(qs):]) if hi != lo]
    if bad:
        raise RuntimeError(f"quantizers in different modes on different ranks: {', '.join(bad[:5])}; usually a "
                           "rank's calibration shard never reached them (they were disabled there): give every "
                           "rank calibration batches that reach every layer")

