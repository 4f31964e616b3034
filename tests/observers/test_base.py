"""What every observer kind shares: registry, bad input, merge rules, saving, constant memory."""

import io

import pytest
import torch

from lowbit.numerics import INT8_ACTIVATION, UINT8_ACTIVATION, QuantSpec
from lowbit.observers import (
    OBSERVERS,
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)

KINDS = sorted(OBSERVERS)
# Small histograms keep these tests fast; the estimators' own tests use the defaults.
OPTIONS = {
    "minmax": {},
    "moving_average": {"averaging_constant": 0.1},
    "percentile": {"bins": 512, "percentile": 99.0},
    "mse": {"bins": 512, "num_candidates": 20},
    "entropy": {"bins": 512},
}
PER_CHANNEL = QuantSpec(bits=8, granularity="channel", axis=1)
PER_CHANNEL_AFFINE = QuantSpec(bits=8, signed=False, symmetric=False, granularity="channel", axis=1)
# Kinds whose merge is exactly one stream (the moving average's is a mean by design).
EXACT_MERGE = [k for k in KINDS if k != "moving_average"]


def _make(kind: str, spec=PER_CHANNEL, name: str = "block1.input") -> Observer:
    return make_observer(kind, spec, name=name, **OPTIONS[kind])


def _batches(seed: int, n: int, channels: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16 + i, channels, generator=g) * (1.0 + i % 3) for i in range(n)]


def _qparams_equal(a: Observer, b: Observer) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.qparams(), b.qparams()))


def test_registry_lists_every_kind_by_its_class_attribute():
    assert KINDS == ["entropy", "minmax", "moving_average", "mse", "percentile"]
    for kind, cls in OBSERVERS.items():
        assert cls.kind == kind and issubclass(cls, Observer)
    assert isinstance(make_observer("mse", "int8-activation"), MSEObserver)


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid kinds: minmax, moving_average, percentile, mse, entropy"):
        make_observer("kl", INT8_ACTIVATION)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="bin.*options are: percentile, bins"):
        make_observer("percentile", INT8_ACTIVATION, name="fc", bin=1024)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_returns_its_input_and_works_inside_a_model(kind):
    obs = _make(kind, INT8_ACTIVATION)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), obs, torch.nn.ReLU())
    x = torch.randn(8, 4, requires_grad=True)
    model(x).sum().backward()  # the observer is transparent to autograd
    assert obs(x) is x
    assert obs.has_data and int(obs.num_batches) == 2
    scale, zp = obs.qparams()
    assert scale.shape == () and zp.shape == () and scale.item() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_names_the_tensor(kind, bad):
    obs = _make(kind)
    x = torch.randn(8, 4)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="block1.input: contains .*NaN.*Inf"):
        obs(x)
    assert not obs.has_data


