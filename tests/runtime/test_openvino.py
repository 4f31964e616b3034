"""OpenVINOModel, its int8 report and measure_latency, on small models quantized with w8a8 and
exported with export_openvino: the IR runs in OpenVINO's CPU plugin, every conv / linear layer
runs in int8 there (read from the compiled model's execution graph), and its outputs follow the
simulation."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.runtime.ort import LatencyStats

ov = pytest.importorskip("openvino", reason="OpenVINO is optional: pip install 'lowbit[openvino]'")

from lowbit.export.openvino import export_openvino
from lowbit.runtime.openvino import OpenVINOModel, classify, measure_latency

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, a strided conv, a depthwise conv with a residual add, pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU6())
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.down(self.stem(x))
        x = x + self.dw(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SmallEncoder(nn.Module):
    """Token features (B, T, 16): a GELU MLP with a residual and LayerNorm, then a linear head."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.norm, self.head = nn.Linear(16, 48), nn.Linear(48, 16), nn.LayerNorm(16), \
            nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.norm(x + self.down(F.gelu(self.up(x)))))


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _build(model: nn.Module, shape: tuple, folder, seed: int):
    torch.manual_seed(seed)
    model = model.eval()
    calib = [_x(8, *shape, seed=s) for s in range(4)]
    qmodel = lowbit.quantize(model, calib, "w8a8", progress=False)
    fp32 = export_openvino(model, folder / "fp32.xml", calib[0][:1])
    int8 = export_openvino(qmodel, folder / "int8.xml", calib[0][:1], keep_onnx=True)
    return model, qmodel, fp32, int8


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return _build(SmallCNN(), (3, 16, 16), tmp_path_factory.mktemp("ov_cnn"), seed=0)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return _build(SmallEncoder(), (6, 16), tmp_path_factory.mktemp("ov_enc"), seed=1)


MODELS = {"cnn": ((3, 16, 16), 3, 1), "encoder": ((6, 16), 0, 3)}  # input shape, convs, linears


def _one_code_bound(head: nn.Module) -> float:
    """How far the head's outputs move when every one of its input codes moves by one step:
    s_in * max over outputs of sum |W|.  OpenVINO (int32 accumulation, dequantization and the
    next FakeQuantize fused as post-ops) and the simulation (float conv / matmul on dequantized
    values) are two roundings of one model: an activation code differs by one step where a value
    falls within float error of a rounding tie, so this bounds the output difference of a model
    this shallow, where such a step cannot grow through further layers."""
    params = head.integer_params()
    weight = params.weight.values.float() * params.weight.scale.reshape(-1, 1)
    return float(params.input.scale) * weight.abs().sum(1).max().item()


@pytest.mark.parametrize("name", list(MODELS))
def test_int8_ir_follows_the_simulation(name, request):
    model, qmodel, _, int8 = request.getfixturevalue(name)
    x = _x(16, *MODELS[name][0], seed=7)
    with torch.no_grad():
        sim, ref = qmodel(x), model(x)
    out = OpenVINOModel(int8)(x)
    assert out.shape == sim.shape and out.dtype == torch.float32
    assert (out - sim).abs().max().item() <= _one_code_bound(qmodel.head)
    flat = (out.reshape(len(x), -1), sim.reshape(len(x), -1), ref.reshape(len(x), -1))
    assert F.cosine_similarity(flat[0], flat[1], dim=1).min() > 0.9999
    assert F.cosine_similarity(flat[0], flat[2], dim=1).min() > 0.99  # and it is still the float model


