"""fixed_weights: a frozen weight fake-quantized once for a pass of many calls, never stale."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit.nn.walk import fixed_weights, frozen_weights


def _qmodel() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return lowbit.quantize(model, [torch.randn(4, 8)], "w8a8", progress=False)


def _counting(own, calls: dict, key: int):
    def forward(w):
        calls[key] += 1
        return own(w)

    return forward


def test_outputs_unchanged_and_each_weight_quantized_once():
    qmodel, x = _qmodel(), torch.randn(5, 8)
    pairs = frozen_weights(qmodel)
    assert [m for m, _ in pairs] == [qmodel[0], qmodel[2]]
    with torch.no_grad():
        expected = qmodel(x)
        calls = {id(q): 0 for _, q in pairs}
        with fixed_weights(qmodel):
            for _, q in pairs:
                q.forward = _counting(q.forward, calls, id(q))
            for _ in range(3):
                assert torch.equal(qmodel(x), expected)
        assert all(count == 3 for count in calls.values())  # the patched forward, never the quantizer's
    assert all("forward" not in q.__dict__ for _, q in pairs)  # the quantizers' own forward again


def test_a_changed_weight_a_switched_mode_and_gradients_are_not_served_stale():
    qmodel, x = _qmodel(), torch.randn(5, 8)
    layer = qmodel[0]
    with fixed_weights(qmodel):
        with torch.no_grad():
            layer.weight.mul_(2)  # a new version: quantized again
            changed = qmodel(x)
        layer.weight_quantizer.mode = "disabled"
        with torch.no_grad():
            disabled = qmodel(x)
        layer.weight_quantizer.mode = "static"
        y = qmodel(x)  # grad mode: the weight needs a gradient through the fake-quant
        y.sum().backward()
    with torch.no_grad():
        assert torch.equal(changed, qmodel(x))
        layer.weight_quantizer.mode = "disabled"
        assert torch.equal(disabled, qmodel(x))
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert "forward" not in layer.weight_quantizer.__dict__  # unpatched afterwards
