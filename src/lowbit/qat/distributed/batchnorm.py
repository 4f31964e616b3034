"""BatchNorm of ``QuantConvBn2d`` with the statistics of the global batch (why
``torch.nn.SyncBatchNorm`` cannot do it: see the package docstring).

``sync_batchnorm(model)``
    ``QuantConvBn2d`` layers normalise with the batch statistics of all ranks (one all-reduce
    of ``world * (2 * C + 1)`` numbers per layer per training forward, differentiable, as
    ``SyncBatchNorm``), so BatchNorm equals single-process BatchNorm of the global batch.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...nn.conv_bn import QuantConvBn2d
from ._comm import _comm_device, _GroupRef, _world

log = logging.getLogger(__name__)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (SUM): the gradient of each rank's input is the sum of every
    rank's output gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


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
        gathered = _AllReduceSum.apply(gathered.to(comm), self.group).to(y.device)
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
