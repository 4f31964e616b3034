"""Observers merge themselves: sharded calibration without torch.distributed.

Calibrate observer A on shard 1 and observer B on shard 2; ``A.merge([B])`` must give what one
observer that saw both shards gives.  Exactly (every state buffer bit for bit, hence the qparams)
for min-max and the histogram observers, whatever the shards' ranges: histogram ranges are
powers of two and coarsen exactly, so counts do not depend on how the range grew.  The moving
average is the exception, by design: its merge is the mean of the states (an EMA depends on the
order of the batches); its tolerance is derived and asserted below.

The same reductions run across ranks in ``lowbit.qat.distributed``; the tests that simulate
ranks here (identities from ranks without data, the per-forward batch fold) check that path
without processes.
"""

from types import MappingProxyType

import pytest
import torch

from lowbit.numerics import INT8_ACTIVATION, QuantSpec
from lowbit.observers import OBSERVERS, MinMaxObserver, Observer, PercentileObserver, make_observer
from lowbit.observers.reduction import StateReduction

KINDS = sorted(OBSERVERS)
# Small histograms keep these tests fast; a kind registered later is tested with its defaults.
OPTIONS = {kind: {} for kind in KINDS} | {
    "moving_average": {"averaging_constant": 0.1},
    "percentile": {"bins": 256, "percentile": 99.0},
    "mse": {"bins": 256, "num_candidates": 20},
    "entropy": {"bins": 512},
}
EXACT = [k for k in KINDS if k != "moving_average"]
SPECS = {
    "tensor-affine": QuantSpec(bits=8, signed=False, symmetric=False),
    "channel-sym": QuantSpec(bits=8, granularity="channel", axis=1),
}


def _make(kind: str, spec=SPECS["channel-sym"], name: str = "fc.input") -> Observer:
    return make_observer(kind, spec, name=name, **OPTIONS[kind])


