"""compare: rows per model and runtime, sizes, the latency grid, markdown and JSON."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.report import Comparison, compare


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 128), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 64), nn.Linear(4, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x, y):
        return self.head(F.relu(self.a(x)) * torch.sigmoid(self.b(y)))


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = MLP().eval()
    qmodel = lowbit.quantize(model, [_x(16, 32, seed=s) for s in range(4)], "w8a8", progress=False)
    path = tmp_path_factory.mktemp("compare") / "int8.onnx"
    lowbit.export_onnx(qmodel, path, _x(2, 32))
    return model, qmodel, path


def _labels_eval(data, labels):
    """A user metric: accuracy of predict() on held-out data."""

    def eval_fn(predict):
        return float((predict(data).argmax(1) == labels).float().mean())

    return eval_fn


def test_rows_sizes_and_latency_with_onnx(setup):
    model, qmodel, path = setup
    result = compare(
        model, qmodel, inputs=_x(8, 32, seed=9), onnx=path, threads=(1, 2), batch_sizes=(1, 3), latency_runs=3
    )
    assert isinstance(result, Comparison)
    assert [(r["model"], r["where"]) for r in result.rows] == [
        ("fp32", "pytorch"),
        ("quantized", "pytorch"),
        ("fp32 onnx", "ort"),
        ("quantized onnx", "ort"),
    ]
    rows = {r["model"]: r for r in result.rows}
    assert (
        rows["fp32"]["size_mb"] is None and rows["quantized"]["size_mb"] is None
    )  # nothing measured in torch
    assert rows["quantized onnx"]["size_mb"] == pytest.approx(os.path.getsize(path) / 1e6)
    assert 0 < rows["quantized onnx"]["size_mb"] < rows["fp32 onnx"]["size_mb"] / 2  # int8 weights
    # Fidelity to the FP32 PyTorch model in every row.
    assert rows["fp32"]["metrics"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows["fp32"]["metrics"]["kl"] == 0.0
    assert rows["fp32 onnx"]["metrics"]["max_abs_diff"] < 1e-4
    for name in ("quantized", "quantized onnx"):
        metrics = rows[name]["metrics"]
        assert 0.99 < metrics["cosine"] <= 1.0 + 1e-6 and metrics["max_abs_diff"] > 0
        assert set(metrics) == {"cosine", "max_abs_diff", "top1_agreement", "kl"}
    # Latency: one entry per model per (threads, batch) asked for.
    cells = sorted((x["model"], x["threads"], x["batch"]) for x in result.latency)
    assert cells == sorted((m, t, b) for m in ("fp32", "quantized") for t in (1, 2) for b in (1, 3))
    for x in result.latency:
        assert x["runs"] == 3 and x["p90_ms"] >= x["median_ms"] > 0 and x["mean_ms"] > 0
    assert any("parity" in note for note in result.notes)
    # ORT's integer kernels emulated in PyTorch: the same outputs bit for bit
    assert set(result.parity) == {"simulation", "integer emulation"}
    emulation = result.parity["integer emulation"]
    assert emulation["max_abs_diff"] == 0.0 and emulation["top1_agreement"] == 1.0
    assert any(note.startswith("Integer emulation vs ORT parity") and "(bit-exact)" in note for note in result.notes)


def test_markdown_and_json(setup, tmp_path):
    model, qmodel, path = setup
    result = compare(model, qmodel, inputs=_x(4, 32), onnx=path, batch_sizes=(1, 2), latency_runs=2)
    text = result.to_markdown()
    assert str(result) == text
    assert "| model | measured in | size (MB) | cosine | kl | max_abs_diff | top1_agreement |" in text
    for name, where in (
        ("fp32", "pytorch"),
        ("quantized", "pytorch"),
        ("fp32 onnx", "ort"),
        ("quantized onnx", "ort"),
    ):
        assert f"| {name} | {where} |" in text
    assert "| model | threads | batch | median ms | p90 ms | vs FP32 |" in text
    assert "| fp32 | 1 | 2 |" in text and "| quantized | 1 | 2 |" in text
    assert "1.0000x" in text  # fp32 against itself
    assert "Simulation vs ORT parity" in text and "ONNX Runtime CPU provider" in text
    out = tmp_path / "report.json"
    result.save_json(out)
    assert json.loads(out.read_text()) == result.to_dict()
    assert result.to_dict() == {"rows": result.rows, "latency": result.latency, "notes": result.notes,
                                "parity": result.parity}


def test_eval_fn_metric_appears_in_every_row(setup):
    model, qmodel, path = setup
    data = _x(64, 32, seed=3)
    with torch.no_grad():
        labels = model(data).argmax(1)
        labels[::4] = (labels[::4] + 1) % 10  # fp32 gets 75% right
    result = compare(model, qmodel, _labels_eval(data, labels), inputs=_x(4, 32), onnx=path, latency_runs=1,
                     emulate=False)
    metrics = {r["model"]: r["metrics"]["metric"] for r in result.rows}
    assert set(metrics) == {"fp32", "quantized", "fp32 onnx", "quantized onnx"}
    assert metrics["fp32"] == 0.75 and metrics["fp32 onnx"] == 0.75
    assert 0.6 < metrics["quantized"] <= 0.8 and 0.6 < metrics["quantized onnx"] <= 0.8
    header = result.to_markdown().splitlines()[0]
    assert "| metric |" in header
    assert set(result.parity) == {"simulation"}  # emulate=False


def test_eval_fn_returning_a_dict(setup):
    model, qmodel, _ = setup
    data = _x(16, 32, seed=4)
    result = compare(
        model, qmodel, lambda predict: {"mean": float(predict(data).mean()), "n": 16.0}, inputs=_x(4, 32)
    )
    assert [r["model"] for r in result.rows] == ["fp32", "quantized"]
    with torch.no_grad():
        assert result.rows[0]["metrics"]["mean"] == pytest.approx(float(model(data).mean()))
    assert all(r["metrics"]["n"] == 16.0 for r in result.rows)


def test_without_onnx_only_pytorch_rows(setup):
    model, qmodel, _ = setup
    result = compare(model, qmodel, inputs=_x(4, 32))
    assert [r["model"] for r in result.rows] == ["fp32", "quantized"]
    assert result.latency == [] and result.parity == {}
    assert "median ms" not in result.to_markdown()


def test_given_fp32_onnx_and_tuple_inputs(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    calib = [(_x(8, 8, seed=s), _x(8, 4, seed=s + 10)) for s in range(3)]
    qmodel = lowbit.quantize(model, calib, "w8a8", progress=False)
    inputs = (_x(6, 8, seed=1), _x(6, 4, seed=2))
    lowbit.export_onnx(model, tmp_path / "fp32.onnx", inputs)
    lowbit.export_onnx(qmodel, tmp_path / "int8.onnx", inputs)
    result = compare(
        model,
        qmodel,
        inputs=inputs,
        onnx=tmp_path / "int8.onnx",
        fp32_onnx=tmp_path / "fp32.onnx",
        batch_sizes=(2,),
        latency_runs=2,
    )
    rows = {r["model"]: r for r in result.rows}
    # relu(a(x)) * sigmoid(b(y)) multiplies in float in ORT: no integer emulation, and the report says why
    assert set(result.parity) == {"simulation"}
    assert any(n.startswith("Integer emulation of ORT: not applicable") and "feeds mul" in n for n in result.notes)
    assert rows["fp32 onnx"]["size_mb"] == pytest.approx(os.path.getsize(tmp_path / "fp32.onnx") / 1e6)
    assert rows["fp32 onnx"]["metrics"]["max_abs_diff"] < 1e-4
    assert rows["quantized onnx"]["metrics"]["cosine"] > 0.99
    assert sorted((x["model"], x["batch"]) for x in result.latency) == [("fp32", 2), ("quantized", 2)]
