"""Group-wise weights export as a blocked DequantizeLinear (opset 21) on INT4 / UINT4 / INT8 integers
feeding the float op; ONNX Runtime runs the file and matches the fake-quant simulation.

Measured on ORT 1.32: Gemm and Conv run in float on the dequantized weight, equal to the simulation
(0 difference here); ``DQ -> MatMul`` with a float input becomes MatMulNBits at optimization level
extended and above, whose default accuracy level 4 rounds the activations to int8 (~0.5% off), so
exactness is checked at level ``basic`` and closeness at ORT's default.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.config import LayerQuant, QuantConfig, Rule
from lowbit.export import export_onnx, inspect_onnx
from lowbit.export._graph import attr
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import INT8_ACTIVATION, UINT8_ACTIVATION, QuantSpec
from lowbit.runtime.emulate import EmulationError, emulate_ort
from lowbit.runtime.ort import OrtModel

INT8_G16 = QuantSpec(bits=8, narrow_range=True, granularity="group", axis=1, group_size=16)
INT4_G16 = QuantSpec(bits=4, granularity="group", axis=1, group_size=16)
UINT4_G16 = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", axis=1, group_size=16)
SPECS = {"int8": INT8_G16, "int4": INT4_G16, "uint4": UINT4_G16}
_ONNX_TYPES = {"int8": onnx.TensorProto.INT8, "int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}


def _config(weight: QuantSpec, act: QuantSpec | None = None, dynamic: bool = False) -> QuantConfig:
    return QuantConfig(name="g", default=LayerQuant(
        weight=TensorQuant(spec=weight), input=None if act is None else TensorQuant(spec=act, dynamic=dynamic)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()


def _export(build, config, x, path, **kwargs):
    torch.manual_seed(0)
    qmodel = lowbit.quantize(build(), [x], config, progress=False)
    model = export_onnx(qmodel, path, x, **kwargs)
    with torch.no_grad():
        return qmodel, model, qmodel(x)


def _blocked_dqs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and attr(n, "block_size")]


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("shape", [(4, 64), (2, 5, 64)], ids=["gemm", "matmul"])
def test_linear_weights_are_blocked_dequantize_linear(kind, shape, tmp_path):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    _, model, simulated = _export(_mlp, _config(SPECS[kind]), x, tmp_path / "m.onnx")
    assert [o.version for o in model.opset_import if o.domain == ""] == [21]  # chosen automatically
    assert not any(o.domain == "lowbit" for o in model.opset_import)
    dqs = _blocked_dqs(model)
    assert len(dqs) == 2 and all(attr(n, "block_size") == 16 for n in dqs)
    inits = _inits(model)
    assert {inits[n.input[0]].data_type for n in dqs} == {_ONNX_TYPES[kind]}
    assert {inits[n.input[2]].data_type for n in dqs} == {_ONNX_TYPES[kind]}  # zero-points share the type
    # Exact at the level where ORT runs DQ -> float Gemm / MatMul.
    exact = OrtModel(tmp_path / "m.onnx", optimization="basic")(x)
    torch.testing.assert_close(exact, simulated, rtol=1e-6, atol=1e-6)
    kernels = inspect_onnx(tmp_path / "m.onnx").op_counts
    default = OrtModel(tmp_path / "m.onnx")(x)
    if len(shape) == 3:  # ORT's MatMulNBits, int8 activations by default
        assert kernels.get("MatMulNBits") == 2
        assert float((default - simulated).abs().max()) < 0.02 * float(simulated.abs().max())
    else:
        assert "MatMulNBits" not in kernels and kernels.get("DequantizeLinear") == 2
        torch.testing.assert_close(default, simulated, rtol=1e-6, atol=1e-6)


def test_constants_are_the_layers_integer_view(tmp_path):
    x = torch.randn(4, 64)
    qmodel, model, _ = _export(_mlp, _config(INT4_G16), x, tmp_path / "m.onnx")
    inits = _inits(model)
    ints = qmodel[0].integer_params().weight
    (dq,) = [n for n in _blocked_dqs(model) if n.input[0].startswith("0.weight")]
    assert attr(dq, "axis") == 1  # Gemm(transB=1) reads W as (out, in): the groups run along axis 1
    np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[0]]).astype(np.int8), ints.values.numpy())
    np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[1]]), ints.scale.numpy())
    assert ints.scale.shape == (32, 4)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("act", [None, UINT8_ACTIVATION], ids=["float-input", "uint8-input"])
def test_conv_groups_along_input_channels(kind, act, tmp_path):
    spec = SPECS[kind].replace(group_size=8)
    torch.manual_seed(2)
    x = torch.randn(2, 16, 6, 6)
    _, model, simulated = _export(_convnet, _config(spec, act), x, tmp_path / "c.onnx")
    scales = _inits(model)
    assert [scales[n.input[1]].dims for n in _blocked_dqs(model)] == [[16, 2, 3, 3], [8, 2, 1, 1]]
    torch.testing.assert_close(OrtModel(tmp_path / "c.onnx")(x), simulated, rtol=1e-5, atol=1e-5)
    kernels = inspect_onnx(tmp_path / "c.onnx").op_counts
    assert kernels.get("Conv", 0) + kernels.get("FusedConv", 0) == 2  # float kernels on the dequantized weights


@pytest.mark.parametrize("act,dynamic", [(UINT8_ACTIVATION, False), (INT8_ACTIVATION, False), (UINT8_ACTIVATION, True)],
                         ids=["uint8", "int8", "dynamic"])
def test_int4_groups_with_a_quantized_input(act, dynamic, tmp_path):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64)
    _, model, simulated = _export(_mlp, _config(INT4_G16, act, dynamic), x, tmp_path / "m.onnx")
    assert len(_blocked_dqs(model)) == 2
    torch.testing.assert_close(OrtModel(tmp_path / "m.onnx")(x), simulated, rtol=1e-5, atol=1e-5)


def _refuses(build, config, x, match, tmp_path):
    torch.manual_seed(0)
    qmodel = lowbit.quantize(build(), [x], config, progress=False)
    with pytest.raises(ValueError, match=match):
        export_onnx(qmodel, tmp_path / "m.onnx", x)
    assert list(tmp_path.iterdir()) == []


def test_what_cannot_be_written_is_refused(tmp_path):
    x = torch.randn(2, 5, 64)
    # Group-wise activations: ONNX Runtime has no blocked QuantizeLinear kernel for them.
    _refuses(_mlp, _config(INT4_G16, UINT8_ACTIVATION.replace(granularity="group", axis=-1, group_size=16)), x,
             r"0\.input: .*blocked .*of an activation", tmp_path)
    # An 8-bit blocked weight on a MatMul with a quantized input: ORT 1.32 would fuse it into a failing kernel.
    _refuses(_mlp, _config(INT8_G16, UINT8_ACTIVATION), x, r"0\.weight: an 8-bit group-wise weight on a MatMul", tmp_path)
    # A group-wise embedding table (rows are dequantized after the Gather).
    ids = torch.randint(0, 10, (2, 3))
    table = QuantConfig(name="e", rules=(Rule(pattern="type:Embedding", layer=LayerQuant(
        weight=TensorQuant(spec=QuantSpec(bits=4, granularity="group", axis=1, group_size=4)))),))
    _refuses(lambda: nn.Sequential(nn.Embedding(10, 8)).eval(), table, ids, r"0\.weight: .*embedding table", tmp_path)


def test_emulation_refuses_group_wise_layers():
    # ORT runs these layers in float (or as MatMulNBits): no QLinear kernel to emulate bit for bit.
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    weight_only = lowbit.quantize(_mlp(), [x], _config(INT4_G16), progress=False)
    with pytest.raises(EmulationError, match=r"\b0\b"):
        emulate_ort(weight_only, cpu="x86-vnni")
    quantized_input = lowbit.quantize(_mlp(), [x], _config(INT4_G16, UINT8_ACTIVATION), progress=False)
    with pytest.raises(EmulationError, match=r"0\.weight: .*blocked DequantizeLinear, so ORT runs 0 as a float"):
        emulate_ort(quantized_input, cpu="x86-vnni")


# -- a ragged last group: SmolLM2's hidden size 576 in groups of 128 (4 x 128 + 64) -------------------
def _wide_mlp() -> nn.Module:
    # 576 = 4 x 128 + 64; the second layer's 32 inputs are one short group of 32.
    return nn.Sequential(nn.Linear(576, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("shape", [(4, 576), (2, 5, 576)], ids=["gemm", "matmul"])
def test_ragged_groups_export_and_run(kind, shape, tmp_path):
    from onnx.reference import ReferenceEvaluator

    spec = SPECS[kind].replace(group_size=128)
    torch.manual_seed(4)
    x = torch.randn(*shape)
    qmodel, model, simulated = _export(_wide_mlp, _config(spec), x, tmp_path / "m.onnx")
    dqs = _blocked_dqs(model)
    assert len(dqs) == 2 and all(attr(n, "block_size") == 128 for n in dqs)
    scales = sorted(tuple(_inits(model)[n.input[1]].dims) for n in dqs)
    # ceil(576 / 128) = 5 and ceil(32 / 128) = 1 scales along the input axis (transposed for MatMul).
    assert scales == ([(1, 8), (5, 32)] if len(shape) == 3 else [(8, 1), (32, 5)])
    assert tuple(qmodel[0].integer_params().weight.scale.shape) == (32, 5)
    # ONNX's reference evaluator and ORT (level basic: DQ -> float Gemm / MatMul) give the simulation.
    (reference,) = ReferenceEvaluator(str(tmp_path / "m.onnx")).run(None, {model.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(reference), simulated, rtol=1e-5, atol=1e-5)
    exact = OrtModel(tmp_path / "m.onnx", optimization="basic")(x)
    torch.testing.assert_close(exact, simulated, rtol=1e-5, atol=1e-5)
    default = OrtModel(tmp_path / "m.onnx")(x)
    kernels = inspect_onnx(tmp_path / "m.onnx").op_counts
    if len(shape) == 3:  # MatMulNBits pads K to whole blocks (both layers); int8 activations by default
        assert kernels.get("MatMulNBits") == 2
        assert float((default - simulated).abs().max()) < 0.02 * float(simulated.abs().max())
    else:
        torch.testing.assert_close(default, simulated, rtol=1e-5, atol=1e-5)
