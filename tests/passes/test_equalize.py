"""cross_layer_equalize: exact on ReLU models, balanced channel ranges, and the per-tensor
int8 weight result on MobileNetV2 with real photos."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import INT8_WEIGHT_PER_TENSOR
from lowbit.passes import cross_layer_equalize
from lowbit.passes.equalize import _in_ranges, _out_ranges
from lowbit.ptq import quantize

W8_PER_TENSOR = QuantConfig(
    name="w8-per-tensor", default=LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT_PER_TENSOR))
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _spread(w: torch.Tensor) -> float:
    """max / min of the per-output-channel ranges of a weight."""
    r = _out_ranges(w.detach())
    return float(r.max() / r.min())


def _unbalance(model: nn.Module, seed: int = 0) -> nn.Module:
    """Scale each output channel of every layer by a factor in [1/30, 30]: wildly unequal ranges."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                f = torch.exp(torch.empty(m.weight.shape[0]).uniform_(-3.4, 3.4, generator=gen))
                m.weight.mul_(f.view(-1, *([1] * (m.weight.dim() - 1))))
                if m.bias is not None:
                    m.bias.mul_(f)
    return model.eval()


class Mixed(nn.Module):
    """fx-only pairs: Conv->F.relu->MaxPool->Conv (grouped), Linear->ReLU->Linear; and a conv whose
    output also feeds a skip, which must not be equalized."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 8, 1)  # c2 -> c3 is a pair (no activation); c3 also feeds the add: no c3 -> c4
        self.c4 = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.c2(self.pool(F.relu(self.c1(x))))
        y = self.c3(x)
        x = self.c4(y) + y
        return self.fc2(self.act(self.fc1(x.mean((2, 3)))))


def _sequential() -> nn.Sequential:
    # conv -> ReLU -> depthwise -> ReLU -> conv, as in an inverted residual, and a 1-D branch.
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 12, 1), nn.Identity(), nn.ReLU()),
        nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.Identity(), nn.ReLU()),
        nn.Conv2d(12, 6, 1, bias=False),
    )


def test_sequential_chain_is_exact_and_balanced():
    model = _unbalance(_sequential())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    before = [_spread(model[0][0].weight), _spread(model[1][0].weight)]
    _, pairs = cross_layer_equalize(model, iterations=200, tol=1e-6)
    assert pairs == [("0.0", "1.0"), ("1.0", "2")]
    with torch.no_grad():
        assert _rel(model(x), expected) < 1e-4
    after = [_spread(model[0][0].weight), _spread(model[1][0].weight)]
    assert after[0] < before[0] / 5 and after[1] < before[1] / 5
    # Converged: each channel has the same range on both sides of every pair
    # (depthwise: channel i <-> group i).
    w1, w2, w3 = model[0][0].weight.detach(), model[1][0].weight.detach(), model[2].weight.detach()
    torch.testing.assert_close(_out_ranges(w1), _in_ranges(w2, 12), rtol=1e-3, atol=0)
    torch.testing.assert_close(_out_ranges(w2), _in_ranges(w3, 1), rtol=1e-3, atol=0)


def test_fx_pairs_through_functional_relu_pools_and_grouped_convs():
    model = _unbalance(Mixed(), seed=1)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    spread_c1 = _spread(model.c1.weight)
    _, pairs = cross_layer_equalize(model)
    assert pairs == [("c1", "c2"), ("c2", "c3"), ("fc1", "fc2")]
    assert _spread(model.c1.weight) < spread_c1 / 5
    with torch.no_grad():
        assert _rel(model(x), expected) < 1e-4


def test_untraceable_model_is_equalized_inside_its_sequentials(caplog):
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _sequential()

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)  # data-dependent: no fx

    model = _unbalance(Untraceable())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with caplog.at_level(logging.INFO, logger="lowbit.passes"):
        _, pairs = cross_layer_equalize(model)
    assert pairs == [("body.0.0", "body.1.0"), ("body.1.0", "body.2")]
    assert "could not trace" in caplog.text
    with torch.no_grad():
        assert _rel(model(x), expected) < 1e-4


def test_relu6_blocks_pairs_unless_replaced(caplog):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU6(), nn.Linear(8, 2))
    with caplog.at_level(logging.INFO, logger="lowbit.passes"):
        _, pairs = cross_layer_equalize(copy.deepcopy(model))
    assert pairs == [] and "relu6_to_relu=True" in caplog.text
    _, pairs = cross_layer_equalize(model, relu6_to_relu=True)
    assert pairs == [("0", "2")] and type(model[1]) is nn.ReLU


def test_unfolded_batchnorm_blocks_pairs_with_a_hint(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    with caplog.at_level(logging.WARNING, logger="lowbit.passes"):
        _, pairs = cross_layer_equalize(model)
    assert pairs == [] and "fold_batchnorm" in caplog.text


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        cross_layer_equalize(_sequential(), iterations=0)


# -- MobileNetV2 with its ImageNet weights, on real photos ------------------------------------

@pytest.fixture(scope="module")
def equalized(folded):
    return cross_layer_equalize(copy.deepcopy(folded), relu6_to_relu=True)


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage")
    from lowbit.zoo import imagenet_photos

    return imagenet_photos(n=32, seed=2)


@pytest.fixture(scope="module")
def fp32_logits(folded, photos):
    with torch.no_grad():
        return folded(photos)


def _agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.argmax(1) == reference.argmax(1)).float().mean())


def test_mobilenet_v2_pairs_and_exactness_against_the_relu_model(folded, equalized, photos):
    model, pairs = equalized
    assert len(pairs) == 36  # 34 through ReLU6 (expand->dw, dw->project, stem->dw) + 2 linear bottlenecks
    assert ("features.0.0", "features.1.conv.0.0") in pairs
    assert ("features.1.conv.1", "features.2.conv.0.0") in pairs
    # The reference: the folded model with the same ReLU6 -> ReLU replacements, not equalized.
    relu_model = copy.deepcopy(folded)
    for name, module in model.named_modules():
        if type(module) is nn.ReLU:
            parent, _, child = name.rpartition(".")
            setattr(relu_model.get_submodule(parent), child, nn.ReLU())
    assert sum(type(m) is nn.ReLU6 for m in model.modules()) == 1  # features.18.2 feeds the pool, not a layer
    with torch.no_grad():
        assert _rel(model(photos[:4]), relu_model(photos[:4])) < 1e-4  # measured 1.3e-6


def test_relu6_to_relu_changes_mobilenet_v2_only_slightly(equalized, photos, fp32_logits):
    with torch.no_grad():
        logits = equalized[0](photos)
    # Measured on these 32 photos: top-1 unchanged on 30/32, logits moved by 7.7 %.
    assert _agreement(logits, fp32_logits) >= 0.85
    assert _rel(logits, fp32_logits) < 0.15


def test_per_tensor_int8_weights_work_better_after_equalization(folded, equalized, photos, fp32_logits):
    results = {}
    for label, model in (("folded", folded), ("equalized", equalized[0])):
        qmodel = quantize(model, None, W8_PER_TENSOR, progress=False)
        with torch.no_grad():
            logits = qmodel(photos)
        results[label] = (_agreement(logits, fp32_logits), _rel(logits, fp32_logits))
    (agree_f, err_f), (agree_e, err_e) = results["folded"], results["equalized"]
    # Measured on these 32 photos: top-1 agreement 0.69 -> 0.88, logit error 0.31 -> 0.21.
    assert err_e < 0.8 * err_f, results
    assert agree_e >= agree_f, results


def test_depthwise_channel_ranges_become_uniform(folded, equalized):
    before = folded.get_submodule("features.2.conv.1.0").weight
    after = equalized[0].get_submodule("features.2.conv.1.0").weight
    assert _spread(after) < _spread(before) / 5  # measured 32.9 -> 2.3
