"""The streaming power-of-two histogram: exact binning, exact coarsening, exact merge."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.numerics import INT8_ACTIVATION, QuantSpec
from lowbit.observers import PercentileObserver
from lowbit.observers.histogram import bin_counts, bin_indices, coarsen, range_exponent

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


def _bincount_reference(rows: torch.Tensor, exponent: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of ``bin_indices`` per row, one bincount per row (the definition)."""
    idx = bin_indices(rows, exponent, bins).long()
    return torch.stack([torch.bincount(r, minlength=bins) for r in idx])


def _edge_values(exponent: int, bins: int) -> torch.Tensor:
    """Values on, just above and just below every bin edge of the range 2**exponent, and +-0."""
    half = bins // 2
    width = 2.0**exponent / half
    k = torch.arange(-half, half, dtype=torch.float64)
    top = torch.nextafter(torch.tensor(2.0**exponent), torch.tensor(0.0))
    x = torch.cat([k * width, k * width * (1 + 2**-20), (k + 1) * width * (1 - 2**-23)]).float()
    return torch.cat([x.clamp(-top, top), torch.tensor([-0.0, 0.0, 1e-38, -1e-38, 1e-45])])


@pytest.mark.parametrize("exponent", [-100, -20, 0, 3, 40, 100])
@pytest.mark.parametrize("bins", [16, 2048])
def test_bin_counts_are_exact_on_bin_edges(exponent, bins):
    x = _edge_values(exponent, bins)
    e = torch.tensor([exponent])
    assert torch.equal(bin_counts(x[None], e, bins), _bincount_reference(x[None], e, bins))
    nonneg = x[x >= 0][None]  # the one-pass path for a row with no negative value
    assert torch.equal(bin_counts(nonneg, e, bins, nonnegative=True), _bincount_reference(nonneg, e, bins))
    rows = torch.stack([x, -x.flip(0), x * 0.5])  # several rows, each with its own offset
    e3 = torch.full((3,), exponent)
    assert torch.equal(bin_counts(rows, e3, bins), _bincount_reference(rows, e3, bins))


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.sampled_from([1, 1, 3, 40]),
    k=st.integers(1, 3000),
    scale_exp=st.integers(-12, 12),
    grow=st.integers(0, 2),
    relu=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bin_counts_equal_bincount_of_bin_indices(n_rows, k, scale_exp, grow, relu, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, k, generator=g) * 2.0**scale_exp
    if relu:
        x = torch.relu(x)
    lo, hi = torch.aminmax(x, dim=1)
    e = range_exponent(torch.maximum(-lo, hi)) + grow  # sometimes a range larger than the data's
    expected = _bincount_reference(x, e, 256)
    assert torch.equal(bin_counts(x, e, 256), expected)
    if relu and n_rows == 1:
        assert torch.equal(bin_counts(x, e, 256, nonnegative=True), expected)


def test_observers_of_the_same_tensor_share_one_binning_exactly():
    """A tensor seen by several observers (a residual block's input) is reduced and binned once;
    each observer ends exactly where it would alone, and an in-place change is a new tensor."""
    g = torch.Generator().manual_seed(5)
    shared, second, alone = (PercentileObserver(PER_CHANNEL, bins=128) for _ in range(3))
    for b in _growing_batches(4, 7):
        shared(b)
        second(b)
        alone(b.clone())
        b.mul_(3.0)  # same object, new values
        second(b)
        alone(b.clone())
        shared(torch.randn(3, 50, generator=g))
    for name in ("counts", "exponent", "min_val", "max_val"):
        assert torch.equal(getattr(second, name), getattr(alone, name)), name
