"""autoquant: the ladder stops at the first rung that meets the target, always returns its best
model with the reason, respects the budget, and its recipe replays the chosen model."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.analysis import agreement, autoquant
from lowbit.analysis._measure import footprint


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()


def _data(seed: int = 1, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def _neg_mse(model: nn.Module, batches):
    """A metric no quantized model reaches exactly: minus the output MSE to FP32."""
    refs = [model(b).detach() for b in batches]

    def eval_fn(m):
        return -sum(((m(b) - r) ** 2).mean().item() for b, r in zip(batches, refs, strict=True)) / len(refs)

    return eval_fn


def test_stops_at_the_first_rung_that_meets():
    model, calib = _net(), _data()
    result = autoquant(model, calib, agreement(model, _data(2)), max_drop=0.05)
    assert result.met and [s.rung for s in result.steps] == ["ptq"] and result.chosen == 0
    assert "rung 'ptq'" in result.reason and "met the target" in result.reason
    assert result.steps[0].drop <= 0.05


def test_nothing_meets_returns_the_best_found_and_says_why():
    model, calib, held = _net(), _data(), _data(2)
    eval_fn = _neg_mse(model, held)
    result = autoquant(model, calib, eval_fn, max_drop=0.0, config="w4a8", rungs=("ptq", "ranges", "algorithms"))
    assert not result.met
    assert {s.rung for s in result.steps} == {"ptq", "ranges", "algorithms"}
    best = max(result.steps, key=lambda s: s.metric)
    assert result.steps[result.chosen] is best  # the highest metric, all within (no) budget
    assert result.reason.startswith("No rung met the target") and best.tried in result.reason
    # the returned model is the one measured: evaluating it again gives the recorded metric
    assert eval_fn(result.model) == pytest.approx(best.metric, rel=1e-6)


def test_qat_is_tried_only_with_training_data_and_the_reason_says_so():
    model, calib = _net(), _data()
    eval_fn = _neg_mse(model, _data(2))
    without = autoquant(model, calib, eval_fn, max_drop=0.0, config="w4a8", rungs=("ptq", "qat"))
    assert [s.rung for s in without.steps] == ["ptq"] and "Not tried: qat (no train_data)" in without.reason
    g = torch.Generator().manual_seed(3)
    train = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    with_qat = autoquant(model, calib, eval_fn, max_drop=0.0, config="w4a8", rungs=("ptq", "qat"), train_data=train)
    assert [s.rung for s in with_qat.steps] == ["ptq", "qat"]
    assert with_qat.steps[1].metric is not None and with_qat.steps[1].seconds > 0


def test_budget_over_every_candidate_keeps_the_least_excess():
    model, calib = _net(), _data()
    # w8a8 everywhere is 8 bits: a 6-bit budget fits no candidate of these rungs
    result = autoquant(model, calib, agreement(model, _data(2)), max_drop=1.0, budget={"avg_weight_bits": 6.0},
                       rungs=("ptq", "ranges"))
    assert not result.met and all(not s.within_budget for s in result.steps)
    assert "over budget" in result.reason
    assert footprint(result.model)["avg_weight_bits"] == pytest.approx(8.0)


def test_the_recipe_replays_the_chosen_model():
    model, calib = _net(), _data()
    eval_fn = _neg_mse(model, _data(2))
    result = autoquant(model, calib, eval_fn, max_drop=0.0, config="w4a8", rungs=("ptq", "algorithms"))
    recipe = result.recipe
    assert recipe["command"] == "quantize"
    again = lowbit.quantize(model, calib, lowbit.QuantConfig.from_dict(recipe["config"]),
                            algorithms=recipe["options"]["algorithms"], target=recipe["target"], progress=False)
    x = _data(5, 1)[0]
    torch.testing.assert_close(again(x), result.model(x), rtol=0, atol=0)


def test_latency_is_measured_on_the_exported_file():
    model, calib = _net(), _data()
    result = autoquant(model, calib, agreement(model, _data(2)), max_drop=0.05, example_inputs=calib[0][:1],
                       budget={"latency_ratio": 100.0})
    row = result.steps[0]
    assert row.latency_ms > 0 and row.onnx_mb > 0 and row.latency_ratio > 0 and result.met


def test_bad_arguments_are_refused_before_any_work():
    model, calib = _net(), _data()
    eval_fn = agreement(model, calib)
    with pytest.raises(ValueError, match="max_drop"):
        autoquant(model, calib, eval_fn, max_drop=-1)
    with pytest.raises(ValueError, match="unknown rung"):
        autoquant(model, calib, eval_fn, max_drop=0.1, rungs=("ptq", "magic"))
    with pytest.raises(ValueError, match="exactly one of"):
        autoquant(model, calib, eval_fn, max_drop=0.1, budget={"bits": 4})
    with pytest.raises(ValueError, match="example_inputs"):
        autoquant(model, calib, eval_fn, max_drop=0.1, budget={"latency_ratio": 1.0})


def test_agreement_metric():
    model = _net()
    held = _data(2)
    assert agreement(model, held)(model) == 1.0
    assert agreement(model, held, "cosine")(model) == pytest.approx(1.0)
    assert agreement(model, held, "neg_kl")(model) == pytest.approx(0.0, abs=1e-6)
    other = _net(seed=7)
    assert agreement(model, held)(other) < 0.5
    with pytest.raises(ValueError, match="metric must be one of"):
        agreement(model, held, "accuracy")


def _drop_of_ptq(model, calib, eval_fn, config):
    return eval_fn(model) - eval_fn(lowbit.quantize(model, calib, config, progress=False))


def test_selective_keeps_the_most_sensitive_layers_float_until_the_target_is_met():
    model, calib = _net(), _data()
    eval_fn = _neg_mse(model, _data(2))
    max_drop = _drop_of_ptq(model, calib, eval_fn, "w4a8") / 20
    result = autoquant(model, calib, eval_fn, max_drop, config="w4a8", rungs=("ptq", "selective"),
                       max_float_layers=3)
    assert result.met and result.steps[result.chosen].rung == "selective"
    ranked = [row.name for row in result.sensitivity.ranked()]
    chosen = result.steps[result.chosen].tried
    assert ranked[0] in chosen  # the most sensitive layer is among those kept float
    kept_float = [n for n in ranked if result.config.resolve(n, model.get_submodule(n))[0] is None]
    assert kept_float == ranked[:len(kept_float)]  # and they are the most sensitive ones, in order


def test_mixed_finds_the_cheapest_front_point_that_meets_the_target():
    model, calib = _net(), _data()
    eval_fn = _neg_mse(model, _data(2))
    max_drop = _drop_of_ptq(model, calib, eval_fn, "w4a8") / 20
    result = autoquant(model, calib, eval_fn, max_drop, config="w4a8", rungs=("ptq", "mixed"),
                       budget={"avg_weight_bits": 16.0})
    mixed = [s for s in result.steps if s.rung == "mixed"]
    assert result.met and result.steps[result.chosen].rung == "mixed"
    assert all(s.avg_weight_bits <= 16.0 for s in mixed)
    met = [s for s in mixed if s.met]
    assert result.steps[result.chosen] is min(met, key=lambda s: s.avg_weight_bits)  # the cheapest that met
    assert result.mixed is not None and result.mixed.front


def test_an_infeasible_mixed_budget_is_said_not_raised():
    model, calib = _net(), _data()
    eval_fn = _neg_mse(model, _data(2))
    result = autoquant(model, calib, eval_fn, 0.0, config="w4a8", rungs=("ptq", "mixed"),
                       budget={"avg_weight_bits": 3.0})
    assert [s.rung for s in result.steps] == ["ptq"] and not result.met
    assert "Mixed: no assignment of" in result.reason and "smallest achievable avg_weight_bits is 4" in result.reason


def test_selective_also_keeps_float_the_convs_ort_would_run_in_float_anyway():
    """Conv -> ReLU -> Conv with the second conv kept float: the first conv's output then meets no
    QuantizeLinear, so ONNX Runtime runs it in float although it is quantized; the selective rung
    tries it float too (no latency to lose, its noise to gain) and says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10)).eval()
    with torch.no_grad():
        model[2].weight[3, 5, 1, 1] = 20.0  # per-tensor weights: this layer dominates the noise
    config = lowbit.config.QuantConfig(name="w8-per-tensor", default=lowbit.config.LayerQuant(
        weight=lowbit.nn.modules.TensorQuant(spec=lowbit.numerics.INT8_WEIGHT_PER_TENSOR),
        input=lowbit.config.W8A8.default.input))
    calib = _data()
    eval_fn = _neg_mse(model, _data(2))
    result = autoquant(model, calib, eval_fn, 0.0, config=config, rungs=("ptq", "selective"), max_float_layers=1)
    assert result.sensitivity.ranked()[0].name == "2"
    tried = [s.tried for s in result.steps if s.rung == "selective"]
    assert len(tried) == 2 and "0, which ONNX Runtime would run in float anyway" in tried[1]
    both = next(s for s in result.steps if s.tried == tried[1])
    first = next(s for s in result.steps if s.tried == tried[0])
    assert both.metric >= first.metric  # the extra float conv removes its noise
