"""lowbit.export: the callable package, dispatch on the target, refusals with the fix, missing
exporters and extras named, and ``lowbit export --target`` on the command line."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
import lowbit.export.tensorrt  # a submodule import must not un-call the package
from lowbit import cli
from lowbit.config import W8A8
from lowbit.export import dispatch, export_onnx
from lowbit.export.tensorrt import check_tensorrt

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


def tiny_data():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)]


def _quantized(target):
    return lowbit.quantize(tiny_cnn(), tiny_data(), "w8a8", target=target, progress=False)


def _weight_dtypes(path) -> set:
    return {numpy_helper.to_array(t).dtype for t in onnx.load(path).graph.initializer
            if t.name.endswith("weight_quantized")}


def test_lowbit_export_is_the_package_and_the_verb():
    assert callable(lowbit.export) and lowbit.export.export_onnx is export_onnx
    assert lowbit.export.tensorrt.export_tensorrt is not None
    assert "export" in lowbit.__all__


def test_cpu_targets_write_export_onnx_bytes(tmp_path):
    qmodel, x = _quantized("x86-vnni"), tiny_data()[0]
    assert lowbit.export(qmodel, tmp_path / "a.onnx", x) == tmp_path / "a.onnx"
    export_onnx(qmodel, tmp_path / "b.onnx", x)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    lowbit.export(qmodel, tmp_path / "ort.onnx", x, target="ort")
    assert _weight_dtypes(tmp_path / "ort.onnx") == {np.dtype(np.int8)}


def test_ort_keeps_the_models_own_cpu_target(tmp_path):
    qmodel, x = _quantized("x86-avx2-u8u8"), tiny_data()[0]
    lowbit.export(qmodel, tmp_path / "m.onnx", x, target="ort")
    assert _weight_dtypes(tmp_path / "m.onnx") == {np.dtype(np.uint8)}


def test_among_cpu_targets_only_the_weight_layout_may_change(tmp_path):
    qmodel, x = _quantized("x86-vnni"), tiny_data()[0]
    lowbit.export(qmodel, tmp_path / "u8.onnx", x, target="x86-avx2-u8u8")  # same numbers, uint8 weights
    assert _weight_dtypes(tmp_path / "u8.onnx") == {np.dtype(np.uint8)}
    with pytest.raises(ValueError, match=r"8-bit weights; target 'x86-avx2-w7' runs at most 7 bits.*"
                                         r"target='x86-avx2-w7'"):
        lowbit.export(qmodel, tmp_path / "w7.onnx", x, target="x86-avx2-w7")


@pytest.mark.parametrize(("quantized", "asked"), [("tensorrt", "ort"), ("x86-vnni", "tensorrt"),
                                                  ("openvino", "qnn"), ("tflite", "x86-vnni")])
def test_another_runtime_than_the_models_is_refused_with_the_fix(quantized, asked, tmp_path):
    qmodel, x = _quantized(quantized), tiny_data()[0]
    with pytest.raises(ValueError, match=rf"quantized for target '{quantized}'.*Quantize again.*target="):
        lowbit.export(qmodel, tmp_path / "m.onnx", x, target=asked)
    assert list(tmp_path.iterdir()) == []


def test_the_models_target_picks_tensorrt(tmp_path):
    qmodel, x = _quantized("tensorrt"), tiny_data()[0]
    path = lowbit.export(qmodel, tmp_path / "m.onnx", x, target="tensorrt")
    assert path == tmp_path / "m.onnx" and check_tensorrt(path).violations == []
    with pytest.raises(TypeError, match="leave out target"):
        lowbit.export.tensorrt.export_tensorrt(qmodel, tmp_path / "n.onnx", x, target="tensorrt")


def test_a_model_without_a_recorded_target_is_judged_by_its_quantizers(tmp_path):
    qmodel, x = _quantized("x86-vnni"), tiny_data()[0]
    del qmodel.lowbit_summary  # quantizers set up by hand: nothing recorded to compare with
    with pytest.raises(ValueError, match="activation uint8 affine"):
        lowbit.export(qmodel, tmp_path / "m.onnx", x, target="tensorrt")


def test_a_missing_exporter_module_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lowbit.export.openvino", None)  # as if this installation had none
    qmodel, x = _quantized("openvino"), tiny_data()[0]
    with pytest.raises(ImportError, match=r"no exporter for openvino \(lowbit.export.openvino is missing\)"):
        lowbit.export(qmodel, tmp_path / "m.onnx", x)


def _fake_module(monkeypatch, tmp_path, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_missing_runtime_package_names_the_extra(monkeypatch, tmp_path):
    _fake_module(monkeypatch, tmp_path, "fake_qnn_exporter", """
        import aimet_onnx_is_not_installed_here as aimet_onnx  # noqa
    """)
    # the package a real exporter imports is named by its top-level module; make this one count
    monkeypatch.setitem(dispatch.EXPORTERS, "qnn", ("fake_qnn_exporter", "export_qnn", "qnn",
                                                    ("aimet_onnx_is_not_installed_here",)))
    qmodel, x = _quantized("qnn"), tiny_data()[0]
    with pytest.raises(ImportError, match=r"pip install 'lowbit\[qnn\]'"):
        lowbit.export(qmodel, tmp_path / "m.onnx", x)
    monkeypatch.setitem(dispatch.EXPORTERS, "qnn", ("fake_qnn_exporter", "export_qnn", "qnn", ("aimet_onnx",)))
    monkeypatch.delitem(sys.modules, "fake_qnn_exporter", raising=False)
    with pytest.raises(ModuleNotFoundError, match="aimet_onnx_is_not_installed_here"):  # not ours: unchanged
        lowbit.export(qmodel, tmp_path / "m.onnx", x)


def test_a_runtime_exporter_gets_the_contracts_call(monkeypatch, tmp_path):
    _fake_module(monkeypatch, tmp_path, "fake_ov_exporter", """
        import pathlib
        calls = []

        def export_openvino(qmodel, path, example_inputs, **options):
            calls.append((qmodel, example_inputs, options))
            pathlib.Path(path).write_text("ir")
            return str(path)
    """)
    monkeypatch.setitem(dispatch.EXPORTERS, "openvino", ("fake_ov_exporter", "export_openvino", "openvino",
                                                         ("openvino",)))
    qmodel, x = _quantized("openvino"), tiny_data()[0]
    path = lowbit.export(qmodel, tmp_path / "m.xml", x, compress=True)
    assert path == tmp_path / "m.xml" and path.read_text() == "ir"
    (call,) = sys.modules["fake_ov_exporter"].calls
    assert call[0] is qmodel and call[1] is x and call[2] == {"compress": True}  # no target=: it is implied


def _recipe(tmp_path, target: str):
    recipe = {"format": "lowbit.recipe", "version": 1, "command": "quantize",
              "model": "tests.export.test_dispatch:tiny_cnn", "data": "tests.export.test_dispatch:tiny_data",
              "config": W8A8.to_dict(), "options": {"progress": False}, "target": target}
    path = tmp_path / f"{target}.json"
    path.write_text(json.dumps(recipe))
    return path


def test_cli_export_follows_the_recipes_target_and_takes_target(tmp_path, capsys):
    trt = _recipe(tmp_path, "tensorrt")
    assert cli.main(["export", str(trt), "--out", str(tmp_path / "trt.onnx")]) == 0
    assert check_tensorrt(tmp_path / "trt.onnx").violations == []
    assert cli.main(["export", str(trt), "--out", str(tmp_path / "ort.onnx"), "--target", "ort"]) == 2
    assert "quantized for target 'tensorrt'" in capsys.readouterr().err
    assert not (tmp_path / "ort.onnx").exists()
    vnni = _recipe(tmp_path, "x86-vnni")
    assert cli.main(["export", str(vnni), "--out", str(tmp_path / "u8.onnx"), "--target", "x86-avx2-u8u8"]) == 0
    assert _weight_dtypes(tmp_path / "u8.onnx") == {np.dtype(np.uint8)}


def test_cli_export_names_a_missing_exporter(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lowbit.export.tflite", None)
    assert cli.main(["export", str(_recipe(tmp_path, "tflite")), "--out", str(tmp_path / "m.tflite")]) == 2
    assert "no exporter for tflite" in capsys.readouterr().err