@pytest.mark.parametrize("name", list(MODELS))
def test_float_ir_reproduces_torch(name, request):
    model, _, fp32, _ = request.getfixturevalue(name)
    x = _x(4, *MODELS[name][0], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(OpenVINOModel(fp32)(x), model(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_conv_and_linear_runs_in_int8(name, request):
    _, _, fp32, int8 = request.getfixturevalue(name)
    _, convs, linears = MODELS[name]
    report = OpenVINOModel(int8).int8_report()
    assert report.float_compute_layers == []
    assert report.integer_fraction == 1.0
    counts = report.counts()
    assert sum(n for (t, p), n in counts.items() if t == "Convolution" and p in ("u8", "i8")) == convs
    assert sum(n for (t, p), n in counts.items() if t == "FullyConnected" and p in ("u8", "i8")) == linears
    # each conv / gemm / matmul node of the QDQ ONNX the IR came from is (part of) an int8 kernel
    nodes = onnx.load(int8.with_suffix(".onnx")).graph.node
    compute = {n.name for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")}
    assert len(compute) == convs + linears
    fused = [n for layer in report.layers if layer.kind == "integer" for n in layer.fused]
    assert all(any(f == n or f.startswith(n + "/") for f in fused) for n in compute), (compute, fused)
    assert report.inference_precision == "f32"
    float_report = OpenVINOModel(fp32).int8_report()
    assert float_report.count("integer") == 0 and float_report.count("float_compute") == convs + linears


def test_report_formats(cnn):
    report = OpenVINOModel(cnn[3]).int8_report()
    text = str(report)
    assert "100% of compute layers in int8" in text and "| Convolution | u8 | integer |" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["kinds"]["integer"] == 4 and data["integer_fraction"] == 1.0
    assert classify("MatMul", "f32") == "float_compute" and classify("Reorder", "u8") == "data_movement"


def test_uint8_weights_run_in_float_and_the_report_says_so(tmp_path):
    """x86-avx2-u8u8 files (uint8 weights, zero point 128): OpenVINO 2026.4 dequantizes the
    weights and runs the convs in f32; the report names them."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    qmodel = lowbit.quantize(model, [_x(8, 3, 16, 16, seed=s) for s in range(2)], "w8a8", progress=False,
                             target="x86-avx2-u8u8")
    report = OpenVINOModel(export_openvino(qmodel, tmp_path / "u8u8.xml", _x(1, 3, 16, 16))).int8_report()
    assert report.float_compute_layers and all("Convolution" in name for name in report.float_compute_layers)


def test_dynamic_batch_and_static_shapes(cnn):
    int8 = cnn[3]
    dynamic = OpenVINOModel(int8)
    for batch in (1, 5):
        x = _x(batch, 3, 16, 16, seed=batch)
        assert dynamic(x).shape == (batch, 10)
    x = _x(2, 3, 16, 16, seed=11)
    static = OpenVINOModel(int8, shapes={"input": (2, 3, 16, 16)})
    assert static.compiled.inputs[0].get_partial_shape().is_static
    torch.testing.assert_close(static(x), dynamic(x), atol=1e-6, rtol=0)


def test_feeds_by_position_keyword_and_dict(cnn):
    ov_model = OpenVINOModel(cnn[3])
    x = _x(2, 3, 16, 16)
    a = ov_model(x)
    assert torch.equal(a, ov_model(input=x)) and torch.equal(a, ov_model({"input": x}))
    with pytest.raises(ValueError, match="missing input"):
        ov_model.feeds()


def test_bf16_precision_hint(cnn):
    model, _, fp32, _ = cnn
    bf16 = OpenVINOModel(fp32, precision="bf16")
    assert bf16.int8_report().inference_precision in ("bf16", "f32")  # f32 where the CPU has no bf16
    x = _x(4, 3, 16, 16, seed=2)
    with torch.no_grad():
        assert F.cosine_similarity(bf16(x), model(x), dim=1).min() > 0.99


def test_bad_arguments(cnn, tmp_path):
    int8 = cnn[3]
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenVINOModel(int8, precision="int8")
    with pytest.raises(ValueError, match="threads"):
        OpenVINOModel(int8, threads=0)
    with pytest.raises(ValueError, match="not inputs"):
        OpenVINOModel(int8, shapes={"images": (1, 3, 16, 16)})
    with pytest.raises(FileNotFoundError, match="no model file"):
        OpenVINOModel(tmp_path / "absent.xml")
    lonely = tmp_path / "lonely.xml"
    lonely.write_bytes(int8.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lonely\.bin"):
        OpenVINOModel(lonely)


def test_measure_latency(cnn):
    ov_model = OpenVINOModel(cnn[3], threads=1)
    stats = measure_latency(ov_model, ov_model.feeds(_x(3, 3, 16, 16)), warmup=2, runs=5)
    assert isinstance(stats, LatencyStats)
    assert stats.runs == 5 and stats.batch == 3 and stats.threads == 1
    assert 0 < stats.median_ms <= stats.p90_ms


def test_target_mismatch_warns_on_a_cpu_without_vnni(cnn, monkeypatch):
    """A VNNI-target IR on an x86 CPU without VNNI: OpenVINO's int8 kernels may saturate there."""
    import lowbit.runtime.openvino as ov_runtime
    from lowbit import targets

    int8 = cnn[3]
    target = OpenVINOModel(int8).target
    assert target == cnn[1].lowbit_summary.target  # the IR carries the model's target
    zen3 = targets.CpuInfo(arch="x86_64", model="AMD EPYC 7B13", flags=frozenset({"avx2", "fma"}))
    monkeypatch.setattr(targets, "cpu_info", lambda: zen3)
    monkeypatch.setattr(ov_runtime, "cpu_info", lambda: zen3)
    if targets.TARGETS[target].safe_without_vnni:
        pytest.skip(f"the fixture's target {target} is exact without VNNI")
    with pytest.warns(targets.TargetMismatchWarning, match="x86-avx2-w7"):
        OpenVINOModel(int8)


def test_missing_openvino_names_the_install(cnn, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails as if absent
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lowbit\[openvino\]'"):
        OpenVINOModel(cnn[3])
