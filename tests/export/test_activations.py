"""Conv / Linear + SiLU, Hardswish, GELU ...: the summary and ONNX Runtime agree on what runs in integers.

``lowbit.passes.activations`` gives a conv that feeds a float activation an output quantizer, and
``lowbit.export._activations`` writes SiLU / GELU on its dequantized output as ORT's QuickGelu /
Gelu.  Here every layer the summary calls quantized must run as an integer kernel in
``inspect_onnx``, every one it reports as a float kernel must not, and ORT must compute what the
simulation computes.  Measured on this machine (Xeon, AVX512-VNNI, ORT 1.32), 64 inputs: ORT and
the simulation agree exactly but for one output element of the LeakyReLU model, one code of the
last conv's output grid apart (a requantization tie, as in ReLU networks); 0.1 - 0.2 % of the
outputs in the 64-channel ``benchmarks/bench_activations.py`` stack.  The bound allows one code
times the activation's steepest slope.
"""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.runtime.emulate import EmulationError, emulate_ort
from lowbit.runtime.ort import OrtModel

ACTIVATIONS = [nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU]
_MAIN_FLOAT_OPS = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}


def _x(n: int, *shape: int) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(n))


def _kernels(path) -> dict[str, set[str]]:
    """layer name -> op types ORT runs for it (node names are ``/<scopes>/<layer>/<Op>``)."""
    report = lowbit.inspect_onnx(path)
    out: dict[str, set[str]] = {}
    for label in report.integer_nodes + report.float_compute_nodes:
        name, op = label.rsplit(" (", 1)
        parts = name.split("/")
        if len(parts) >= 3:
            out.setdefault(parts[-2], set()).add(op.rstrip(")"))
    return out


def _assert_summary_matches_ort(qmodel, path) -> None:
    layers = qmodel.lowbit_summary.layers
    kernels = _kernels(path)
    for name in layers.quantized:
        ops = kernels.get(name, set())
        main_float = ops & _MAIN_FLOAT_OPS
        if name in layers.float_kernels:
            assert main_float, f"{name}: the summary says float ({layers.float_kernels[name]}), ORT runs {ops}"
        else:
            integer = {op for op in ops if lowbit.export.onnx_inspect.classify(op) == "integer"}
            assert integer and not main_float, f"{name}: the summary says quantized, ORT runs {ops}"


def _conv_stack(act) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), act(), nn.Conv2d(16, 16, 3, padding=1), act()).eval()


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.__name__)
def test_conv_activation_blocks_run_in_integers_and_match_the_simulation(act, tmp_path):
    x = _x(64, 3, 12, 12)
    qmodel = lowbit.quantize(_conv_stack(act), [x[:32]], "w8a8", progress=False)
    path = tmp_path / "m.onnx"
    lowbit.export_onnx(qmodel, path, x[:1])
    assert qmodel.lowbit_summary.layers.float_kernels == {}
    _assert_summary_matches_ort(qmodel, path)
    assert lowbit.inspect_onnx(path).op_counts["QLinearConv"] == 2

    with torch.no_grad():
        sim = qmodel(x)
    ort_out = OrtModel(path)(x)
    step = float(qmodel.get_submodule("2").output_quantizer.scale)  # one code of the last conv's output
    diff = (ort_out - sim).abs()
    assert float(diff.max()) <= 1.5 * step + 1e-6  # Hardswish's steepest slope is 1.5
    assert float((diff > 1e-5).double().mean()) < 0.01


@pytest.mark.parametrize("rank", [2, 3])
def test_linear_gelu_linear_needs_no_output_quantizer(rank, tmp_path):
    class FFN(nn.Module):  # BERT's feed-forward block
        def __init__(self) -> None:
            super().__init__()
            self.up, self.act, self.down = nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)

        def forward(self, x):
            return self.down(self.act(self.up(x)))

    torch.manual_seed(0)
    x = _x(16, 32) if rank == 2 else _x(4, 5, 32)
    qmodel = lowbit.quantize(FFN().eval(), [x], "w8a8", progress=False)
    assert qmodel.up.output_quantizer is None and qmodel.lowbit_summary.layers.float_kernels == {}
    path = tmp_path / "ffn.onnx"
    lowbit.export_onnx(qmodel, path, x)
    _assert_summary_matches_ort(qmodel, path)  # QGemm / MatMulIntegerToFloat with a float output
    with torch.no_grad():
        torch.testing.assert_close(OrtModel(path)(x), qmodel(x), rtol=0, atol=1e-5)


