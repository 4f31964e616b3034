"""swap_modules / unswap_modules: which layers are swapped, what is reported, and the inverse."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from lowbit.config import W8, W8A8, LayerQuant, QuantConfig, Rule
from lowbit.nn.modules import QuantConv2d, QuantEmbedding, QuantLinear, TensorQuant, is_quantized
from lowbit.nn.swap import SwapReport, swap_modules, unswap_modules
from lowbit.numerics import INT8_WEIGHT, UINT8_ACTIVATION


class MyLinear(nn.Linear):
    """A subclass may override forward: swapping it for QuantLinear would drop that."""

    def forward(self, x):
        return super().forward(x) * 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.custom = MyLinear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx):
        h = self.emb(idx)  # (B, T, 8)
        h = self.bn(self.conv(h.transpose(1, 2))).transpose(1, 2)
        h = self.body(self.norm(h))
        return self.head(self.custom(h)).mean(1)


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _idx(seed=0):
    return torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(seed))


def test_only_exact_registered_types_are_swapped():
    model = _net()
    report = swap_modules(model, W8A8.resolve)
    assert isinstance(report, SwapReport)
    assert type(model.emb) is QuantEmbedding
    assert type(model.body[0]) is QuantLinear and type(model.body[2]) is QuantLinear
    assert type(model.head) is QuantLinear
    assert type(model.custom) is MyLinear  # a subclass of nn.Linear is not swapped
    assert set(report.quantized) == {"emb", "conv", "body.0", "body.2", "head"}
    assert type(model.norm) is nn.LayerNorm and type(model.bn) is nn.BatchNorm1d
    # The rule that chose each layer is recorded.
    assert "type:Embedding" in report.quantized["emb"] and "default" in report.quantized["head"]


def test_layers_with_unsupported_parameters_are_reported():
    model = _net()
    report = swap_modules(model, W8A8.resolve)
    assert report.unsupported == {"norm": "LayerNorm", "bn": "BatchNorm1d", "custom": "MyLinear"}
    # Containers and parameter-free layers are not reported at all.
    named = {**report.quantized, **report.skipped, **report.unsupported}
    assert "body" not in named and "body.1" not in named


def test_resolve_returning_none_keeps_float_and_is_reported():
    model = _net()
    seen = []

    def resolve(name, module):
        seen.append((name, type(module)))
        if name == "head":
            return None, "my rule"
        return LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT)), "everything else"

    report = swap_modules(model, resolve)
    assert type(model.head) is nn.Linear
    assert report.skipped == {"head": "Linear kept in float by my rule"}
    assert "head" not in report.quantized
    # resolve is asked about exactly the swappable layers, with their float types.
    assert seen == [
        ("emb", nn.Embedding),
        ("conv", nn.Conv1d),
        ("body.0", nn.Linear),
        ("body.2", nn.Linear),
        ("head", nn.Linear),
    ]


def test_config_skip_keeps_matching_layers_float():
    model = _net()
    report = swap_modules(model, W8A8.skip("body.*").resolve)
    assert type(model.body[0]) is nn.Linear and type(model.body[2]) is nn.Linear
    assert set(report.skipped) == {"body.0", "body.2"}
    assert "rule 'body.*'" in report.skipped["body.0"]


def test_swap_uses_the_resolved_tensor_choices():
    model = _net()
    swap_modules(model, W8.resolve)  # weight-only
    assert model.head.input_quantizer is None and model.head.weight_quantizer is not None
    model = _net()
    swap_modules(model, W8A8.resolve)
    assert model.head.input_quantizer.spec == UINT8_ACTIVATION
    assert model.emb.input_quantizer is None  # the embedding rule quantizes its table only


def test_swapping_twice_changes_nothing():
    model = _net()
    swap_modules(model, W8A8.resolve)
    before = {name: type(m) for name, m in model.named_modules()}
    report = swap_modules(model, W8A8.resolve)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert report.quantized == {} and report.skipped == {}


def test_unswap_restores_the_float_model():
    model = _net()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    types = {name: type(m) for name, m in model.named_modules()}
    swap_modules(model, W8A8.resolve)
    assert any(is_quantized(m) for m in model.modules())
    out = unswap_modules(model)
    assert out is model
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert list(model.state_dict()) == keys
    x = _idx(1)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_unswap_after_calibration_gives_back_float_outputs():
    model = _net()
    x = _idx(2)
    with torch.no_grad():
        expected = model(x)
    swap_modules(model, W8A8.resolve)
    for m in model.modules():
        if is_quantized(m):
            for _, q in m.quantizers():
                q.mode = "dynamic" if q.observer is None else "calibrating"
    with torch.no_grad():
        model(x)
    for m in model.modules():
        if is_quantized(m):
            for _, q in m.quantizers():
                q.freeze()
    with torch.no_grad():
        assert not torch.equal(model(x), expected)
        unswap_modules(model)
        assert torch.equal(model(x), expected)


def test_swap_logs_quantized_and_float_layers(caplog):
    model = _net()
    with caplog.at_level(logging.INFO, logger="lowbit.nn.swap"):
        report = swap_modules(model, W8A8.skip("head").resolve)
    text = caplog.text
    assert "quantized body.0: Linear" in text
    assert "float     head: Linear kept in float by rule 'head'" in text
    assert "float     norm: LayerNorm is not supported" in text
    assert len(report.lines()) == len(report.quantized) + len(report.skipped) + len(report.unsupported)
    for line in report.lines():
        assert line in text


def test_nested_and_conv2d_layers_are_swapped_by_qualified_name():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 6, 6))  # materialise the lazy layer (it becomes an nn.Linear)
    cfg = QuantConfig(
        default=LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT)), rules=(Rule(pattern="0.*", layer=None),)
    )
    report = swap_modules(model, cfg.resolve)
    assert type(model[0][0]) is nn.Conv2d and report.skipped["0.0"].endswith("rule '0.*'")
    assert type(model[2]) is QuantLinear
    cfg2 = QuantConfig(default=LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT)))
    swap_modules(model, cfg2.resolve)
    assert type(model[0][0]) is QuantConv2d


def test_a_layer_registered_under_two_names_is_swapped_everywhere():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a  # the same layer applied twice

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied()
    swap_modules(model, W8A8.resolve)
    assert type(model.a) is QuantLinear
    assert model.b is model.a  # still one layer, now quantized, under both names
