"""lowbit.ptq.range_search: the search repairs a range that hurts the output, never raises the
output error on the batches it searched, chooses exactly what full forward passes would (the
graph replay is only faster), and the step goes through the registry, quantize, sensitivity,
ONNX Runtime (bit-exact with the emulation) and save / load."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from tests.persist.test_persist import net
from tests.ptq.test_adaround import CALIB, HELD_OUT, W4A8, conv_net

import lowbit
from lowbit.numerics import compute_qparams
from lowbit.ptq import BiasCorrection, RangeSearch, Step, parse_step, parse_steps
from lowbit.ptq import range_search as rs
from lowbit.ptq.steps import CALIBRATED, STEPS
from lowbit.runtime import OrtModel, emulate_ort

pytestmark = pytest.mark.usefixtures("one_thread")


def _output_error(model, reference) -> float:
    with torch.no_grad():
        return sum(float((model(x) - reference(x)).pow(2).mean()) for x in HELD_OUT)


def _shrunk(model, name: str, factor: float):
    """``model`` with the quantizer ``name``'s range shrunk by ``factor`` (clipping most of its tensor)."""
    q = dict(lowbit.ptq.iter_quantizers(model))[name]
    lo = (q.spec.qmin - q.zero_point.double()) * q.scale.double()
    hi = (q.spec.qmax - q.zero_point.double()) * q.scale.double()
    q.set_qparams(*compute_qparams((lo * factor).float(), (hi * factor).float(), q.spec))
    return q


@pytest.fixture
def sabotaged():
    """conv_net at W4A8 whose fc input range is a sixteenth of its calibrated one."""
    qmodel = lowbit.quantize(conv_net(), CALIB, W4A8, progress=False)
    _shrunk(qmodel, "fc.input", 1 / 16)
    return qmodel


def test_a_range_that_hurts_the_output_is_repaired_on_held_out_inputs(sabotaged):
    before = _output_error(sabotaged, conv_net())
    report = rs.search_ranges(sabotaged, CALIB, batches=2, reach=8, progress=False)
    assert report["changed"]["fc.input"] >= 4  # widened back by 4x or more (2**(k/2) steps)
    after = _output_error(sabotaged, conv_net())
    assert after < 0.2 * before, (before, after)
    assert report["error_after"] < 0.2 * report["error_before"]
    assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize("objective", ["mse", "kl"])
def test_the_searched_output_error_never_goes_up(objective):
    qmodel = lowbit.quantize(conv_net(), CALIB, W4A8, progress=False)
    report = rs.search_ranges(qmodel, CALIB, batches=3, objective=objective, progress=False)
    assert report["objective"] == objective
    assert report["error_after"] <= report["error_before"]
    # the error the walk kept track of is the searched batches' error of the model as it now is
    assert rs._Runs(qmodel, CALIB[:3], objective).error == pytest.approx(report["error_after"], rel=1e-9)
    activation = [n for n, q in lowbit.ptq.iter_quantizers(qmodel) if not n.endswith(".weight")]
    assert set(report["changed"]) <= set(activation)


def test_the_graph_replay_chooses_exactly_what_full_passes_choose(monkeypatch):
    replayed = lowbit.quantize(conv_net(), CALIB, W4A8, progress=False)
    whole = lowbit.quantize(conv_net(), CALIB, W4A8, progress=False)
    for model in (replayed, whole):
        _shrunk(model, "conv2.input", 0.3)
    first = rs.search_ranges(replayed, CALIB, batches=2, progress=False)
    monkeypatch.setattr(rs, "try_trace", lambda _m: (None, "forced: no graph"))
    second = rs.search_ranges(whole, CALIB, batches=2, progress=False)
    assert first == second and first["changed"]
    for (name, a), (_, b) in zip(lowbit.ptq.iter_quantizers(replayed), lowbit.ptq.iter_quantizers(whole), strict=True):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point), name


def test_candidates_go_outward_and_widen_only_up_to_the_observed_data():
    percentile = W4A8.with_observer("percentile", percentile=99.0)
    qmodel = lowbit.quantize(conv_net(), CALIB, percentile, progress=False)
    q = dict(lowbit.ptq.iter_quantizers(qmodel))["conv2.input"]

    def top(qparams):
        scale, zero_point = qparams
        return float((q.spec.qmax - zero_point.double()) * scale.double())

    current = top((q.scale, q.zero_point))
    narrower, wider = rs._candidates(q, reach=6)
    assert [f for f, _ in narrower] == [round(2 ** (-k / 2), 4) for k in range(1, len(narrower) + 1)]
    assert all(top(a) > top(b) for (_, a), (_, b) in zip([(1.0, (q.scale, q.zero_point)), *narrower], narrower))
    data_hi = float(q.observer.max_val)
    assert current < data_hi / 2  # the 99th percentile: the data reach further than the range
    assert all(top(a) < top(b) for (_, a), (_, b) in itertools.pairwise(wider))
    assert top(wider[-1][1]) == pytest.approx(data_hi, rel=1e-6)
    assert rs._candidates(q, reach=1)[1][-1][0] == "data"  # beyond 2**(1/2): the data range itself
    grids = [(float(s), int(z)) for _, (s, z) in [*narrower, *wider]] + [(float(q.scale), int(q.zero_point))]
    assert len(set(grids)) == len(grids)  # no grid twice, the current one not again


