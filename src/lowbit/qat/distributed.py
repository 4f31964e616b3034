"""Data-parallel QAT: keep every rank's quantization state identical under DDP.

DDP keeps the *parameters* of its replicas identical: it broadcasts them once and averages
their gradients, so learned scales (LSQ / LSQ+ Parameters) stay identical by themselves.
What it does not handle is the state a forward pass computes from the data each rank sees:

* observer statistics (the ranges of ``observing`` quantizers and of the first training
  batch of learnable quantizers, and calibration ranges when each rank calibrates on its
  shard): each rank would see only its own shard;
* BatchNorm batch statistics of ``QuantConvBn2d`` (``torch.nn.SyncBatchNorm`` does not know
  this layer: ``convert_sync_batchnorm`` swaps its inner ``bn`` module, whose ``forward`` the
  layer never calls, so nothing is synchronised).  They scale the folded weight the weight
  quantizer sees, so per-rank statistics also give per-rank weight grids.

(DDP's ``broadcast_buffers=True``, its default, copies rank 0's buffers over the other ranks
before every forward: replicas then agree, but every observer and BatchNorm tracks rank 0's
shard alone.  With this module's synchronisation, use ``broadcast_buffers=False``.)

This module gives every rank the statistics of the *global* batch:

``prepare_ddp(model)``
    what to call once per rank, after ``prepare_qat`` and before wrapping the model in DDP:
    ``sync_calibration`` + ``sync_batchnorm`` + ``attach_observer_sync``.
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
``sync_batchnorm(model)``
    ``QuantConvBn2d`` layers normalise with the batch statistics of all ranks (one all-reduce
    of ``world * (2 * C + 1)`` numbers per layer per training forward, differentiable, as
    ``SyncBatchNorm``), so BatchNorm equals single-process BatchNorm of the global batch.
``replica_mismatches(model)``
    the names of parameters and buffers (scales, zero-points, observer and BatchNorm state)
    that differ between ranks, bit for bit: what the tests assert empty.

Weight quantizers are never reduced: the weights are replicated, not sharded.  Dynamic
activation quantizers (``*-dynamic`` configs) use each rank's own batch range by design.
Every rank must run the same number of training forwards (as DDP itself requires).

    dist.init_process_group("gloo")                       # "nccl" on GPUs
    qmodel = lowbit.prepare_qat(model, "w4a8", calib_data=my_shard_of_batches)
    lowbit.qat.prepare_ddp(qmodel)
    ddp = DDP(qmodel, broadcast_buffers=False)
    ... usual training loop on ddp ...
    assert not lowbit.qat.replica_mismatches(qmodel)     # optional check, e.g. at the end
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..nn.conv_bn import QuantConvBn2d
from ..nn.quantizer import Quantizer
from ..observers import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, Observer
from .prepare import quantizers_by_role

log = logging.getLogger(__name__)

SyncMode = Literal["merge", "step"]

_FAMILIES = (HistogramObserver, MovingAverageMinMaxObserver, MinMaxObserver)  # most specific first
_META = 10  # ints per observer in the layout exchange: has_data, ndim, up to 8 dims
_BIG = 2**62


# -- process groups ------------------------------------------------------------------------
def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("lowbit.qat.distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group (torchrun sets the environment) first")
    return dist.get_world_size(group)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where a collective's payload must live for this group's backend."""
    backend = str(dist.get_backend(group))
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device()) if device.type != "cuda" else device
    return device  # mixed backends ("cpu:gloo,cuda:nccl") dispatch on the tensor's device


class _GroupRef:
    """Holds a process group for a hook stored on a module.

    Deep copies share it (a copy of a model in the same process lives in the same group, and
    process groups cannot be copied: ``convert`` and export deep-copy the model), and pickling
    drops it (the unpickled attribute is None: the module computes locally again)."""

    def __init__(self, group) -> None:
        self.group = group

    def __deepcopy__(self, memo) -> _GroupRef:
        return self

    def __reduce__(self):
        return (_none, ())


def _none() -> None:
    return None


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


def _rows(obs: Observer) -> int:
    n = 1
    for d in obs.param_shape.tolist():
        n *= int(d)
    return n


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


