"""lowbit.analysis.sensitivity: the three methods on tiny seeded models, against exact answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.analysis import SensitivityReport, choice_config, decision_layers, sensitivity
from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.nn.walk import iter_quantizers
from lowbit.numerics import INT8_WEIGHT_PER_TENSOR, fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("sqnr", "ablation", "hessian")


class ConvNet(nn.Module):
    """conv-BN-ReLU, conv, a two-layer head: logits (batch, 5)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.hidden = nn.Linear(8, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(F.relu(self.hidden(self.features(x).mean((2, 3)))))


def _convnet() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():
        bn = model.features[1]
        bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 1.5)
    return model, [torch.randn(4, 3, 6, 6) for _ in range(3)]


def _mlp(out: int = 5) -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, out)).eval()
    return model, [torch.randn(16, 8) for _ in range(3)]


def _on_grid(layer: nn.Linear) -> None:
    """Put the weight on the int8 per-channel grid minmax calibration will pick: integers
    -127..127 times 2^-7, each row reaching 127, so the observer's scale is exactly 2^-7."""
    torch.manual_seed(2)
    ints = torch.randint(-127, 128, layer.weight.shape)
    ints[:, 0] = 127
    with torch.no_grad():
        layer.weight.copy_(ints * 2.0**-7)


W8_PER_TENSOR = QuantConfig(name="w8-per-tensor", default=LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT_PER_TENSOR)))


def _modes(qmodel):
    return {name: q.mode for name, q in iter_quantizers(qmodel)}


def _tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(before, model):
    return before.keys() == _tensors(model).keys() and all(torch.equal(before[k], v) for k, v in _tensors(model).items())


# -- rows -------------------------------------------------------------------------------------
def test_sqnr_rows_in_model_order_with_costs_from_the_only_sqnr():
    model, data = _convnet()
    report = sensitivity(model, data, "w8a8", method="sqnr", batches=2)
    assert [r.name for r in report.layers] == decision_layers(model) == ["features.0", "features.3", "hidden", "fc"]
    assert [r.kind for r in report.layers] == ["Conv2d", "Conv2d", "Linear", "Linear"]
    assert [r.params for r in report.layers] == [8 * 3 * 9, 8 * 8 * 9, 16 * 8, 5 * 16]
    assert all(r.weight_bits == 8 for r in report.layers)
    for r in report.layers:
        assert r.cost == pytest.approx(10 ** (-r.values["output_sqnr_db_only"] / 10), rel=1e-9)
        assert r.cost > 0
        assert set(r.values) == {"output_sqnr_db_only", "output_sqnr_db_without", "weight_sqnr_db", "input_sqnr_db"}
        assert all(math.isfinite(v) for v in r.values.values())
        # keeping a layer float removes its own noise: the rest is quieter than everything
        assert r.values["output_sqnr_db_without"] > report.baseline["output_sqnr_db"] - 1.0
    assert report.settings["batches"] == 2 and report.method == "sqnr" and report.choice == "w8a8"
    assert report.seconds > 0


def test_w4a8_choice_gives_every_layer_4_bits_first_and_last_included():
    model, data = _mlp()
    report = sensitivity(model, data, "w4a8", batches=1)
    assert [r.weight_bits for r in report.layers] == [4, 4, 4]


def test_input_sqnr_is_the_layers_own_input_quantizer_noise():
    model, data = _mlp()
    qmodel = lowbit.quantize(model, data, choice_config("w8a8"), progress=False)
    report = sensitivity(model, data, "w8a8", batches=2, qmodel=qmodel)
    q = qmodel[0].input_quantizer
    x = torch.cat(data[:2]).double()
    xq = torch.cat([q(b) for b in data[:2]]).double()
    expected = 10 * math.log10(float((x**2).sum()) / float(((xq - x) ** 2).sum()))
    assert report["0"].values["input_sqnr_db"] == pytest.approx(expected, rel=1e-9)
    w = qmodel[0].weight.detach()
    wq = fake_quantize(w, *qmodel[0].weight_quantizer.qparams_for(w), qmodel[0].weight_quantizer.spec)
    expected_w = 10 * math.log10(float((w.double() ** 2).sum()) / float(((wq - w).double() ** 2).sum()))
    assert report["0"].values["weight_sqnr_db"] == pytest.approx(expected_w, rel=1e-9)


# -- exact answers: a layer already on the grid ---------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_weight_only_layer_on_the_grid_costs_nothing(method):
    model, data = _mlp()
    _on_grid(model[2])
    report = sensitivity(model, data, "w8", method=method, batches=2, probes=4)
    row = report["2"]
    assert row.cost == 0.0
    assert all(r.cost > 0 for r in report.layers if r.name != "2")
    if method == "sqnr":
        assert row.values["weight_sqnr_db"] == math.inf and row.values["output_sqnr_db_only"] == math.inf
        assert row.values["input_sqnr_db"] == math.inf  # weight-only: the input stays float
    elif method == "ablation":
        assert row.values["metric_only"] == 0.0
    else:
        assert row.values["perturbation"] == 0.0 and row.values["trace"] > 0


