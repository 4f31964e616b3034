"""MinMaxObserver and MovingAverageMinMaxObserver against brute force and torch.ao."""

import warnings

import pytest
import torch

from lowbit.numerics import INT8_ACTIVATION, QuantSpec, compute_qparams
from lowbit.observers import MinMaxObserver, MovingAverageMinMaxObserver

PER_CHANNEL = QuantSpec(bits=8, granularity="channel", axis=1)
GROUPED = QuantSpec(bits=4, granularity="group", axis=1, group_size=4)


def _batches(seed: int, n: int, shape=(6, 8, 5), vary_batch: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rows = shape[0] + (i % 3 if vary_batch else 0)
        out.append(torch.randn((rows, *shape[1:]), generator=g) * (0.5 + i))
    return out


def _brute_force_range(batches: list[torch.Tensor], spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per scale, written out with explicit loops."""
    if spec.granularity == "tensor":
        everything = torch.cat([b.flatten() for b in batches])
        return everything.min().reshape(()), everything.max().reshape(())
    if spec.granularity == "channel":
        n_channels = batches[0].shape[spec.axis]
        lo = [min(b.select(spec.axis, c).min() for b in batches) for c in range(n_channels)]
        hi = [max(b.select(spec.axis, c).max() for b in batches) for c in range(n_channels)]
        return torch.stack(lo), torch.stack(hi)
    # group on axis 1 of [rows, cols]: block (r, k) holds x[r, k*size:(k+1)*size]
    rows, cols = batches[0].shape
    size = spec.group_size
    lo = torch.empty(rows, cols // size)
    hi = torch.empty(rows, cols // size)
    for r in range(rows):
        for k in range(cols // size):
            block = torch.cat([b[r, k * size : (k + 1) * size] for b in batches])
            lo[r, k], hi[r, k] = block.min(), block.max()
    return lo, hi


@pytest.mark.parametrize(
    "spec, shape, vary",
    [(INT8_ACTIVATION, (6, 8, 5), True), (PER_CHANNEL, (6, 8, 5), True), (GROUPED, (3, 12), False)],
    ids=["tensor", "channel", "group"],
)
def test_minmax_matches_brute_force(spec, shape, vary):
    batches = _batches(0, 5, shape, vary)
    obs = MinMaxObserver(spec, name="x")
    for b in batches:
        obs(b)
    lo, hi = obs.compute_range()
    ref_lo, ref_hi = _brute_force_range(batches, spec)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    scale, zp = obs.qparams()
    ref_scale, ref_zp = compute_qparams(ref_lo, ref_hi, spec)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)


@pytest.mark.parametrize("spec", [INT8_ACTIVATION, PER_CHANNEL], ids=["tensor", "channel"])
def test_minmax_merge_equals_one_stream(spec):
    batches = _batches(1, 7)
    whole, first, second = (MinMaxObserver(spec) for _ in range(3))
    for i, b in enumerate(batches):
        whole(b)
        (first if i % 2 else second)(b)
    merged = MinMaxObserver(spec).merge(first).merge(second)
    for candidate in (merged, first.merge(second)):
        assert torch.equal(candidate.min_val, whole.min_val)
        assert torch.equal(candidate.max_val, whole.max_val)
        assert int(candidate.num_batches) == len(batches)


def _torch_ao_observer(spec: QuantSpec, averaging_constant: float):
    from torch.ao.quantization import MovingAverageMinMaxObserver as AoTensor
    from torch.ao.quantization import MovingAveragePerChannelMinMaxObserver as AoChannel

    if spec.granularity == "tensor":
        return AoTensor(
            averaging_constant=averaging_constant, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric
        )
    return AoChannel(
        averaging_constant=averaging_constant,
        ch_axis=spec.axis,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
    )


@pytest.mark.parametrize("spec", [INT8_ACTIVATION, PER_CHANNEL], ids=["tensor", "channel"])
def test_moving_average_matches_torch_ao(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated; a peer here only
        ao = _torch_ao_observer(spec, 0.1)
        ours = MovingAverageMinMaxObserver(spec, averaging_constant=0.1)
        for b in _batches(2, 20):
            ao(b)
            ours(b)
    lo, hi = ours.compute_range()
    assert torch.equal(lo, ao.min_val.reshape(lo.shape))
    assert torch.equal(hi, ao.max_val.reshape(hi.shape))


def test_moving_average_first_batch_sets_range():
    obs = MovingAverageMinMaxObserver(INT8_ACTIVATION, averaging_constant=0.01)
    obs(torch.tensor([-3.0, 5.0]))
    lo, hi = obs.compute_range()
    assert torch.equal(lo, torch.tensor(-3.0)) and torch.equal(hi, torch.tensor(5.0))
    obs(torch.tensor([-1.0, 1.0]))
    lo, hi = obs.compute_range()
    assert torch.allclose(lo, torch.tensor(-3.0 + 0.01 * 2.0))
    assert torch.allclose(hi, torch.tensor(5.0 - 0.01 * 4.0))


def test_moving_average_merge_is_the_mean_not_one_stream():
    """Documented: merge averages the two states (an all-reduce mean), unlike one EMA over both streams."""
    batches = _batches(3, 6)
    a, b, whole = (MovingAverageMinMaxObserver(PER_CHANNEL, averaging_constant=0.2) for _ in range(3))
    for i, x in enumerate(batches):
        (a if i < 3 else b)(x)
        whole(x)
    expected_lo = (a.min_val + b.min_val) / 2
    expected_hi = (a.max_val + b.max_val) / 2
    a.merge(b)
    assert torch.equal(a.min_val, expected_lo) and torch.equal(a.max_val, expected_hi)
    assert not torch.allclose(a.min_val, whole.min_val)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_moving_average_rejects_bad_constant(bad):
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(INT8_ACTIVATION, name="act", averaging_constant=bad)
