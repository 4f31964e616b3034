"""quantize_read_outputs: a target whose integer kernels write quantized outputs (TFLite) gets an
output quantizer on exactly the layers whose output something other than a quantizer reads, found
on one eager pass (so models torch.fx cannot trace are covered), recorded, and rebuilt by load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import targets
from lowbit.config import W8A8
from lowbit.nn.swap import swap_modules
from lowbit.passes.outputs import find_float_read_outputs
from lowbit.ptq import read_output_quantizers


class Untraceable(nn.Module):
    """Every way a Linear's output can be read, behind data-dependent control flow (fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.d, self.e, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > -1e9:  # (fx cannot trace a branch on a tensor)
            x = x + 0
        a = torch.relu(self.a(x)).view(x.shape[0], 2, 4).transpose(1, 2).reshape(x.shape[0], 8)  # -> quantized b
        b = self.b(a)  # read by c (quantized) and by the residual add below (float)
        c = self.norm(self.c(b) + b)  # c: read by a float add
        d = torch.nn.functional.gelu(self.d(c))  # d: read by a float activation
        e = self.e(d)  # e: read by the quantized head only (through clamp, which the kernel fuses)
        return self.head(e.clamp(-3, 3)), d.shape[-1]  # head: the model output


def _swapped(model):
    cfg = W8A8.for_target(targets.TFLITE)
    swap_modules(model, cfg.resolve)
    return cfg


def test_finds_every_float_reader_and_only_those():
    model = Untraceable().eval()
    _swapped(model)
    with pytest.raises(Exception):  # noqa: B017 - the point: the graph search cannot see this model
        torch.fx.symbolic_trace(model)
    found = find_float_read_outputs(model, torch.randn(4, 8))
    assert set(found) == {"b", "c", "d", "head"}, found
    assert found["head"] == "the model output"
    assert found["d"].startswith("gelu")
    assert "add" in found["b"] and "add" in found["c"]


def test_no_quantizer_observes_during_the_search():
    model = Untraceable().eval()
    _swapped(model)
    find_float_read_outputs(model, torch.randn(4, 8))
    assert all(not q.observer.has_data for m in model.modules() if hasattr(m, "quantizers")
               for _, q in m.quantizers() if q.observer is not None)


def test_only_targets_that_quantize_outputs_get_them():
    model = Untraceable().eval()
    report = swap_modules(model, W8A8.resolve)
    assert read_output_quantizers(model, W8A8, [torch.randn(4, 8)], report) == {}  # ONNX Runtime: QGemm writes float


def test_quantize_for_tflite_rounds_where_the_file_rounds_and_load_rebuilds_it(tmp_path):
    calib = [torch.randn(16, 8, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    qmodel = lowbit.quantize(Untraceable(), calib, "w8a8", target="tflite", progress=False)
    assert qmodel.lowbit_summary.options["quantized_outputs"] == ["b", "c", "d", "head"]
    head = qmodel.head.output_quantizer
    assert head is not None and head.has_range and qmodel.a.output_quantizer is None
    assert "the target's kernel writes it quantized" in qmodel.lowbit_summary.layers.quantized["head"]
    x = torch.randn(5, 8)
    with torch.no_grad():
        y = qmodel(x)[0]
        codes = y / head.scale + head.zero_point
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # the logits sit on the int8 grid
    ort = lowbit.quantize(Untraceable(), calib, "w8a8", target="x86-vnni", progress=False)
    assert "quantized_outputs" not in ort.lowbit_summary.options and ort.head.output_quantizer is None

    lowbit.save(qmodel, tmp_path / "q")
    loaded = lowbit.load(Untraceable(), tmp_path / "q")
    assert loaded.head.output_quantizer is not None
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], y)


def test_prepare_qat_for_tflite_quantizes_the_same_outputs():
    calib = [torch.randn(16, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    qat = lowbit.prepare_qat(Untraceable(), "w8a8", calib, target="tflite", progress=False)
    assert qat.lowbit_summary.options["quantized_outputs"] == ["b", "c", "d", "head"]
    assert qat.head.output_quantizer.has_range
