"""export_onnx refuses what it cannot express, naming the tensor and the fix, before writing anything."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lowbit.config import LayerQuant, QuantConfig, Rule
from lowbit.export import export_onnx
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import INT4_WEIGHT_G128, INT8_ACTIVATION, INT8_WEIGHT, UINT8_ACTIVATION, QuantSpec
from lowbit.ptq import quantize


def _config(weight=INT8_WEIGHT, act=UINT8_ACTIVATION, dynamic=False) -> QuantConfig:
    return QuantConfig(name="t", default=LayerQuant(weight=TensorQuant(spec=weight),
                                                    input=TensorQuant(spec=act, dynamic=dynamic)))


def _quantized(config, d: int = 128) -> nn.Module:
    torch.manual_seed(0)
    return quantize(nn.Sequential(nn.Linear(d, 8)).eval(), [torch.randn(4, d)], config, progress=False)


def _refuses(model, tmp_path, match, x=None, **kwargs):
    with pytest.raises(ValueError, match=match):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 128) if x is None else x, **kwargs)
    assert os.listdir(tmp_path) == []


def test_group_wise_weights_below_opset_21(tmp_path):
    # Group-wise weights export (tests/export/test_onnx_export_group.py), but not at an opset without block_size.
    _refuses(_quantized(_config(weight=INT4_WEIGHT_G128)), tmp_path, r"0\.weight: .*blocked .*opset=21", opset=20)


def test_16_bit_activations(tmp_path):
    _refuses(_quantized(_config(act=QuantSpec(bits=16, signed=False, symmetric=False))), tmp_path,
             r"0\.input: .*16-bit")


def test_dynamic_activations_must_be_uint8_affine(tmp_path):
    _refuses(_quantized(_config(act=INT8_ACTIVATION, dynamic=True)), tmp_path,
             r"0\.input: .*DynamicQuantizeLinear.*UINT8_ACTIVATION")


def test_quantizer_still_calibrating(tmp_path):
    model = _quantized(_config())
    model[0].input_quantizer.mode = "calibrating"
    _refuses(model, tmp_path, r"0\.input: .*calibrating")


def test_embedding_max_norm(tmp_path):
    config = QuantConfig(name="e", rules=(Rule(pattern="type:Embedding", layer=LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT))),))
    ids = torch.randint(0, 10, (2, 3))
    model = quantize(nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)).eval(), [ids], config, progress=False)
    _refuses(model, tmp_path, r"0\.weight: .*max_norm", x=ids)


@pytest.mark.parametrize("opset", [12, 28, "19", True, 19.0])
def test_opset_range(opset, tmp_path):
    _refuses(_quantized(_config()), tmp_path, "opset", opset=opset)


def test_bad_inputs_and_names(tmp_path):
    model = _quantized(_config())
    _refuses(model, tmp_path, "example_inputs", x={"x": torch.randn(2, 128)})
    _refuses(model, tmp_path, "input_names", input_names=["a", "b"])


def test_narrow_activation_grid_exports_with_a_warning(tmp_path, caplog):
    model = _quantized(_config(act=QuantSpec(bits=4, signed=False, symmetric=False)))
    export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 128))
    assert "narrower than its 8-bit container" in caplog.text
