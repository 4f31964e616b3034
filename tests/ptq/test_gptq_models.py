"""The GPTQ step on models that are not known causal LMs (lowbit.ptq._blocks): a stack of blocks in
a ModuleList is found and streamed (with a layer before it and a head after it), blocks that do not
feed one another and models without blocks take passes of the whole model, convolutions included;
the Hessians are those of the model GPTQ says it used, and the output error drops below round to
nearest's."""

from __future__ import annotations

import pytest
import torch
from tests.ptq.test_gptq_llm import recording, reference_hessians
from torch import nn

import lowbit
from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import QuantSpec
from lowbit.ptq import GPTQ

pytestmark = pytest.mark.usefixtures("one_thread")

INT4_G16 = QuantSpec(bits=4, granularity="group", axis=1, group_size=16)
INT4_CHANNEL = QuantSpec(bits=4, granularity="channel", axis=0)


def weight_only(spec: QuantSpec) -> QuantConfig:
    return QuantConfig(name="w-only", default=LayerQuant(weight=TensorQuant(spec=spec)))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """An input projection, three residual blocks in a ModuleList, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(Block(32) for _ in range(3))
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class Parallel(nn.Module):
    """A ModuleList whose members all read the same input: not a chain of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(32, 16) for _ in range(2))

    def forward(self, x):
        return sum(head(x) for head in self.heads)


class Skipping(nn.Module):
    """Two Linears around a grouped conv that is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.grouped, self.last = nn.Linear(8, 8), nn.Conv2d(2, 2, 1, groups=2), nn.Linear(8, 4)

    def forward(self, x):
        return self.last(torch.relu(self.first(x)))


class Routed(nn.Module):
    """Each batch goes through one of two experts (by the sign of its mean), like a MoE's router."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.experts[int(x.mean() > 0)](x))


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 3 * 3, 10))


def _inputs(shape, n: int, seed: int) -> list[torch.Tensor]:
    """Inputs whose features are correlated (with white inputs GPTQ is round to nearest), the same
    correlations for every seed."""
    width = shape[1]
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(width, width, generator=g) / width ** 0.5 + torch.eye(width)
    g = torch.Generator().manual_seed(seed)
    return [torch.einsum("dc,nc...->nd...", mix, torch.randn(*shape, generator=g)) for _ in range(n)]


MODELS = {  # builder, input shape, config
    "stack": (Stack, (32, 16), weight_only(INT4_G16)),
    "parallel": (Parallel, (32, 32), weight_only(INT4_G16)),
    "conv": (conv_net, (8, 3, 8, 8), weight_only(INT4_CHANNEL)),
}


def _build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind][0]().eval()


@pytest.mark.parametrize("kind, mode, order", [
    ("stack", "blocks", ["inp", *(f"blocks.{b}.fc{i}" for b in range(3) for i in (1, 2)), "head"]),
    ("parallel", "whole_model", ["heads.0", "heads.1"]),
    ("conv", "whole_model", ["0", "2", "5"]),
], ids=["stack", "parallel", "conv"])
def test_gptq_lowers_the_output_error_below_round_to_nearest(kind, mode, order):
    _, shape, config = MODELS[kind]
    calib, held_out = _inputs(shape, 4, 0), _inputs(shape, 2, 1)
    rtn = lowbit.quantize(_build(kind), calib, config, progress=False)
    gptq = lowbit.quantize(_build(kind), calib, config, algorithms=["gptq"], progress=False)
    report = gptq.lowbit_summary.reports[-1]
    assert report["mode"] == mode and list(report["layers"]) == order
    for name, r in report["layers"].items():
        assert r["kept"] == "gptq" and r["objective_gptq"] < r["objective_rtn"], name
    reference = _build(kind)
    with torch.no_grad():
        errors = {name: sum(float((m(x) - reference(x)).pow(2).mean()) for x in held_out)
                  for name, m in (("rtn", rtn), ("gptq", gptq))}
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


