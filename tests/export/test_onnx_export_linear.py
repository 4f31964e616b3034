"""export_onnx on Linear-only (transformer-MLP-like) models and embeddings.

ORT kernels observed (ORT 1.32, level ALL):
  * w8a8, 3-D input:   MatMulIntegerToFloat per Linear (+ a float bias Add each, reading
    the int32 bias through its DequantizeLinear: ORT's QDQ fusion does not fold the bias
    into it; ORT's own quantize_static leaves the same Adds).  ORT vs simulation: 2.4e-7.
  * w8a8, 2-D input:   QGemm (the int32 bias folded in).  ORT vs simulation: 3.6e-7.
  * w8a8-dynamic:      DynamicQuantizeMatMul per Linear (2-D Gemms are rewritten to
    MatMul, for which ORT has the fusion).
  * w8 (weight-only):  ORT 1.32 turns DQ(int8 W) -> MatMul into MatMulNBits (8-bit
    weights); with its default accuracy_level it quantizes activations internally, so
    ORT differs from the float-activation simulation by ~0.6 % of the output range.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from lowbit.config import LayerQuant, QuantConfig, Rule
from lowbit.export import export_onnx, inspect_onnx
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import INT8_WEIGHT, INT8_WEIGHT_PER_TENSOR, QuantSpec
from lowbit.ptq import quantize
from lowbit.targets import TARGETS


class MLP(nn.Module):
    """A transformer MLP block with a residual connection and a head: x -> head(x + down(relu(up(x))))."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(x + self.down(torch.relu(self.up(x))))


def _quantized_mlp(config, shape=(4, 6, 32)):
    torch.manual_seed(0)
    calib = [torch.randn(*shape) for _ in range(4)]
    return quantize(MLP().eval(), calib, config, progress=False)


def _export(qmodel, tmp_path, shape, name="m.onnx"):
    path = tmp_path / name
    export_onnx(qmodel, path, torch.randn(*shape))
    return path


