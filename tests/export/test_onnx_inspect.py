"""inspect_onnx: classification of ORT's optimized graph and the report's forms."""

from __future__ import annotations

import json
import warnings

import onnxruntime.capi.onnxruntime_pybind11_state as ort_state
import pytest
import torch
from torch import nn

from lowbit.export import OnnxKernelReport, inspect_onnx
from lowbit.export.onnx_inspect import classify


@pytest.mark.parametrize("op, kind", [
    ("QLinearConv", "integer"), ("QGemm", "integer"), ("MatMulIntegerToFloat", "integer"),
    ("DynamicQuantizeMatMul", "integer"), ("QLinearAdd", "integer"), ("MatMulNBits", "integer"),
    ("Conv", "float_compute"), ("FusedConv", "float_compute"), ("Gemm", "float_compute"), ("Add", "float_compute"),
    ("QuantizeLinear", "data_movement"), ("NhwcMaxPool", "data_movement"), ("ReorderInput", "data_movement"),
    ("Relu", "other"), ("LayerNormalization", "other"),
])
def test_classify(op, kind):
    assert classify(op) == kind


def test_every_ort_quantized_kernel_counts_as_integer():
    schemas = {s.name for s in ort_state.get_all_operator_schema() if s.domain.startswith("com.m")}
    quantized = {n for n in schemas if n.startswith(("QLinear", "MatMulNBits")) or "Integer" in n}
    assert quantized and all(classify(n) == "integer" for n in quantized)


@pytest.fixture(scope="module")
def float_cnn(tmp_path_factory):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    path = tmp_path_factory.mktemp("float") / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, used on purpose
        torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=19)
    return path


def test_float_model_has_no_integer_kernels(float_cnn):
    report = inspect_onnx(float_cnn)
    assert report.integer_fraction == 0.0
    assert report.count("integer") == 0 and len(report.float_compute_nodes) == 2
    assert report.level == "all" and report.onnxruntime_version


def test_report_forms(float_cnn):
    report = inspect_onnx(float_cnn, level="extended", threads=2)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["integer_fraction"] == 0.0 and data["kinds"]["float_compute"] == 2
    text = str(report)
    assert "| op | kind | count |" in text and "float compute nodes:" in text


def test_no_compute_nodes_gives_no_fraction():
    assert OnnxKernelReport(path="x.onnx", level="all", op_counts={"Reshape": 1}).integer_fraction is None


def test_bad_arguments(float_cnn, tmp_path):
    with pytest.raises(ValueError, match="level"):
        inspect_onnx(float_cnn, level="max")
    with pytest.raises(FileNotFoundError):
        inspect_onnx(tmp_path / "missing.onnx")
