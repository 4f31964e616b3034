"""export_openvino: the IR files it writes (atomically, float32 scales, the ONNX kept on request),
its errors, and the install hint when openvino is missing."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.export.openvino import export_openvino

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).eval()
    return lowbit.quantize(model, [_x(8, 3, 8, 8, seed=s) for s in range(2)], "w8a8", progress=False)


def test_missing_openvino_names_the_install(qmodel, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails as if absent
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lowbit\[openvino\]'") as info:
        export_openvino(qmodel, tmp_path / "m.xml", _x(1, 3, 8, 8))
    assert info.value.name == "openvino"
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_is_not_xml_is_refused(qmodel, tmp_path):
    with pytest.raises(ValueError, match=r"ending in \.xml"):
        export_openvino(qmodel, tmp_path / "model.onnx", _x(1, 3, 8, 8))


@pytest.fixture
def ov():
    """The openvino package; the tests that run it are skipped where it is not installed."""
    return pytest.importorskip("openvino", reason="OpenVINO is optional: pip install 'lowbit[openvino]'")


def test_writes_xml_and_bin_and_nothing_else(qmodel, tmp_path, ov):
    xml = export_openvino(qmodel, tmp_path / "out" / "model.xml", _x(1, 3, 8, 8))
    assert xml == tmp_path / "out" / "model.xml"
    assert sorted(p.name for p in xml.parent.iterdir()) == ["model.bin", "model.xml"]  # no temporary left
    model = ov.Core().read_model(xml)
    assert [i.get_any_name() for i in model.inputs] == ["input"]
    assert model.inputs[0].get_partial_shape()[0].is_dynamic  # export_onnx's dynamic batch survives
    assert model.get_rt_info(["framework", "lowbit.target"]).astype(str) == qmodel.lowbit_summary.target


def test_scales_stay_float32_and_the_ir_computes_as_its_onnx(qmodel, tmp_path, ov):
    """OpenVINO's save_model would round float constants to f16 by default; the IR keeps f32, so it
    computes exactly what the QDQ ONNX it came from computes in OpenVINO."""
    xml = export_openvino(qmodel, tmp_path / "model.xml", _x(1, 3, 8, 8), keep_onnx=True)
    text = xml.read_text()
    assert 'element_type="i8"' in text and 'element_type="f16"' not in text
    core = ov.Core()
    x = _x(6, 3, 8, 8, seed=3).numpy()
    from_ir = core.compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    from_onnx = core.compile_model(xml.with_suffix(".onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    assert (from_ir == from_onnx).all()


def test_onnx_options_pass_through(qmodel, tmp_path, ov):
    xml = export_openvino(qmodel, tmp_path / "m.xml", _x(1, 3, 8, 8), input_names=["images"],
                          output_names=["logits"], dynamic_batch=False)
    model = ov.Core().read_model(xml)
    assert model.inputs[0].get_any_name() == "images" and "logits" in model.outputs[0].get_names()
    assert model.inputs[0].get_partial_shape().is_static


def test_a_failed_export_leaves_the_old_files(qmodel, tmp_path, ov):
    xml = export_openvino(qmodel, tmp_path / "model.xml", _x(1, 3, 8, 8))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(Exception):  # noqa: B017 (whatever the tracer raises for a wrong input shape)
        export_openvino(qmodel, xml, _x(1, 4, 8, 8))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
