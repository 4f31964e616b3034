"""Observers on group-wise specs with a shorter last group (group size not dividing the axis).

``rows_view`` pads a ragged last group with copies of its last element; the extremes stay exact and
the histogram observers discount the copies from their counts.  Reference: a loop over the groups,
one observer per group fed only that group's values (as a whole group of its own length, so no
padding), concatenated along the axis.  Every kind must give the same state and range.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.numerics import QuantSpec, compute_qparams
from lowbit.observers import OBSERVERS, make_observer

CASES = [
    pytest.param((6, 576), 1, 128, id="576-g128"),
    pytest.param((3, 10, 4), 1, 4, id="3d-axis1"),
    pytest.param((7, 5), 0, 3, id="axis0"),
    pytest.param((4, 40), 1, 128, id="one-short-group"),
]
GRIDS = [
    pytest.param({"bits": 4}, id="int4-sym"),
    pytest.param({"bits": 4, "signed": False, "symmetric": False}, id="uint4-affine"),
]
OPTIONS = {"percentile": {"percentile": 99.0, "bins": 256}, "mse": {"bins": 256, "num_candidates": 20},
           "entropy": {"bins": 256}}


def _batches(shape, seed: int) -> list[torch.Tensor]:
    """Three batches whose range grows (the histograms coarsen between them); the first row of
    each is all positive, so a zero padding would change an affine group's range."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(3):
        x = torch.randn(shape, generator=gen) * (1 + 3 * k)
        x.view(-1, shape[-1])[0].abs_().add_(0.25)
        out.append(x)
    return out


def _groups(size: int, group_size: int) -> list[tuple[int, int]]:
    return [(start, min(group_size, size - start)) for start in range(0, size, group_size)]


def _observe(kind: str, spec: QuantSpec, batches: list[torch.Tensor]):
    obs = make_observer(kind, spec, name="w", **OPTIONS.get(kind, {}))
    for x in batches:
        obs(x)
    return obs


def _per_group(kind: str, spec: QuantSpec, batches: list[torch.Tensor], read):
    """``read(observer)`` (tensors in the observer's scale layout) for one observer per group,
    concatenated along the group axis."""
    axis = spec.axis % batches[0].dim()
    parts = []
    for start, length in _groups(batches[0].shape[axis], spec.group_size):
        chunks = [x.narrow(axis, start, length) for x in batches]
        parts.append(read(_observe(kind, spec.replace(group_size=length), chunks)))
    return [torch.cat(p, dim=axis) for p in zip(*parts, strict=True)]


@pytest.mark.parametrize("shape, axis, group_size", CASES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_range_equals_a_loop_over_groups(kind, grid, shape, axis, group_size):
    spec = QuantSpec(**grid, granularity="group", axis=axis, group_size=group_size)
    batches = _batches(shape, seed=len(shape) + group_size)
    obs = _observe(kind, spec, batches)
    lo, hi = obs.compute_range()
    ref_lo, ref_hi = _per_group(kind, spec, batches, lambda o: o.compute_range())
    assert lo.shape == spec.param_shape(shape)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    assert torch.equal(obs.qparams()[0], compute_qparams(ref_lo, ref_hi, spec)[0])


@pytest.mark.parametrize("shape, axis, group_size", CASES)
@pytest.mark.parametrize("kind", ["percentile", "mse", "entropy"])
def test_histograms_count_only_the_data(kind, shape, axis, group_size):
    spec = QuantSpec(bits=4, granularity="group", axis=axis, group_size=group_size)
    batches = _batches(shape, seed=7)
    obs = _observe(kind, spec, batches)
    counts, edges = obs.histogram()
    ref_counts, ref_edges = _per_group(kind, spec, batches, lambda o: o.histogram())
    assert torch.equal(counts, ref_counts) and torch.equal(edges, ref_edges)
    # Each scale counts exactly its group's elements over the batches: the last group's are fewer.
    a = axis % len(shape)
    sizes = torch.tensor([length for _, length in _groups(shape[a], group_size)])
    view = [1] * len(shape)
    view[a] = -1
    expected = (sizes.reshape(view) * len(batches)).expand(spec.param_shape(shape))
    assert torch.equal(counts.sum(-1), expected)


def test_observers_sharing_a_ragged_tensor_and_merging_agree():
    spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", axis=1, group_size=128)
    batches = _batches((5, 576), seed=3)
    # Observers of one tensor share its binning (one batch statistic); the shared counts are discounted once.
    together = [make_observer(kind, spec, **OPTIONS.get(kind, {})) for kind in ("minmax", "mse", "percentile")]
    for x in batches:
        for obs in together:
            obs(x)
    for obs in together:
        alone = _observe(obs.kind, spec, batches)
        assert torch.equal(torch.stack(obs.compute_range()), torch.stack(alone.compute_range()))
    # Merging observers of shards equals one observer of the whole stream.
    shards = [_observe("mse", spec, [x]) for x in batches]
    merged = shards[0].merge(shards[1:])
    whole = _observe("mse", spec, batches)
    assert torch.equal(merged.counts, whole.counts)
    assert torch.equal(torch.stack(merged.compute_range()), torch.stack(whole.compute_range()))