@pytest.mark.parametrize("kind", list(MODELS))
def test_true_sequential_hessians_are_the_finished_models_own(kind, monkeypatch):
    _, shape, config = MODELS[kind]
    calib = _inputs(shape, 3, 0)
    seen = recording(monkeypatch)
    qmodel = lowbit.quantize(_build(kind), calib, config, algorithms=["gptq(true_sequential=true)"],
                             progress=False)
    reference = reference_hessians(qmodel, calib, list(seen))
    assert seen
    for name, h in seen.items():
        torch.testing.assert_close(h, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_one_pass_over_the_whole_model_sees_round_to_nearest_inputs(monkeypatch):
    _, shape, config = MODELS["conv"]
    calib = _inputs(shape, 3, 0)
    seen = recording(monkeypatch)
    lowbit.quantize(_build("conv"), calib, config, algorithms=["gptq"], progress=False)
    rtn = lowbit.quantize(_build("conv"), calib, config, progress=False)
    reference = reference_hessians(rtn, calib, list(seen))
    for name, h in seen.items():
        torch.testing.assert_close(h, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_layers_it_cannot_take_are_skipped_and_logged(caplog):
    model = Skipping().eval()
    calib = [torch.randn(16, 8)]
    with caplog.at_level("INFO", logger="lowbit.ptq"):
        qmodel = lowbit.quantize(model, calib, weight_only(INT4_CHANNEL), algorithms=["gptq"], progress=False)
    assert list(qmodel.lowbit_summary.reports[-1]["layers"]) == ["first", "last"]
    assert "gptq: grouped skipped: only ungrouped 1-d and 2-d convolutions are supported" in caplog.text


def test_a_layer_the_data_never_reaches_keeps_round_to_nearest(caplog):
    model = Stack().eval()
    model.spare = nn.Linear(32, 32)  # quantized, never called
    with caplog.at_level("INFO", logger="lowbit.ptq"):
        qmodel = lowbit.quantize(model, _inputs((8, 16), 2, 0), weight_only(INT4_G16), algorithms=["gptq"],
                                 progress=False)
    assert "spare" not in qmodel.lowbit_summary.reports[-1]["layers"]
    assert torch.equal(qmodel.spare.weight, model.spare.weight)
    assert "gptq: spare skipped: the calibration data never reaches it" in caplog.text


@pytest.mark.parametrize("true_sequential", [False, True])
def test_a_layer_the_first_item_misses_is_quantized_on_the_items_that_reach_it(true_sequential, monkeypatch):
    calib = _inputs((64, 32), 2, 0)
    calib = [calib[0].abs() + 0.1, -calib[1].abs() - 0.1]  # the first to expert 1, the second to expert 0
    seen = recording(monkeypatch)
    torch.manual_seed(0)
    qmodel = lowbit.quantize(Routed().eval(), calib, weight_only(INT4_G16),
                             algorithms=[GPTQ(true_sequential=true_sequential)], progress=False)
    assert set(qmodel.lowbit_summary.reports[-1]["layers"]) == {"experts.0", "experts.1", "head"}
    reference = reference_hessians(qmodel, calib[1:], ["experts.0"])  # only the second item reaches it
    torch.testing.assert_close(seen["experts.0"], reference["experts.0"])


def test_too_few_calibration_rows_per_column_are_counted_and_warned(caplog):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    few = [torch.randn(100, 64)]  # 100 rows: < 16 per column for both layers
    with caplog.at_level("WARNING", logger="lowbit.ptq"):
        qmodel = lowbit.quantize(model, few, weight_only(INT4_G16), algorithms=["gptq"], progress=False)
    layers = qmodel.lowbit_summary.reports[-1]["layers"]
    assert layers["0"]["rows"] == layers["2"]["rows"] == 100
    assert "2 of 2 layers saw fewer than 16 calibration rows (tokens) per weight column (0: 1.6)" in caplog.text
    caplog.clear()
    enough = [torch.randn(1100, 64)]  # >= 16 per column for both
    with caplog.at_level("WARNING", logger="lowbit.ptq"):
        lowbit.quantize(model, enough, weight_only(INT4_G16), algorithms=["gptq"], progress=False)
    assert "calibration rows" not in caplog.text
