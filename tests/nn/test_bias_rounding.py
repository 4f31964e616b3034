"""_QuantMixin._quant_bias: the simulation adds the bias integer runtimes store, int32 on s_in * s_w.

Reference: ``round(b / step) * step`` in numpy float32 (IEEE division, round half to
even), ``step = s_in * s_w`` per output channel.  The bias stays float (the Parameter
itself) wherever the step is not fixed: dynamic, absent, disabled or uncalibrated
quantizers, per-channel inputs, weight scales along the summed axis.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.nn.modules import QuantConv1d, QuantConv2d, QuantLinear, TensorQuant
from lowbit.numerics import INT8_WEIGHT, INT8_WEIGHT_PER_TENSOR, UINT8_ACTIVATION, QuantSpec, fake_quantize

W8 = TensorQuant(spec=INT8_WEIGHT)
A8 = TensorQuant(spec=UINT8_ACTIVATION)

# name -> (float layer, quantized type, input shape, weight quantizer)
LAYERS = {
    "linear": (lambda: nn.Linear(8, 6), QuantLinear, (4, 8), W8),
    "linear-3d": (lambda: nn.Linear(8, 6), QuantLinear, (2, 5, 8), W8),
    "linear-per-tensor-weight": (lambda: nn.Linear(8, 6), QuantLinear, (4, 8), TensorQuant(spec=INT8_WEIGHT_PER_TENSOR)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), QuantConv1d, (2, 4, 10), W8),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), QuantConv2d, (2, 4, 9, 9), W8),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), QuantConv2d, (2, 4, 7, 7), W8),
}


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _layer(kind: str, *, weight=None, input=A8, bias_scale: float = 0.3):
    """A calibrated quantized layer with a wide input range (s_in 0.3 to 0.5), so that its bias
    grid (s_in * s_w, 5e-4 to 1.2e-3) moves the bias (about ``bias_scale``) far above float noise."""
    make, qtype, shape, w = LAYERS[kind]
    torch.manual_seed(0)
    fmod = make()
    with torch.no_grad():
        fmod.bias.copy_(_rand(fmod.bias.shape[0], seed=1) * bias_scale)
    qmod = qtype.from_float(fmod, name=kind, weight=w if weight is None else weight, input=input)
    wq, iq = qmod.weight_quantizer, qmod.input_quantizer
    if wq is not None:
        wq.observer(qmod.weight)
        wq.freeze()
    if iq is not None and iq.mode != "dynamic":
        iq.mode = "calibrating"
        with torch.no_grad():
            qmod(_rand(*shape, seed=2) * 20)
        iq.freeze()
    return qmod, shape


def _reference(b: torch.Tensor, step: torch.Tensor) -> np.ndarray:
    b, step = b.detach().numpy(), np.broadcast_to(step.numpy(), b.shape)
    codes = np.clip(np.rint(b / step), -(2.0**31), 2.0**31 - 1)  # float32 ops; rint: half to even
    return codes.astype(np.float32) * step


def _bias_free(qmod, x):
    """The layer on its fake-quantized input and weight, without bias."""
    iq, wq = qmod.input_quantizer, qmod.weight_quantizer
    qx = fake_quantize(x, iq.scale, iq.zero_point, iq.spec)
    qw = fake_quantize(qmod.weight, wq.scale, wq.zero_point, wq.spec)
    return F.linear(qx, qw) if isinstance(qmod, nn.Linear) else qmod._conv_forward(qx, qw, None)


def _channels_first(qmod, y: torch.Tensor) -> torch.Tensor:
    """Output as (C_out, everything else): channels are last for Linear, dim 1 for Conv."""
    y = y.movedim(-1 if isinstance(qmod, nn.Linear) else 1, 0)
    return y.reshape(y.shape[0], -1)


@pytest.mark.parametrize("kind", LAYERS)
def test_the_effective_bias_is_on_the_int32_grid(kind):
    qmod, shape = _layer(kind)
    step = qmod.input_quantizer.scale * qmod.weight_quantizer.scale
    want = _reference(qmod.bias, step)
    np.testing.assert_array_equal(qmod._quant_bias().detach().numpy(), want)  # bit for bit
    # ... and it is what the layer adds: output minus the bias-free output (float noise only).
    x = _rand(*shape, seed=3) * 20
    with torch.no_grad():
        added = _channels_first(qmod, qmod(x) - _bias_free(qmod, x))
    np.testing.assert_allclose(added.numpy(), np.broadcast_to(want[:, None], added.shape), rtol=0, atol=1e-5)
    assert np.abs(want - qmod.bias.detach().numpy()).max() > 1e-4  # the grid shows, far above the 1e-5 noise


@pytest.mark.parametrize("kind", LAYERS)
def test_gradients_reach_the_float_bias_straight_through(kind):
    qmod, shape = _layer(kind)
    x = _rand(*shape, seed=4) * 20
    qmod(x).pow(2).sum().backward()
    # Straight-through: d loss / d bias is d loss / d (the bias the layer adds), i.e. the
    # rounding's Jacobian is the identity.  The same loss on a leaf holding that bias:
    added = qmod._quant_bias().detach().requires_grad_()
    y = _channels_first(qmod, _bias_free(qmod, x)) + added[:, None]
    y.pow(2).sum().backward()
    torch.testing.assert_close(qmod.bias.grad, added.grad, rtol=1e-5, atol=1e-5)
    assert qmod.bias.grad.abs().min() > 0 and qmod.weight.grad.abs().sum() > 0


FLOAT_CASES = {  # how a layer ends up without a fixed bias grid -> the layer
    "dynamic input": lambda: _layer("linear", input=TensorQuant(spec=UINT8_ACTIVATION, dynamic=True))[0],
    "no input quantizer (weight-only)": lambda: _layer("linear", input=None)[0],
    "input quantizer disabled": lambda: _set_mode(_layer("linear")[0], "input", "disabled"),
    "input quantizer calibrating": lambda: _set_mode(_layer("linear")[0], "input", "calibrating"),
    "weight quantizer dynamic (QAT)": lambda: _set_mode(_layer("linear")[0], "weight", "dynamic"),
    "per-channel input": lambda: _layer("linear", input=TensorQuant(
        spec=QuantSpec(bits=8, signed=False, symmetric=False, granularity="channel", axis=-1)))[0],
    "weight scales along the summed axis": lambda: _layer(
        "linear", weight=TensorQuant(spec=QuantSpec(bits=8, narrow_range=True, granularity="channel", axis=1)))[0],
}


def _set_mode(qmod, role, mode):
    getattr(qmod, f"{role}_quantizer").mode = mode
    return qmod


@pytest.mark.parametrize("case", FLOAT_CASES)
def test_the_bias_stays_float_without_a_fixed_grid(case):
    qmod = FLOAT_CASES[case]()
    assert qmod._quant_bias() is qmod.bias  # the Parameter itself: export keeps it float too


def test_a_layer_without_bias_has_none():
    qmod = QuantLinear.from_float(nn.Linear(8, 6, bias=False), name="nb", weight=W8, input=A8)
    assert qmod._quant_bias() is None


def _with_scales(b: np.ndarray, s_in: float, s_w: np.ndarray) -> QuantLinear:
    qmod = QuantLinear.from_float(nn.Linear(3, len(b)), name="p", weight=W8, input=A8)
    with torch.no_grad():
        qmod.bias.copy_(torch.from_numpy(b))
    qmod.input_quantizer.set_qparams(torch.tensor(s_in), torch.tensor(128))
    qmod.weight_quantizer.set_qparams(torch.from_numpy(s_w), torch.zeros(len(b), dtype=torch.int32))
    return qmod


_F32 = {"width": 32, "allow_nan": False, "allow_infinity": False, "allow_subnormal": False}


@settings(max_examples=200, deadline=None)
@given(b=st.lists(st.floats(-1e3, 1e3, **_F32), min_size=1, max_size=8),
       s_in=st.floats(2.0**-13, 1.0, **_F32), s_w=st.floats(2.0**-17, 1.0, **_F32))
def test_rounding_moves_a_bias_by_at_most_half_a_step(b, s_in, s_w):
    b = np.asarray(b, np.float32)
    s_w = np.full(len(b), s_w, np.float32) * np.linspace(0.5, 2, len(b), dtype=np.float32)  # per channel
    qmod = _with_scales(b, s_in, s_w)
    step = (qmod.input_quantizer.scale * qmod.weight_quantizer.scale).numpy()
    got = qmod._quant_bias().detach().numpy()
    np.testing.assert_array_equal(got, _reference(qmod.bias, torch.from_numpy(step)))
    assume(np.all(np.abs(b / step) < 2**31))  # beyond, int32 saturates (next test)
    # Half a step, plus float32 rounding of b / step and of n * step (2**-23 relative each).
    assert np.all(np.abs(got - b) <= 0.5 * step + 2**-22 * (np.abs(b) + step))


def test_a_bias_beyond_int32_saturates():
    qmod = _with_scales(np.array([1e6, -1e6, 0.5], np.float32), 1e-3, np.full(3, 1e-3, np.float32))
    got = qmod._quant_bias().detach()
    step = qmod.input_quantizer.scale * qmod.weight_quantizer.scale
    # clamp(..., 2**31 - 1) in float32 is 2**31 (float32 holds no 2**31 - 1); export writes 2**31 - 1,
    # which dequantizes in float32 to the same 2**31 * step.
    assert torch.equal(got[:2], torch.tensor([2.0**31, -(2.0**31)]) * step[:2])