@pytest.mark.parametrize("kind", KINDS)
def test_empty_tensor_is_an_error(kind):
    with pytest.raises(ValueError, match="block1.input: got an empty tensor of shape \\(0, 4\\)"):
        _make(kind)(torch.zeros(0, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_empty_observer_says_it_saw_no_data(kind):
    obs = _make(kind)
    assert not obs.has_data
    for ask in (obs.qparams, obs.compute_range):
        with pytest.raises(RuntimeError, match="block1.input: observer saw no data; run calibration"):
            ask()


@pytest.mark.parametrize("kind", KINDS)
def test_changing_the_channel_count_is_an_error(kind):
    obs = _make(kind)
    obs(torch.randn(8, 4))
    obs(torch.randn(3, 4))  # another batch size is fine
    with pytest.raises(ValueError, match="block1.input: this batch gives scale shape \\(5,\\) but earlier"):
        obs(torch.randn(8, 5))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_with_empty_observers(kind):
    full, empty = _make(kind), _make(kind)
    for b in _batches(0, 3):
        full(b)
    before = full.qparams()
    assert full.merge(empty) is full
    assert all(torch.equal(x, y) for x, y in zip(full.qparams(), before))
    copy = _make(kind).merge(full)
    assert _qparams_equal(copy, full) and int(copy.num_batches) == 3
    full(torch.randn(8, 4) * 100)  # the copy does not share buffers with its source
    assert all(torch.equal(x, y) for x, y in zip(copy.qparams(), before))


@pytest.mark.parametrize("kind", EXACT_MERGE)
def test_merge_equals_one_observer_that_saw_both_streams(kind):
    whole, a, b = _make(kind), _make(kind), _make(kind)
    for i, x in enumerate(_batches(1, 6)):
        whole(x)
        (a if i % 3 == 0 else b)(x)
    assert _qparams_equal(a.merge(b), whole)
    assert int(a.num_batches) == 6


@pytest.mark.parametrize(
    "other",
    [
        lambda: MinMaxObserver(PER_CHANNEL, name="other"),
        lambda: PercentileObserver(INT8_ACTIVATION, bins=512, percentile=99.0),
        lambda: PercentileObserver(PER_CHANNEL, bins=1024, percentile=99.0),
        lambda: PercentileObserver(PER_CHANNEL, bins=512, percentile=99.9),
        lambda: torch.zeros(3),
    ],
    ids=["other-class", "other-spec", "other-bins", "other-percentile", "not-an-observer"],
)
def test_merge_refuses_a_different_observer(other):
    obs = _make("percentile")
    with pytest.raises(ValueError, match="block1.input: cannot merge .* same class, spec and options"):
        obs.merge(other())


def test_merge_refuses_observers_of_different_tensors():
    a, b = _make("minmax"), _make("minmax")
    a(torch.randn(2, 4))
    b(torch.randn(2, 6))
    with pytest.raises(ValueError, match="scale shape \\(6,\\) into one that saw \\(4,\\)"):
        a.merge(b)


def _save_and_load(obs: Observer, kind: str) -> Observer:
    buffer = io.BytesIO()
    torch.save(obs.state_dict(), buffer)
    buffer.seek(0)
    restored = _make(kind)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    return restored


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trips_through_torch_save(kind):
    obs = _make(kind)
    batches = _batches(2, 5)
    for b in batches[:3]:
        obs(b)
    restored = _save_and_load(obs, kind)
    assert _qparams_equal(restored, obs) and int(restored.num_batches) == 3
    # Both keep going, and merging after a reload still works.
    for b in batches[3:]:
        obs(b)
        restored(b)
    assert _qparams_equal(restored, obs)
    other = _make(kind)
    other(batches[0] * 7)
    assert _qparams_equal(restored.merge(other), obs.merge(other))


@pytest.mark.parametrize("kind", KINDS)
def test_empty_state_round_trips(kind):
    restored = _save_and_load(_make(kind), kind)
    assert not restored.has_data
    full = _make(kind)
    full(torch.randn(4, 4))
    full.load_state_dict(_make(kind).state_dict())  # loading an empty state empties it
    assert not full.has_data
    full(torch.randn(4, 4))
    assert full.has_data


@pytest.mark.parametrize(
    "target",
    [
        lambda: PercentileObserver(UINT8_ACTIVATION, name="x", bins=512, percentile=99.0),
        lambda: PercentileObserver(PER_CHANNEL, name="x", bins=1024, percentile=99.0),
        lambda: MSEObserver(PER_CHANNEL, name="x", bins=512),
    ],
    ids=["spec", "bins", "kind"],
)
def test_loading_a_state_from_a_different_observer_fails(target):
    source = _make("percentile")
    source(torch.randn(8, 4))
    with pytest.raises(RuntimeError, match="x: saved observer state has .*build the observer with the same"):
        target().load_state_dict(source.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_state_built_under_inference_mode_stays_usable_outside_it(kind):
    """Inference tensors cannot be updated in place later; the buffers must stay ordinary tensors."""
    a, b = _make(kind), _make(kind)
    batches = _batches(4, 4)
    with torch.inference_mode():
        a(batches[0])
        b(batches[1])
    a(batches[2])  # in-place updates outside inference mode
    a.merge(b)
    restored = _make(kind)
    restored.load_state_dict(a.state_dict())
    with torch.inference_mode():
        restored.merge(b)
        a.merge(b)
    restored(batches[3])
    a(batches[3])
    assert not any(buf.is_inference() for buf in restored.buffers())
    assert _qparams_equal(restored, a)


@pytest.mark.parametrize("kind", KINDS)
def test_state_size_does_not_grow_with_batches(kind):
    obs = _make(kind)
    batches = _batches(3, 40)
    obs(batches[0])
    size = sum(b.numel() for b in obs.buffers())
    for b in batches[1:]:
        obs(b)
    assert sum(b.numel() for b in obs.buffers()) == size
    assert int(obs.num_batches) == 40


@pytest.mark.parametrize("kind", KINDS)
def test_reset_forgets_everything(kind):
    obs = _make(kind)
    obs(torch.randn(8, 4))
    obs.reset()
    assert not obs.has_data and all(b.numel() <= 1 for b in obs.buffers())
    with pytest.raises(RuntimeError, match="saw no data"):
        obs.qparams()
    obs(torch.randn(8, 3))  # a new layout is fine after a reset
    assert obs.qparams()[0].shape == (3,)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", [PER_CHANNEL, PER_CHANNEL_AFFINE], ids=["sym", "affine"])
def test_all_zero_and_constant_channels_are_handled(kind, spec):
    obs = _make(kind, spec)
    x = torch.randn(64, 4)
    x[:, 0] = 0.0
    x[:, 1] = 2.5
    obs(x)
    lo, hi = obs.compute_range()
    scale, _ = obs.qparams()
    assert lo[0].item() == 0.0 and hi[0].item() == 0.0 and scale[0].item() == 1.0  # zero range, no 0/0
    assert hi[1].item() == pytest.approx(2.5, rel=0.02)  # a constant channel keeps its value
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_repr_shows_spec_and_options():
    text = repr(EntropyObserver(INT8_ACTIVATION, name="act", bins=1024))
    assert text == "EntropyObserver(int8 sym per-tensor, name='act', bins=1024)"
