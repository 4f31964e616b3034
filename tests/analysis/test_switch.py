"""Switched runs that re-run only the part of the graph a layer's switch changes give exactly the
outputs of full forward passes (lowbit.analysis._switch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.analysis import choice_config, decision_layers
from lowbit.analysis._layers import float_only, quantized_only
from lowbit.analysis._switch import LayerSwitches, switched_outputs
from lowbit.nn.walk import run_model


class Residual(nn.Module):
    """Two branches and a residual add: layers upstream of the add share nothing downstream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x)) + self.b(x)
        return self.head(x.mean((2, 3)))


class Branchy(Residual):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        x = torch.relu(self.stem(x))
        if x.sum() > 0:
            x = x + self.b(x)
        return self.head(torch.relu(self.a(x)).mean((2, 3)))


class DictInput(Residual):
    def forward(self, pixels):
        return super().forward(pixels)


def _quantized(model: nn.Module, data: list) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    model.eval()
    qmodel = lowbit.quantize(model, data, choice_config("w8a8"), progress=False).eval()
    return qmodel, [n for n in decision_layers(model)]


def _full(qmodel, batch, switch, name) -> torch.Tensor:
    with switch(qmodel, [name]), torch.no_grad():
        return run_model(qmodel, batch).double()


@pytest.mark.parametrize(("cls", "replays"), [(Residual, True), (Branchy, False)])
def test_switched_runs_equal_full_forward_passes(cls, replays):
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    qmodel, names = _quantized(cls(), data)
    switches = LayerSwitches(qmodel, data, names)
    assert switches.replays is replays
    for batch, runs in zip(data, switches, strict=True):
        with torch.no_grad():
            assert torch.equal(runs.full, run_model(qmodel, batch).double())
        for name in names:
            assert torch.equal(runs.only(name), _full(qmodel, batch, quantized_only, name)), name
            assert torch.equal(runs.without(name), _full(qmodel, batch, float_only, name)), name
    if replays:  # the head re-runs a few nodes only, not the whole network
        assert len(switches.nodes["head"]) < len(switches.nodes["stem"]) / 2


def test_dict_batches_and_no_layers_fall_back_to_full_passes():
    torch.manual_seed(0)
    data = [{"pixels": torch.randn(2, 3, 8, 8)} for _ in range(2)]
    qmodel, names = _quantized(DictInput(), data)
    outs = switched_outputs(qmodel, data, names)
    for b, batch in enumerate(data):
        for name in names:
            assert torch.equal(outs.only[name][b], _full(qmodel, batch, quantized_only, name))
            assert torch.equal(outs.without[name][b], _full(qmodel, batch, float_only, name))
    none = switched_outputs(qmodel, data, [])
    assert len(none.full) == 2 and torch.equal(none.full[0], outs.full[0])


def test_switches_leave_the_quantizer_modes_as_they_were():
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 8, 8)]
    qmodel, names = _quantized(Residual(), data)
    before = {n: q.mode for n, q in lowbit.nn.walk.iter_quantizers(qmodel)}
    switched_outputs(qmodel, data, names)
    assert {n: q.mode for n, q in lowbit.nn.walk.iter_quantizers(qmodel)} == before
