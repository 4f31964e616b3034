"""export_onnx on a small CNN (w8a8): integer kernels in ORT, parity, file properties.

Parity, measured on this machine (AVX512-VNNI, ORT 1.32), 512 random inputs:
  * ORT vs the fake-quant simulation: max |diff| 1.4e-3 = 0.19 % of the output
    range = 0.041 of "one quantization step on every input of the classifier"
    (``s_in * ||W_row||_1``); argmax agreement 100 %.
  * The whole difference is bias rounding: ORT quantizes every bias of a fused
    Conv / Gemm to int32 with scale ``s_in * s_w`` (its BiasQuantization pass).
    Rounding the simulation's biases the same way, ORT agrees to 2.7e-7 (float
    noise): its integer requantization reproduces the simulation exactly.
  * onnx.reference on the exported file vs the simulation: 1.1e-6, i.e. half a
    bias step of the classifier (whose bias export stores as int32, see
    ``_ort_layout.quantize_gemm_bias``) plus float noise.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from lowbit.export import export_onnx, inspect_onnx
from lowbit.nn.modules import QuantAdd, TensorQuant
from lowbit.numerics import UINT8_ACTIVATION, fake_quantize
from lowbit.ptq import quantize


class SmallCNN(nn.Module):
    """conv-relu-conv-relu, a residual block joined by a QuantAdd, max-pool, linear."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.res1 = nn.Conv2d(16, 16, 3, padding=1)
        self.res2 = nn.Conv2d(16, 16, 3, padding=1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(16) if batchnorm else nn.Identity()
        # The residual add, quantized on both operands (a graph pass will insert these later).
        self.add = QuantAdd(TensorQuant(spec=UINT8_ACTIVATION), TensorQuant(spec=UINT8_ACTIVATION), name="add")
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        y = self.bn2(self.res2(torch.relu(self.res1(x))))
        x = torch.relu(self.add(y, x))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


def _randomize_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=gen) - 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) * 3 - 1.5)  # some negative
            bn.bias.copy_(torch.rand(bn.num_features, generator=gen) * 0.6 - 0.3)


