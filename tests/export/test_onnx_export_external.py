"""Models over 2 GiB: one ``<file>.data`` beside the ``.onnx`` (ONNX external data), written atomically.

The size limit is lowered here (``_external.EXTERNAL_DATA_THRESHOLD``), so small models take the same
path as a real one; benchmarks/check_large_export.py exports and runs a real 2+ GiB model.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.config import LayerQuant, QuantConfig
from lowbit.export import _external, export_onnx, inspect_onnx
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import QuantSpec
from lowbit.runtime.ort import OrtModel


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setattr(_external, "EXTERNAL_DATA_THRESHOLD", 4096)


def _quantized(config="w8", width: int = 64) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8)).eval()
    x = torch.randn(2, 3, width)
    return lowbit.quantize(model, [x], config, progress=False), x


def _values(model: onnx.ModelProto, base_dir: str) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t, base_dir) for t in model.graph.initializer}


def _assert_same_model(big: str, small: str) -> None:
    """Same graph and tensor values; only where the tensors' bytes live differs."""
    a, b = onnx.load(big), onnx.load(small)  # loads the external data too
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    va, vb = _values(a, ""), _values(b, "")
    assert va.keys() == vb.keys()
    for name in va:
        np.testing.assert_array_equal(va[name], vb[name], err_msg=name)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


GROUP_INT4 = QuantConfig(name="g4", default=LayerQuant(
    weight=TensorQuant(spec=QuantSpec(bits=4, granularity="group", axis=1, group_size=16))))


@pytest.mark.parametrize("config", ["w8", "w8a8", GROUP_INT4], ids=["w8", "w8a8", "int4-group"])
def test_large_model_gets_one_data_file(config, tmp_path, monkeypatch):
    qmodel, x = _quantized(config)
    normal = export_onnx(qmodel, tmp_path / "normal" / "m.onnx", x)
    assert not _external_tensors(normal)
    monkeypatch.setattr(_external, "EXTERNAL_DATA_THRESHOLD", 4096)
    returned = export_onnx(qmodel, tmp_path / "big" / "m.onnx", x)
    assert sorted(os.listdir(tmp_path / "big")) == ["m.onnx", "m.onnx.data"]  # no temporaries left
    moved = _external_tensors(returned)
    assert moved and {e.value for t in moved for e in t.external_data if e.key == "location"} == {"m.onnx.data"}
    assert os.path.getsize(tmp_path / "big" / "m.onnx") < 4096
    _assert_same_model(str(tmp_path / "big" / "m.onnx"), str(tmp_path / "normal" / "m.onnx"))
    torch.testing.assert_close(OrtModel(tmp_path / "big" / "m.onnx")(x), OrtModel(tmp_path / "normal" / "m.onnx")(x),
                               rtol=0, atol=0)
    report = inspect_onnx(tmp_path / "big" / "m.onnx")
    assert report.op_counts == inspect_onnx(tmp_path / "normal" / "m.onnx").op_counts


def test_large_tensors_start_on_64_kib_boundaries(tmp_path, small_limit):
    qmodel, x = _quantized(width=1024)  # a 1 MiB int8 weight
    model = export_onnx(qmodel, tmp_path / "m.onnx", x)
    offsets = {t.name: {e.key: int(e.value) for e in t.external_data if e.key != "location"}
               for t in _external_tensors(model)}
    big = [o for o in offsets.values() if o["length"] >= 2**20]
    assert big and all(o["offset"] % 2**16 == 0 for o in big)


def test_reexport_replaces_both_files_and_failures_leave_none(tmp_path, small_limit):
    qmodel, x = _quantized()
    path = tmp_path / "m.onnx"
    export_onnx(qmodel, path, x)
    qmodel, x = _quantized(width=96)  # a different model, same file names
    export_onnx(qmodel, path, x)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    with torch.no_grad():  # ORT's level "basic": DQ -> float MatMul, as the simulation computes
        torch.testing.assert_close(OrtModel(path, optimization="basic")(x), qmodel(x), rtol=1e-6, atol=1e-6)

    class Broken(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(Broken(qmodel), tmp_path / "other.onnx", x)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def test_tensors_traced_into_files_are_gathered_into_one(tmp_path):
    # Over 2 GiB the TorchScript exporter writes each constant to its own file; save() streams
    # them into one .data file (here: a small model saved that way by onnx itself).
    qmodel, x = _quantized()
    model = export_onnx(qmodel, tmp_path / "m.onnx", x)
    trace = tmp_path / "trace"
    trace.mkdir()
    onnx.save_model(model, trace / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(os.listdir(trace)) > 3
    scattered = onnx.load(trace / "model.onnx", load_external_data=False)
    _external.save(scattered, tmp_path / "out" / "m.onnx", base_dir=str(trace))
    assert sorted(os.listdir(tmp_path / "out")) == ["m.onnx", "m.onnx.data"]
    _assert_same_model(str(tmp_path / "out" / "m.onnx"), str(tmp_path / "m.onnx"))
    torch.testing.assert_close(OrtModel(tmp_path / "out" / "m.onnx")(x), OrtModel(tmp_path / "m.onnx")(x),
                               rtol=0, atol=0)


def test_missing_data_file_is_named(tmp_path, small_limit):
    qmodel, x = _quantized()
    export_onnx(qmodel, tmp_path / "m.onnx", x)
    os.remove(tmp_path / "m.onnx.data")
    with pytest.raises(FileNotFoundError, match=r"m\.onnx\.data"):
        OrtModel(tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match=r"m\.onnx\.data"):
        inspect_onnx(tmp_path / "m.onnx")
