"""compute_qparams, tensor_minmax, rows_view, check_finite: known values, edge ranges, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.numerics import (
    INT4_WEIGHT,
    INT8_ACTIVATION,
    INT8_WEIGHT,
    INT8_WEIGHT_PER_TENSOR,
    UINT8_ACTIVATION,
    QuantSpec,
    check_finite,
    compute_qparams,
    fake_quantize,
    rows_view,
    tensor_minmax,
)

F32 = torch.float32
TINY = torch.finfo(F32).tiny

SPECS = [
    UINT8_ACTIVATION,
    INT8_ACTIVATION,
    INT8_WEIGHT_PER_TENSOR,
    QuantSpec(bits=8, symmetric=False),
    QuantSpec(bits=4, signed=False, symmetric=False),
    QuantSpec(bits=4),
    QuantSpec(bits=2, signed=False, symmetric=False),
    QuantSpec(bits=16, signed=False, symmetric=False),
    QuantSpec(bits=16, narrow_range=True),
]


# -- known values -------------------------------------------------------------------------


def test_uint8_affine_known_values():
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), UINT8_ACTIVATION)
    assert scale.dtype == F32 and zp.dtype == torch.int32
    assert scale.item() == pytest.approx(4 / 255, rel=1e-7)
    assert torch.equal(scale, torch.tensor(4.0) / 255)  # float32 arithmetic, bit for bit
    assert zp.item() == 64  # 0 - round(-1 / (4/255)) = round(63.75)


def test_int8_affine_known_values():
    scale, zp = compute_qparams(-1.0, 3.0, QuantSpec(bits=8, symmetric=False))
    assert torch.equal(scale, torch.tensor(4.0) / 255)
    assert zp.item() == -128 + 64


def test_int8_symmetric_narrow_known_values():
    scale, zp = compute_qparams(torch.tensor(-0.5), torch.tensor(1.27), INT8_WEIGHT_PER_TENSOR)
    assert scale.item() == pytest.approx(0.01, rel=1e-7)
    assert torch.equal(scale, torch.tensor(1.27) / 127)
    assert zp.item() == 0 and zp.dtype == torch.int32


def test_int8_symmetric_full_range_uses_half_the_span():
    # qmax - qmin = 255, so amax maps to 127.5 (torch's observers use the same convention).
    scale, zp = compute_qparams(-2.55, 1.0, INT8_ACTIVATION)
    assert torch.equal(scale, torch.tensor(2.55) / 127.5)
    assert zp.item() == 0


def test_symmetric_takes_larger_side():
    scale_neg, _ = compute_qparams(-4.0, 1.0, INT4_WEIGHT.replace(granularity="tensor", axis=None))
    scale_pos, _ = compute_qparams(-1.0, 4.0, INT4_WEIGHT.replace(granularity="tensor", axis=None))
    assert scale_neg.item() == scale_pos.item() == pytest.approx(4.0 / 7.5, rel=1e-7)


def test_positive_only_range_is_widened_to_zero():
    # [2, 3] is widened to [0, 3] so 0 stays exact: scale 3/255, zero point 0.
    scale, zp = compute_qparams(2.0, 3.0, UINT8_ACTIVATION)
    assert torch.equal(scale, torch.tensor(3.0) / 255) and zp.item() == 0
    scale, zp = compute_qparams(-3.0, -2.0, UINT8_ACTIVATION)
    assert torch.equal(scale, torch.tensor(3.0) / 255) and zp.item() == 255


def test_per_channel_ranges_elementwise():
    lo = torch.tensor([-1.0, 0.0, -2.0, 0.5])
    hi = torch.tensor([3.0, 2.55, 0.0, 0.51])
    scale, zp = compute_qparams(lo, hi, UINT8_ACTIVATION)
    assert scale.shape == zp.shape == (4,)
    for i in range(4):
        s_i, z_i = compute_qparams(lo[i], hi[i], UINT8_ACTIVATION)
        assert torch.equal(scale[i], s_i) and torch.equal(zp[i], z_i)
    assert zp.tolist() == [64, 0, 255, 0]


def test_matches_torch_minmax_observer_affine():
    # torch's MinMaxObserver uses the same affine formula (and the same widening to 0).
    from torch.ao.quantization import MinMaxObserver

    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(100, generator=gen) * 5 + torch.randn((), generator=gen) * 3
        obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        obs(x)
        t_scale, t_zp = obs.calculate_qparams()
        lo, hi = tensor_minmax(x, UINT8_ACTIVATION)
        scale, zp = compute_qparams(lo, hi, UINT8_ACTIVATION)
        assert torch.equal(scale.reshape(1), t_scale)
        assert torch.equal(zp.reshape(1), t_zp)


# -- zero / constant ranges -----------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_all_zero_tensor_gets_valid_scale(spec):
    x = torch.zeros(5, 3)
    scale, zp = compute_qparams(*tensor_minmax(x, spec), spec)
    assert scale.item() == 1.0
    assert spec.qmin <= zp.item() <= spec.qmax
    assert torch.equal(fake_quantize(x, scale, zp, spec), x)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("value", [5.0, -5.0, 0.3, -1 / 3, 7.0, 1e-3, -123.456, 1e-30, 3e20])
def test_constant_tensor(spec, value):
    x = torch.full((4, 3), value)  # float32 constant
    scale, zp = compute_qparams(*tensor_minmax(x, spec), spec)
    assert torch.isfinite(scale) and scale.item() > 0
    assert spec.qmin <= zp.item() <= spec.qmax
    y = fake_quantize(x, scale, zp, spec)
    # The range is widened to include 0, so the constant sits at one end of the grid.
    # Affine and narrow symmetric grids put it on a code (up to one float32 rounding of
    # the scale); full-range symmetric puts amax at qmax + 1/2, so it is off by half a step.
    err = (y.double() - x.double()).abs().max().item()
    slack = 2 * torch.finfo(F32).eps * abs(value)  # float32 rounding of the scale and of x / scale
    if not spec.symmetric or spec.narrow_range:
        assert err <= slack
    else:
        assert err <= scale.item() / 2 + slack
    # and 0 is still exact
    assert fake_quantize(torch.zeros(2), scale, zp, spec).eq(0).all()


def test_tiny_range_lifted_to_smallest_normal_scale():
    scale, _ = compute_qparams(0.0, 1e-40, UINT8_ACTIVATION)  # subnormal range
    assert scale.item() == TINY
    scale, _ = compute_qparams(-1e-39, 1e-39, INT8_ACTIVATION)
    assert scale.item() == TINY


def test_huge_symmetric_range_stays_finite():
    scale, zp = compute_qparams(-3e38, 3e38, INT8_ACTIVATION)
    assert zp.item() == 0
    assert torch.isfinite(scale) and scale.item() == pytest.approx(3e38 / 127.5, rel=1e-6)


def test_huge_affine_range_stays_finite():
    scale, zp = compute_qparams(torch.tensor(-3e38), torch.tensor(3e38), UINT8_ACTIVATION)
    assert torch.isfinite(scale)
    y = fake_quantize(torch.tensor([1e38, 0.0]), scale, zp, UINT8_ACTIVATION)
    assert torch.isfinite(y).all()


# -- bad ranges ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("side", ["min", "max"])
def test_non_finite_range_raises_naming_tensor(bad, side):
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    if side == "min":
        lo = torch.tensor(bad)
    else:
        hi = torch.tensor(bad)
    with pytest.raises(ValueError, match=rf"layer3\.conv\.input \({side} of range\)"):
        compute_qparams(lo, hi, UINT8_ACTIVATION, name="layer3.conv.input")


def test_min_greater_than_max_raises():
    with pytest.raises(ValueError, match=r"fc\.out: min of range exceeds max"):
        compute_qparams(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), INT8_ACTIVATION, name="fc.out")


def test_mismatched_range_shapes_raise():
    with pytest.raises(ValueError, match=r"w: min shape \(3,\) != max shape \(4,\)"):
        compute_qparams(torch.zeros(3), torch.ones(4), INT8_WEIGHT, name="w")


# -- tensor_minmax / check_finite --------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_tensor_minmax_rejects_non_finite(bad):
    x = torch.randn(4, 6)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.input: contains") as info:
        tensor_minmax(x, INT8_ACTIVATION, name="encoder.layer.0.input")
    n_nan = 1 if math.isnan(bad) else 0
    assert f"{n_nan} NaN and {1 - n_nan} Inf value(s) out of 24" in str(info.value)


def test_check_finite_counts_and_ignores_integers():
    x = torch.tensor([float("nan"), float("nan"), float("inf"), 1.0])
    with pytest.raises(ValueError, match=r"t: contains 2 NaN and 1 Inf value\(s\) out of 4"):
        check_finite(x, "t")
    check_finite(torch.tensor([1, 2, 3]), "ints")  # integers are always finite
    check_finite(torch.randn(3), "ok")


def test_tensor_minmax_empty_raises():
    with pytest.raises(ValueError, match="x: cannot take the range of an empty tensor"):
        tensor_minmax(torch.empty(0, 3), INT8_ACTIVATION, name="x")


def test_tensor_minmax_layouts():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, generator=gen, dtype=torch.float64)
    lo, hi = tensor_minmax(x, INT8_ACTIVATION)
    assert lo.dtype == hi.dtype == F32 and lo.shape == ()
    assert lo.item() == x.min().float().item() and hi.item() == x.max().float().item()

    lo, hi = tensor_minmax(x, QuantSpec(granularity="channel", axis=1))
    assert torch.equal(hi, x.amax(dim=(0, 2)).float())
    assert torch.equal(lo, x.amin(dim=(0, 2)).float())

    spec = QuantSpec(granularity="group", axis=2, group_size=4)
    lo, hi = tensor_minmax(x, spec)
    assert hi.shape == (4, 6, 2)
    assert torch.equal(hi[..., 0], x[..., :4].amax(-1).float())
    assert torch.equal(hi[..., 1], x[..., 4:].amax(-1).float())
    assert torch.equal(lo[..., 1], x[..., 4:].amin(-1).float())

    spec = QuantSpec(granularity="group", axis=0, group_size=2)
    lo, hi = tensor_minmax(x, spec)
    assert hi.shape == (2, 6, 8)
    assert torch.equal(hi[1], x[2:4].amax(0).float())
    assert torch.equal(lo[0], x[0:2].amin(0).float())


def test_tensor_minmax_does_not_track_gradients():
    x = torch.randn(3, 4, requires_grad=True)
    lo, hi = tensor_minmax(x, INT8_ACTIVATION)
    assert not lo.requires_grad and not hi.requires_grad


@pytest.mark.parametrize(
    "spec, shape",
    [
        (QuantSpec(granularity="channel", axis=2), (3, 4)),
        (QuantSpec(granularity="channel", axis=-3), (3, 4)),
        (QuantSpec(granularity="group", axis=2, group_size=3), (3, 4)),
    ],
)
def test_layout_errors_through_range_paths(spec, shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"^blocks\.0\.attn\.weight: (axis|group_size)"):
        tensor_minmax(x, spec, name="blocks.0.attn.weight")
    with pytest.raises(ValueError, match=r"^blocks\.0\.attn\.weight: (axis|group_size)"):
        rows_view(x, spec, name="blocks.0.attn.weight")


# -- rows_view -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(),
        QuantSpec(granularity="channel", axis=0),
        QuantSpec(granularity="channel", axis=1),
        QuantSpec(granularity="channel", axis=-1),
        QuantSpec(granularity="group", axis=0, group_size=2),
        QuantSpec(granularity="group", axis=1, group_size=3),
        QuantSpec(granularity="group", axis=2, group_size=5),
        QuantSpec(granularity="group", axis=-1, group_size=1),
    ],
    ids=lambda s: s.describe(),
)
def test_rows_view_rows_share_one_scale(spec):
    shape = (4, 6, 5)
    x = torch.arange(120, dtype=F32).reshape(shape)
    rows, param_shape = rows_view(x, spec)
    assert param_shape == spec.param_shape(shape)
    n_params = max(1, torch.Size(param_shape).numel())
    assert rows.shape == (n_params, 120 // n_params)
    # Every element appears exactly once.
    assert torch.equal(rows.flatten().sort().values, x.flatten())
    # Index of the scale each element uses, computed from the ONNX layout directly.
    owner = torch.zeros(shape, dtype=torch.long)
    idx = torch.arange(n_params).reshape(param_shape) if param_shape else torch.tensor(0)
    if spec.granularity == "tensor":
        owner[:] = 0
    elif spec.granularity == "channel":
        axis = spec.axis % 3
        view = [1, 1, 1]
        view[axis] = -1
        owner[:] = idx.reshape(view)
    else:
        axis = spec.axis % 3
        owner[:] = idx.repeat_interleave(spec.group_size, dim=axis)
    for r in range(n_params):
        assert torch.equal(rows[r].sort().values, x[owner == r].sort().values)
