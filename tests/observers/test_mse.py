"""MSEObserver: its error model, and its choice against brute force on the raw data."""

import numpy as np
import pytest
import torch

from lowbit.numerics import INT8_ACTIVATION, QuantSpec, compute_qparams, fake_quantize
from lowbit.observers import MSEObserver
from lowbit.observers.mse import expected_sq_error

INT4 = QuantSpec(bits=4)
UINT4_AFFINE = QuantSpec(bits=4, signed=False, symmetric=False)
INT4_PER_CHANNEL = QuantSpec(bits=4, granularity="channel", axis=1)
INT4_GROUPED = QuantSpec(bits=4, granularity="group", axis=1, group_size=32)


def _raw_mse(x: torch.Tensor, lo, hi, spec: QuantSpec) -> torch.Tensor:
    """Mean squared error of fake-quantizing the raw values ``x`` with each range ``[lo[k], hi[k]]``.

    Each candidate range becomes one channel of a per-channel problem on copies of
    ``x``, so a single ``fake_quantize`` call scores them all with the real arithmetic.
    Returns float64 [k].
    """
    lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1)
    hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
    per_row = spec.replace(granularity="channel", axis=0)
    scale, zp = compute_qparams(lo, hi, per_row)
    copies = x.reshape(1, -1).expand(len(lo), -1)
    return ((fake_quantize(copies, scale, zp, per_row) - copies).double() ** 2).mean(1)


def _best_symmetric(x: torch.Tensor, ratios: list[float], spec: QuantSpec) -> float:
    """Lowest raw-data MSE over the symmetric candidates ``amax = r * max|x|``."""
    amax = x.abs().max() * torch.tensor(ratios)
    return _raw_mse(x, -amax, amax, spec).min().item()


def _student_t(seed: int, n: int, df: float = 2.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_t(df, n).astype(np.float32))


def _observe(spec, x, **options) -> MSEObserver:
    obs = MSEObserver(spec, **options)
    for chunk in x.chunk(4):
        obs(chunk)
    return obs


@pytest.mark.parametrize("lo, hi", [(-1.0, 1.0), (-0.3, 0.3), (-0.05, 0.05), (-0.2, 0.9)])
@pytest.mark.parametrize("spec", [INT4, UINT4_AFFINE], ids=["sym", "affine"])
def test_expected_error_matches_monte_carlo(spec, lo, hi):
    """Values spread uniformly over each bin: the closed-form error equals the sampled one."""
    g = torch.Generator().manual_seed(0)
    edges = torch.linspace(-1.0, 1.0, 17, dtype=torch.float64)
    counts = torch.randint(0, 50, (16,), generator=g).double()
    bin_of = torch.multinomial(counts, 400_000, replacement=True, generator=g)
    u = torch.rand(400_000, generator=g, dtype=torch.float64)
    x = (edges[bin_of] + u * (edges[1] - edges[0])).float()
    sampled = _raw_mse(x, lo, hi, spec).item()
    lo_t, hi_t = (torch.tensor([v], dtype=torch.float64) for v in (lo, hi))
    closed = expected_sq_error(counts[None], edges[None], lo_t, hi_t, spec)
    assert closed.item() == pytest.approx(sampled, rel=0.01)


@pytest.mark.parametrize("spec", [INT4, INT8_ACTIVATION], ids=["int4", "int8"])
def test_symmetric_heavy_tail_is_clipped_and_near_the_brute_force_best(spec):
    x = _student_t(1, 60_000)
    obs = _observe(spec, x)
    lo, hi = obs.compute_range()
    assert _raw_mse(x, lo, hi, spec).item() <= 1.02 * _best_symmetric(x, obs.ratios(), spec)
    assert lo.item() == -hi.item()
    # Clipped: well below max|x| at 4 bits, a little at 8 bits (MSE pays dearly for clipped tails).
    assert hi.item() < (0.3 if spec.bits == 4 else 0.95) * x.abs().max().item()


def test_affine_skewed_heavy_tail_is_near_the_best_of_the_full_2d_grid():
    """Short negative side, long positive tail: the search keeps one end and clips the other."""
    rng = np.random.default_rng(2)
    x = np.concatenate([-np.abs(rng.normal(0, 0.2, 20_000)), np.abs(rng.standard_t(2.0, 20_000))])
    x = torch.from_numpy(x.astype(np.float32))
    obs = _observe(UINT4_AFFINE, x, num_candidates=25)
    lo, hi = obs.compute_range()
    lo0, hi0 = x.min(), x.max()
    ratios = torch.tensor(obs.ratios())
    best = min(
        _raw_mse(x, torch.full_like(ratios, lo0 * a), hi0 * ratios, UINT4_AFFINE).min().item()
        for a in obs.ratios()
    )
    assert _raw_mse(x, lo, hi, UINT4_AFFINE).item() <= 1.02 * best
    assert hi.item() < 0.6 * hi0.item()  # the tail is clipped
    assert lo.item() < 0.5 * lo0.item()  # the short side is mostly kept