# -- Hessian -------------------------------------------------------------------------------------
def test_hessian_trace_of_a_quadratic_loss_matches_the_closed_form():
    """One Linear, loss = sum (Wx + b - t)^2 / N: H_W = 2/N X^T X (x) I_out, trace 2/N * out * ||X||^2."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 3))  # (decision layers are named submodules)
    x = torch.randn(32, 6) * torch.linspace(0.5, 2.0, 6)
    target = torch.nn.Linear(6, 3)

    def loss_fn(output, batch):
        return ((output - target(batch).detach()) ** 2).sum() / len(batch)

    report = sensitivity(model, [x], "w8a8", method="hessian", loss_fn=loss_fn, probes=64, batches=1)
    row = report["0"]
    exact = 2 / 32 * 3 * float((x.double() ** 2).sum())
    assert abs(row.values["trace"] - exact) <= row.values["trace_ci95"]
    assert row.values["trace_ci95"] < 0.2 * exact
    assert row.values["trace_per_param"] == pytest.approx(row.values["trace"] / 18)
    assert row.cost == pytest.approx(0.5 * row.values["trace_per_param"] * row.values["perturbation"])


def test_hessian_of_kl_is_psd_and_its_cost_estimates_the_measured_kl():
    """The Fisher's trace is positive; 1/2 Tr/n ||dW||^2 is within a small factor of the KL that
    ablation measures with the layer quantized (second-order estimate vs measurement)."""
    model, data = _mlp()
    hess = sensitivity(model, data, "w8", method="hessian", probes=32, batches=3)
    abl = sensitivity(model, data, "w8", method="ablation", batches=3)
    for name in ("0", "2", "4"):
        assert hess[name].values["trace"] > 0
        assert 0.2 < hess[name].cost / abl[name].cost < 5


# -- ablation ------------------------------------------------------------------------------------
def test_ablation_with_an_eval_fn():
    model, data = _mlp()
    targets = [model(x).detach().argmax(1) for x in data]
    seen = []

    def accuracy(m):
        seen.append((m.training, torch.is_grad_enabled()))
        return sum(float((m(x).argmax(1) == t).float().mean()) for x, t in zip(data, targets, strict=True)) / 3

    def neg_loss(m):
        return -sum(float(F.cross_entropy(m(x), t)) for x, t in zip(data, targets, strict=True))

    report = sensitivity(model, data, "w4a8", method="ablation", eval_fn=neg_loss)
    with torch.no_grad():
        assert report.baseline["fp32_metric"] == pytest.approx(neg_loss(model))
    for r in report.layers:
        assert r.cost == pytest.approx(report.baseline["fp32_metric"] - r.values["metric_only"])
    assert "neg_loss" in report.settings["metric"]
    sensitivity(model, data, "w4a8", method="ablation", eval_fn=accuracy)
    assert seen and all(s == (False, False) for s in seen)  # eval mode, no grad
    assert report.baseline["quantized_metric"] != report.baseline["fp32_metric"]


def test_ablation_without_eval_fn_on_a_regression_output_is_the_noise_ratio_sqnr_measures():
    model, data = _mlp(out=1)
    abl = sensitivity(model, data, "w8a8", method="ablation", batches=2)
    sq = sensitivity(model, data, "w8a8", method="sqnr", batches=2)
    for a, s in zip(abl.layers, sq.layers, strict=True):
        assert a.cost == pytest.approx(s.cost, rel=1e-9)


# -- ranking -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_a_layer_with_an_outlier_weight_under_per_tensor_scales_ranks_first(method):
    model, data = _mlp()
    with torch.no_grad():
        model[2].weight[3, 5] = 10.0  # one huge weight: the per-tensor step wipes out most others
    report = sensitivity(model, data, W8_PER_TENSOR, method=method, batches=2, probes=8)
    assert report.ranked()[0].name == "2"
    assert report.choice == "w8-per-tensor"


# -- nothing changes -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_model_and_qmodel_untouched(method):
    model, data = _convnet()
    model.train()
    before = _tensors(model)
    qmodel = lowbit.quantize(model, data, choice_config("w8a8"), progress=False)
    qmodel.train()
    qmodel.fc.input_quantizer.mode = "disabled"  # a quantizer that was off stays off
    modes = _modes(qmodel)
    qstate = _tensors(qmodel)
    grads = {n: p.requires_grad for n, p in qmodel.named_parameters()}
    report = sensitivity(model, data, "w8a8", method=method, qmodel=qmodel, batches=1, probes=2)
    assert "fc" in report.costs()
    assert model.training and _same(before, model)
    assert _modes(qmodel) == modes and qmodel.training
    assert _same(qstate, qmodel)
    assert {n: p.requires_grad for n, p in qmodel.named_parameters()} == grads
    assert all(p.grad is None for p in qmodel.parameters())


def test_qmodel_modes_restored_when_eval_fn_raises():
    model, data = _mlp()
    qmodel = lowbit.quantize(model, data, choice_config("w8a8"), progress=False)
    modes = _modes(qmodel)
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        sensitivity(model, data, "w8a8", method="ablation", eval_fn=flaky, qmodel=qmodel)
    assert _modes(qmodel) == modes


def test_a_passed_qmodel_is_reused():
    model, data = _mlp()
    qmodel = lowbit.quantize(model, data, choice_config("w4a8"), progress=False)
    reused = sensitivity(model, data, "w4a8", qmodel=qmodel, batches=2)
    fresh = sensitivity(model, data, "w4a8", batches=2)
    assert reused.costs() == pytest.approx(fresh.costs(), rel=1e-12)
    assert reused.settings["qmodel"] == "passed in"


def test_steps_that_tune_layers_for_quantized_inputs_are_left_out_of_the_analysis():
    """Bias correction edits each layer's bias for its quantized inputs; switched to float, the
    layer would keep that edit and the analysis would charge it as noise.  The analysis runs the
    float-phase steps only, and refuses a passed qmodel that ran such a step."""
    model, data = _convnet()
    report = sensitivity(model, data, "w8a8", algorithms=["cle", "bias_correction"], batches=2)
    assert report.settings["algorithms"] == ["fold_bn", "cle"]
    corrected = lowbit.quantize(model, data, choice_config("w8a8"), algorithms=["bias_correction"], progress=False)
    with pytest.raises(ValueError, match="bias_correction.*edit weights or biases"):
        sensitivity(model, data, "w8a8", qmodel=corrected, batches=2)
    plain = sensitivity(model, data, "w8a8", algorithms=["bias_correction"], batches=2)
    assert plain.costs() == pytest.approx(sensitivity(model, data, "w8a8", batches=2).costs(), rel=1e-12)


def test_one_shot_iterator_and_single_tensor_data():
    model, data = _mlp()
    it = sensitivity(model, iter(data), "w8a8", batches=2)
    listed = sensitivity(model, data, "w8a8", batches=2)
    assert it.costs() == pytest.approx(listed.costs(), rel=1e-12)
    single = sensitivity(model, data[0], "w8a8")
    assert single.settings["batches"] == 1


def test_eval_data_is_used_for_measuring():
    model, data = _mlp()
    a = sensitivity(model, data, "w8a8", eval_data=data[2:], batches=4)
    b = sensitivity(model, data, "w8a8", eval_data=data[1:], batches=4)
    assert a.settings["batches"] == 1 and b.settings["batches"] == 2
    assert a.costs() != b.costs()


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "fisher"}, "sqnr, ablation, hessian"),
    ({"batches": 0}, "batches must be a positive integer"),
    ({"probes": -1, "method": "hessian"}, "probes must be a positive integer"),
    ({"eval_fn": lambda m: 0.0}, "eval_fn is read by method='ablation' only"),
    ({"loss_fn": lambda y, b: y.sum(), "method": "ablation"}, "loss_fn is read by method='hessian' only"),
    ({"config": None}, "config is None"),
])
def test_bad_arguments(kwargs, match):
    model, data = _mlp()
    with pytest.raises(ValueError, match=match):
        sensitivity(model, data, **{"config": "w8a8", **kwargs})


def test_empty_data():
    model, _ = _mlp()
    with pytest.raises(ValueError, match="calibration data .* is empty"):
        sensitivity(model, [], "w8a8")
    with pytest.raises(ValueError, match="evaluation data is empty"):
        sensitivity(model, [torch.randn(2, 8)], "w8a8", eval_data=[])


# -- files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_json_round_trip_and_markdown(tmp_path, method):
    model, data = _mlp()
    _on_grid(model[2])  # infinities in the values survive the round trip
    report = sensitivity(model, data, "w8", method=method, batches=1, probes=2)
    again = SensitivityReport.load_json(report.save_json(tmp_path / "s.json"))
    assert again == report
    md = report.to_markdown()
    assert md.startswith(f"Sensitivity ({method}, w8); cost = ")
    assert md.count("\n| ") == 1 + len(report.layers)
    assert md.splitlines()[4].startswith(f"| {report.ranked()[0].name} |")
