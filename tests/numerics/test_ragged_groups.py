"""Group-wise specs whose group size does not divide the axis: the last group is shorter.

ONNX (opset 21 blocked Quantize/DequantizeLinear) gives the scale ``ceil(D / B)`` entries along the
axis and ONNX Runtime runs it (tests/numerics/test_ops_onnx.py checks both, bit for bit).  Here:
the layout helpers, and quantize / dequantize / fake_quantize / tensor_minmax against a naive loop
that handles one group at a time as a tensor of its own (each group is then a whole group).
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.numerics import (
    QuantSpec,
    compute_qparams,
    dequantize,
    expand_param,
    fake_quantize,
    group_padding,
    quantize,
    ragged_rows,
    rows_view,
    tensor_minmax,
)
from lowbit.numerics.qparams import group_view, ungroup

# (shape, axis, group size): SmolLM2's 576 in groups of 128 (4 x 128 + 64), a 3-D tensor, axis 0,
# and a group wider than its axis (one short group).
CASES = [
    pytest.param((6, 576), 1, 128, id="576-g128"),
    pytest.param((3, 10, 4), 1, 4, id="3d-axis1"),
    pytest.param((7, 5), 0, 3, id="axis0"),
    pytest.param((4, 40), -1, 128, id="one-short-group"),
]
GRIDS = [
    pytest.param({"bits": 4}, id="int4-sym"),
    pytest.param({"bits": 4, "signed": False, "symmetric": False}, id="uint4-affine"),
    pytest.param({"bits": 3}, id="int3-sym"),
    pytest.param({"bits": 8, "narrow_range": True}, id="int8-narrow"),
]


def _spec(grid: dict, axis: int, group_size: int) -> QuantSpec:
    return QuantSpec(**grid, granularity="group", axis=axis, group_size=group_size)


def _groups(shape, axis: int, group_size: int) -> list[tuple[int, int]]:
    """(start, length) of each group along the axis, the last one possibly shorter."""
    size = shape[axis]
    return [(start, min(group_size, size - start)) for start in range(0, size, group_size)]


def _per_group(fn, x: torch.Tensor, params: list[torch.Tensor | None], spec: QuantSpec) -> torch.Tensor:
    """``fn(chunk, *param_slices, chunk_spec)`` group by group, concatenated along the axis: each
    chunk is one whole group of its own length (the divisible path, checked elsewhere against
    ONNX and torch)."""
    axis = spec.axis % x.dim()
    outs = []
    for g, (start, length) in enumerate(_groups(x.shape, axis, spec.group_size)):
        chunk_spec = spec.replace(group_size=length)
        sliced = [None if p is None else p.narrow(axis, g, 1) for p in params]
        outs.append(fn(x.narrow(axis, start, length), *sliced, chunk_spec))
    return torch.cat(outs, dim=axis)


def _data(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2
    # One row whose values are all positive and one all negative: a padding of zeros would widen
    # the affine range of such a group; copies of a member must not.
    flat = x.view(-1, shape[-1])
    flat[0] = flat[0].abs() + 0.5
    flat[-1] = -flat[-1].abs() - 0.5
    return x


# -- layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis, group_size", CASES)
def test_param_shape_padding_and_ragged_rows(shape, axis, group_size):
    spec = _spec({"bits": 4}, axis, group_size)
    a = axis % len(shape)
    n_groups = math.ceil(shape[a] / group_size)
    param_shape = spec.param_shape(shape)
    assert param_shape == shape[:a] + (n_groups,) + shape[a + 1:]
    assert group_padding(shape, spec) == n_groups * group_size - shape[a] > 0
    rows, _ = rows_view(torch.zeros(shape), spec)
    assert rows.shape == (math.prod(param_shape), group_size)
    index, copies = ragged_rows(shape, spec)
    assert copies == group_padding(shape, spec)
    # The ragged rows are exactly those whose group index along the axis is the last one.
    owner = torch.arange(math.prod(param_shape)).reshape(param_shape)
    assert sorted(index.tolist()) == sorted(owner.select(a, n_groups - 1).flatten().tolist())


def test_divisible_groups_have_no_padding_and_no_copy():
    spec = _spec({"bits": 4}, 1, 32)
    x = torch.randn(4, 64)
    assert group_padding(x.shape, spec) == 0 and ragged_rows(x.shape, spec) is None
    view, axis = group_view(x, spec)
    assert view.data_ptr() == x.data_ptr() and view.shape == (4, 2, 32)  # a reshape, not a copy
    assert ungroup(view, x.shape, spec, axis).data_ptr() == x.data_ptr()
    for other in (QuantSpec(), QuantSpec(granularity="channel", axis=0)):
        assert group_padding(x.shape, other) == 0 and ragged_rows(x.shape, other) is None


@pytest.mark.parametrize("shape, axis, group_size", CASES)
def test_rows_hold_each_group_then_copies_of_its_last_element(shape, axis, group_size):
    spec = _spec({"bits": 4}, axis, group_size)
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    a = axis % len(shape)
    rows, param_shape = rows_view(x, spec)
    rows = rows.reshape(*param_shape, group_size)
    for g, (start, length) in enumerate(_groups(shape, a, group_size)):
        members = x.narrow(a, start, length).movedim(a, -1)  # [..., length], the group's elements
        got = rows.select(a, g)
        assert torch.equal(got[..., :length], members)
        assert torch.equal(got[..., length:], members[..., -1:].expand(*members.shape[:-1], group_size - length))


@pytest.mark.parametrize("shape, axis, group_size", CASES)
def test_group_view_and_ungroup_are_inverse(shape, axis, group_size):
    spec = _spec({"bits": 4}, axis, group_size)
    x = torch.randn(shape)
    view, a = group_view(x, spec)
    back = ungroup(view, x.shape, spec, a)
    assert back.is_contiguous() and torch.equal(back, x)


def test_expand_param_gives_each_element_its_groups_value():
    spec = _spec({"bits": 4}, 1, 4)
    p = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert expand_param(p, (2, 10), spec).tolist() == [[1.0] * 4 + [2.0] * 4 + [3.0] * 2,
                                                       [4.0] * 4 + [5.0] * 4 + [6.0] * 2]
    assert torch.equal(expand_param(torch.tensor([1.0, 2.0]), (2, 3), QuantSpec(granularity="channel", axis=0)),
                       torch.tensor([[1.0] * 3, [2.0] * 3]))
    with pytest.raises(ValueError, match=r"^fc\.weight: parameter has shape \(2, 2\) but .* needs \(2, 3\)$"):
        expand_param(p[:, :2], (2, 10), spec, name="fc.weight")


# -- numerics against a loop over the groups --------------------------------------------------------


@pytest.mark.parametrize("shape, axis, group_size", CASES)
@pytest.mark.parametrize("grid", GRIDS)
def test_ranges_and_qparams_match_a_loop_over_groups(shape, axis, group_size, grid):
    spec = _spec(grid, axis, group_size)
    x = _data(shape, seed=1)
    lo, hi = tensor_minmax(x, spec, name="w")
    a = axis % len(shape)
    for g, (start, length) in enumerate(_groups(shape, a, group_size)):
        chunk = x.narrow(a, start, length)
        assert torch.equal(lo.select(a, g), chunk.amin(a)) and torch.equal(hi.select(a, g), chunk.amax(a))
    scale, zp = compute_qparams(lo, hi, spec)
    for i, ours in enumerate((scale, zp)):
        loop = _per_group(lambda c, _p, sp, i=i: compute_qparams(*tensor_minmax(c, sp), sp)[i], x, [None], spec)
        assert torch.equal(ours, loop)


@pytest.mark.parametrize("shape, axis, group_size", CASES)
@pytest.mark.parametrize("grid", GRIDS)
def test_quantize_dequantize_fake_quantize_match_a_loop_over_groups(shape, axis, group_size, grid):
    spec = _spec(grid, axis, group_size)
    x = _data(shape, seed=2)
    scale, zp = compute_qparams(*tensor_minmax(x, spec), spec)
    q = quantize(x, scale, zp, spec)
    assert q.shape == x.shape and q.dtype == spec.storage_dtype and q.is_contiguous()
    assert torch.equal(q, _per_group(quantize, x, [scale, zp], spec))
    dq = dequantize(q, scale, zp, spec)
    assert torch.equal(dq, _per_group(dequantize, q, [scale, zp], spec))
    fq = fake_quantize(x, scale, zp, spec)
    assert fq.is_contiguous() and torch.equal(fq, dq)
    assert torch.equal(fq, _per_group(fake_quantize, x, [scale, zp], spec))
    # The range of every group, short or not, is its own: its extremes sit at most half a step away.
    step = expand_param(scale, shape, spec)
    assert bool(((fq - x).abs() <= step / 2 + 1e-6 * x.abs()).all())


@pytest.mark.parametrize("shape, axis, group_size", CASES)
@pytest.mark.parametrize("grid", GRIDS)
def test_lsq_gradients_match_a_loop_over_groups(shape, axis, group_size, grid):
    spec = _spec(grid, axis, group_size)
    x = _data(shape, seed=3)
    scale, zp = compute_qparams(*tensor_minmax(x, spec), spec)
    scale = scale * 0.8  # clip some values, so every gradient term is exercised
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    g = 0.01  # the same gradient scale for the whole tensor and for each group on its own

    def leaves():
        zl = None if spec.symmetric else zp.float().clone().requires_grad_()
        return x.clone().requires_grad_(), scale.clone().requires_grad_(), zl

    xs, ss, zs = leaves()
    out = fake_quantize(xs, ss, zs, spec, learned=True, grad_scale=g)
    (out * upstream).sum().backward()

    xl, sl, zl = leaves()
    loop = _per_group(lambda c, s, z, sp: fake_quantize(c, s, z, sp, learned=True, grad_scale=g),
                      xl, [sl, zl], spec)
    (loop * upstream).sum().backward()
    assert torch.equal(out, loop)
    assert torch.equal(xs.grad, xl.grad)
    torch.testing.assert_close(ss.grad, sl.grad, rtol=1e-5, atol=1e-7)  # summed in another order
    if zs is not None:
        torch.testing.assert_close(zs.grad, zl.grad, rtol=1e-5, atol=1e-7)
