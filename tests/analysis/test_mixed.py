"""mixed_precision: budgets, the chosen assignment, the config that replays it, the result file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.analysis import LayerSensitivity, MixedPrecisionResult, SensitivityReport, mixed_precision
from lowbit.analysis._latency import LatencyTable

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = {"0": 8 * 16, "2": 16 * 32, "4": 32 * 4}  # 128 + 512 + 128 = 768 weights


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 8, generator=g) for _ in range(2)]


def report(choice: str, costs: dict[str, float], bits: int) -> SensitivityReport:
    rows = [LayerSensitivity(name=n, kind="Linear", params=PARAMS[n], weight_bits=bits, cost=c) for n, c in costs.items()]
    return SensitivityReport(method="sqnr", choice=choice, cost_unit="test units", layers=rows)


# 4 bits costs most on layer "2" (the largest), then "0"; 8 bits costs little everywhere
REPORTS = {"w4a8": report("w4a8", {"0": 1.0, "2": 5.0, "4": 0.5}, 4),
           "w8a8": report("w8a8", {"0": 0.1, "2": 0.1, "4": 0.1}, 8)}


def solve(model, calib, budget, choices=("w4a8", "w8a8"), **kw):
    return mixed_precision(model, calib, choices, budget, sensitivities=kw.pop("sensitivities", REPORTS), **kw)


@pytest.mark.parametrize("budget", [{}, {"bits": 5}, {"avg_weight_bits": 5, "size_mb": 1}, 5.0])
def test_budget_must_be_one_known_kind(model, calib, budget):
    with pytest.raises(ValueError, match="exactly one of avg_weight_bits, size_mb, latency_ratio"):
        solve(model, calib, budget)


def test_avg_weight_bits_known_optimum(model, calib):
    # 8 bits on a layer adds 4 * params / 768 bits: "0" and "4" +0.667, "2" +2.667.
    r = solve(model, calib, {"avg_weight_bits": 5.0})  # room for one small layer: "0" saves 0.9, "4" 0.4
    assert r.assignment == {"0": "w8a8", "2": "w4a8", "4": "w4a8"}
    assert r.predicted["avg_weight_bits"] == pytest.approx(4 + 4 * 128 / 768)
    assert r.predicted["error"] == pytest.approx(0.1 + 5.0 + 0.5)
    r = solve(model, calib, {"avg_weight_bits": 7.0})  # "2" (saves 4.9) beats "0" + "4" (1.3)
    assert r.assignment == {"0": "w4a8", "2": "w8a8", "4": "w4a8"}
    assert r.budget == {"avg_weight_bits": 7.0} and r.base == "w8a8"


def test_infeasible_budget_names_the_smallest(model, calib):
    with pytest.raises(ValueError, match=r"smallest achievable avg_weight_bits is 4\b"):
        solve(model, calib, {"avg_weight_bits": 3.5})


def test_float_choice(model, calib):
    reports = {"w8a8": report("w8a8", {"0": 1.0, "2": 1.0, "4": 1.0}, 8)}
    # float adds 24 * params / 768 bits: "0" and "4" +4 each, "2" +16
    r = solve(model, calib, {"avg_weight_bits": 16.0}, choices=("w8a8", None), sensitivities=reports)
    assert r.assignment == {"0": "float", "2": "w8a8", "4": "float"}
    assert r.predicted["error"] == 1.0 and r.predicted["avg_weight_bits"] == pytest.approx(16.0)
    assert r.choices == ["w8a8", "float"] and r.base == "w8a8"


def test_size_mb(model, calib):
    other = (16 + 32 + 4) * 32 / 8 / 1e6  # biases at 32 bits
    r = solve(model, calib, {"size_mb": other + (128 * 8 + 512 * 4 + 128 * 4) / 8 / 1e6})
    assert r.assignment == {"0": "w8a8", "2": "w4a8", "4": "w4a8"}
    assert r.predicted["size_mb"] == pytest.approx(other + (128 * 8 + 512 * 4 + 128 * 4) / 8 / 1e6)
    with pytest.raises(ValueError, match="smallest achievable size_mb is 0.000"):
        solve(model, calib, {"size_mb": 1e-4})


def test_latency_ratio_from_a_table(model, calib):
    # w8a8 1 ms per layer, w4a8 0.5 ms (pretend), other 1 ms: uniform w8a8 = 4 ms
    table = LatencyTable(per_layer={n: {"w4a8": 0.5, "w8a8": 1.0} for n in PARAMS},
                         other={"w4a8": 1.0, "w8a8": 1.0}, total={"w4a8": 2.5, "w8a8": 4.0})
    r = solve(model, calib, {"latency_ratio": 3.25 / 4}, latency=table)  # one layer at 8 bits fits (3 ms)
    assert r.assignment == {"0": "w4a8", "2": "w8a8", "4": "w4a8"}
    assert r.predicted["latency_ratio"] == pytest.approx(3.0 / 4)
    assert r.latency is table
    with pytest.raises(ValueError, match="smallest achievable latency_ratio is 0.625"):
        solve(model, calib, {"latency_ratio": 0.5}, latency=table)
    with pytest.raises(ValueError, match=r"the latency table lacks \['float'\]"):
        solve(model, calib, {"latency_ratio": 0.9}, choices=("w4a8", "w8a8", None), latency=table)


def test_front_is_non_dominated(model, calib):
    r = solve(model, calib, {"avg_weight_bits": 5.0}, choices=("w4a8", "w8a8", None),
              sensitivities=REPORTS, front_points=20)
    bits = [p.resources["avg_weight_bits"] for p in r.front]
    errors = [p.error for p in r.front]
    assert bits == sorted(bits) and errors == sorted(errors, reverse=True)
    assert bits[0] == pytest.approx(4.0) and errors[-1] == 0.0  # from all-4-bit to all-float
    assert all(set(p.assignment.values()) <= {"w4a8", "w8a8", "float"} for p in r.front)


def test_config_replays_the_bits(model, calib):
    r = solve(model, calib, {"avg_weight_bits": 12.0}, choices=("w4a8", "w8a8", None))
    assert set(r.assignment.values()) >= {"float"}
    qmodel = lowbit.quantize(model, calib, config=r.config, progress=False)
    for name, choice in r.assignment.items():
        layer = qmodel.get_submodule(name)
        quantizer = getattr(layer, "weight_quantizer", None)
        if choice == "float":
            assert quantizer is None
        else:
            assert quantizer.spec.bits == {"w4a8": 4, "w8a8": 8}[choice]
    assert r.config.name == "mixed"


def test_base(model, calib):
    r = solve(model, calib, {"avg_weight_bits": 5.0}, choices=("w4a8", "w8a8", None))
    assert r.base == "w8a8" and r.config.default is not None
    r = solve(model, calib, {"avg_weight_bits": 5.0}, choices=("w4a8", "w8a8", None), base="float")
    assert r.base == "float" and r.config.default is None


def test_report_missing_a_layer(model, calib):
    reports = {**REPORTS, "w4a8": report("w4a8", {"0": 1.0, "2": 5.0}, 4)}
    with pytest.raises(ValueError, match=r"no row for layer\(s\) \['4'\]"):
        solve(model, calib, {"avg_weight_bits": 5.0}, sensitivities=reports)


def test_json_round_trip(model, calib, tmp_path):
    table = LatencyTable(per_layer={n: {"w4a8": 0.5, "w8a8": 1.0} for n in PARAMS},
                         other={"w4a8": 1.0, "w8a8": 1.0}, total={"w4a8": 2.5, "w8a8": 4.0})
    r = solve(model, calib, {"avg_weight_bits": 5.0}, latency=table)
    again = MixedPrecisionResult.load_json(r.save_json(tmp_path / "mixed.json"))
    assert again.to_dict() == r.to_dict()
    assert again.config == r.config and again.latency == table
    md = r.to_markdown()
    assert "| 2 | Linear | 512 | w4a8 | 4 | 5 |" in md and "Pareto front" in md and "latency_ratio" in md
    with pytest.raises(ValueError, match="not a lowbit mixed-precision result"):
        MixedPrecisionResult.from_dict({**r.to_dict(), "format": "other"})


def test_measures_latency_when_the_budget_needs_it(model, calib):
    r = solve(model, calib, {"latency_ratio": 1.5}, choices=("w4a8", "w8a8", None))
    assert set(r.latency.other) == {"w4a8", "w8a8", "float"}
    assert r.predicted["latency_ratio"] <= 1.5


def test_with_sensitivity_analysis(model, calib):
    r = mixed_precision(model, calib, ("w4a8", "w8a8"), {"avg_weight_bits": 6.0}, method="sqnr", batches=1)
    assert set(r.sensitivities) == {"w4a8", "w8a8"}
    assert r.sensitivities["w4a8"].method == "sqnr"
    assert r.predicted["avg_weight_bits"] <= 6.0
    assert r.predicted["error"] == pytest.approx(sum(r.sensitivities[c][n].cost for n, c in r.assignment.items()))
