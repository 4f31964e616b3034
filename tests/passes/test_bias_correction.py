"""correct_bias: the mean output error per channel goes away and the end metric improves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.nn.quantizer import Quantizer
from lowbit.numerics import INT4_WEIGHT, QuantSpec
from lowbit.passes import correct_bias
from lowbit.passes.bias_correction import _layers
from lowbit.ptq import quantize

W4_PER_TENSOR = QuantConfig(
    name="w4-per-tensor", default=LayerQuant(weight=TensorQuant(spec=QuantSpec(bits=4, narrow_range=True)))
)
W4_PER_CHANNEL = QuantConfig(name="w4-per-channel", default=LayerQuant(weight=TensorQuant(spec=INT4_WEIGHT)))


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def _batches(seed: int, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(16, 3, 12, 12, generator=gen) for _ in range(n)]  # non-negative: E[x] != 0


def _outputs(model: nn.Module, names: list[str], data) -> dict[str, torch.Tensor]:
    """Every named layer's output over ``data``, concatenated along the batch."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(lambda _m, _a, y, n=n: seen[n].append(y))
               for n in names]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(ys) for n, ys in seen.items()}


def _channel_bias(y_q: torch.Tensor, y_fp: torch.Tensor) -> torch.Tensor:
    """|E[y_q - y_fp]| per channel (channels on axis 1), relative to the output's RMS."""
    err = (y_q - y_fp).movedim(1, 0).flatten(1).mean(1)
    return err.abs() / y_fp.pow(2).mean().sqrt()


def _mse(model: nn.Module, reference: nn.Module, data) -> float:
    with torch.no_grad():
        return float(sum(((model(x) - reference(x)) ** 2).mean() for x in data) / len(data))


@pytest.mark.parametrize("reference", ["layer", "model"])
def test_small_cnn_int4_per_tensor_bias_goes_away(reference):
    model = _small_cnn()
    calib, held_out = _batches(seed=1), _batches(seed=2)
    qmodel = quantize(model, None, W4_PER_TENSOR, progress=False)
    names = list(_layers(qmodel))
    before = copy.deepcopy(qmodel)
    _, corrected = correct_bias(model, qmodel, calib, reference=reference)
    assert corrected == names == ["0", "2", "4", "8"]
    assert qmodel[0].bias is not None  # created: the first conv had none

    # Per-channel mean error of every layer's output against the float model, on held-out data.
    fp = _outputs(model, names, held_out)
    err_before = {n: _channel_bias(y, fp[n]) for n, y in _outputs(before, names, held_out).items()}
    err_after = {n: _channel_bias(y, fp[n]) for n, y in _outputs(qmodel, names, held_out).items()}
    for n in names:
        before_n, after_n = float(err_before[n].mean()), float(err_after[n].mean())
        assert after_n < 0.5 * before_n, (n, before_n, after_n)  # measured: 10x to 190x smaller
    assert _mse(qmodel, model, held_out) < 0.7 * _mse(before, model, held_out)


@pytest.mark.parametrize("pass_float_model", [True, False])
def test_model_reference_removes_the_end_to_end_bias_exactly_on_the_calibration_data(pass_float_model):
    model = _small_cnn()
    calib = _batches(seed=3)
    qmodel = quantize(model, None, W4_PER_TENSOR, progress=False)
    # Without a float model, qmodel with its quantizers disabled is the reference: the same thing.
    correct_bias(model if pass_float_model else None, qmodel, calib, reference="model")
    assert all(q.mode == "static" for q in qmodel.modules() if isinstance(q, Quantizer))  # restored
    names = list(_layers(qmodel))
    fp, q = _outputs(model, names, calib), _outputs(qmodel, names, calib)
    for n in names:  # each layer was corrected after all the layers before it: nothing is left
        assert float(_channel_bias(q[n], fp[n]).max()) < 1e-4, n


def test_errors_name_the_fix():
    model = _small_cnn()
    qmodel = quantize(model, None, W4_PER_TENSOR, progress=False)
    with pytest.raises(ValueError, match="empty"):
        correct_bias(None, qmodel, [])
    with pytest.raises(ValueError, match="reference must be"):
        correct_bias(None, qmodel, _batches(0), reference="float")
    with pytest.raises(ValueError, match="re-iterable"):
        correct_bias(None, qmodel, iter(_batches(0)), reference="model")
    other = _small_cnn()
    with torch.no_grad():
        other[2].weight.mul_(2)
    with pytest.raises(ValueError, match="2 has a different float weight.*reference='layer'"):
        correct_bias(other, qmodel, _batches(0), reference="model")


def test_float_model_is_untouched_and_a_layer_called_twice_is_skipped():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    model = Shared().eval()
    state = copy.deepcopy(model.state_dict())
    qmodel = quantize(model, None, W4_PER_TENSOR, progress=False)
    _, corrected = correct_bias(model, qmodel, _batches(0), reference="model")
    assert corrected == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# -- MobileNetV2 at int4 per-channel weights, on real photos ---------------------------------

def test_mobilenet_v2_int4_weights_get_closer_to_fp32(folded):
    pytest.importorskip("skimage")
    from lowbit.zoo import imagenet_photos, photo_batches

    # 160 px keeps the test fast; the photos are real and the model still classifies them.
    calib = list(photo_batches(n=8, seed=5, size=160, batch_size=8))
    x = imagenet_photos(n=16, seed=6, size=160)
    qmodel = quantize(folded, None, W4_PER_CHANNEL, progress=False)
    with torch.no_grad():
        y, before = folded(x), qmodel(x)
        correct_bias(None, qmodel, calib)
        after = qmodel(x)
    err_before, err_after = float((before - y).norm() / y.norm()), float((after - y).norm() / y.norm())
    agree_before = float((before.argmax(1) == y.argmax(1)).float().mean())
    agree_after = float((after.argmax(1) == y.argmax(1)).float().mean())
    # Measured: logit error 1.00 -> 0.63, top-1 agreement 5/16 -> 8/16.
    assert err_after < 0.75 * err_before
    assert agree_after > agree_before