def _run_ort(path, x):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _simulate(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _int32_initializers(path) -> list[str]:
    return [t.name for t in onnx.load(path).graph.initializer if t.data_type == onnx.TensorProto.INT32]


CASES = [  # config, input shape, the integer kernel ORT must run for each of the 3 Linears
    ("w8a8", (4, 6, 32), "MatMulIntegerToFloat"),
    ("w8a8", (4, 32), "QGemm"),
    ("w8a8-dynamic", (4, 6, 32), "DynamicQuantizeMatMul"),
    ("w8a8-dynamic", (4, 32), "DynamicQuantizeMatMul"),
]


@pytest.mark.parametrize("config, shape, kernel", CASES)
def test_linears_run_as_integer_matmuls(config, shape, kernel, tmp_path):
    qmodel = _quantized_mlp(config, shape)
    path = _export(qmodel, tmp_path, shape)
    report = inspect_onnx(path)
    assert report.op_counts.get(kernel) == 3, report
    assert not [n for n in report.float_compute_nodes if "MatMul" in n or "Gemm" in n], report
    x = np.random.default_rng(1).standard_normal((8, *shape[1:])).astype(np.float32)
    # The simulation already holds the biases ORT uses (int32 on s_in * s_w for static
    # inputs, float for dynamic ones): one quantize per layer input, an exact int32 matmul,
    # a float rescale; measured <= 1.9e-7 of the largest output.  (Over thousands of rows
    # a value on a rounding tie of the next quantizer can flip: see test_onnx_export.)
    want = _simulate(qmodel, x)
    np.testing.assert_allclose(_run_ort(path, x), want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("config", ["w8a8", "w8a8-dynamic", "w8"])
def test_reference_evaluator_is_exact(config, tmp_path):
    qmodel = _quantized_mlp(config)
    path = _export(qmodel, tmp_path, (4, 6, 32))
    onnx.checker.check_model(onnx.load(path), full_check=True)
    x = np.random.default_rng(2).standard_normal((4, 6, 32)).astype(np.float32)
    got = ReferenceEvaluator(str(path)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, _simulate(qmodel, x), rtol=0, atol=1e-6)  # measured 0.0 (dynamic: 4.8e-7)
    # int32 biases exactly where the simulation rounds them: static per-tensor inputs only.
    int32_biases = [n for n in _int32_initializers(path) if n.endswith(".bias_quantized")]
    assert int32_biases == (["up.bias_quantized", "down.bias_quantized", "head.bias_quantized"]
                            if config == "w8a8" else [])


def test_weight_only_is_int8_weights_and_float_ops(tmp_path):
    qmodel = _quantized_mlp("w8")
    path = _export(qmodel, tmp_path, (4, 6, 32))
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and "DynamicQuantizeLinear" not in ops
    assert ops.count("DequantizeLinear") == 3
    assert inspect_onnx(path).op_counts.get("MatMulNBits") == 3  # ORT 1.32's fusion of DQ(int8) -> MatMul
    # That fusion computes with int8 activations by default (accuracy_level 4: ~0.6 % off);
    # accuracy level 0 keeps activations float and reproduces the simulation.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    x = np.random.default_rng(4).standard_normal((4, 6, 32)).astype(np.float32)
    got = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, _simulate(qmodel, x), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the float baseline uses torch.onnx directly
def test_export_is_about_four_times_smaller_than_float(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    x = torch.randn(4, 256)
    qmodel = quantize(model, [x], "w8a8", progress=False)
    export_onnx(qmodel, tmp_path / "int8.onnx", x)
    torch.onnx.export(model, (x,), str(tmp_path / "float.onnx"), dynamo=False, opset_version=19)
    ratio = (tmp_path / "float.onnx").stat().st_size / (tmp_path / "int8.onnx").stat().st_size
    assert 3.7 < ratio < 4.0, ratio  # int8 weights + one float scale per row, int32 biases and their scales


def test_dynamic_weight_quantizer_exports_int8_constants(tmp_path):
    qmodel = _quantized_mlp("w8a8")
    qmodel.up.weight_quantizer.mode = "dynamic"  # as during QAT: range taken from the weight itself
    path = _export(qmodel, tmp_path, (4, 6, 32))
    inits = {t.name: t for t in onnx.load(path).graph.initializer}
    layout = TARGETS[qmodel.lowbit_summary.target].weight_layout  # uint8 for x86-avx2-u8u8
    assert inits["up.weight_quantized"].data_type == (onnx.TensorProto.UINT8 if layout == "u8" else onnx.TensorProto.INT8)
    # The simulation keeps a bias float while its weight scale moves; the file does too.
    assert inits["up.bias"].data_type == onnx.TensorProto.FLOAT and "up.bias_quantized" not in inits
    assert inits["down.bias_quantized"].data_type == onnx.TensorProto.INT32
    x = np.random.default_rng(3).standard_normal((4, 6, 32)).astype(np.float32)
    np.testing.assert_allclose(ReferenceEvaluator(str(path)).run(None, {"input": x})[0], _simulate(qmodel, x),
                               rtol=0, atol=1e-5)


def test_disabled_quantizer_exports_nothing(tmp_path):
    qmodel = _quantized_mlp("w8a8")

    def quantize_nodes(name):
        model = onnx.load(_export(qmodel, tmp_path, (4, 6, 32), name))
        return [n.name for n in model.graph.node if n.op_type == "QuantizeLinear"]

    before = quantize_nodes("before.onnx")
    qmodel.head.input_quantizer.mode = "disabled"
    assert quantize_nodes("after.onnx") == [n for n in before if not n.startswith("head.input")]


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16, padding_idx=0)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids):
        return self.proj(self.tok(ids))


EMBEDDING_SPECS = {
    "per-row int8": INT8_WEIGHT,
    "per-tensor int8": INT8_WEIGHT_PER_TENSOR,
    "per-column int8": QuantSpec(bits=8, granularity="channel", axis=1),
    "per-row uint8 affine": QuantSpec(bits=8, signed=False, symmetric=False, granularity="channel", axis=0),
}


@pytest.mark.parametrize("spec", EMBEDDING_SPECS.values(), ids=EMBEDDING_SPECS.keys())
def test_embedding_gathers_the_integer_table(spec, tmp_path):
    config = QuantConfig(name="emb", rules=(Rule(pattern="type:Embedding", layer=LayerQuant(weight=TensorQuant(spec=spec))),),
                         default=None)
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 7))
    qmodel = quantize(Encoder().eval(), [ids], config, progress=False)
    path = tmp_path / "emb.onnx"
    export_onnx(qmodel, path, ids)
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    table = inits["tok.weight_quantized"]
    assert table.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and list(table.dims) == [50, 16]
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "tok.weight_quantized"]
    assert len(gathers) == 1 and gathers[0].input[1] == "input"  # rows first, dequantize after
    x = torch.randint(0, 50, (5, 7)).numpy()
    want = _simulate(qmodel, x)
    np.testing.assert_allclose(ReferenceEvaluator(model).run(None, {"input": x})[0], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_run_ort(path, x), want, rtol=0, atol=1e-5)


def test_a_bias_beyond_int32_saturates_as_in_the_simulation(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    model = nn.Sequential(nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([1e9, -1e9, 0.25, -0.25]))  # the first two: ~1e13 steps
    qmodel = quantize(model, [x], "w8a8", progress=False)
    path = tmp_path / "big.onnx"
    export_onnx(qmodel, path, x)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    assert inits["0.bias_quantized"][:2].tolist() == [2**31 - 1, -(2**31)]
    # float32 has no 2**31 - 1: the simulation's clamp and the DQ of the int32 both give 2**31.
    got = ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, _simulate(qmodel, x.numpy()), rtol=1e-6, atol=1e-6)
