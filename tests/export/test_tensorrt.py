"""export_tensorrt: TensorRT's explicit-quantization layout, checked rule by rule; ONNX Runtime runs
the same file and agrees with the simulation (there is no GPU here, so no TensorRT build).

The rules are NVIDIA's (TensorRT developer guide, "Explicit Quantization" and "Q/DQ
Layer-Placement Recommendations"); the assertions below restate each one independently of
``lowbit.export._tensorrt_layout.check_layout``, which a further test runs against an ONNX
Runtime file that breaks them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.export import export_onnx
from lowbit.export.tensorrt import check_tensorrt, export_tensorrt
from lowbit.runtime import OrtModel

pytestmark = pytest.mark.usefixtures("one_thread")


class ResCNN(nn.Module):
    """Conv-BN-ReLU, MaxPool, a residual block (the add TensorRT fuses), average pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.c1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        for bn in (self.stem[1], self.c1[1], self.c2[1]):  # non-trivial statistics to fold
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.c2(self.c1(x))))


class Encoder(nn.Module):
    """Linears on 3-D inputs (MatMul), GELU, a residual add feeding LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down, self.norm = nn.Linear(16, 32), nn.Linear(32, 16), nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.down(nn.functional.gelu(self.up(x))))


def _images(n=32):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    x = _images()
    qmodel = lowbit.quantize(ResCNN().eval(), [x[:16], x[16:]], "w8a8", target="tensorrt", progress=False)
    path = tmp_path_factory.mktemp("trt") / "cnn.onnx"
    assert lowbit.export(qmodel, path, x[:1]) == path  # the model's target picks export_tensorrt
    return qmodel, path, onnx.load(path)


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if name in n.output), None)


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def _inits(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def test_symmetric_int8_zero_point_zero_everywhere(cnn):
    """R1: "TensorRT supports only symmetric quantization": every Q/DQ zero point is given, int8 and 0."""
    _, _, model = cnn
    inits = _inits(model.graph)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) >= 14
    for node in qdq:
        assert len(node.input) == 3 and node.input[2] in inits, f"{node.name}: zero point omitted (means uint8)"
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
        assert (inits[node.input[1]] > 0).all()
    assert {p.key: p.value for p in model.metadata_props}["lowbit.target"] == "tensorrt"


def test_qdq_on_both_inputs_of_weighted_ops_weights_per_channel_on_axis_0(cnn):
    """R2 + R3: "quantize all inputs of weighted operations": the activation through Q -> DQ per tensor,
    the weight as DQ of an int8 initializer with one scale per output channel, axis 0."""
    _, _, model = cnn
    g, inits = model.graph, _inits(model.graph)
    weighted = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert [n.op_type for n in weighted] == ["Conv", "Conv", "Conv", "Gemm"]
    for op in weighted:
        act = _producer(g, op.input[0])
        assert act.op_type == "DequantizeLinear" and _producer(g, act.input[0]).op_type == "QuantizeLinear"
        assert inits[act.input[1]].ndim == 0  # activations per tensor
        w = _producer(g, op.input[1])
        assert w.op_type == "DequantizeLinear" and inits[w.input[0]].dtype == np.int8
        weight, scale = inits[w.input[0]], inits[w.input[1]]
        assert _axis(w) == 0 and scale.shape == (weight.shape[0],)
        assert np.abs(weight).max() <= 127  # narrow range: -127..127
        if op.op_type == "Gemm":
            assert next(a.i for a in op.attribute if a.name == "transB") == 1  # [out, in]: axis 0 = outputs


def test_no_qdq_on_biases_and_they_are_the_simulations(cnn):
    """R4: no Q/DQ on bias (TensorRT adds a float bias after the int32 sum); the float written is the
    bias the simulation adds (rounded to the s_in * s_w grid), bit for bit."""
    qmodel, _, model = cnn
    g, inits = model.graph, _inits(model.graph)
    assert not any(t.dtype == np.int32 for t in inits.values())
    layers = {name: m for name, m in qmodel.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for op in (n for n in g.node if n.op_type in ("Conv", "Gemm")):
        assert op.input[2] in inits and inits[op.input[2]].dtype == np.float32, op.name
        name = op.input[2].removesuffix(".bias_quantized_float")
        with torch.no_grad():
            assert np.array_equal(inits[op.input[2]], layers[name]._quant_bias().numpy()), name


def test_residual_add_has_qdq_inputs_and_a_requantized_output(cnn):
    """R5: "non-weighted layers with INT8 inputs also require INT8 outputs": the residual add reads two
    DQs and its output (through the ReLU TensorRT fuses) reaches only QuantizeLinear, so DQ-Add-Q fuses."""
    _, _, model = cnn
    g = model.graph
    (add,) = [n for n in g.node if n.op_type == "Add"]
    assert all(_producer(g, i).op_type == "DequantizeLinear" for i in add.input)
    (relu,) = _consumers(g, add.output[0])
    assert relu.op_type == "Relu" and {n.op_type for n in _consumers(g, relu.output[0])} == {"QuantizeLinear"}


def test_standard_ops_and_opset(cnn):
    """R6: opset >= 13 (per-channel DequantizeLinear); standard ONNX ops only, no ORT integer forms."""
    _, path, model = cnn
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert not {"DynamicQuantizeLinear", "MatMulInteger", "QLinearConv", "QGemm"} & {n.op_type for n in model.graph.node}
    onnx.checker.check_model(model, full_check=True)
    layout = check_tensorrt(path)
    assert layout.violations == [] and layout.float_layers == [] and layout.float_adds == []
    assert len(layout.int8_layers) == 4


def test_onnx_runtime_runs_the_file_as_simulated(cnn):
    qmodel, path, _ = cnn
    x = _images(64)
    with torch.no_grad():
        sim = qmodel(x)
    got = OrtModel(path)(x)
    torch.testing.assert_close(got, sim, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(1), sim.argmax(1))


def test_linear_on_3d_inputs_keeps_its_weight_out_by_in(tmp_path):
    """R2 for MatMul: the weight stays [out, in] with its channels on axis 0 and is transposed after its
    DQ (the layout TensorRT's PyTorch toolkits export); the add feeding LayerNorm is reported as float."""
    x = torch.randn(8, 6, 16, generator=torch.Generator().manual_seed(2))
    qmodel = lowbit.quantize(Encoder().eval(), [x], "w8a8", target="tensorrt", progress=False)
    path = export_tensorrt(qmodel, tmp_path / "enc.onnx", x[:1])
    g, inits = onnx.load(path).graph, _inits(onnx.load(path).graph)
    matmuls = [n for n in g.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2
    for mm in matmuls:
        t = _producer(g, mm.input[1])
        dq = _producer(g, t.input[0])
        assert t.op_type == "Transpose" and dq.op_type == "DequantizeLinear" and _axis(dq) == 0
        assert inits[dq.input[1]].shape == (inits[dq.input[0]].shape[0],)
    layout = check_tensorrt(path)
    assert layout.violations == [] and len(layout.int8_layers) == 2 and len(layout.float_adds) == 1
    with torch.no_grad():
        torch.testing.assert_close(OrtModel(path)(x), qmodel(x), atol=1e-5, rtol=1e-5)


def test_a_layer_left_float_is_reported(tmp_path):
    x = _images(16)
    config = lowbit.CONFIGS["w8a8"].skip("head.2")
    qmodel = lowbit.quantize(ResCNN().eval(), [x], config, target="tensorrt", progress=False)
    layout = check_tensorrt(export_tensorrt(qmodel, tmp_path / "m.onnx", x[:1]))
    assert layout.violations == [] and layout.float_layers == ["/head.2/Gemm"] and len(layout.int8_layers) == 3


@pytest.mark.parametrize(("config", "target", "match"), [
    ("w8a8", "x86-vnni", r"activation uint8 affine.*target='tensorrt'"),
    ("w8a8-dynamic", "tensorrt", "no int8 dynamic quantization"),
    ("w4a4", "tensorrt", r"activation int4 sym per-tensor"),
])
def test_what_tensorrt_cannot_run_is_refused_with_the_fix(config, target, match, tmp_path):
    x = _images(8)
    qmodel = lowbit.quantize(ResCNN().eval(), [x], config, target=target, progress=False)
    with pytest.raises(ValueError, match=match):
        export_tensorrt(qmodel, tmp_path / "m.onnx", x[:1])
    assert list(tmp_path.iterdir()) == []


def test_group_wise_weights_are_refused(tmp_path):
    x = torch.randn(4, 256)
    qmodel = lowbit.quantize(nn.Sequential(nn.Linear(256, 8)), None, "w4a16-g128", target="tensorrt",
                             progress=False)
    with pytest.raises(ValueError, match=r"weight int4 .*group.*axis 0"):
        export_tensorrt(qmodel, tmp_path / "m.onnx", x)


def test_an_onnx_runtime_file_breaks_the_rules(tmp_path):
    x = _images(8)
    qmodel = lowbit.quantize(ResCNN().eval(), [x], "w8a8", target="x86-vnni", progress=False)
    proto = export_onnx(qmodel, tmp_path / "ort.onnx", x[:1])
    text = " ".join(check_tensorrt(proto).violations)
    assert "uint8" in text and "(R1)" in text  # affine uint8 activations
    assert "int32 DequantizeLinear" in text and "(R4)" in text  # ORT's int32 biases


def test_a_qat_model_exports_for_tensorrt(tmp_path):
    x = _images(16)
    qat = lowbit.prepare_qat(ResCNN().eval(), "w8a8", [x], target="tensorrt", progress=False)
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    for _ in range(2):
        qat(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    path = lowbit.export(qat, tmp_path / "qat.onnx", x[:1])
    assert check_tensorrt(path).violations == []
    with torch.no_grad():
        sim = lowbit.qat.convert(qat)(x)
    torch.testing.assert_close(OrtModel(path)(x), sim, atol=1e-5, rtol=1e-5)