class FloatConvs(nn.Module):
    """Convs ORT runs in float whatever lowbit does: one feeding a concat, one returning the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([F.silu(self.a(x)), F.relu(self.b(x))], 1)
        return self.c(y)


def test_convs_reported_as_float_kernels_are_float_in_ort(tmp_path):
    x = _x(8, 3, 6, 6)
    qmodel = lowbit.quantize(FloatConvs().eval(), [x], "w8a8", progress=False)
    layers = qmodel.lowbit_summary.layers
    assert set(layers.float_kernels) == {"b", "c"} and "cat" in layers.float_kernels["b"]
    assert qmodel.a.output_quantizer is not None
    path = tmp_path / "f.onnx"
    lowbit.export_onnx(qmodel, path, x)
    _assert_summary_matches_ort(qmodel, path)


def _ops(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in model.graph.node}


def test_silu_and_gelu_on_a_dequantized_input_become_one_ort_op(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.GELU(), nn.Conv2d(8, 8, 1),
                          nn.GELU(approximate="tanh"), nn.Conv2d(8, 4, 1), nn.ReLU()).eval()
    model.append(nn.Sequential(nn.Flatten(), nn.Linear(4 * 25, 2)))
    x = _x(4, 3, 5, 5)
    qmodel = lowbit.quantize(model, [x], "w8a8", progress=False)
    at19 = lowbit.export_onnx(qmodel, tmp_path / "19.onnx", x)
    assert {("com.microsoft", "QuickGelu"), ("com.microsoft", "Gelu")} <= _ops(at19)
    assert not {("", "Sigmoid"), ("", "Erf")} & _ops(at19)
    assert any(o.domain == "com.microsoft" and o.version == 1 for o in at19.opset_import)
    assert ("", "Tanh") in _ops(at19)  # the tanh approximation is left as traced
    at20 = lowbit.export_onnx(qmodel, tmp_path / "20.onnx", x, opset=20)
    assert ("", "Gelu") in _ops(at20) and ("com.microsoft", "Gelu") not in _ops(at20)
    for path in ("19.onnx", "20.onnx"):
        _assert_summary_matches_ort(qmodel, tmp_path / path)
        with torch.no_grad():
            torch.testing.assert_close(OrtModel(tmp_path / path)(x), qmodel(x), rtol=0, atol=1e-4)


def test_models_without_these_activations_export_byte_identically(tmp_path, monkeypatch):
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.body = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            y = F.relu6(self.stem(x))
            y = y + F.relu(self.body(y))
            return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))

    x = _x(4, 3, 8, 8)
    torch.manual_seed(0)
    model = Residual().eval()
    lowbit.export_onnx(lowbit.quantize(model, [x], "w8a8", progress=False), tmp_path / "new.onnx", x)
    monkeypatch.setattr("lowbit.passes.activations.quantize_activation_inputs", lambda m, c, r=None: (m, []))
    monkeypatch.setattr("lowbit.export._activations.fuse_dq_activations", lambda g: 0)
    lowbit.export_onnx(lowbit.quantize(model, [x], "w8a8", progress=False), tmp_path / "old.onnx", x)
    assert (tmp_path / "new.onnx").read_bytes() == (tmp_path / "old.onnx").read_bytes()


def test_emulation_names_the_float_activation():
    qmodel = lowbit.quantize(_conv_stack(nn.SiLU), [_x(4, 3, 6, 6)], "w8a8", progress=False)
    with pytest.raises(EmulationError, match=r"^1: SiLU runs in float"):
        emulate_ort(qmodel)
    qmodel = lowbit.quantize(_conv_stack(nn.Sigmoid), [_x(4, 3, 6, 6)], "w8a8", progress=False)
    with pytest.raises(EmulationError, match=r"^1: ORT runs this Sigmoid on integer codes as QLinearSigmoid"):
        emulate_ort(qmodel)