def _shards(seed: int, n: int, scales=(1.0,)) -> list[list[torch.Tensor]]:
    """``n`` shards of 3 batches [16, 4] each; shard i scaled by ``scales[i % len(scales)]``."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(16, 4, generator=g) * scales[i % len(scales)] + 0.25 for _ in range(3)] for i in range(n)]


def _fed(kind: str, batches, spec=SPECS["channel-sym"], name: str = "fc.input") -> Observer:
    obs = _make(kind, spec, name)
    for x in batches:
        obs(x)
    return obs


def _assert_same_state(a: Observer, b: Observer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sb.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(sa[key], value), f"{key}: {sa[key]} vs {value}"
    for x, y in zip(a.qparams(), b.qparams()):
        assert torch.equal(x, y)


# -- every registered class: merge == one observer on all shards ------------------------------
def test_every_registered_class_declares_how_its_state_reduces():
    for kind, cls in OBSERVERS.items():
        obs = _make(kind)
        assert set(cls.reductions) == set(obs._state_names), kind
        assert obs._reducible()


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("kind", EXACT)
def test_merged_shards_equal_one_observer_on_all_of_them(kind, spec):
    shards = _shards(0, 2)
    whole = _fed(kind, [x for shard in shards for x in shard], spec)
    a, b = (_fed(kind, shard, spec) for shard in shards)
    _assert_same_state(a.merge([b]), whole)
    assert int(a.num_batches) == 6


@pytest.mark.parametrize("kind", EXACT)
def test_histogram_ranges_that_grew_differently_still_merge_exactly(kind):
    """Shards 2**15 apart in scale: their histograms sit at different power-of-two ranges, and
    one stream grows its range batch by batch in yet another way.  Re-binning to a power-of-two
    range that is 2**d times larger maps bin j to bin floor((j - bins/2) / 2**d) + bins/2, the
    bin those values get at the larger range directly, so no tolerance is needed."""
    shards = _shards(1, 3, scales=(0.01, 300.0, 1.0))
    whole = _fed(kind, [x for shard in shards for x in shard])
    a, b, c = (_fed(kind, shard) for shard in shards)
    if kind != "minmax":
        assert len({int(o.exponent.max()) for o in (a, b, c)}) == 3  # three different ranges
    _assert_same_state(a.merge([b, c]), whole)


@pytest.mark.parametrize("kind", EXACT)
def test_merge_is_independent_of_order_and_grouping(kind):
    shards = _shards(2, 4, scales=(1.0, 5.0))
    whole = _fed(kind, [x for shard in shards for x in shard])
    observers = [_fed(kind, shard) for shard in shards]
    at_once = _make(kind).merge(observers)
    one_by_one = _make(kind)
    for obs in reversed(observers):
        one_by_one.merge(obs)
    pairs = observers[3].merge(observers[2]).merge(observers[0].merge(observers[1]))
    for merged in (at_once, one_by_one, pairs):
        _assert_same_state(merged, whole)


def test_merge_leaves_the_merged_observers_alone():
    a, b = (_fed("percentile", shard) for shard in _shards(3, 2, scales=(1.0, 64.0)))
    before = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    a.merge(b)  # b's counts are re-binned to the merged range for the sum, on a copy
    assert all(torch.equal(b.state_dict()[k], v) for k, v in before.items())


# -- the moving average: a mean of states, with a derived tolerance ---------------------------
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_moving_average_merge_is_the_mean_within_the_batch_extremes(spec):
    """Not exact: an EMA weighs batches by their position, so one stream over shard 1 then
    shard 2 weighs shard 2 more, while the merge averages the two shard states.  Both are
    convex combinations of the batches' extremes, so they differ by at most the spread of those
    extremes per row; asserted here, and that the merge is exactly the float64 mean."""
    shards = _shards(4, 2)
    batches = [x for shard in shards for x in shard]
    whole = _fed("moving_average", batches, spec)
    a, b = (_fed("moving_average", shard, spec) for shard in shards)
    expected = [((x.double() + y.double()) / 2).float() for x, y in ((a.min_val, b.min_val), (a.max_val, b.max_val))]
    merged = _fed("moving_average", shards[0], spec).merge([b])
    assert torch.equal(merged.min_val, expected[0]) and torch.equal(merged.max_val, expected[1])
    lows = torch.stack([_fed("minmax", [x], spec).min_val for x in batches])  # [batches, rows]
    highs = torch.stack([_fed("minmax", [x], spec).max_val for x in batches])
    for got, ref, ext in ((merged.min_val, whole.min_val, lows), (merged.max_val, whole.max_val, highs)):
        spread = ext.amax(0) - ext.amin(0)
        assert ((ext.amin(0) <= got) & (got <= ext.amax(0))).all()
        assert ((got - ref).abs() <= spread).all()
    assert not torch.equal(merged.min_val, whole.min_val)  # really not one stream
    # Three shards at once: the mean of three, not ((a + b) / 2 + c) / 2.
    c = _fed("moving_average", _shards(5, 1)[0], spec)
    three = _fed("moving_average", shards[0], spec).merge([b, c])
    mean3 = ((a.max_val.double() + b.max_val.double() + c.max_val.double()) / 3).float()
    assert torch.equal(three.max_val, mean3)


# -- observers without data --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merging_observers_that_saw_no_data(kind):
    full = _fed(kind, _shards(6, 1)[0])
    reference = _fed(kind, _shards(6, 1)[0])
    assert full.merge([_make(kind), _make(kind)]) is full
    _assert_same_state(full, reference)
    empty = _make(kind).merge([_make(kind)])
    assert not empty.has_data and empty.param_shape.numel() == 0
    copy = _make(kind).merge([_make(kind), full, _make(kind)])
    _assert_same_state(copy, reference)
    assert copy.merge([]) is copy


@pytest.mark.parametrize("kind", KINDS)
def test_simulated_ranks_with_one_rank_without_data(kind):
    """What lowbit.qat.distributed does, without processes: each 'rank' sends its flat vectors
    (the empty one sends the identities, -inf and 0), MAX then SUM, every rank loads the result."""
    shards = _shards(7, 2, scales=(1.0, 9.0))
    ranks = [_fed(kind, shards[0]), _make(kind), _fed(kind, shards[1])]
    expected = _fed(kind, shards[0]).merge([_fed(kind, shards[1])])
    plans = [StateReduction(obs, (4,)) for obs in ranks]
    extremes = torch.stack([p.extremes_payload() for p in plans]).amax(0)
    additive = torch.stack([p.additive_payload(extremes) for p in plans]).sum(0)
    batches = sum(int(obs.num_batches) for obs in ranks)
    for p in plans:
        p.load(extremes, additive, batches)
    for obs in ranks:
        _assert_same_state(obs, expected)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_folding_the_merged_batch_of_the_shards_equals_observing_the_whole_batch(kind, spec):
    """The per-forward DDP hook: every rank's observer folds in the merge of the ranks' batch
    observers; that must equal forward() on the global batch, bit for bit (moving average
    included: a batch's statistics are its extremes, which merge exactly)."""
    history, global_batch = _shards(8, 1)[0], torch.randn(32, 4) * 3
    single = _fed(kind, history, spec)
    single(global_batch)
    synced = _fed(kind, history, spec)
    parts = [synced._batch_observer() for _ in range(2)]
    for part, shard in zip(parts, global_batch.chunk(2)):
        part(shard)
    synced._fold_batch(parts[0].merge(parts[1:]))
    _assert_same_state(synced, single)
    first = _make(kind, spec)  # the global batch as the very first one
    first._fold_batch(parts[0])
    _assert_same_state(first, _fed(kind, [global_batch], spec))


# -- refused merges: the error names both observers --------------------------------------------
def test_merging_another_class_names_both():
    a = _make("percentile", name="fc.input")
    b = make_observer("mse", SPECS["channel-sym"], name="fc2.input", bins=256)
    with pytest.raises(ValueError, match=r"fc.input: cannot merge MSEObserver\(.*name='fc2.input'.*\) into "
                                         r"PercentileObserver\(.*name='fc.input'.*\); merge only observers"):
        a.merge([b])


def test_merging_other_options_or_spec_names_both():
    a = _make("percentile")
    with pytest.raises(ValueError, match=r"PercentileObserver\(.*bins=512.*\) into PercentileObserver\(.*bins=256"):
        a.merge(PercentileObserver(SPECS["channel-sym"], bins=512, percentile=99.0))
    with pytest.raises(ValueError, match="cannot merge MinMaxObserver.*per-tensor.*into MinMaxObserver.*per-channel"):
        _make("minmax").merge(MinMaxObserver(INT8_ACTIVATION))


@pytest.mark.parametrize("kind", KINDS)
def test_merging_another_shape_names_both_and_changes_nothing(kind):
    a = _fed(kind, [torch.randn(8, 4)], name="a.input")
    b = _fed(kind, [torch.randn(8, 6)], name="b.input")
    before = a.qparams()
    with pytest.raises(ValueError, match=r"a.input: cannot merge the observer of 'b.input' that saw scale shape "
                                         r"\(6,\) into one that saw \(4,\) \(the observer of 'a.input'\)"):
        a.merge([_make(kind), b])
    assert all(torch.equal(x, y) for x, y in zip(a.qparams(), before))
    with pytest.raises(ValueError, match=r"'b.input' that saw scale shape \(6,\) into one that saw \(4,\)"):
        _make(kind, name="empty").merge([a, b])  # into an empty observer: the first one with data rules


def test_merging_something_else_is_refused():
    with pytest.raises(ValueError, match="cannot merge Tensor"):
        _make("minmax").merge(torch.zeros(3))
    with pytest.raises(ValueError, match="cannot merge int"):
        _make("minmax").merge([3])


# -- user-defined observers ---------------------------------------------------------------------
class MeanAbsObserver(Observer):
    """Range = +-k * mean |x| per row; merges by declaring its reductions (two sums)."""

    kind = "mean_abs"
    reductions = MappingProxyType({"abs_sum": "sum", "count": "sum"})

    def __init__(self, spec, name="tensor", *, k: float = 3.0):
        super().__init__(spec, name)
        self.k = k
        self._add_state("abs_sum", torch.float64)
        self._add_state("count", torch.int64)

    def _options(self):
        return {"k": self.k}

    def _update(self, rows, first, lo, hi):
        total = rows.abs().double().sum(1)
        count = torch.full_like(total, rows.shape[1], dtype=torch.int64)
        self.abs_sum, self.count = (total, count) if first else (self.abs_sum + total, self.count + count)

    def _range_rows(self):
        amax = (self.k * self.abs_sum / self.count).float()
        return -amax, amax


class TopKObserver(Observer):
    """Range = +-(the k-th largest |x|) per row; keeps the k largest |x| of each row, which no
    elementwise reduction combines: it merges pair by pair (``_merge_state``)."""

    kind = "top_k"

    def __init__(self, spec, name="tensor", *, k: int = 4):
        super().__init__(spec, name)
        self.k = k
        self._add_state("top", torch.float32, per_row=(k,))

    def _options(self):
        return {"k": self.k}

    def _keep_top(self, values):
        padded = torch.cat([values, values.new_zeros(values.shape[0], self.k)], 1)
        return padded.topk(self.k, dim=1).values

    def _update(self, rows, first, lo, hi):
        self.top = self._keep_top(rows.abs() if first else torch.cat([self.top, rows.abs()], 1))

    def _merge_state(self, other):
        self.top = self._keep_top(torch.cat([self.top, other.top], 1))

    def _range_rows(self):
        return -self.top[:, -1], self.top[:, -1]


@pytest.mark.parametrize("cls", [MeanAbsObserver, TopKObserver])
def test_user_defined_observers_merge(cls):
    shards = _shards(9, 3, scales=(1.0, 20.0, 0.5))
    whole = cls(SPECS["channel-sym"])
    for x in (x for shard in shards for x in shard):
        whole(x)
    parts = [cls(SPECS["channel-sym"]) for _ in shards]
    for obs, shard in zip(parts, shards):
        for x in shard:
            obs(x)
    merged = cls(SPECS["channel-sym"]).merge([parts[0], cls(SPECS["channel-sym"]), *parts[1:]])
    assert int(merged.num_batches) == 9
    if cls is TopKObserver:  # a selection: exact
        _assert_same_state(merged, whole)
    else:  # float64 sums added in another order: differ by rounding, ~1e-16 relative
        assert torch.equal(merged.count, whole.count)
        torch.testing.assert_close(merged.abs_sum, whole.abs_sum, rtol=1e-13, atol=0)
        torch.testing.assert_close(merged.qparams()[0], whole.qparams()[0], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="cannot merge MinMaxObserver"):
        merged.merge(MinMaxObserver(SPECS["channel-sym"]))


def test_user_observer_that_says_nothing_about_merging_is_told_what_to_implement():
    class Opaque(MeanAbsObserver):
        reductions = MappingProxyType({})

    a, b = Opaque(INT8_ACTIVATION, name="x"), Opaque(INT8_ACTIVATION, name="x")
    a(torch.randn(4))
    b(torch.randn(4))
    with pytest.raises(NotImplementedError, match="x: Opaque does not say how to merge its state: set its "
                                                  "`reductions`.* or override `_merge_state`"):
        a.merge(b)


def test_user_observer_with_incomplete_reductions_is_refused():
    class Partial(MeanAbsObserver):
        reductions = MappingProxyType({"abs_sum": "sum", "count": "median"})

    obs = Partial(INT8_ACTIVATION, name="x")
    with pytest.raises(TypeError, match=r"x: Partial.reductions must map every state buffer \(abs_sum, count\).*"
                                        r"unknown reductions: \{'count': 'median'\}"):
        obs._reducible()
