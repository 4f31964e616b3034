"""Data-parallel QAT: keep every rank's quantization state identical under DDP.

DDP keeps the *parameters* of its replicas identical: it broadcasts them once and averages
their gradients, so learned scales (LSQ / LSQ+ Parameters) stay identical by themselves
(though not equal to one process on the global batch: see ``rescale_lsq_gradients``).
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
shard alone.  With this package's synchronisation, use ``broadcast_buffers=False``
(``forward_sync_buffers=False`` from torch 2.13): the buffers stay identical by themselves.)

This package gives every rank the statistics of the *global* batch:

``prepare_ddp(model)``
    what to call once per rank, after ``prepare_qat`` and before wrapping the model in DDP:
    ``sync_calibration`` + ``sync_batchnorm`` + ``rescale_lsq_gradients`` +
    ``attach_observer_sync``.
``attach_observer_sync(model)``, ``sync_observers(model, mode=...)``, ``sync_calibration(model)``
    every rank's activation observers hold what one observer folding the global batch would:
    per training forward (the hook, exact), after each optimizer step (cheaper), or once after
    calibrating on shards; ``observers`` says why each reduction is exact and what it costs.
``sync_batchnorm(model)``
    ``QuantConvBn2d`` layers normalise with the batch statistics of all ranks (``batchnorm``).
``rescale_lsq_gradients(model)``
    LSQ's gradient scale ``1 / sqrt(N * qmax)`` counts the elements of the *batch*, so on
    ``world`` ranks the activation-range gradients come out ``sqrt(world)`` times larger than
    in one process on the global batch; a gradient hook multiplies them by ``1 / sqrt(world)``.
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

(also exported from ``lowbit.qat``.)  A runnable version:
``torchrun --standalone --nproc-per-node 2 -m lowbit.examples.qat_ddp --reference``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

from torch import nn

from ...nn.conv_bn import QuantConvBn2d
from ...nn.quantizer import Quantizer
from ._comm import _none as _none  # old pickles of a _GroupRef name lowbit.qat.distributed._none
from ._comm import _world
from .batchnorm import BatchNormSync, sync_batchnorm
from .check import replica_mismatches
from .observers import (
    ObserverSync,
    SyncMode,
    _synced_quantizers,
    attach_observer_sync,
    sync_calibration,
    sync_observers,
)

__all__ = [
    "BatchNormSync",
    "DDPSetup",
    "ObserverSync",
    "SyncMode",
    "attach_observer_sync",
    "detach_sync",
    "prepare_ddp",
    "replica_mismatches",
    "rescale_lsq_gradients",
    "sync_batchnorm",
    "sync_calibration",
    "sync_observers",
]


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


# -- undoing it ---------------------------------------------------------------------------
def detach_sync(model: nn.Module) -> int:
    """Remove every hook this package installed (observers, BatchNorms and LSQ gradients
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