def test_the_walk_stops_where_the_error_rises_and_keeps_the_best(monkeypatch):
    """A synthetic error curve along the candidates: the walk goes down while it falls, stops at
    the first rise, never evaluates the wider side once narrower helped, and keeps the minimum."""
    qmodel = lowbit.quantize(conv_net(), CALIB, W4A8, progress=False)
    run = rs._Runs(qmodel, CALIB[:1], "mse")
    entry = rs._activation_quantizers(qmodel)[1]
    q = entry.quantizer
    narrower, wider = rs._candidates(q, reach=4)
    curve = {1.0: 5.0, narrower[0][0]: 4.0, narrower[1][0]: 3.0, narrower[2][0]: 3.5, narrower[3][0]: 1.0}
    evaluated = []

    def fake_error(_outputs):
        factor = next(f for f, (s, z) in [(1.0, (run_scale, run_zp)), *narrower, *wider]
                      if torch.equal(s, q.scale) and torch.equal(z, q.zero_point))
        evaluated.append(factor)
        return curve.get(factor, 9.0)

    run_scale, run_zp = q.scale.clone(), q.zero_point.clone()
    run.error = curve[1.0]
    monkeypatch.setattr(run, "_error", fake_error)
    assert run.choose(entry, (narrower, wider)) == narrower[1][0]
    assert evaluated == [narrower[0][0], narrower[1][0], narrower[2][0]]  # stopped at the rise
    assert run.error == 3.0 and torch.equal(q.scale, narrower[1][1][0])


# -- the step -----------------------------------------------------------------------------------
def test_the_step_is_registered_and_round_trips():
    assert STEPS["range_search"] is RangeSearch and RangeSearch.phase == CALIBRATED and RangeSearch.needs_data
    step = RangeSearch(batches=2, reach=3, objective="kl")
    assert Step.from_dict(json.loads(json.dumps(step.to_dict()))) == step
    assert parse_step(str(step)) == step
    assert parse_steps("range_search(objective=kl),bias_correction") == (RangeSearch(objective="kl"), BiasCorrection())


@pytest.mark.parametrize("bad, message", [
    ("range_search(batches=0)", r"RangeSearch.batches must be an integer >= 1, got 0"),
    ("range_search(reach=0)", r"RangeSearch.reach must be an integer >= 1, got 0"),
    ("range_search(objective=l1)", r"RangeSearch.objective must be 'mse' or 'kl', got 'l1'"),
])
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_steps(bad)


def test_no_calibration_data_is_a_clear_error():
    with pytest.raises(ValueError, match=r"range_search needs calibration data"):
        lowbit.quantize(conv_net(), None, "w8a8", algorithms=["range_search"], progress=False)
    qmodel = lowbit.quantize(conv_net(), CALIB, W4A8, progress=False)
    with pytest.raises(ValueError, match="range_search: calibration data is empty"):
        rs.search_ranges(qmodel, [])


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployed():
    """``net`` (Conv-BN, a residual add, a pool, a Linear) through w8a8, range search, bias correction."""
    calib = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return lowbit.quantize(net(0), calib, "w8a8", algorithms=["range_search(reach=3)", "bias_correction"],
                           progress=False)


def test_quantize_with_range_search_exports_and_ort_matches_the_emulation_bit_for_bit(deployed, tmp_path):
    summary = deployed.lowbit_summary
    assert summary.algorithms[1:] == (RangeSearch(reach=3), BiasCorrection())
    assert summary.reports[1]["error_after"] <= summary.reports[1]["error_before"]
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(9)) * 1.5
    path = tmp_path / "model.onnx"
    lowbit.export_onnx(deployed, path, x[:1])
    expected = OrtModel(path)(x)
    assert torch.equal(emulate_ort(deployed)(x), expected)


def test_save_and_load_give_identical_outputs(deployed, tmp_path):
    loaded = lowbit.load(net(1), lowbit.save(deployed, tmp_path / "m"))
    assert loaded.lowbit_summary.algorithms == deployed.lowbit_summary.algorithms
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))


def test_sensitivity_keeps_the_search_since_a_float_layer_drops_its_ranges():
    qmodel = lowbit.quantize(conv_net(), CALIB, W4A8, algorithms=["range_search(batches=1)"], progress=False)
    report = lowbit.sensitivity(conv_net(), CALIB[:1], config=W4A8, method="sqnr", qmodel=qmodel)
    assert {row.name for row in report.ranked()} == {"conv1", "conv2", "fc"}
    with pytest.raises(ValueError, match=r"qmodel ran bias_correction"):
        lowbit.sensitivity(conv_net(), CALIB[:1], config=W4A8, method="sqnr", qmodel=lowbit.quantize(
            conv_net(), CALIB, W4A8, algorithms=["range_search(batches=1)", "bias_correction"], progress=False))
