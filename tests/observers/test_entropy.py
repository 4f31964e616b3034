"""EntropyObserver against an independent, loop-by-loop KL calibration reference."""

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from lowbit.numerics import INT8_ACTIVATION, QuantSpec
from lowbit.observers import EntropyObserver


def _smooth(h: np.ndarray) -> np.ndarray | None:
    """MXNet / ONNX Runtime smoothing: empty bins get 1e-4, taken from the others."""
    zeros = h == 0
    if zeros.all():
        return None
    eps1 = 1e-4 * zeros.sum() / (~zeros).sum()
    out = h.copy()
    out[zeros] = 1e-4
    out[~zeros] -= eps1
    return None if (out <= 0).any() else out


def reference_threshold_bins(hist: np.ndarray, levels: int) -> int:
    """TensorRT's calibration loop (Migacz, GTC 2017), written for clarity, not speed.

    Returns how many ``|x|`` bins to keep.
    """
    hist = hist.astype(np.float64)
    used = int(np.nonzero(hist)[0][-1]) + 1 if hist.any() else 0
    best_i, best_kl = used, np.inf
    for i in range(levels, used + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()  # clipped tail folded into the last kept bin
        kept = hist[:i]
        per_level = i // levels
        q = np.zeros(i)
        for j in range(levels):
            start = j * per_level
            stop = i if j == levels - 1 else start + per_level
            nonzero = p[start:stop] != 0
            if nonzero.any():
                block = np.zeros(stop - start)
                block[nonzero] = kept[start:stop].sum() / nonzero.sum()
                q[start:stop] = block
        p_s, q_s = _smooth(p), _smooth(q)
        kl = np.inf if p_s is None or q_s is None else entropy(p_s, q_s)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def _bimodal_with_outliers(seed: int, n: int = 40_000, n_outliers: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    modes = np.concatenate([rng.normal(-2.0, 0.5, n // 2), rng.normal(3.0, 0.7, n // 2)])
    outliers = rng.uniform(10.0, 60.0, n_outliers) * rng.choice([-1.0, 1.0], n_outliers)
    return rng.permutation(np.concatenate([modes, outliers])).astype(np.float32)


def _feed(obs: EntropyObserver, x: np.ndarray) -> None:
    for chunk in torch.from_numpy(x).chunk(5):
        obs(chunk)


def test_bimodal_with_outliers_matches_reference_and_clips_outliers():
    x = _bimodal_with_outliers(0)
    obs = EntropyObserver(INT8_ACTIVATION)
    _feed(obs, x)
    lo, hi = obs.compute_range()
    width = obs.bin_width().item()
    expected_bins = reference_threshold_bins(obs.folded_counts()[0].numpy(), levels=128)
    assert hi.item() == pytest.approx(expected_bins * width, abs=1e-6)
    assert lo.item() == -hi.item()
    # Keeps both modes (|x| up to ~5), clips the sparse outliers spread over 10..60.
    assert 5.0 < hi.item() < 0.5 * np.abs(x).max()


def test_per_channel_rows_match_reference_row_by_row():
    spec = QuantSpec(bits=6, granularity="channel", axis=1)  # 32 levels per side
    rng = np.random.default_rng(1)
    x = np.stack(
        [_bimodal_with_outliers(2, 8_000, 5), rng.laplace(0, 1.0, 8_005), rng.normal(0, 0.01, 8_005)], axis=1
    ).astype(np.float32)
    obs = EntropyObserver(spec, bins=1024)
    _feed(obs, x)
    lo, hi = obs.compute_range()
    folded, width = obs.folded_counts().numpy(), obs.bin_width().numpy()
    for c in range(3):
        expected = min(reference_threshold_bins(folded[c], levels=32) * width[c], np.abs(x[:, c]).max())
        assert hi[c].item() == pytest.approx(expected, rel=1e-6), f"channel {c}"
    assert torch.equal(lo, -hi)
    assert hi[0].item() < 0.5 * np.abs(x[:, 0]).max() and hi[1].item() < np.abs(x[:, 1]).max()


def test_affine_levels_follow_the_sign_of_each_row():
    """A row that does not change sign spends the whole grid on one side: 2**bits levels."""
    spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity="channel", axis=1)
    bimodal = _bimodal_with_outliers(3, 20_000, 10)
    x = np.stack([np.maximum(bimodal, 0.0), bimodal], axis=1)
    obs = EntropyObserver(spec, bins=1024)
    _feed(obs, x)
    assert obs.levels().tolist() == [256, 128]
    lo, hi = obs.compute_range()
    folded, width = obs.folded_counts().numpy(), obs.bin_width().numpy()
    for c, levels in enumerate((256, 128)):
        threshold = reference_threshold_bins(folded[c], levels) * width[c]
        assert hi[c].item() == pytest.approx(min(threshold, x[:, c].max()), rel=1e-6)
        assert lo[c].item() == pytest.approx(max(-threshold, x[:, c].min()), rel=1e-6)
    assert lo[0].item() == 0.0  # never below the data's minimum


def test_narrow_data_keeps_its_whole_range():
    """Data spanning fewer bins than levels needs no clipping."""
    obs = EntropyObserver(INT8_ACTIVATION)
    obs(torch.tensor([-1.0, 0.25, 0.5, 0.9]))
    lo, hi = obs.compute_range()
    assert hi.item() == 1.0 and lo.item() == -1.0


def test_too_few_bins_for_the_grid_is_an_error():
    with pytest.raises(ValueError, match="bins >= 512"):
        EntropyObserver(QuantSpec(bits=8, signed=False, symmetric=False), name="act", bins=256)
