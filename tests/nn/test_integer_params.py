"""layer.integer_params(): the one integer view of a quantized layer that export, emulation
and reports read.  Checked against the simulation (the view reproduces the layer's forward
with integer arithmetic), against the exported ONNX constants, and on every kind of layer
and mode that changes it."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.nn.integer import IntegerBias, IntegerParams, IntegerTensor


def _calib(*shape, n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _dequant(t: IntegerTensor, shape_like: torch.Tensor) -> torch.Tensor:
    scale, zp = t.scale, t.zero_point.float()
    while scale.dim() < shape_like.dim():
        scale, zp = scale.unsqueeze(-1), zp.unsqueeze(-1)
    return (t.values.float() - zp) * scale


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(16, 8), (4, 16)),
    (nn.Conv2d(3, 6, 3, padding=1), (2, 3, 8, 8)),
    (nn.Conv1d(4, 5, 3), (2, 4, 10)),
])
def test_integer_view_reproduces_the_simulation(layer, shape):
    """Quantize the input with the view's qparams, compute in integers (exact in float64),
    rescale: the simulated output of the layer, up to float32 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    qmodel = lowbit.quantize(model, _calib(*shape), "w8a8", target="x86-vnni", progress=False)
    qlayer = qmodel[0]
    view = qlayer.integer_params()
    assert isinstance(view, IntegerParams) and view.output is None
    assert view.weight.values.dtype == torch.int8 and view.input.zero_point.dtype == torch.uint8
    assert isinstance(view.bias, IntegerBias) and view.bias.values.dtype == torch.int32

    x = _calib(*shape, n=1)[0]
    xq = torch.clamp(torch.round(x / view.input.scale) + view.input.zero_point.float(), 0, 255)
    x_int = (xq - view.input.zero_point.float()).double()
    w_int = (view.weight.values.float() - view.weight.zero_point.float().reshape(-1, *[1] * (layer.weight.dim() - 1)))
    if isinstance(layer, nn.Linear):
        acc = F.linear(x_int, w_int.double(), view.bias.values.double())
        channel = (view.input.scale * view.weight.scale).double()
    else:
        conv = F.conv2d if layer.weight.dim() == 4 else F.conv1d
        acc = conv(x_int, w_int.double(), view.bias.values.double(), layer.stride, layer.padding)
        channel = (view.input.scale * view.weight.scale).double().reshape(-1, *[1] * (layer.weight.dim() - 2))
    expected = (acc * channel).float()
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), expected, rtol=1e-5, atol=1e-5)


def test_weight_and_bias_match_the_simulation_exactly():
    qmodel = lowbit.quantize(nn.Sequential(nn.Linear(16, 8)), _calib(4, 16), "w8a8", target="x86-vnni",
                             progress=False)
    layer = qmodel[0]
    view = layer.integer_params()
    with torch.no_grad():
        assert torch.equal(_dequant(view.weight, layer.weight), layer.weight_quantizer(layer.weight))
        assert torch.equal(view.bias.values.float() * view.bias.scale, layer._quant_bias())
        assert torch.equal(view.input.scale, layer.input_quantizer.scale)


def test_export_writes_the_view(tmp_path):
    """The ONNX initializers are the integer view's tensors, byte for byte."""
    x = _calib(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    qmodel = lowbit.quantize(model, x, "w8a8", target="x86-vnni", progress=False)
    path = tmp_path / "m.onnx"
    lowbit.export_onnx(qmodel, path, x[0])
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    for name in ("0", "3"):
        view = qmodel.get_submodule(name).integer_params()
        weights = [v for k, v in inits.items() if k.startswith(f"{name}.weight") and v.dtype.name == "int8"
                   and v.ndim > 1]
        assert len(weights) == 1 and (weights[0] == view.weight.values.numpy()).all()
        assert (inits[f"{name}.bias_quantized"] == view.bias.values.numpy()).all()


def test_float_and_dynamic_tensors_are_none():
    x = _calib(4, 16)
    dynamic = lowbit.quantize(nn.Sequential(nn.Linear(16, 8)), x, "w8a8-dynamic", progress=False)[0].integer_params()
    assert dynamic.input is None and dynamic.bias is None and dynamic.weight is not None
    weight_only = lowbit.quantize(nn.Sequential(nn.Linear(16, 8)), x, "w8", progress=False)[0].integer_params()
    assert weight_only.input is None and weight_only.bias is None
    embedding = lowbit.quantize(nn.Sequential(nn.Embedding(10, 4)), [torch.arange(10)], "w8a8",
                                progress=False)[0].integer_params()
    assert embedding.bias is None and embedding.input is None and embedding.weight.values.shape == (10, 4)


def test_qat_conv_bn_view_is_the_folded_layer():
    """A conv trained with its BatchNorm: the view holds the BN-folded weight and bias, the
    same integers ``convert`` (what export writes) gives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    qat = lowbit.prepare_qat(model, "w8a8", _calib(2, 3, 8, 8), target="x86-vnni", progress=False)
    qat.eval()
    view = qat[0].integer_params()
    converted = lowbit.qat.convert(qat)[0].integer_params()
    assert torch.equal(view.weight.values, converted.weight.values)
    assert torch.equal(view.bias.values, converted.bias.values)


def test_a_calibrating_quantizer_has_no_integer_view():
    qmodel = lowbit.quantize(nn.Sequential(nn.Linear(16, 8)), _calib(4, 16), "w8a8", progress=False)
    qmodel[0].input_quantizer.mode = "calibrating"
    with pytest.raises(ValueError, match="0.input.*calibrate"):
        qmodel[0].integer_params()
