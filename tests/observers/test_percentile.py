"""PercentileObserver against numpy's quantiles of the raw data."""

import numpy as np
import pytest
import torch

from lowbit.numerics import INT8_ACTIVATION, UINT8_ACTIVATION, QuantSpec
from lowbit.observers import MinMaxObserver, PercentileObserver

PER_CHANNEL_SYM = QuantSpec(bits=8, granularity="channel", axis=1)
PER_CHANNEL_AFFINE = QuantSpec(bits=8, signed=False, symmetric=False, granularity="channel", axis=1)


def _feed(obs, x: torch.Tensor, n_batches: int = 8) -> None:
    for chunk in x.chunk(n_batches):
        obs(chunk)


def _bin_width(obs: PercentileObserver) -> np.ndarray:
    return obs.bin_width().numpy()


def test_affine_percentiles_of_a_gaussian():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * 1.5 + 0.7
    obs = PercentileObserver(UINT8_ACTIVATION, percentile=99.9)
    _feed(obs, x)
    lo, hi = obs.compute_range()
    raw = x.double().numpy()
    tol = _bin_width(obs)[0] * 1.001
    assert abs(lo.item() - np.quantile(raw, 0.001)) <= tol
    assert abs(hi.item() - np.quantile(raw, 0.999)) <= tol
    assert hi.item() < raw.max() - 1.0  # a real clip, not the min-max range


def test_symmetric_percentile_of_abs_gaussian():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100_000, generator=g) * 2.0
    obs = PercentileObserver(INT8_ACTIVATION, percentile=99.99)
    _feed(obs, x)
    lo, hi = obs.compute_range()
    expected = np.quantile(np.abs(x.double().numpy()), 0.9999)
    assert lo.item() == -hi.item()
    assert abs(hi.item() - expected) <= _bin_width(obs)[0] * 1.001


@pytest.mark.parametrize("spec", [PER_CHANNEL_SYM, PER_CHANNEL_AFFINE], ids=["sym", "affine"])
def test_per_channel_percentiles_with_different_sigmas(spec):
    g = torch.Generator().manual_seed(2)
    sigmas = torch.tensor([0.1, 1.0, 3.0, 20.0])
    x = torch.randn(50_000, 4, generator=g) * sigmas  # channels on axis 1
    obs = PercentileObserver(spec, percentile=99.5)
    _feed(obs, x)
    lo, hi = obs.compute_range()
    tol = _bin_width(obs) * 1.001
    raw = x.double().numpy()
    for c in range(4):
        if spec.symmetric:
            expected_hi = np.quantile(np.abs(raw[:, c]), 0.995)
            expected_lo = -expected_hi
        else:
            expected_lo, expected_hi = np.quantile(raw[:, c], [0.005, 0.995])
        assert abs(hi[c].item() - expected_hi) <= tol[c]
        assert abs(lo[c].item() - expected_lo) <= tol[c]
    # The ranges follow the channels' scales: 2.58 sigma for the 99.5th percentile.
    assert torch.allclose(hi / sigmas, torch.full((4,), 2.8 if spec.symmetric else 2.58), rtol=0.05)


@pytest.mark.parametrize("spec", [INT8_ACTIVATION, UINT8_ACTIVATION], ids=["sym", "affine"])
def test_percentile_100_is_the_min_max_range(spec):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5_000, generator=g).exp() - 0.3
    obs, minmax = PercentileObserver(spec, percentile=100), MinMaxObserver(spec)
    _feed(obs, x)
    _feed(minmax, x)
    lo, hi = obs.compute_range()
    if spec.symmetric:
        amax = torch.maximum(-minmax.min_val, minmax.max_val)
        assert torch.equal(hi.reshape(1), amax) and torch.equal(lo.reshape(1), -amax)
    else:
        assert torch.equal(lo.reshape(1), minmax.min_val) and torch.equal(hi.reshape(1), minmax.max_val)


def test_estimates_stay_inside_the_data():
    obs = PercentileObserver(UINT8_ACTIVATION, percentile=99.0)
    obs(torch.tensor([0.3, 0.3, 0.3, 0.3]))  # one value: the bin is wider than the data
    lo, hi = obs.compute_range()
    assert lo.item() == pytest.approx(0.3) and hi.item() == pytest.approx(0.3)


def test_merge_gives_the_same_qparams_as_one_stream():
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(100, 4, generator=g) * (1 + 3 * (i % 2)) for i in range(6)]
    whole, a, b = (PercentileObserver(PER_CHANNEL_AFFINE, percentile=99.0) for _ in range(3))
    for i, x in enumerate(batches):
        whole(x)
        (a if i in (0, 3, 4) else b)(x)
    for got, expected in zip(a.merge(b).qparams(), whole.qparams()):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("bad", [50, 0, 100.5, "99"])
def test_percentile_must_be_in_range(bad):
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(INT8_ACTIVATION, name="act", percentile=bad)
