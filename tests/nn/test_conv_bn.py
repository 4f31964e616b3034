"""ConvBn2d / QuantConvBn2d: conv and BatchNorm trained together, folded for export."""

import copy

import pytest
import torch
from torch import nn

from lowbit.nn.conv_bn import ConvBn2d, QuantConvBn2d
from lowbit.nn.modules import QuantConv2d, TensorQuant
from lowbit.numerics import INT8_WEIGHT, UINT8_ACTIVATION


def _pair(seed=0, bias=True, groups=1):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=bias, groups=groups)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return conv, bn


def _quant(conv, bn, weight=True, act=True):
    return QuantConvBn2d.from_float(
        ConvBn2d.from_pair(conv, bn), name="c",
        weight=TensorQuant(spec=INT8_WEIGHT) if weight else None,
        input=TensorQuant(spec=UINT8_ACTIVATION) if act else None)


@pytest.mark.parametrize("bias", [True, False])
def test_float_layers_match_conv_then_batchnorm_in_both_modes(bias):
    conv, bn = _pair(bias=bias)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    q = _quant(conv, bn, weight=False, act=False)  # nothing quantized: the folding algebra alone
    x = torch.randn(6, 4, 5, 5)
    q.train(), ref_bn.train()
    torch.testing.assert_close(q(x), ref_bn(ref_conv(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)  # batch statistics were used and tracked
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked == ref_bn.num_batches_tracked == 1
    q.eval(), ref_bn.eval()
    torch.testing.assert_close(q(x), ref_bn(ref_conv(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ConvBn2d.from_pair(ref_conv, ref_bn)(x), ref_bn(ref_conv(x)))


def test_weight_quantizer_sees_the_folded_weight():
    conv, bn = _pair()
    q = _quant(conv, bn)
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(q.quantized_weight_source(), conv.weight * factor.view(-1, 1, 1, 1))


def _calibrate(q, x):
    q.weight_quantizer.observer(q.quantized_weight_source().detach())
    q.weight_quantizer.freeze()
    q.input_quantizer.mode = "calibrating"
    q.eval()
    q(x)
    q.input_quantizer.freeze()


def test_to_quant_conv_is_the_eval_forward_exactly():
    conv, bn = _pair()
    q = _quant(conv, bn)
    x = torch.randn(3, 4, 6, 6)
    _calibrate(q, x)
    folded = q.to_quant_conv()
    assert type(folded) is QuantConv2d and "bn" not in dict(folded.named_children())
    assert folded.weight_quantizer is q.weight_quantizer
    with torch.no_grad():
        assert torch.equal(folded(x), q(x))


def test_frozen_batchnorm_uses_running_statistics_in_training():
    conv, bn = _pair()
    q = _quant(conv, bn)
    x = torch.randn(3, 4, 6, 6)
    _calibrate(q, x)
    q.bn_frozen = True
    q.train()
    stats = bn.running_mean.clone()
    out = q(x)
    assert torch.equal(bn.running_mean, stats)
    q.eval()
    assert torch.equal(out, q(x))
    again = _quant(*_pair())
    again.load_state_dict(q.state_dict())  # the freeze is part of the saved state
    assert again.bn_frozen


def test_gradients_reach_conv_and_batchnorm_parameters():
    conv, bn = _pair()
    q = _quant(conv, bn)
    _calibrate(q, torch.randn(3, 4, 6, 6))
    q.train()
    q(torch.randn(3, 4, 6, 6)).square().mean().backward()
    for p in (conv.weight, conv.bias, bn.weight, bn.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_momentum_none_is_a_cumulative_average():
    conv, bn = _pair()
    bn.momentum = None
    ref_bn = copy.deepcopy(bn)
    ref_conv = copy.deepcopy(conv)
    q = _quant(conv, bn, weight=False, act=False)
    q.train(), ref_bn.train()
    for _ in range(3):
        x = torch.randn(4, 4, 5, 5)
        q(x), ref_bn(ref_conv(x))
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


def test_bad_pairs_are_refused():
    conv, _ = _pair()
    with pytest.raises(TypeError, match="from_pair"):
        ConvBn2d(4, 8, 3)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        ConvBn2d.from_pair(conv, nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match="8 outputs"):
        ConvBn2d.from_pair(conv, nn.BatchNorm2d(5))


def test_channel_division_gradients_match_autograd():
    """The hand-written backward of the training-time un-scaling (y / factor per channel)."""
    from lowbit.nn.conv_bn import _DivideChannels

    torch.manual_seed(0)
    y = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    factor = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(_DivideChannels.apply, (y, factor))
    grad = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    mine = torch.autograd.grad(_DivideChannels.apply(y, factor), (y, factor), grad)
    ref = torch.autograd.grad(y / factor.reshape(1, -1, 1, 1), (y, factor), grad)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b)
