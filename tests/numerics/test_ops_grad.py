"""Gradients of fake_quantize: the straight-through estimator and LSQ / LSQ+.

The references are written with plain autograd ops (float64), independently of
ops.py's hand-written backward passes::

    round_ste(t) = t + (round(t) - t).detach()          # forward round, gradient 1
    grad_scaled(p) = p * g + (p - p * g).detach()        # forward p, gradient times g
    x_hat = (clamp(round_ste(x / s) + round_ste(z), qmin, qmax) - round_ste(z)) * s

which yields the formulas of ``_FakeQuantLSQ``: d/dx = 1 inside the range, 0 outside;
d/ds = (q - z) - v * inside; d/dz = -s outside, 0 inside; s and z gradients times g.
(gradcheck is meaningless here: the function is piecewise constant in x.)
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.numerics import INT8_ACTIVATION, UINT8_ACTIVATION, QuantSpec, fake_quantize, lsq_grad_scale

F32, F64 = torch.float32, torch.float64


# -- shared helpers --------------------------------------------------------------------


def per_element(p: torch.Tensor, spec: QuantSpec, shape) -> torch.Tensor:
    """Expand a parameter in ONNX layout to one value per element of a tensor of ``shape``."""
    if spec.granularity == "tensor":
        return p.expand(shape)
    axis = spec.axis % len(shape)
    if spec.granularity == "channel":
        view = [1] * len(shape)
        view[axis] = -1
        return p.reshape(view).expand(shape)
    return p.repeat_interleave(spec.group_size, dim=axis).narrow(axis, 0, shape[axis])  # last group may be short


def round_ste(t):
    return t + (torch.round(t) - t).detach()


def grad_scaled(p, g):
    return p * g + (p - p * g).detach()


def lsq_reference(x, s, z, spec, g):
    """x_hat in float64 with autograd; s, z in ONNX layout (z may be None)."""
    s_el = per_element(grad_scaled(s, g), spec, x.shape)
    v = x / s_el
    if z is None:
        q = torch.clamp(round_ste(v), spec.qmin, spec.qmax)
        return q * s_el
    z_el = per_element(round_ste(grad_scaled(z, g)), spec, x.shape)
    q = torch.clamp(round_ste(v) + z_el, spec.qmin, spec.qmax)
    return (q - z_el) * s_el


def make_case(spec: QuantSpec, shape, seed: int, float_zp: bool):
    gen = torch.Generator().manual_seed(seed)
    pshape = spec.param_shape(shape)
    scale = torch.exp(torch.empty(pshape).uniform_(-5.0, 0.0, generator=gen)).float()
    if spec.symmetric:
        zp = None
    elif float_zp:  # LSQ+: a learnable real zero point, rounded in the forward pass
        zp = torch.empty(pshape).uniform_(spec.qmin + 0.1, spec.qmax - 0.1, generator=gen)
        zp = torch.where((zp - zp.floor() - 0.5).abs() < 0.05, zp + 0.2, zp)  # keep off .5
    else:
        zp = torch.randint(spec.qmin, spec.qmax + 1, pshape, generator=gen, dtype=torch.int32)
    s_el = per_element(scale, spec, shape)
    z_el = 0 if zp is None else per_element(torch.round(zp.float()), spec, shape)
    span = spec.qmax - spec.qmin
    codes = torch.empty(shape).uniform_(spec.qmin - 0.25 * span, spec.qmax + 0.25 * span, generator=gen)
    x = ((codes - z_el) * s_el).float()
    upstream = torch.randn(shape, generator=gen)
    # The float64 reference must make the same rounding decisions as float32 (no near-ties).
    assert torch.equal(torch.round(x / s_el), torch.round(x.double() / s_el.double()).float())
    return x, scale, zp, upstream


def sum_per_param(t: torch.Tensor, spec: QuantSpec, param_shape) -> torch.Tensor:
    """Sum of ``t`` over the elements each parameter covers (the adjoint of per_element)."""
    p = torch.zeros(param_shape, dtype=t.dtype, requires_grad=True)
    (per_element(p, spec, t.shape) * t).sum().backward()
    return p.grad


def inside_mask(x, s_el, z_el, spec):
    """The codes that did not saturate, computed as ONNX does (float32 division)."""
    t = torch.round(x / s_el) + z_el
    return (t >= spec.qmin) & (t <= spec.qmax)


LAYOUTS = [
    pytest.param((40, 30), {}, id="tensor"),
    pytest.param((12, 10), {"granularity": "channel", "axis": 0}, id="channel-axis0"),
    pytest.param((4, 6, 5), {"granularity": "channel", "axis": 1}, id="channel-axis1"),
    pytest.param((8, 12), {"granularity": "group", "axis": 1, "group_size": 4}, id="group-axis1"),
    pytest.param((6, 3, 5), {"granularity": "group", "axis": 0, "group_size": 2}, id="group-axis0"),
    # Ragged: the last group is shorter (10 = 4 + 4 + 2; 7 = 3 + 3 + 1; 6 < 8: one short group).
    pytest.param((8, 10), {"granularity": "group", "axis": 1, "group_size": 4}, id="group-ragged-axis1"),
    pytest.param((7, 3, 5), {"granularity": "group", "axis": 0, "group_size": 3}, id="group-ragged-axis0"),
    pytest.param((5, 6), {"granularity": "group", "axis": -1, "group_size": 8}, id="group-one-short"),
]
GRIDS = [
    pytest.param({"bits": 8}, id="int8-sym"),
    pytest.param({"bits": 4, "narrow_range": True}, id="int4-sym-narrow"),
    pytest.param({"bits": 8, "signed": False, "symmetric": False}, id="uint8-affine"),
    pytest.param({"bits": 3, "symmetric": False}, id="int3-affine"),
]
# LSQ cases: (grid, float zero point?) -- LSQ+ only where the grid has a zero point.
LSQ_GRIDS = [
    pytest.param({"bits": 8}, False, id="int8-sym"),
    pytest.param({"bits": 4, "narrow_range": True}, False, id="int4-sym-narrow"),
    pytest.param({"bits": 8, "signed": False, "symmetric": False}, False, id="uint8-affine-int-zp"),
    pytest.param({"bits": 8, "signed": False, "symmetric": False}, True, id="uint8-affine-float-zp"),
    pytest.param({"bits": 3, "symmetric": False}, False, id="int3-affine-int-zp"),
    pytest.param({"bits": 3, "symmetric": False}, True, id="int3-affine-float-zp"),
]


# -- straight-through estimator --------------------------------------------------------


@pytest.mark.parametrize("shape, layout", LAYOUTS)
@pytest.mark.parametrize("grid", GRIDS)
def test_ste_gradient_is_mask_of_unsaturated_codes(shape, layout, grid):
    spec = QuantSpec(**grid, **layout)
    x, scale, zp, upstream = make_case(spec, shape, seed=len(str(spec)) + len(shape), float_zp=False)
    x = x.requires_grad_()
    s = scale.clone().requires_grad_()
    fake_quantize(x, s, zp, spec).backward(upstream)
    s_el = per_element(scale, spec, shape)
    z_el = 0 if zp is None else per_element(zp, spec, shape)
    mask = inside_mask(x.detach(), s_el, z_el, spec)
    assert torch.equal(x.grad, upstream * mask)
    assert s.grad is None  # the STE does not train the scale
    assert mask.any() and not mask.all()


def test_ste_gradient_at_the_clipping_boundary():
    # Codes landing exactly on qmin / qmax still pass the gradient; one step beyond does not.
    spec = INT8_ACTIVATION
    s = torch.tensor(0.5)
    x = torch.tensor([-129.0, -128.0, -127.0, 126.0, 127.0, 128.0, 127.6, -128.4]) * s
    x.requires_grad_()
    fake_quantize(x, s, None, spec).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_ste_gradient_keeps_input_dtype():
    x = torch.tensor([0.1, 5.0, -5.0], dtype=F64, requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.01), None, INT8_ACTIVATION)
    assert y.dtype == F64
    y.sum().backward()
    assert x.grad.dtype == F64 and x.grad.tolist() == [1.0, 0.0, 0.0]


# -- LSQ / LSQ+ ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape, layout", LAYOUTS)
@pytest.mark.parametrize("grid, float_zp", LSQ_GRIDS)
@pytest.mark.parametrize("explicit_g", [None, 0.37], ids=["default-g", "g=0.37"])
def test_lsq_gradients_match_autograd_reference(shape, layout, grid, float_zp, explicit_g):
    spec = QuantSpec(**grid, **layout)
    x, scale, zp, upstream = make_case(
        spec, shape, seed=3 * len(str(spec)) + int(float_zp), float_zp=float_zp
    )

    # lowbit, float32
    xa = x.clone().requires_grad_()
    sa = scale.clone().requires_grad_()
    za = zp.clone().requires_grad_() if float_zp else zp
    out = fake_quantize(xa, sa, za, spec, learned=True, grad_scale=explicit_g)
    out.backward(upstream)

    # reference, float64, independent formulas
    n_per_scale = x.numel() // max(1, math.prod(spec.param_shape(shape)))
    g = explicit_g if explicit_g is not None else 1 / math.sqrt(n_per_scale * spec.qmax)
    xr = x.double().requires_grad_()
    sr = scale.double().requires_grad_()
    zr = None if zp is None else zp.double().requires_grad_(float_zp)
    ref = lsq_reference(xr, sr, zr, spec, g)
    ref.backward(upstream.double())

    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=0)
    assert torch.equal(xa.grad.double(), xr.grad)  # exactly upstream * inside

    # Parameter gradients are float32 sums of terms that partly cancel, so the tolerance
    # is a few float32 ulps of the sum of the terms' magnitudes, per parameter.
    s_el = per_element(scale.double(), spec, shape)
    z_el = 0.0 if zp is None else per_element(torch.round(zp.double()), spec, shape)
    v = x.double() / s_el
    q = torch.clamp(torch.round(v) + z_el, spec.qmin, spec.qmax)
    up = upstream.double().abs()
    pshape = scale.shape
    mag_s = g * sum_per_param(up * ((q - z_el).abs() + v.abs()), spec, pshape)
    assert sa.grad.shape == pshape and sa.grad.dtype == F32
    assert ((sa.grad.double() - sr.grad).abs() <= 1e-6 * mag_s).all()
    assert (sr.grad != 0).any()
    if float_zp:
        mag_z = g * sum_per_param(up * s_el, spec, pshape)
        assert za.grad.shape == pshape
        assert ((za.grad.double() - zr.grad).abs() <= 1e-6 * mag_z).all()
        assert (zr.grad != 0).any()  # some elements did saturate


def test_lsq_forward_equals_ste_forward():
    gen = torch.Generator().manual_seed(0)
    spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", axis=1, group_size=8)
    x = torch.randn(6, 32, generator=gen)
    scale = torch.rand(6, 4, generator=gen) * 0.3 + 0.01
    zp = torch.randint(0, 16, (6, 4), generator=gen, dtype=torch.int32)
    ste = fake_quantize(x, scale, zp, spec)
    lsq = fake_quantize(x, scale.requires_grad_(), zp, spec, learned=True)
    assert torch.equal(ste, lsq.detach())
    # An integer zero point is used as is but receives no gradient.
    lsq_float = fake_quantize(x, scale, zp.float().requires_grad_(), spec, learned=True)
    assert torch.equal(ste, lsq_float.detach())


def test_lsq_hand_computed_example_symmetric():
    # int8 symmetric, s = 0.1, grad_scale 1: v = [2.6, 200, -200]
    # d/ds = (3 - 2.6) + 127 + (-128) = -0.6 ; d/dx = [1, 0, 0]
    x = torch.tensor([0.26, 20.0, -20.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = fake_quantize(x, s, None, INT8_ACTIVATION, learned=True, grad_scale=1.0)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), torch.tensor([0.3, 12.7, -12.8]))
    assert x.grad.tolist() == [1.0, 0.0, 0.0]
    assert s.grad.item() == pytest.approx(-0.6, abs=1e-5)


def test_lsq_plus_hand_computed_example():
    # uint8 affine, s = 0.1, z = 10.3 (rounds to 10): v = [2.6, 300, -50]
    # codes [13, 255 (sat), 0 (sat)], q - z = [3, 245, -10]
    # d/ds = (3 - 2.6) + 245 - 10 = 235.4 ; d/dz = -s * 2 saturated = -0.2 ; d/dx = [1, 0, 0]
    x = torch.tensor([0.26, 30.0, -5.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    z = torch.tensor(10.3, requires_grad=True)
    y = fake_quantize(x, s, z, UINT8_ACTIVATION, learned=True, grad_scale=1.0)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), torch.tensor([0.3, 24.5, -1.0]))
    assert x.grad.tolist() == [1.0, 0.0, 0.0]
    assert s.grad.item() == pytest.approx(235.4, rel=1e-6)
    assert z.grad.item() == pytest.approx(-0.2, rel=1e-6)


def test_lsq_grad_scale_multiplies_parameter_gradients_only():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 8, generator=gen) * 2
    grads = {}
    for g in (1.0, 0.25):
        xa = x.clone().requires_grad_()
        s = torch.tensor(0.05, requires_grad=True)
        z = torch.tensor(120.2, requires_grad=True)
        fake_quantize(xa, s, z, UINT8_ACTIVATION, learned=True, grad_scale=g).sum().backward()
        grads[g] = (xa.grad, s.grad, z.grad)
    assert torch.equal(grads[1.0][0], grads[0.25][0])
    torch.testing.assert_close(grads[0.25][1], grads[1.0][1] * 0.25)
    torch.testing.assert_close(grads[0.25][2], grads[1.0][2] * 0.25)


def test_lsq_gradient_flows_through_a_reparametrised_scale():
    # A log-scale parameter (common in QAT) gets d/dlog_s = d/ds * s.
    x = torch.linspace(-3, 3, 50)
    log_s = torch.tensor(math.log(0.02), requires_grad=True)
    fake_quantize(x, log_s.exp(), None, INT8_ACTIVATION, learned=True, grad_scale=1.0).sum().backward()
    s = torch.tensor(0.02, requires_grad=True)
    fake_quantize(x, s, None, INT8_ACTIVATION, learned=True, grad_scale=1.0).sum().backward()
    torch.testing.assert_close(log_s.grad, s.grad * 0.02, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "spec, shape, n",
    [
        (QuantSpec(bits=8), (16, 8), 128),
        (QuantSpec(bits=8, granularity="channel", axis=0), (16, 8), 8),
        (QuantSpec(bits=8, granularity="channel", axis=1), (16, 8, 3), 48),
        (QuantSpec(bits=4, granularity="group", axis=1, group_size=4), (16, 8), 4),
        (QuantSpec(bits=4, signed=False, symmetric=False), (5, 5), 25),
        (QuantSpec(bits=2), (1,), 1),
    ],
)
def test_lsq_grad_scale_formula(spec, shape, n):
    assert lsq_grad_scale(torch.empty(shape), spec) == pytest.approx(1 / math.sqrt(n * spec.qmax))


def test_lsq_plus_zero_point_off_the_grid_is_clamped_as_export_stores_it():
    """A learned zero-point that drifted below qmin quantizes as qmin, which is what
    Quantizer.qparams_for (and so export) uses: training and the exported file agree."""
    x = torch.tensor([0.0, 0.5, 2.0])
    s = torch.tensor(0.1, requires_grad=True)
    drifted = fake_quantize(x, s, torch.tensor(-3.2, requires_grad=True), UINT8_ACTIVATION, learned=True)
    on_grid = fake_quantize(x, s.detach(), torch.tensor(0, dtype=torch.int32), UINT8_ACTIVATION)
    torch.testing.assert_close(drifted.detach(), on_grid)
    assert float(drifted[0]) == 0.0  # zero stays exactly representable


# -- learned scale over anchored codes (learn="rescale") ------------------------------------


@pytest.mark.parametrize("shape, layout", LAYOUTS)
@pytest.mark.parametrize("grid", GRIDS)
def test_rescale_gradients_match_autograd_reference(shape, layout, grid):
    """x_hat = s * (clamp(round(x / a) + z) - z) with the anchor a constant: d/dx = s/a inside,
    d/ds = the codes (times g)."""
    spec = QuantSpec(**grid, **layout)
    x, anchor, zp, upstream = make_case(spec, shape, seed=7 * len(str(spec)), float_zp=False)
    scale = anchor * torch.empty_like(anchor).uniform_(0.8, 1.25, generator=torch.Generator().manual_seed(1))
    g = 0.37
    xa, sa = x.clone().requires_grad_(), scale.clone().requires_grad_()
    out = fake_quantize(xa, sa, zp, spec, learned=True, grad_scale=g, anchor=anchor)
    out.backward(upstream)

    xr, sr = x.double().requires_grad_(), scale.double().requires_grad_()
    a_el = per_element(anchor.double(), spec, shape)
    z_el = 0.0 if zp is None else per_element(zp.double(), spec, shape)
    codes = torch.clamp(round_ste(xr / a_el) + z_el, spec.qmin, spec.qmax) - z_el
    ref = codes * per_element(grad_scaled(sr, g), spec, shape)
    ref.backward(upstream.double())

    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-6, atol=0)
    mag = g * sum_per_param(upstream.double().abs() * codes.detach().abs(), spec, scale.shape)
    assert ((sa.grad.double() - sr.grad).abs() <= 1e-6 * mag + 1e-30).all()
    assert (sr.grad != 0).any()


def test_rescale_at_its_anchor_is_the_static_grid_and_lsq_sees_no_gradient_on_it():
    """Weights on their grid (as GPTQ leaves them): at scale == anchor the forward is the static
    fake-quantization; LSQ's scale gradient round(v) - v is 0 there (to rounding), rescale's is
    the codes."""
    spec = QuantSpec(bits=4, granularity="group", axis=1, group_size=8)
    gen = torch.Generator().manual_seed(2)
    scale = torch.rand(6, 2, generator=gen) * 0.1 + 0.01
    codes = torch.randint(spec.qmin, spec.qmax + 1, (6, 16), generator=gen).float()
    w = codes * scale.repeat_interleave(8, dim=1)  # on the grid
    static = fake_quantize(w, scale, None, spec)
    assert torch.equal(static, w)
    grads = {}
    for kind, anchor in (("lsq", None), ("rescale", scale)):
        s = scale.clone().requires_grad_()
        out = fake_quantize(w, s, None, spec, learned=True, grad_scale=1.0, anchor=anchor)
        assert torch.equal(out.detach(), static)
        out.sum().backward()
        grads[kind] = s.grad
    torch.testing.assert_close(grads["rescale"], codes.reshape(6, 2, 8).sum(-1))
    # LSQ: 0 up to the float32 rounding of w = q * s (w / s is q within an ulp)
    assert (grads["lsq"].abs() <= 1e-5 * codes.abs().reshape(6, 2, 8).sum(-1)).all()


def test_rescale_anchor_must_have_the_scale_shape():
    spec = QuantSpec(bits=4, granularity="channel", axis=0)
    with pytest.raises(ValueError, match="anchor"):
        fake_quantize(torch.ones(3, 4), torch.ones(3, requires_grad=True), None, spec, learned=True,
                      anchor=torch.ones(4))
