"""Conv2d + BatchNorm2d as one layer, for quantization-aware training.

PTQ folds an eval-mode BatchNorm into the conv before quantizing (``passes.fold_batchnorm``).
QAT cannot simply do that: during training BatchNorm normalises with the statistics of
each batch, and those move.  Following Jacob et al. (2018) and Krishnamoorthi (2018,
section 3.2), the quantized layer fake-quantizes the weight *as it will be folded*,
``w * gamma / sigma_running``, and in training undoes the running-statistics scaling
after the conv so BatchNorm can apply the batch statistics::

    factor = gamma / sqrt(running_var + eps)                 # (C_out,)
    y      = conv(x_q, fq(w * factor)) / factor + b          # = conv(x_q, w_q') + b, w_q' on the folded grid
    out    = batch_norm(y)                                   # batch statistics; updates running ones

Once BatchNorm is frozen (``freeze_bn``) or the model is in eval mode, the layer is the
folded conv: ``conv(x_q, fq(w * factor)) + (b - mean) * factor + beta``, which is exactly
what ``to_quant_conv`` turns it into for export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantConv2d, QuantLayer, adopt


def _per_channel(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


class _DivideChannels(torch.autograd.Function):
    """``y / factor`` with one factor per channel (dim 1 of NCHW), differentiable in both.

    Autograd's own division spends three full-size temporaries on the factor's gradient
    (``-grad * y / factor**2``); here it is one product, reduced:
    ``d/d factor = -sum(grad * out) / factor`` over the batch and spatial positions.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        out = y / _per_channel(factor, y.dim(), 1)
        ctx.save_for_backward(out, factor)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, factor = ctx.saved_tensors
        grad_y = grad / _per_channel(factor, grad.dim(), 1) if ctx.needs_input_grad[0] else None
        grad_factor = None
        if ctx.needs_input_grad[1]:
            dims = [d for d in range(grad.dim()) if d != 1]
            grad_factor = -(grad * out).sum(dims) / factor
        return grad_y, grad_factor


class ConvBn2d(nn.Conv2d):
    """A Conv2d and the BatchNorm2d that follows it (``self.bn``), in float.

    Built by ``lowbit.qat`` from a (conv, bn) pair so the two can be quantized together;
    its forward is ``bn(conv(x))``.
    """

    bn: nn.BatchNorm2d

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("build a ConvBn2d from a pair: ConvBn2d.from_pair(conv, bn)")

    @classmethod
    def from_pair(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> ConvBn2d:
        """Wrap ``conv`` and ``bn`` (parameters and buffers shared, not copied)."""
        if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:
            raise TypeError(f"ConvBn2d pairs an nn.Conv2d with an nn.BatchNorm2d, got "
                            f"{type(conv).__name__} and {type(bn).__name__}")
        if bn.num_features != conv.out_channels or bn.running_var is None:
            raise ValueError(f"BatchNorm2d({bn.num_features}, track_running_stats={bn.running_var is not None}) "
                             f"cannot fold into a conv with {conv.out_channels} outputs")
        fused = adopt(cls, conv)
        fused.bn = bn
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self._conv_forward(x, self.weight, self.bias))


class QuantConvBn2d(QuantLayer, ConvBn2d):
    """ConvBn2d with fake-quantized input and folded weight; BatchNorm trains until frozen.

    ``bn_frozen``: use (and stop updating) the running statistics even in training mode,
    as Krishnamoorthi (2018) recommends for the last part of QAT.
    """

    _float_type = ConvBn2d
    bn_frozen: bool = False
    # ``bn_sync(y, bn, momentum)`` replaces ``F.batch_norm`` in training (batch statistics):
    # ``lowbit.qat.distributed.sync_batchnorm`` sets one that reduces them across ranks.
    bn_sync = None

    def _fold_factor(self) -> torch.Tensor:
        bn = self.bn
        factor = torch.rsqrt(bn.running_var + bn.eps)
        return factor if bn.weight is None else bn.weight * factor

    def _folded_weight(self) -> torch.Tensor:
        return self.weight * _per_channel(self._fold_factor(), self.weight.dim(), 0)

    def _folded_bias(self) -> torch.Tensor:
        bn = self.bn
        b = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        return (b - bn.running_mean) * self._fold_factor() + beta

    def _quant_weight(self) -> torch.Tensor:
        w = self._folded_weight()
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def quantized_weight_source(self) -> torch.Tensor:
        """The tensor the weight quantizer sees: the BN-folded weight."""
        return self._folded_weight()

    def quantized_bias_source(self) -> torch.Tensor:
        """The BN-folded bias (running statistics), as evaluation adds it."""
        return self._folded_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_input(x)
        w = self._quant_weight()
        if self.training and not self.bn_frozen:
            y = _DivideChannels.apply(self._conv_forward(x, w, None), self._fold_factor())
            if self.bias is not None:
                y = y + _per_channel(self.bias, 4, 1)
            bn = self.bn
            if self.bn_sync is None:
                y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                                 _momentum(bn), bn.eps)
            else:  # statistics of the batch across ranks (lowbit.qat.distributed.sync_batchnorm)
                y = self.bn_sync(y, bn, _momentum(bn))
        else:
            y = self._conv_forward(x, w, self._round_bias(self._folded_bias()))
        return self._quant_output(y)

    def get_extra_state(self) -> dict:
        return {"bn_frozen": bool(self.bn_frozen)}

    def set_extra_state(self, state: dict) -> None:
        self.bn_frozen = bool(state.get("bn_frozen", False))

    @torch.no_grad()
    def to_quant_conv(self) -> QuantConv2d:
        """The equivalent QuantConv2d with BatchNorm folded in (running statistics), sharing
        this layer's quantizers: what export and PTQ tools understand."""
        conv = adopt(QuantConv2d, self)
        conv.__dict__.pop("bn_frozen", None)
        conv.__dict__.pop("bn_sync", None)
        conv._parameters = {"weight": nn.Parameter(self._folded_weight().detach().clone()),
                            "bias": nn.Parameter(self._folded_bias().detach().clone())}
        del conv._modules["bn"]
        return conv


def _momentum(bn: nn.BatchNorm2d) -> float:
    """BatchNorm's update factor; ``momentum=None`` is a cumulative average, as in nn.BatchNorm."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum
