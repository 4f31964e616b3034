"""Properties of quantize / dequantize / fake_quantize, against a slow numpy reference.

Hypothesis draws the spec (every supported width, signed / unsigned, symmetric /
affine, narrow, per-tensor / per-channel / group, with group sizes that need not divide the
axis), the tensor and the parameters.
Plus the argument checks of the three functions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.numerics import (
    INT8_ACTIVATION,
    INT8_WEIGHT,
    SUPPORTED_BITS,
    UINT8_ACTIVATION,
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    tensor_minmax,
)

F32 = torch.float32
EPS = float(torch.finfo(F32).eps)
PROPERTY = settings(max_examples=60, deadline=None)

# Values stay within +-2**100: ranges wider than FLT_MAX overflow the affine scale, a known
# bug pinned by test_qparams.py::test_huge_affine_range_stays_finite.
FLOATS = st.floats(-(2.0**100), 2.0**100, width=32)
MODERATE = st.floats(-1e4, 1e4, width=32)


# -- strategies ---------------------------------------------------------------------------


@st.composite
def specs_and_shapes(draw):
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    kind = draw(st.sampled_from(["sym", "sym-narrow", "int-affine", "uint-affine"]))
    grid = {
        "sym": {},
        "sym-narrow": {"narrow_range": True},
        "int-affine": {"symmetric": False},
        "uint-affine": {"signed": False, "symmetric": False},
    }[kind]
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    layout = {}
    if granularity != "tensor":
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        layout = {"granularity": granularity, "axis": axis}
        if granularity == "group":
            n = shape[axis]
            # Any size: one that does not divide n leaves a shorter last group, one above n a single group.
            layout["group_size"] = draw(st.integers(1, n + 2))
    return QuantSpec(bits=bits, **grid, **layout), shape


def draw_params(draw, spec: QuantSpec, shape):
    """Any valid scale (2**-20..1e3) and zero point, in the spec's ONNX layout."""
    pshape = spec.param_shape(shape)
    scale = draw(hnp.arrays(np.float32, pshape, elements=st.floats(2.0**-20, 1e3, width=32)))
    if spec.symmetric:
        zp = np.zeros(pshape, np.int32)
    else:
        zp = draw(hnp.arrays(np.int32, pshape, elements=st.integers(spec.qmin, spec.qmax)))
    return torch.from_numpy(scale), torch.from_numpy(zp)


@st.composite
def quant_cases(draw, elements=MODERATE):
    """(spec, x, scale, zero_point) with arbitrary valid parameters (not from x's range)."""
    spec, shape = draw(specs_and_shapes())
    scale, zp = draw_params(draw, spec, shape)
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
    return spec, torch.from_numpy(x), scale, zp


@st.composite
def code_space_cases(draw):
    """Like quant_cases, but x drawn in units of the scale, so every region of the grid
    (interior, both edges, beyond both ends) is hit for every bit width."""
    spec, shape = draw(specs_and_shapes())
    scale, zp = draw_params(draw, spec, shape)
    span = spec.qmax - spec.qmin
    codes = draw(hnp.arrays(np.float64, shape, elements=st.floats(-0.6 * span - 3, 1.6 * span + 3)))
    s_el, z_el = per_element(scale, spec, shape), per_element(zp, spec, shape)
    x = ((torch.from_numpy(codes) + spec.qmin - z_el.double()) * s_el.double()).float()
    return spec, x, scale, zp


def per_element(p: torch.Tensor, spec: QuantSpec, shape) -> torch.Tensor:
    """A parameter in ONNX layout, expanded to one value per element."""
    if spec.granularity == "tensor":
        return p.expand(shape)
    axis = spec.axis % len(shape)
    if spec.granularity == "channel":
        view = [1] * len(shape)
        view[axis] = -1
        return p.reshape(view).expand(shape)
    return p.repeat_interleave(spec.group_size, dim=axis).narrow(axis, 0, shape[axis])  # the last group may be short


def numpy_quantize(x, scale, zp, spec):
    """Slow, independent reference: ONNX QuantizeLinear, element by element in float32."""
    s_el = per_element(scale, spec, x.shape).numpy().astype(np.float32)
    z_el = per_element(zp, spec, x.shape).numpy().astype(np.int64)
    out = np.empty(x.shape, np.int64)
    for idx in np.ndindex(*x.shape):
        v = np.float32(x.numpy()[idx]) / s_el[idx]  # float32 / float32 stays float32
        out[idx] = min(max(int(np.rint(v)) + int(z_el[idx]), spec.qmin), spec.qmax)
    return out


# -- properties ---------------------------------------------------------------------------


@PROPERTY
@given(quant_cases())
def test_quantize_matches_slow_reference(case):
    spec, x, scale, zp = case
    q = quantize(x, scale, zp, spec)
    assert q.dtype == spec.storage_dtype and q.shape == x.shape
    assert np.array_equal(q.to(torch.int64).numpy(), numpy_quantize(x, scale, zp, spec))


@PROPERTY
@given(code_space_cases())
def test_round_trip_error_and_saturation(case):
    spec, x, scale, zp = case
    q = quantize(x, scale, zp, spec).to(torch.int64)
    y = dequantize(q.to(spec.storage_dtype), scale, zp, spec).double()
    s_el = per_element(scale, spec, x.shape).double()
    z_el = per_element(zp, spec, x.shape).double()
    xd = x.double()
    v = xd / s_el  # position on the grid, float64
    inside = (v >= spec.qmin - z_el) & (v <= spec.qmax - z_el)
    slack = 4 * EPS * (xd.abs() + s_el)  # float32 rounding of x / s and of (q - z) * s
    err = (y - xd).abs()
    assert (err[inside] <= s_el[inside] / 2 + slack[inside]).all()
    # Clearly beyond the grid (more than half a step plus float slack): saturated.
    above = v > spec.qmax - z_el + 0.5 + 1e-3
    below = v < spec.qmin - z_el - 0.5 - 1e-3
    assert (q[above] == spec.qmax).all()
    assert (q[below] == spec.qmin).all()
    assert ((q >= spec.qmin) & (q <= spec.qmax)).all()


@PROPERTY
@given(quant_cases(elements=FLOATS))
def test_far_outside_values_saturate(case):
    spec, x, scale, zp = case
    s_el = per_element(scale, spec, x.shape).double()
    z_el = per_element(zp, spec, x.shape).double()
    far = torch.where(x.double() >= 0, 1.0, -1.0) * (spec.qmax - spec.qmin + 10) * s_el
    far = (far - z_el * s_el).float()  # at least span + 10 steps away from the zero point
    q = quantize(far, scale, zp, spec).to(torch.int64)
    assert torch.equal(q, torch.where(far >= 0, spec.qmax, spec.qmin).to(torch.int64))
    huge = torch.where(x >= 0, 3e38, -3e38).to(F32)
    q = quantize(huge, scale, zp, spec).to(torch.int64)
    assert torch.equal(q, torch.where(huge >= 0, spec.qmax, spec.qmin).to(torch.int64))


@PROPERTY
@given(code_space_cases(), st.booleans())
def test_fake_quantize_is_dequantize_of_quantize_bit_for_bit(case, learned):
    spec, x, scale, zp = case
    expected = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
    got = fake_quantize(x, scale, zp, spec, learned=learned)
    assert got.dtype == F32
    assert torch.equal(got, expected)


@PROPERTY
@given(code_space_cases())
def test_fake_quantize_is_idempotent(case):
    spec, x, scale, zp = case
    once = fake_quantize(x, scale, zp, spec)
    assert torch.equal(fake_quantize(once, scale, zp, spec), once)
    # and the codes of a fake-quantized tensor are the codes of the original
    assert torch.equal(quantize(once, scale, zp, spec), quantize(x, scale, zp, spec))


@PROPERTY
@given(specs_and_shapes(), st.data())
def test_round_trip_with_qparams_from_the_tensor(spec_shape, data):
    spec, shape = spec_shape
    x = torch.from_numpy(data.draw(hnp.arrays(np.float32, shape, elements=FLOATS)))
    scale, zp = compute_qparams(*tensor_minmax(x, spec), spec)
    assert (scale > 0).all() and torch.isfinite(scale).all()
    assert ((zp >= spec.qmin) & (zp <= spec.qmax)).all()
    y = fake_quantize(x, scale, zp, spec).double()
    s_el = per_element(scale, spec, shape).double()
    slack = 4 * EPS * (x.double().abs() + s_el)
    assert ((y - x.double()).abs() <= s_el / 2 + slack).all()


@PROPERTY
@given(specs_and_shapes(), st.data())
def test_zero_is_exact_after_compute_qparams(spec_shape, data):
    spec, shape = spec_shape
    pshape = spec.param_shape(shape)
    a = torch.from_numpy(data.draw(hnp.arrays(np.float32, pshape, elements=FLOATS)))
    b = torch.from_numpy(data.draw(hnp.arrays(np.float32, pshape, elements=FLOATS)))
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    scale, zp = compute_qparams(lo, hi, spec)
    zeros = torch.zeros(shape)
    assert torch.equal(fake_quantize(zeros, scale, zp, spec), zeros)
    assert torch.equal(
        quantize(zeros, scale, zp, spec).to(torch.int32), per_element(zp, spec, shape).expand(shape)
    )
    # zeros inside an arbitrary tensor stay exact too
    x = torch.from_numpy(data.draw(hnp.arrays(np.float32, shape, elements=FLOATS)))
    x = torch.where(torch.rand(shape) < 0.5, 0.0, x)
    y = fake_quantize(x, scale, zp, spec)
    assert (y[x == 0] == 0).all()


# -- dtypes and parameter forms -------------------------------------------------------------