def _quantized_cnn(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN(batchnorm).eval()
    if batchnorm:
        _randomize_bn(model)
    calib = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    # fold_bn=False: leave BatchNorm in the model, as a user who skips the fold would.
    return quantize(model, calib, "w8a8", progress=False, fold_bn=not batchnorm)


@pytest.fixture(scope="module")
def cnn():
    return _quantized_cnn()


@pytest.fixture(scope="module")
def cnn_onnx(cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "cnn.int8.onnx"
    export_onnx(cnn, path, torch.randn(2, 3, 8, 8))
    return path


def _ort(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _simulate(model, x) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _with_ort_biases(model: nn.Module) -> nn.Module:
    """A copy whose biases are rounded to ORT's int32 bias grid (scale = s_in * s_w)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (model.conv1, model.conv2, model.res1, model.res2, model.fc):
            if layer.bias is not None:
                step = layer.input_quantizer.scale * layer.weight_quantizer.scale
                layer.bias.copy_(torch.round(layer.bias / step) * step)
    return model


# Golden layout: every layer reads DQ(Q(x)) and DQ(int8 W); the classifier's Q is copied
# in front of Flatten and MaxPool so the residual Add ends in a Q; conv2's output, read
# by res1 and by the add, has one Q.  Names: "<quantized tensor>/<op>".
GOLDEN = [
    ("QuantizeLinear", "conv1.input/QuantizeLinear"), ("DequantizeLinear", "conv1.input/DequantizeLinear"),
    ("DequantizeLinear", "conv1.weight/DequantizeLinear"), ("Conv", "/conv1/Conv"), ("Relu", "/Relu"),
    ("QuantizeLinear", "conv2.input/QuantizeLinear"), ("DequantizeLinear", "conv2.input/DequantizeLinear"),
    ("DequantizeLinear", "conv2.weight/DequantizeLinear"), ("Conv", "/conv2/Conv"), ("Relu", "/Relu_1"),
    ("QuantizeLinear", "res1.input/QuantizeLinear"), ("DequantizeLinear", "res1.input/DequantizeLinear"),
    ("DequantizeLinear", "res1.weight/DequantizeLinear"), ("Conv", "/res1/Conv"), ("Relu", "/Relu_2"),
    ("QuantizeLinear", "res2.input/QuantizeLinear"), ("DequantizeLinear", "res2.input/DequantizeLinear"),
    ("DequantizeLinear", "res2.weight/DequantizeLinear"), ("Conv", "/res2/Conv"),
    ("QuantizeLinear", "add.a/QuantizeLinear"), ("DequantizeLinear", "add.a/DequantizeLinear"),
    ("Add", "/add/Add"), ("Relu", "/Relu_3"),
    ("QuantizeLinear", "fc.input/QuantizeLinear@/Flatten@/MaxPool"),
    ("DequantizeLinear", "fc.input/QuantizeLinear@/Flatten@/MaxPool/DequantizeLinear"), ("MaxPool", "/MaxPool"),
    ("QuantizeLinear", "fc.input/QuantizeLinear@/Flatten"),
    ("DequantizeLinear", "fc.input/QuantizeLinear@/Flatten/DequantizeLinear"), ("Flatten", "/Flatten"),
    ("QuantizeLinear", "fc.input/QuantizeLinear"), ("DequantizeLinear", "fc.input/DequantizeLinear"),
    ("DequantizeLinear", "fc.weight/DequantizeLinear"), ("DequantizeLinear", "fc.bias/DequantizeLinear"),
    ("Gemm", "/fc/Gemm"),
]


def test_graph_layout_matches_the_golden(cnn_onnx):
    model = onnx.load(cnn_onnx)
    assert [(n.op_type, n.name) for n in model.graph.node] == GOLDEN
    add = next(n for n in model.graph.node if n.op_type == "Add")
    assert add.input[1] == "/res1/input_quantizer/DequantizeLinear_output_0"  # add.b merged into res1's Q


def test_every_layer_runs_as_an_integer_kernel(cnn_onnx):
    report = inspect_onnx(cnn_onnx)
    assert report.op_counts.get("QLinearConv") == 4, report
    assert report.op_counts.get("QLinearAdd") == 1, report
    assert report.op_counts.get("QGemm", 0) + report.op_counts.get("QLinearMatMul", 0) == 1, report
    assert report.float_compute_nodes == [], report
    assert report.integer_fraction == 1.0


def test_ort_agrees_with_the_simulation(cnn, cnn_onnx):
    x = torch.randn(512, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = _ort(cnn_onnx).run(None, {"input": x.numpy()})[0]
    want = _simulate(cnn, x)
    diff = np.abs(got - want)
    # A classifier input code off by one moves output i by s_in * |w_ij|; "one step on
    # every input" is s_in * ||W_i||_1.  Measured max 0.041 of that (0.19 % of the range).
    fc = cnn.fc
    w = fake_quantize(fc.weight.detach(), fc.weight_quantizer.scale, fc.weight_quantizer.zero_point,
                      fc.weight_quantizer.spec).numpy()
    one_step = float(fc.input_quantizer.scale) * np.abs(w).sum(axis=1)
    assert (diff / one_step).max() < 0.1
    assert diff.max() < 0.005 * np.ptp(want)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99


def test_ort_is_exact_up_to_bias_rounding(cnn, cnn_onnx):
    x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    got = _ort(cnn_onnx).run(None, {"input": x.numpy()})[0]
    want = _simulate(_with_ort_biases(cnn), x)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # measured 2.7e-7


def test_reference_evaluator_matches_the_simulation(cnn, cnn_onnx):
    model = onnx.load(cnn_onnx)
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    got = ReferenceEvaluator(model).run(None, {"input": x.numpy()})[0]
    # Same Q/DQ arithmetic as the simulation; the classifier's bias is stored as int32
    # (ORT needs that to fuse a Gemm without an output Q), off by at most half a step.
    half_bias_step = 0.5 * float(cnn.fc.input_quantizer.scale) * cnn.fc.weight_quantizer.scale.numpy()
    assert np.all(np.abs(got - _simulate(cnn, x)) <= half_bias_step + 1e-6)


def test_weights_are_int8_initializers_with_per_channel_dq(cnn_onnx):
    model = onnx.load(cnn_onnx)
    inits = {t.name: t for t in model.graph.initializer}
    float_weights = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]
    assert float_weights == []
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(weight_dqs) == 5  # four convs and the linear
    for n in weight_dqs:
        assert len(inits[n.input[1]].dims) == 1  # one scale per output channel
    quantized_constants = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    assert quantized_constants == []


def test_a_tensor_read_by_two_layers_gets_one_quantize(cnn_onnx):
    # conv2's output feeds res1 and the residual add; both quantizers saw the same data.
    model = onnx.load(cnn_onnx)
    q_inputs = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_inputs) == len(set(q_inputs))


def test_reexport_is_byte_identical(cnn, tmp_path):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    export_onnx(cnn, tmp_path / "a.onnx", x)
    export_onnx(cnn, tmp_path / "b.onnx", x)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


class _Exploding(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom")
        return self.inner(x)


def test_failed_export_leaves_no_file(cnn, tmp_path):
    model = _Exploding(cnn)
    model.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(model, tmp_path / "model.onnx", torch.randn(1, 3, 8, 8))
    assert os.listdir(tmp_path) == []


def test_failed_export_keeps_the_previous_file(cnn, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(cnn, path, torch.randn(1, 3, 8, 8), opset=11)
    model = _Exploding(cnn)
    model.armed = True
    with pytest.raises(RuntimeError):
        export_onnx(model, path, torch.randn(1, 3, 8, 8))
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_batchnorm_after_a_quantized_conv_still_fuses(tmp_path):
    # ORT folds BN only into float-weight Convs; without export's fold, Conv + BN stay float.
    qmodel = _quantized_cnn(batchnorm=True)
    assert isinstance(qmodel.bn1, nn.BatchNorm2d)
    path = tmp_path / "bn.onnx"
    export_onnx(qmodel, path, torch.randn(2, 3, 8, 8))
    assert not [n for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"]
    report = inspect_onnx(path)
    assert report.op_counts.get("QLinearConv") == 4 and report.float_compute_nodes == [], report
    x = torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    got = _ort(path).run(None, {"input": x.numpy()})[0]
    want = _simulate(qmodel, x)
    # BN now lives in the weight scale (s * gamma / sigma) and the folded bias, which ORT
    # rounds to int32: same size of difference as without BN (measured 0.16 % of the range).
    assert np.abs(got - want).max() < 0.005 * np.ptp(want)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99


def test_training_flag_is_restored_and_quantizers_unpatched(cnn, tmp_path):
    model = copy.deepcopy(cnn).train()
    export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert model.training
    assert "forward" not in model.conv1.input_quantizer.__dict__
    assert "_extra_state" in "".join(model.state_dict())


class _PlainAdd(nn.Module):
    def forward(self, a, b):
        return a + b


def test_float_model_exports_unchanged(tmp_path):
    # The CLI exports the FP32 baseline through the same call.
    torch.manual_seed(0)
    model = SmallCNN(batchnorm=True).eval()
    model.add = _PlainAdd()
    path = tmp_path / "fp32.onnx"
    export_onnx(model, path, torch.randn(2, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    np.testing.assert_allclose(_ort(path).run(None, {"input": x.numpy()})[0], _simulate(model, x), rtol=0, atol=1e-5)
    assert inspect_onnx(path).count("integer") == 0


def test_dynamic_batch(cnn_onnx):
    session = _ort(cnn_onnx)
    for batch in (1, 5):
        assert session.run(None, {"input": np.zeros((batch, 3, 8, 8), np.float32)})[0].shape == (batch, 10)