def detach_sync(model: nn.Module) -> int:
    """Remove every hook this module installed (observers, BatchNorms and LSQ gradients
    compute locally again).  Returns how many were removed."""
    n = 0
    for m in model.modules():
        if isinstance(m, Quantizer):
            if "observe_hook" in m.__dict__:
                del m.__dict__["observe_hook"]
                n += 1
            for p in m.parameters(recurse=False):
                handle = _LSQ_HOOKS.pop(p, None)
                if handle is not None:
                    handle.remove()
                    n += 1
        elif isinstance(m, QuantConvBn2d) and "bn_sync" in m.__dict__:
            del m.__dict__["bn_sync"]
            n += 1
    return n


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


# -- BatchNorm ------------------------------------------------------------------------------
class BatchNormSync(_GroupRef):
    """``QuantConvBn2d.bn_sync``: batch normalisation with the statistics of the batch on all
    ranks, differentiable (as ``torch.nn.SyncBatchNorm``, which needs GPUs).

    Each rank computes its per-channel count, mean and sum of squared deviations, one
    all-reduce gathers them (each rank writes its own slot, so the sum is an exact gather and
    its backward sums every rank's gradient into the slot), and every rank combines them in
    rank order in float64 (Chan et al.'s parallel variance), so all ranks get the same bits.
    """

    def __call__(self, y: torch.Tensor, bn: nn.BatchNorm2d, momentum: float) -> torch.Tensor:
        world = _world(self.group)
        if world == 1:
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)
        import torch.distributed.nn.functional as dist_fn

        channels = y.shape[1]
        dims = [d for d in range(y.dim()) if d != 1]
        n_local = y.numel() // max(channels, 1)
        var, mean = torch.var_mean(y, dim=dims, correction=0)
        local = torch.cat([mean.double(), var.double() * n_local,
                           torch.full((1,), float(n_local), dtype=torch.float64, device=y.device)])
        rank = dist.get_rank(self.group)
        slots = [local if r == rank else torch.zeros_like(local) for r in range(world)]
        gathered = torch.stack(slots)
        comm = _comm_device(self.group, y.device)
        gathered = dist_fn.all_reduce(gathered.to(comm), op=dist.ReduceOp.SUM, group=self.group).to(y.device)
        means, m2s, counts = gathered[:, :channels], gathered[:, channels:2 * channels], gathered[:, 2 * channels:]
        total = counts.sum()
        g_mean = (counts * means).sum(0) / total
        g_var = (m2s + counts * (means - g_mean) ** 2).sum(0) / total
        with torch.no_grad():
            bn.running_mean.mul_(1 - momentum).add_(g_mean.to(bn.running_mean.dtype), alpha=momentum)
            unbiased = g_var * (total / (total - 1).clamp_min(1))
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
        shape = [1] * y.dim()
        shape[1] = channels
        inv = torch.rsqrt(g_var.to(y.dtype) + bn.eps)
        if bn.weight is not None:
            inv = inv * bn.weight
        out = (y - g_mean.to(y.dtype).view(shape)) * inv.view(shape)
        return out if bn.bias is None else out + bn.bias.view(shape)


def sync_batchnorm(model: nn.Module, group=None) -> list[str]:
    """Make every ``QuantConvBn2d`` of ``model`` normalise with the batch statistics of all
    ranks in training.  Returns the names of those layers.

    Other BatchNorm layers (not folded into a conv) are logged as a warning: on GPUs convert
    them with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (it leaves ``QuantConvBn2d``
    alone: that layer never calls its inner module's forward); on CPU they keep per-rank
    statistics.
    """
    _world(group)
    hook = BatchNormSync(group)
    names, inner = [], set()
    for name, m in model.named_modules():
        if isinstance(m, QuantConvBn2d):
            m.bn_sync = hook
            names.append(name)
            inner.add(id(m.bn))
    others = [name for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in inner
              and not isinstance(m, nn.SyncBatchNorm)]
    if others:
        log.warning("sync_batchnorm: %d BatchNorm layer(s) outside QuantConvBn2d keep per-rank batch statistics "
                    "(%s); on GPUs use torch.nn.SyncBatchNorm.convert_sync_batchnorm", len(others),
                    ", ".join(others[:5]))
    return names


# -- LSQ gradient scale -----------------------------------------------------------------------
_LSQ_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Parameter -> hook handle


