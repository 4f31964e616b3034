"""Per-layer figures (lowbit.report.layers) of PTQ and QAT models, against hand computations."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import INT8_WEIGHT, UINT8_ACTIVATION
from lowbit.qat import prepare_qat
from lowbit.report.layers import bit_width_table, bit_widths, layer_errors, quantizer_scales, weight_errors

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """conv-BN-ReLU, a second conv, a two-layer head: every layer with a weight matrix."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.hidden = nn.Linear(16, 32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(F.relu(self.hidden(self.features(x).mean((2, 3)))))


LAYERS = {"features.0", "features.3", "hidden", "fc"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]


def _weight_bits(bits: int) -> QuantConfig:
    """Every layer: ``bits``-bit per-channel weights (range by min-max), uint8 activations."""
    spec = dataclasses.replace(INT8_WEIGHT, bits=bits)
    return QuantConfig(name=f"w{bits}", default=LayerQuant(weight=TensorQuant(spec=spec),
                                                           input=TensorQuant(spec=UINT8_ACTIVATION)))


def _ptq(config) -> nn.Module:
    return lowbit.quantize(_model(), _calib(), config, progress=False)


def _qat(config, learn="lsq") -> nn.Module:
    qmodel = prepare_qat(_model(), config, _calib(), learn=learn, progress=False)
    qmodel.train()
    opt = torch.optim.SGD(qmodel.parameters(), lr=1e-2)
    F.cross_entropy(qmodel(_calib()[0]), torch.arange(8) % 5).backward()  # one step: the ranges move
    opt.step()
    return qmodel


@pytest.mark.parametrize("make", [_ptq, _qat], ids=["ptq", "qat"])
def test_layer_error_is_zero_for_a_layer_kept_float_and_grows_as_bits_drop(make):
    errors = {bits: layer_errors(make(_weight_bits(bits).skip("hidden"))) for bits in (8, 6, 4, 3, 2)}
    for e in errors.values():
        assert set(e) == LAYERS  # every layer with a weight, float ones included
        assert e["hidden"] == 0.0
    for name in LAYERS - {"hidden"}:
        curve = [errors[bits][name] for bits in (8, 6, 4, 3, 2)]
        assert 0 < curve[0] < 0.02, (name, curve)  # 8 bits: well under 2 % of the weight's norm
        assert all(a < b for a, b in itertools.pairwise(curve)) and curve[-1] > 10 * curve[0], (name, curve)


def test_layer_error_of_a_ptq_layer_is_its_relative_rounding_error():
    qmodel = _ptq("w8a8")
    layer = qmodel.hidden
    scale, zp = layer.weight_quantizer.scale, layer.weight_quantizer.zero_point
    w = layer.weight.detach()
    by_hand = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)
    assert layer_errors(qmodel)["hidden"] == pytest.approx(float((w - by_hand).norm() / w.norm()), rel=1e-5)
    layer.weight_quantizer.mode = "disabled"  # the weight stays float now
    assert layer_errors(qmodel)["hidden"] == 0.0


def test_weight_errors_of_a_qat_conv_bn_layer_use_the_folded_weight():
    qmodel = _qat("w8a8", learn=None)  # weight ranges: min-max of the current (folded) weight
    conv = qmodel.features[0]  # QuantConvBn2d: its quantizer sees the BN-folded weight
    errors = weight_errors(qmodel)
    assert set(errors) == {f"{name}.weight" for name in LAYERS}
    folded = conv.quantized_weight_source().detach()
    scale = conv.weight_quantizer.qparams_for(folded)[0]
    err = errors["features.0.weight"].reshape(folded.shape)
    assert bool((err.abs() <= scale[:, None, None, None] / 2 + 1e-6).all())  # int8 per channel: no clipping
    assert float(err.abs().max()) > 0
    relative = float(err.double().norm() / folded.double().norm())
    assert layer_errors(qmodel)["features.0"] == pytest.approx(relative, rel=1e-5)


@pytest.mark.parametrize("make", [_ptq, _qat], ids=["ptq", "qat"])
def test_scales_and_bit_widths_of_a_w4a8_model(make):
    qmodel = make("w4a8")  # first and last layers int8, the others int4
    scales = quantizer_scales(qmodel)
    q = qmodel.hidden.input_quantizer
    assert scales["hidden.input"] == pytest.approx(float(q.qparams_for(torch.empty(0))[0]))
    w = qmodel.fc.weight_quantizer.qparams_for(torch.empty(0))[0]
    assert scales["fc.weight/max"] == pytest.approx(float(w.max()))
    assert scales["fc.weight/min"] <= scales["fc.weight/mean"] <= scales["fc.weight/max"]

    counts = bit_widths(qmodel)
    n_int4 = qmodel.features[3].weight.numel() + qmodel.hidden.weight.numel()
    n_int8 = qmodel.features[0].weight.numel() + qmodel.fc.weight.numel()
    assert counts["int4"] == n_int4 and counts["int8"] == n_int8
    assert sum(counts.values()) == sum(p.numel() for p in qmodel.parameters())
    table = bit_width_table(counts)
    assert f"| int4 | {n_int4:,} |" in table
    mean_bits = (4 * n_int4 + 8 * n_int8 + 32 * counts["float32"]) / sum(counts.values())
    assert table.endswith(f"mean bits per parameter: {mean_bits:.2f}")


def test_figures_change_no_state_and_skip_a_range_not_known_yet():
    qmodel = prepare_qat(_model(), "w8a8", None, learn="lsq", progress=False)  # no calibration data
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if isinstance(v, torch.Tensor)}
    scales, errors = quantizer_scales(qmodel), layer_errors(qmodel)
    assert not any(name.endswith(".input") for name in scales)  # activations wait for a first batch
    assert set(errors) <= LAYERS
    weight_errors(qmodel), bit_widths(qmodel)
    for k, v in qmodel.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
