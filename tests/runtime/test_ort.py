"""OrtModel and measure_latency on small exported models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.runtime import LatencyStats, OrtModel, measure_latency


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(3, 4)

    def forward(self, x, y):
        ha, hb = self.a(x), self.b(y)
        return ha + hb, ha * hb


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    torch.manual_seed(0)
    model = MLP().eval()
    qmodel = lowbit.quantize(model, [_x(8, 16, seed=s) for s in range(3)], "w8a8", progress=False)
    folder = tmp_path_factory.mktemp("ort")
    lowbit.export_onnx(model, folder / "fp32.onnx", _x(2, 16))
    lowbit.export_onnx(qmodel, folder / "int8.onnx", _x(2, 16))
    return model, qmodel, folder / "fp32.onnx", folder / "int8.onnx"


@pytest.fixture(scope="module")
def two_io(tmp_path_factory):
    torch.manual_seed(0)
    model = TwoInTwoOut().eval()
    path = tmp_path_factory.mktemp("ort2") / "two.onnx"
    lowbit.export_onnx(model, path, (_x(2, 8), _x(2, 3)))
    return model, path


@pytest.mark.parametrize("batch", [1, 7])
def test_float_export_reproduces_torch(mlp_files, batch):
    model, _, fp32, _ = mlp_files
    ort_model = OrtModel(fp32)
    x = _x(batch, 16, seed=batch)
    out = ort_model(x)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_quantized_export_runs_close_to_the_simulation(mlp_files):
    model, qmodel, _, int8 = mlp_files
    x = _x(16, 16, seed=5)
    with torch.no_grad():
        sim, ref = qmodel(x), model(x)
    out = OrtModel(int8)(x)
    assert out.shape == sim.shape
    assert F.cosine_similarity(out, sim, dim=1).min() > 0.999
    assert F.cosine_similarity(out, ref, dim=1).min() > 0.99


def test_feeds_by_position_keyword_and_dict(two_io):
    model, path = two_io
    ort_model = OrtModel(path, threads=2)
    assert ort_model.input_names == ["input_0", "input_1"] and ort_model.threads == 2
    x, y = _x(3, 8, seed=1), _x(3, 3, seed=2)
    with torch.no_grad():
        expected = model(x, y)
    for out in (
        ort_model(x, y),
        ort_model({"input_0": x, "input_1": y}),
        ort_model(input_1=y, input_0=x),
        ort_model(x, input_1=y),
        ort_model(x.numpy(), y.numpy()),
    ):
        assert isinstance(out, tuple) and len(out) == 2  # several outputs -> a tuple
        for got, want in zip(out, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    feeds = ort_model.feeds(x, y)
    assert set(feeds) == {"input_0", "input_1"} and feeds["input_0"].shape == (3, 8)


def test_missing_input_is_a_clear_error(two_io):
    _, path = two_io
    ort_model = OrtModel(path)
    with pytest.raises(
        ValueError,
        match=r"two\.onnx: missing input\(s\) \['input_1'\]; the model takes "
        r"\['input_0', 'input_1'\]",
    ):
        ort_model(_x(2, 8))
    with pytest.raises(ValueError, match=r"missing input\(s\) \['input_0'\]"):
        ort_model({"input_1": _x(2, 3)})
    with pytest.raises(ValueError, match=r"missing input\(s\) \['input_0', 'input_1'\]"):
        ort_model(inputs=_x(2, 8))  # a wrong name is not an input


@pytest.mark.parametrize("level", ["all", "extended", "basic", "disable"])
def test_optimization_levels_give_the_same_result(mlp_files, level):
    _, _, fp32, _ = mlp_files
    x = _x(4, 16, seed=3)
    torch.testing.assert_close(OrtModel(fp32, optimization=level)(x), OrtModel(fp32)(x), atol=1e-5, rtol=1e-5)


def test_unknown_optimization_level_is_a_clear_error(mlp_files):
    _, _, fp32, _ = mlp_files
    with pytest.raises(ValueError, match="all.*extended.*basic.*disable"):
        OrtModel(fp32, optimization="fast")


def test_measure_latency_returns_sane_stats(mlp_files):
    _, _, _, int8 = mlp_files
    ort_model = OrtModel(int8)
    calls = []
    real_run = ort_model.run
    ort_model.run = lambda feeds: calls.append(1) or real_run(feeds)
    stats = measure_latency(ort_model, ort_model.feeds(_x(5, 16)), warmup=3, runs=11)
    assert isinstance(stats, LatencyStats)
    assert len(calls) == 3 + 11
    assert (stats.runs, stats.warmup, stats.threads, stats.batch) == (11, 3, 1, 5)
    assert stats.p90_ms >= stats.median_ms > 0 and stats.mean_ms > 0
    assert stats.median_ms < 1000  # a 16-32-10 MLP: well under a second
    assert stats.to_dict() == {
        "median_ms": stats.median_ms,
        "p90_ms": stats.p90_ms,
        "mean_ms": stats.mean_ms,
        "runs": 11,
        "warmup": 3,
        "threads": 1,
        "batch": 5,
    }


def test_measure_latency_batch_override(mlp_files):
    _, _, fp32, _ = mlp_files
    ort_model = OrtModel(fp32, threads=2)
    stats = measure_latency(ort_model, ort_model.feeds(_x(4, 16)), warmup=0, runs=1, batch=32)
    assert (stats.batch, stats.threads, stats.runs) == (32, 2, 1)
    assert stats.p90_ms == stats.median_ms == stats.mean_ms > 0  # one run: all the same number
