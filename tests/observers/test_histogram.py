"""The streaming power-of-two histogram: exact binning, exact coarsening, exact merge."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.numerics import INT8_ACTIVATION, QuantSpec
from lowbit.observers import PercentileObserver
from lowbit.observers.histogram import coarsen

PER_CHANNEL = QuantSpec(bits=8, granularity="channel", axis=0)


def _reference_counts(values: np.ndarray, bins: int) -> np.ndarray:
    """Bin all of one row's values at once, at the final range, in float64 numpy."""
    amax = float(np.abs(values).max())
    half = bins // 2
    exponent = int(np.frexp(amax)[1]) if amax > 0 else -100  # amax < 2**exponent
    width = 2.0**exponent / half
    idx = np.floor(values.astype(np.float64) / width).astype(np.int64) + half
    assert idx.min() >= 0 and idx.max() < bins  # no value needs clamping
    return np.bincount(idx, minlength=bins)


def _growing_batches(seed: int, n: int, shape=(3, 50)) -> list[torch.Tensor]:
    """Batches whose scale jumps around, so the range has to grow (and coarsen) several times."""
    g = torch.Generator().manual_seed(seed)
    scales = [0.01, 1.0, 0.3, 17.0, 2.0, 300.0, 0.5]
    return [torch.randn(shape, generator=g) * scales[i % len(scales)] for i in range(n)]


@pytest.mark.parametrize("spec", [INT8_ACTIVATION, PER_CHANNEL], ids=["tensor", "channel"])
def test_counts_equal_binning_everything_at_the_final_range(spec):
    bins = 256
    batches = _growing_batches(0, 9)
    obs = PercentileObserver(spec, bins=bins)
    for b in batches:
        obs(b)
    data = torch.cat(batches, dim=1).numpy()  # [3, all]
    rows = data.reshape(1, -1) if spec.granularity == "tensor" else data
    expected = np.stack([_reference_counts(r, bins) for r in rows])
    assert np.array_equal(obs.counts.numpy(), expected)
    assert torch.equal(obs.min_val, torch.from_numpy(rows.min(1)))
    assert torch.equal(obs.max_val, torch.from_numpy(rows.max(1)))


def test_powers_of_two_and_zero_rows_bin_exactly():
    """Powers of two sit strictly inside [-R, R); all-zero rows start at the minimum range."""
    bins = 64
    batches = [
        torch.tensor([[0.0, 0.0], [1.0, -1.0]]),
        torch.tensor([[0.0, 0.0], [0.5, 2.0]]),
        torch.tensor([[-4.0, 2.0**-30], [3.0, -3.0]]),
    ]
    obs = PercentileObserver(PER_CHANNEL, bins=bins)
    for b in batches:
        obs(b)
    data = torch.cat(batches, dim=1).numpy()
    expected = np.stack([_reference_counts(r, bins) for r in data])
    assert np.array_equal(obs.counts.numpy(), expected)
    assert obs.exponent.tolist() == [3, 2]  # max|x| = 4 -> R = 8; max|x| = 3 -> R = 4


def test_coarsen_is_floor_division_of_bin_offsets():
    counts = torch.arange(16, dtype=torch.int64).reshape(2, 8)
    out = coarsen(counts, torch.tensor([0, 0]), torch.tensor([1, 70]))  # row 1 grows far beyond the bins
    # row 0: offsets -4..3 // 2 -> -2,-2,-1,-1,0,0,1,1 -> bins 2,2,3,3,4,4,5,5
    assert out[0].tolist() == [0, 0, 0 + 1, 2 + 3, 4 + 5, 6 + 7, 0, 0]
    # row 1: offsets < 0 -> bin 3, offsets >= 0 -> bin 4
    assert out[1].tolist() == [0, 0, 0, 8 + 9 + 10 + 11, 12 + 13 + 14 + 15, 0, 0, 0]
    assert torch.equal(out.sum(1), counts.sum(1))


@settings(max_examples=40, deadline=None)
@given(
    exponents=st.lists(st.integers(-20, 20), min_size=2, max_size=6),
    split=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_merge_equals_one_stream_in_any_order(exponents, split, seed):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, 30, generator=g) * 2.0**e for e in exponents]
    whole, left, right = (PercentileObserver(PER_CHANNEL, bins=128) for _ in range(3))
    for i, b in enumerate(batches):
        whole(b)
        (left if i < split else right)(b)
    for merged in (PercentileObserver(PER_CHANNEL, bins=128).merge(left).merge(right), right.merge(left)):
        assert torch.equal(merged.counts, whole.counts)
        assert torch.equal(merged.exponent, whole.exponent)
        assert torch.equal(merged.min_val, whole.min_val) and torch.equal(merged.max_val, whole.max_val)


def test_expand_range_then_summing_counts_is_the_all_reduce_recipe():
    """MAX over exponents, expand_range on each rank, SUM the counts == one observer on all data."""
    ranks = [PercentileObserver(PER_CHANNEL, bins=128) for _ in range(3)]
    whole = PercentileObserver(PER_CHANNEL, bins=128)
    for i, b in enumerate(_growing_batches(2, 9)):
        ranks[i % 3](b)
        whole(b)
    shared = torch.stack([r.exponent for r in ranks]).amax(0)  # all_reduce(MAX)
    for r in ranks:
        r.expand_range(shared)
    assert torch.equal(sum(r.counts for r in ranks), whole.counts)  # all_reduce(SUM)
    assert torch.equal(shared, whole.exponent)
    with pytest.raises(ValueError, match="would shrink; all-reduce the exponents with MAX first"):
        ranks[0].expand_range(shared - 1)
    with pytest.raises(RuntimeError, match="saw no data"):
        PercentileObserver(PER_CHANNEL).expand_range(shared)


def test_state_size_is_fixed_while_the_range_grows():
    obs = PercentileObserver(PER_CHANNEL, bins=512)
    batches = _growing_batches(1, 60)
    obs(batches[0])
    sizes = {name: buf.shape for name, buf in obs.named_buffers()}
    for b in batches[1:]:
        obs(b)
    assert {name: buf.shape for name, buf in obs.named_buffers()} == sizes
    assert obs.counts.shape == (3, 512)
    assert int(obs.counts.sum()) == sum(b.numel() for b in batches)


def test_histogram_view_has_spec_layout_and_edges():
    obs = PercentileObserver(PER_CHANNEL, bins=32)
    obs(torch.tensor([[0.1, -0.2], [5.0, 1.0], [0.0, 0.0]]))
    counts, edges = obs.histogram()
    assert counts.shape == (3, 32) and edges.shape == (3, 33)
    assert counts.sum(1).tolist() == [2, 2, 2]
    assert edges[1, 0].item() == -8.0 and edges[1, -1].item() == 8.0  # max|x| = 5 -> R = 8
    assert edges[0, -1].item() == 0.25  # max|x| = 0.2 -> R = 0.25


@pytest.mark.parametrize("bins", [0, 15, 100, 2047, True])
def test_bins_must_be_a_power_of_two(bins):
    with pytest.raises(ValueError, match="power of two"):
        PercentileObserver(INT8_ACTIVATION, name="act", bins=bins)
