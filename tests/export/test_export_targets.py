"""Export follows the model's integer target: uint8 weights for x86-avx2-u8u8, the target in the
file's metadata, and a warning when a VNNI file meets a CPU without VNNI."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit import targets
from lowbit.runtime import OrtModel
from lowbit.targets import CpuInfo, TargetMismatchWarning


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith("weight_quantized")}


def test_u8u8_writes_uint8_weights_with_the_same_values(tmp_path):
    model, x = _model(), torch.randn(4, 3, 8, 8)
    files = {}
    for target in ("x86-vnni", "x86-avx2-u8u8"):
        qmodel = lowbit.quantize(model, [x], "w8a8", target=target, progress=False)
        files[target] = tmp_path / f"{target}.onnx"
        proto = lowbit.export_onnx(qmodel, files[target], x[:1])
        assert {p.key: p.value for p in proto.metadata_props} == {"lowbit.target": target}
    s8, u8 = (_weights(onnx.load(files[t])) for t in ("x86-vnni", "x86-avx2-u8u8"))
    assert s8.keys() == u8.keys() and len(s8) == 2
    for name in s8:
        assert s8[name].dtype == np.int8 and u8[name].dtype == np.uint8
        assert np.array_equal(s8[name].astype(np.int16) + 128, u8[name])
    report = lowbit.inspect_onnx(files["x86-avx2-u8u8"])
    assert report.integer_fraction == 1.0, report
    assert torch.equal(OrtModel(files["x86-vnni"])(x), OrtModel(files["x86-avx2-u8u8"])(x)) \
        or not targets.cpu_info().has_vnni  # (the VNNI file saturates on a CPU without VNNI)


def test_u8u8_dynamic_matmuls_keep_their_integer_kernel(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.randn(2, 5, 32)
    qmodel = lowbit.quantize(model, None, "w8a8-dynamic", target="x86-avx2-u8u8", progress=False)
    path = tmp_path / "dyn.onnx"
    lowbit.export_onnx(qmodel, path, x[:1])
    ints = [i for i in onnx.load(path).graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert len(ints) >= 2  # the two weights (and their zero points)
    assert lowbit.inspect_onnx(path).op_counts.get("DynamicQuantizeMatMul") == 2
    torch.testing.assert_close(OrtModel(path)(x), qmodel(x), atol=1e-4, rtol=1e-4)


def test_export_target_can_be_overridden(tmp_path):
    model, x = _model(), torch.randn(2, 3, 8, 8)
    qmodel = lowbit.quantize(model, [x], "w8a8", target="x86-vnni", progress=False)
    proto = lowbit.export_onnx(qmodel, tmp_path / "m.onnx", x[:1], target="x86-avx2-u8u8")
    assert all(w.dtype == np.uint8 for w in _weights(proto).values())


@pytest.mark.parametrize(("target", "warns"), [("x86-vnni", True), ("x86-avx2-u8u8", False), ("x86-avx2-w7", False)])
def test_a_vnni_file_on_a_cpu_without_vnni_warns(target, warns, tmp_path, monkeypatch):
    model, x = _model(), torch.randn(2, 3, 8, 8)
    qmodel = lowbit.quantize(model, [x], "w8a8", target=target, progress=False)
    path = tmp_path / "m.onnx"
    lowbit.export_onnx(qmodel, path, x[:1])
    zen3 = CpuInfo(arch="x86_64", model="AMD EPYC 7B13", flags=frozenset({"avx2", "fma"}))
    monkeypatch.setattr(targets, "cpu_info", lambda: zen3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OrtModel(path)
    mismatch = [w for w in caught if issubclass(w.category, TargetMismatchWarning)]
    assert bool(mismatch) == warns
    if warns:
        message = str(mismatch[0].message)
        assert "m.onnx" in message and "AMD EPYC 7B13" in message and "target='x86-avx2'" in message