def rescale_lsq_gradients(model: nn.Module, group=None) -> int:
    """Give learned activation ranges the gradients of one process on the global batch.

    LSQ multiplies scale (and LSQ+ zero-point) gradients by ``1 / sqrt(N * qmax)`` with ``N``
    the elements per scale *in the batch* (``lowbit.numerics.lsq_grad_scale``).  A rank's batch
    holds ``1 / world`` of the global batch's elements, so each rank's activation-range
    gradients, and DDP's average of them, come out ``sqrt(world)`` times larger than one process
    training on the global batch gets (a 41% larger learning rate for those Parameters on 2
    ranks).  This registers a gradient hook on every learned activation scale / zero-point
    multiplying it by ``1 / sqrt(world)`` (shards of equal size assumed, as DDP's averaging
    does).  Weight ranges are unaffected (their ``N`` counts weights).  Returns how many
    Parameters got the hook; ``detach_sync`` removes them.
    """
    factor = 1.0 / math.sqrt(_world(group))
    n = 0
    for q in _synced_quantizers(model):
        if q.learn is None:
            continue
        for p in q.parameters(recurse=False):
            if p in _LSQ_HOOKS:
                continue
            _LSQ_HOOKS[p] = p.register_hook(lambda g, f=factor: g * f)
            n += 1
    return n


# -- all at once ---------------------------------------------------------------------------
@dataclass
class DDPSetup:
    """What ``prepare_ddp`` did on this rank."""

    calibrated_ranges: int  # ranges re-installed from the merged calibration
    observer_hooks: int  # activation quantizers that observe the global batch
    lsq_gradient_hooks: int  # learned activation scales / zero-points rescaled to the global batch
    synced_batchnorms: list[str] = field(default_factory=list)  # QuantConvBn2d layers


def prepare_ddp(model: nn.Module, group=None, *, sync_bn: bool = True, global_batch_lsq: bool = True) -> DDPSetup:
    """Make a model fresh from ``prepare_qat`` (on this rank's shard) train on every rank as one
    process would on the global batch: ``sync_calibration`` (if it was calibrated),
    ``sync_batchnorm`` (unless ``sync_bn=False``), ``rescale_lsq_gradients`` (unless
    ``global_batch_lsq=False``) and ``attach_observer_sync``.  Call it on every rank before
    wrapping the model in ``DistributedDataParallel(model, broadcast_buffers=False)``.

    Example:
        >>> qmodel = lowbit.prepare_qat(model, "w4a8", calib_data=shard, progress=False)
        >>> lowbit.qat.prepare_ddp(qmodel)
        >>> ddp = torch.nn.parallel.DistributedDataParallel(qmodel, broadcast_buffers=False)
    """
    calibrated = sync_calibration(model, group)
    bns = sync_batchnorm(model, group) if sync_bn else []
    lsq = rescale_lsq_gradients(model, group) if global_batch_lsq else 0
    hooks = attach_observer_sync(model, group, check=False)  # just merged: identical by construction
    return DDPSetup(calibrated_ranges=calibrated, observer_hooks=hooks, lsq_gradient_hooks=lsq,
                    synced_batchnorms=bns)


# -- checking ------------------------------------------------------------------------------
def _digests(named: Iterator[tuple[str, object]]) -> dict[str, str]:
    out = {}
    for name, value in named:
        h = hashlib.sha256()
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
        out[name] = h.hexdigest()
    return out


def _mismatches(modules: dict[str, nn.Module], group) -> list[str]:
    named = ((f"{prefix}.{k}", v) for prefix, m in modules.items() for k, v in m.state_dict(keep_vars=True).items())
    return _compare(_digests(named), group)


def _compare(digests: dict[str, str], group) -> list[str]:
    world = _world(group)
    gathered: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(gathered, digests, group=group)
    names = sorted(set().union(*(d.keys() for d in gathered)))
    return [n for n in names if len({d.get(n) for d in gathered}) > 1]


def replica_mismatches(model: nn.Module, group=None) -> list[str]:
    """Names in ``model.state_dict()`` (parameters, buffers, quantizer and observer state) whose
    value differs between ranks, bit for bit (one all-gather of SHA-256 digests).  Empty when
    the replicas are identical.  Every rank must call it."""
    return _compare(_digests(iter(model.state_dict(keep_vars=True).items())), group)