def test_per_channel_choices_match_brute_force_per_channel():
    rng = np.random.default_rng(3)
    n = 20_000
    columns = [
        rng.standard_t(2.0, n),
        rng.laplace(0, 0.5, n),
        rng.normal(0, 3.0, n),
        rng.uniform(-1, 1, n),
    ]
    x = torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))  # channels on axis 1
    obs = _observe(INT4_PER_CHANNEL, x)
    lo, hi = obs.compute_range()
    for c in range(4):
        col = x[:, c].contiguous()
        chosen = _raw_mse(col, lo[c], hi[c], INT4).item()
        assert chosen <= 1.02 * _best_symmetric(col, obs.ratios(), INT4), f"channel {c}"
    assert hi[3].item() > 0.85  # uniform data: little to gain from clipping
    assert hi[0].item() < 0.6 * x[:, 0].abs().max().item()  # Student-t: clipped


def test_grouped_weight_choices_match_brute_force_per_group():
    w = _student_t(4, 8 * 64, df=3.0).reshape(8, 64)
    obs = MSEObserver(INT4_GROUPED)
    obs(w)
    lo, hi = obs.compute_range()
    assert lo.shape == (8, 2)
    for r in range(8):
        for k in range(2):
            block = w[r, 32 * k : 32 * (k + 1)].contiguous()
            chosen = _raw_mse(block, lo[r, k], hi[r, k], INT4).item()
            assert chosen <= 1.02 * _best_symmetric(block, obs.ratios(), INT4) + 1e-9, f"group {r},{k}"


def test_all_zero_rows_and_constant_rows_are_handled():
    obs = MSEObserver(QuantSpec(bits=8, granularity="channel", axis=0))
    obs(torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [-1.0, 0.5, 1.0]]))
    lo, hi = obs.compute_range()
    scale, _ = obs.qparams()
    assert lo[0].item() == 0.0 and hi[0].item() == 0.0 and scale[0].item() == 1.0
    assert hi[1].item() == pytest.approx(2.0, rel=0.02)  # a constant row keeps its value
    assert torch.isfinite(scale).all()


def test_num_candidates_is_validated():
    with pytest.raises(ValueError, match="num_candidates"):
        MSEObserver(INT8_ACTIVATION, name="act", num_candidates=0)


def _scan(spec, counts, edges, candidates, best):
    """Keep the first candidate ``(lo, hi)`` whose error is strictly below ``best``'s, in order."""
    for lo, hi in candidates:
        err = expected_sq_error(counts, edges, lo, hi, spec)
        if err.item() < best[2].item():
            best = (lo, hi, err)
    return best


def _loop_search(obs: MSEObserver) -> tuple[torch.Tensor, torch.Tensor]:
    """The search as a plain loop over candidates, one ``expected_sq_error`` each (per row, in
    order, strict improvement): what the vectorised search must reproduce exactly."""
    counts, edges = obs._occupied_histogram(slice(None))  # the bins the search scores (all rows)
    lo0 = obs.min_val.double().clamp_max(0.0)
    hi0 = obs.max_val.double().clamp_min(0.0)
    if obs.spec.symmetric:
        hi0 = torch.maximum(-lo0, hi0)
        lo0 = -hi0
    out_lo, out_hi = [], []
    for r in range(len(lo0)):
        c, e, lo, hi = counts[r : r + 1], edges[r : r + 1], lo0[r : r + 1], hi0[r : r + 1]
        best = (lo, hi, torch.tensor([float("inf")], dtype=torch.float64))
        best = _scan(obs.spec, c, e, [(lo * q, hi * q) for q in obs.ratios()], best)
        if not obs.spec.symmetric:
            best = _scan(obs.spec, c, e, [(lo * q, best[1]) for q in obs.ratios()], best)
            best = _scan(obs.spec, c, e, [(best[0], hi * q) for q in obs.ratios()], best)
        out_lo.append(best[0])
        out_hi.append(best[1])
    return torch.cat(out_lo).float(), torch.cat(out_hi).float()


@pytest.mark.parametrize(
    "data",
    ["relu", "gelu", "student_t", "negative", "skewed"],
)
@pytest.mark.parametrize("spec", [UINT4_AFFINE, INT8_ACTIVATION, QuantSpec(bits=8, signed=False, symmetric=False,
                                                                          granularity="channel", axis=1)],
                         ids=["u4-affine", "i8-sym", "u8-affine-per-channel"])
def test_vectorised_search_equals_the_candidate_loop_exactly(data, spec):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3000, 3))
    x = {
        "relu": np.maximum(x, 0),
        "gelu": x * 0.5 * (1 + np.tanh(0.79788 * (x + 0.044715 * x**3))),
        "student_t": rng.standard_t(2.0, (3000, 3)),
        "negative": -np.abs(x),
        "skewed": np.where(x < 0, 0.1 * x, x**3),
    }[data]
    obs = _observe(spec, torch.from_numpy(x.astype(np.float32)), bins=256, num_candidates=30)
    lo, hi = obs.compute_range()
    ref_lo, ref_hi = _loop_search(obs)
    assert torch.equal(lo.flatten(), ref_lo) and torch.equal(hi.flatten(), ref_hi)


def test_floor_from_frac_is_floor():
    from lowbit.observers.mse import _floor

    x = torch.cat([torch.randn(5000, dtype=torch.float64) * 300, torch.arange(-5, 6, dtype=torch.float64),
                   torch.tensor([-0.0, 0.0, -0.5, 0.5, -1e-300, 2.0**52 - 0.5, -(2.0**52) + 0.5])])
    assert torch.equal(_floor(x), torch.floor(x))
    assert torch.equal(torch.signbit(_floor(x)), torch.signbit(torch.floor(x)))
