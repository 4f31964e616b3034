"""Mixed 4/8-bit weights for causal LMs: the streamed reconstruction sensitivity
(``lowbit.analysis._llm_sensitivity``) against direct computations, and ``mixed_precision`` on it
(budget, brute force, the quantized model, the config's replay)."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.analysis import mixed_precision
from lowbit.analysis._llm_sensitivity import is_causal_lm, output_fisher, reconstruction_sensitivities
from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import QuantSpec
from lowbit.ptq._awq_search import weight_rounder
from lowbit.zoo import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

W4, W8 = "w4a16-g128", "w8a16"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 256, (2, 24), generator=g)} for _ in range(3)]


@pytest.fixture(scope="module")
def reports(model, calib):
    return reconstruction_sensitivities(model, calib, [W4, W8])


def _rounded(name: str, layer: nn.Module, choice: str = W4) -> torch.Tensor:
    tq = lowbit.CONFIGS[choice].resolve(name, layer)[0].weight
    return weight_rounder(tq, name)(layer.weight.detach())


def test_every_linear_lm_head_included_gets_a_row(model, reports):
    names = lowbit.analysis.decision_layers(model)
    assert len(names) == 2 * 7 + 1 and names[-1] == "lm_head"
    for choice, bits in ((W4, 4), (W8, 8)):
        rows = reports[choice].layers
        assert [r.name for r in rows] == names and {r.weight_bits for r in rows} == {bits}
        assert all(r.cost == r.values["fisher"] and r.cost > 0 for r in rows)


# uint4 affine, groups of 128: a weight whose groups hold the codes 0..15 (both ends present) times a
# power of two sits exactly on the grid its min-max observer gives it.  (The symmetric presets have no
# such weight: their scale is amax / 7.5, so re-rounding any rounded weight moves it.)
ASYM_W4 = QuantConfig(name="w4a16-g128-asym", rules=(), default=LayerQuant(weight=TensorQuant(
    spec=QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", axis=1, group_size=128))))


def _on_asym_grid(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, shape, generator=g)
    for start in range(0, shape[1], 128):  # each group of each row reaches both ends of the range
        codes[:, start], codes[:, min(start + 1, shape[1] - 1)] = 0, 15
    return (codes - 8).float() * 2.0 ** -5


def test_a_layer_already_on_the_4bit_grid_costs_nothing(model, calib):
    on_grid = copy.deepcopy(model)
    name = "model.layers.1.mlp.down_proj"
    layer = on_grid.get_submodule(name)
    with torch.no_grad():
        layer.weight.copy_(_on_asym_grid(tuple(layer.weight.shape)))
    report = reconstruction_sensitivities(on_grid, calib, [ASYM_W4])[ASYM_W4.name]
    assert report[name].values == {"raw": 0.0, "relative": 0.0, "fisher": 0.0} and report[name].weight_bits == 4
    assert all(r.cost > 0 for r in report.layers if r.name != name)


def test_8_bits_never_cost_more_than_4(reports):
    for r4, r8 in zip(reports[W4].layers, reports[W8].layers):
        for key in ("raw", "relative", "fisher"):
            assert r8.values[key] <= r4.values[key], (r4.name, key)


def _direct_inputs(model: nn.Module, calib, name: str) -> torch.Tensor:
    """Every input row ``name`` receives in whole-model forward passes (no streaming)."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            for item in calib:
                model(**item)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj", "lm_head"])
def test_streamed_error_equals_a_direct_computation(calib, name):
    model = tiny_llama(seed=0).double()
    row = reconstruction_sensitivities(model, calib, [W4], fisher_batches=0, weighting="raw")[W4][name]
    layer = model.get_submodule(name)
    x = _direct_inputs(model, calib, name)
    dy = x @ (_rounded(name, layer) - layer.weight.detach()).T  # the output error, token by token
    assert x.dtype == torch.float64 and x.shape[0] == 3 * 2 * 24
    assert row.values["raw"] == pytest.approx(float(dy.pow(2).sum()) / x.shape[0], rel=1e-9)
    signal = float((x @ layer.weight.detach().T).pow(2).sum())
    assert row.values["relative"] == pytest.approx(float(dy.pow(2).sum()) / signal, rel=1e-9)