def test_docstring_example():
    assert quantize(torch.tensor([0.3, -2.0]), torch.tensor(0.1), None, INT8_ACTIVATION).tolist() == [3, -20]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_storage_dtype_and_dequantize_back(bits, signed):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=signed)
    codes = torch.arange(spec.qmin, spec.qmax + 1, max(1, (spec.qmax - spec.qmin) // 50), dtype=torch.float64)
    z = torch.tensor(0 if signed else 2 ** (bits - 1), dtype=torch.int32)
    s = torch.tensor(0.25)
    x = ((codes - z) * 0.25).float()  # exactly on the grid
    q = quantize(x, s, z, spec)
    assert q.dtype == spec.storage_dtype
    assert torch.equal(q.to(torch.int64), codes.to(torch.int64))
    assert torch.equal(dequantize(q, s, z, spec), x)
    assert q.to(torch.int64).min() == spec.qmin and q.to(torch.int64).max() <= spec.qmax


def test_python_scalars_as_parameters():
    x = torch.tensor([0.26, -1.0, 9.0])
    assert torch.equal(
        quantize(x, 0.1, 128, UINT8_ACTIVATION),
        quantize(x, torch.tensor(0.1), torch.tensor(128, dtype=torch.int32), UINT8_ACTIVATION),
    )
    assert torch.equal(
        fake_quantize(x, 0.1, None, INT8_ACTIVATION), fake_quantize(x, torch.tensor(0.1), 0, INT8_ACTIVATION)
    )
    q = quantize(x, 0.1, 128, UINT8_ACTIVATION)
    assert torch.equal(
        dequantize(q, 0.1, 128, UINT8_ACTIVATION), fake_quantize(x, 0.1, 128, UINT8_ACTIVATION)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_compute_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 16, generator=gen) * 2).to(dtype)
    scale = torch.rand(8, generator=gen) * 0.05 + 0.01
    spec = INT8_WEIGHT
    y = fake_quantize(x, scale, None, spec)
    assert y.dtype == dtype
    assert torch.equal(y, fake_quantize(x.float(), scale, None, spec).to(dtype))
    assert torch.equal(quantize(x, scale, None, spec), quantize(x.float(), scale, None, spec))


def test_empty_tensor():
    x = torch.empty(0, 4)
    spec = QuantSpec(granularity="channel", axis=1)
    scale = torch.ones(4)
    assert quantize(x, scale, None, spec).shape == (0, 4)
    assert fake_quantize(x, scale, None, spec).shape == (0, 4)


def test_float_zero_point_is_rounded_in_both_paths():
    x = torch.linspace(-1, 1, 11)
    s = torch.tensor(0.1)
    z = torch.tensor(2.4)
    expected = fake_quantize(x, s, torch.tensor(2, dtype=torch.int32), UINT8_ACTIVATION)
    assert torch.equal(fake_quantize(x, s, z, UINT8_ACTIVATION, learned=True), expected)
    assert torch.equal(fake_quantize(x, s, z, UINT8_ACTIVATION), expected)


# -- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["quantize", "dequantize", "fake_quantize"])
@pytest.mark.parametrize(
    "spec, x_shape, scale_shape, expected",
    [
        (INT8_ACTIVATION, (4, 6), (1,), r"\(\)"),
        (INT8_WEIGHT, (4, 6), (6,), r"\(4,\)"),
        (INT8_WEIGHT, (4, 6), (), r"\(4,\)"),
        (INT8_WEIGHT, (4, 6), (4, 1), r"\(4,\)"),
        (QuantSpec(bits=4, granularity="group", axis=1, group_size=3), (4, 6), (4, 3), r"\(4, 2\)"),
        (QuantSpec(bits=4, granularity="group", axis=1, group_size=3), (4, 6), (8,), r"\(4, 2\)"),
    ],
)
def test_wrong_scale_shape_explains_expected_shape(fn, spec, x_shape, scale_shape, expected):
    x = torch.zeros(x_shape, dtype=spec.storage_dtype if fn == "dequantize" else F32)
    func = {"quantize": quantize, "dequantize": dequantize, "fake_quantize": fake_quantize}[fn]
    pattern = rf"^fc1\.weight: scale has shape .* but .* on a tensor of shape \(4, 6\) needs {expected}$"
    with pytest.raises(ValueError, match=pattern):
        func(x, torch.ones(scale_shape), None, spec, name="fc1.weight")


def test_wrong_zero_point_shape_raises():
    with pytest.raises(ValueError, match=r"^t: zero_point has shape \(3,\) but .* needs \(\)$"):
        quantize(
            torch.zeros(3), torch.tensor(1.0), torch.zeros(3, dtype=torch.int32), UINT8_ACTIVATION, name="t"
        )


@pytest.mark.parametrize("fn", ["quantize", "dequantize", "fake_quantize", "fake_quantize_learned"])
@pytest.mark.parametrize(
    "spec, scale_shape, fragment",
    [
        (QuantSpec(granularity="channel", axis=2), (4,), "axis 2 is out of range for a tensor of rank 2"),
        (QuantSpec(granularity="channel", axis=-3), (4,), "axis -3 is out of range"),
        # A ragged last group has a scale too: 6 in groups of 4 is 4 + 2, two scales per row.
        (QuantSpec(granularity="group", axis=1, group_size=4), (4, 1), "needs (4, 2)"),
    ],
)
def test_layout_errors_name_the_tensor(fn, spec, scale_shape, fragment):
    x = torch.zeros(4, 6, dtype=spec.storage_dtype if fn == "dequantize" else F32)
    kwargs = {"learned": True} if fn == "fake_quantize_learned" else {}
    func = {"quantize": quantize, "dequantize": dequantize}.get(fn, fake_quantize)
    with pytest.raises(ValueError, match="^layers.2.mlp.weight: ") as info:
        func(x, torch.ones(scale_shape), None, spec, name="layers.2.mlp.weight", **kwargs)
    assert fragment in str(info.value)
