"""Learnable (LSQ / LSQ+) and observing quantizers: the QAT modes of Quantizer."""

import pytest
import torch

from lowbit.nn.quantizer import Quantizer
from lowbit.numerics import INT8_WEIGHT, UINT8_ACTIVATION, fake_quantize


def _calibrated(spec=UINT8_ACTIVATION, x=None):
    q = Quantizer(spec, observer="minmax", name="t")
    q.mode = "calibrating"
    q(torch.linspace(-1, 3, 101) if x is None else x)
    q.freeze()
    return q


def test_make_learnable_keeps_the_forward_and_trains_the_scale():
    q = _calibrated()
    x = torch.randn(64) * 2
    before = q(x)
    scale0 = q.scale.clone()
    q.make_learnable()
    assert isinstance(q.scale, torch.nn.Parameter) and q.mode == "learned" and q.learn == "lsq"
    assert torch.equal(q.scale.detach(), scale0)
    assert [n for n, _ in q.named_parameters()] == ["scale"]  # affine LSQ: zero-point stays an int buffer
    x.requires_grad_(True)
    out = q(x)
    assert torch.equal(out.detach(), before)
    out.pow(2).sum().backward()
    # same gradient as the numerics' LSQ op on the same parameters
    s = scale0.clone().requires_grad_(True)
    fake_quantize(x.detach(), s, q.zero_point, UINT8_ACTIVATION, learned=True).pow(2).sum().backward()
    assert torch.allclose(q.scale.grad, s.grad) and q.scale.grad.abs() > 0


def test_lsq_plus_learns_the_zero_point_of_affine_grids_only():
    q = _calibrated()
    q.make_learnable(offset=True)
    assert q.learn == "lsq+" and isinstance(q.zero_point, torch.nn.Parameter) and q.zero_point.is_floating_point()
    q(torch.linspace(-5, 5, 50)).sum().backward()  # values below the range: zero-point gets a gradient
    assert q.zero_point.grad is not None and q.zero_point.grad.abs() > 0
    w = _calibrated(INT8_WEIGHT, torch.randn(4, 3))
    w.make_learnable(offset=True)  # symmetric: 0 by definition, nothing to learn
    assert w.learn == "lsq" and not isinstance(w.zero_point, torch.nn.Parameter)
    assert w.scale.shape == (4,)


def test_rescale_keeps_the_codes_of_its_anchor_and_scales_them():
    w = torch.randn(4, 8)
    q = _calibrated(INT8_WEIGHT, w)
    before = q(w)
    anchor = q.scale.clone()
    q.make_learnable(rescale=True)
    assert q.learn == "rescale" and q.mode == "learned" and torch.equal(q.anchor, anchor)
    assert [n for n, _ in q.named_parameters()] == ["scale"] and "anchor" in q.state_dict()
    assert torch.equal(q(w), before)  # at its anchor: the static grid
    with torch.no_grad():
        q.scale.mul_(1.1)  # a larger step: the same codes, 1.1x the values (no re-rounding)
    torch.testing.assert_close(q(w), before * 1.1)
    q.to_static(q.scale.detach(), q.zero_point)
    assert q.learn is None and not hasattr(q, "anchor") and q.mode == "static"
    with pytest.raises(ValueError, match="offset"):
        _calibrated().make_learnable(rescale=True, offset=True)


def test_qparams_for_gives_plain_tensors_on_the_grid():
    q = _calibrated()
    q.make_learnable(offset=True)
    with torch.no_grad():
        q.scale.mul_(-1)  # an optimizer step overshooting zero: |scale| is used
        q.zero_point.add_(0.4)
    scale, zp = q.qparams_for(torch.empty(0))
    assert not scale.requires_grad and scale > 0 and zp.dtype == torch.int32
    assert zp == torch.round(q.zero_point.detach()).to(torch.int32)
    x = torch.randn(32)
    assert torch.equal(q(x), fake_quantize(x, scale, zp, UINT8_ACTIVATION))


def test_learnable_without_range_initialises_from_its_first_training_batch():
    q = Quantizer(UINT8_ACTIVATION, observer="minmax", name="act")
    q.make_learnable(shape=())
    assert q.mode == "observing"
    q.eval()
    with pytest.raises(RuntimeError, match="no scale yet"):
        q(torch.randn(4))
    q.train()
    param = q.scale
    x = torch.rand(100) * 4
    q(x)
    assert q.mode == "learned" and q.scale is param  # the optimizer's Parameter object is kept
    assert torch.allclose(q.scale.detach(), torch.tensor(x.max().item() / 255), rtol=1e-6)


def test_observing_mode_observes_in_training_only():
    q = Quantizer(UINT8_ACTIVATION, observer="minmax", name="act")
    q.mode = "observing"
    q.train()
    q(torch.tensor([0.0, 2.0]))
    s = q.scale.clone()
    q.eval()
    q(torch.tensor([0.0, 10.0]))  # evaluation never moves the range
    assert torch.equal(q.scale, s)
    q.train()
    q(torch.tensor([0.0, 10.0]))
    assert q.scale > s


def test_learned_state_round_trips_and_refuses_another_kind():
    q = _calibrated()
    q.make_learnable(offset=True)
    with torch.no_grad():
        q.scale.mul_(1.5)
    fresh = _calibrated(x=torch.linspace(0, 1, 11))
    fresh.make_learnable(offset=True)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(50)
    assert torch.equal(fresh(x), q(x)) and fresh.mode == "learned"
    plain = _calibrated()
    with pytest.raises(ValueError, match="learnable"):
        plain.load_state_dict(q.state_dict())


def test_to_static_and_bad_requests():
    q = _calibrated()
    q.make_learnable()
    x = torch.randn(20)
    expected = q(x).detach()
    q.to_static(*q.qparams_for(x))
    assert q.learn is None and q.mode == "static" and not list(q.parameters())
    assert torch.equal(q(x), expected)
    with pytest.raises(ValueError, match="make_learnable"):
        Quantizer(UINT8_ACTIVATION, name="a").mode = "learned"
    with pytest.raises(ValueError, match="shape"):
        Quantizer(UINT8_ACTIVATION, name="a").make_learnable()
    with pytest.raises(ValueError, match="nothing to learn"):
        Quantizer(UINT8_ACTIVATION, dynamic=True, name="a").make_learnable(shape=())
    with pytest.raises(ValueError, match="already"):
        q2 = _calibrated()
        q2.make_learnable()
        q2.make_learnable()