def test_fisher_of_the_head_is_softmax_minus_one_hot(calib):
    model = tiny_llama(seed=0).double()
    fisher = output_fisher(model, calib, {"lm_head": model.lm_head})["lm_head"]
    expected, predicted = torch.zeros(256, dtype=torch.float64), 0
    with torch.no_grad():
        for item in calib:
            ids = item["input_ids"]
            logits = model(**item).logits[:, :-1]  # the last position predicts nothing
            grad = F.softmax(logits, -1) - F.one_hot(ids[:, 1:], 256).double()
            expected += grad.pow(2).reshape(-1, 256).sum(0)
            predicted += ids[:, 1:].numel()
    torch.testing.assert_close(fisher, expected / predicted, rtol=1e-9, atol=0)
    assert all(p.requires_grad for p in model.parameters())  # restored


def _brute_force(result) -> float:
    """The least predicted error of any assignment within the budget, by enumeration."""
    params = np.array([info.params for info in result.layers], dtype=float)
    costs = np.array([[result.sensitivities[c].costs()[i.name] for c in (W4, W8)] for i in result.layers])
    best = np.inf
    for choice in itertools.product((0, 1), repeat=len(params)):
        c = np.array(choice)
        bits = float((params * np.where(c == 1, 8, 4)).sum() / params.sum())
        if bits <= result.budget["avg_weight_bits"] + 1e-12:
            best = min(best, float(costs[np.arange(len(c)), c].sum()))
    return best


@pytest.fixture(scope="module")
def mixed(model, calib):
    return mixed_precision(model, calib, (W4, W8), {"avg_weight_bits": 5.0})


def test_mixed_precision_on_a_causal_lm_uses_reconstruction_and_matches_brute_force(model, mixed):
    assert is_causal_lm(model) and not is_causal_lm(nn.Sequential(nn.Linear(2, 2)))
    assert {r.method for r in mixed.sensitivities.values()} == {"reconstruction"}
    assert mixed.predicted["avg_weight_bits"] <= 5.0 + 1e-12
    assert 0 < list(mixed.assignment.values()).count(W8) < len(mixed.assignment)
    assert mixed.predicted["error"] == pytest.approx(_brute_force(mixed), rel=1e-9)


def test_the_mixed_config_quantizes_runs_and_replays(model, calib, mixed):
    qmodel = lowbit.quantize(model, calib, config=mixed.config, algorithms=["gptq"], progress=False)
    for name, choice in mixed.assignment.items():
        assert qmodel.get_submodule(name).weight_quantizer.spec.bits == (8 if choice == W8 else 4), name
    with torch.no_grad():
        logits = qmodel(**calib[0]).logits
    assert logits.shape == (2, 24, 256) and bool(torch.isfinite(logits).all())
    recipe = json.loads(json.dumps(mixed.config.to_dict()))  # as a recipe file holds it
    again = lowbit.quantize(model, calib, config=lowbit.QuantConfig.from_dict(recipe), algorithms=["gptq"],
                            progress=False)
    for name in mixed.assignment:
        assert torch.equal(again.get_submodule(name).weight, qmodel.get_submodule(name).weight), name


def test_sensitivity_method_reconstruction(model, calib, reports):
    report = lowbit.sensitivity(model, calib, W4, method="reconstruction", batches=3)
    assert report.costs() == pytest.approx(reports[W4].costs(), rel=1e-12)
    with pytest.raises(ValueError, match="not one: use method='sqnr'"):
        lowbit.sensitivity(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], "w8a8", method="reconstruction")
    with pytest.raises(ValueError, match="unknown weighting 'kl'"):
        reconstruction_sensitivities(model, calib, [W4], weighting="kl")


def test_the_mixed_model_exports_with_4_and_8_bit_matmulnbits(model, calib, mixed, tmp_path):
    from lowbit.export import export_llm
    from lowbit.export.llm import load_session, run_step

    qmodel = lowbit.quantize(model, calib, config=mixed.config, algorithms=["gptq"], progress=False)
    path = tmp_path / "mixed.onnx"
    proto = export_llm(qmodel, path, max_length=64, accuracy_level=0)
    bits = [a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    assert sorted(bits) == sorted(8 if c == W8 else 4 for c in mixed.assignment.values())
    ids = calib[0]["input_ids"]
    logits, _ = run_step(load_session(path, threads=1), ids.numpy())
    with torch.no_grad():
        ref = qmodel(ids).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()  # accuracy_level 0: exact up to float sums
