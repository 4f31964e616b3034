"""lowbit.ptq.adaround: AdaRound lowers the layers' and the model's output error against round to
nearest on held-out inputs, writes integers that are floor or ceil of W / s (bit for bit, through
``integer_params``) on every grid layout, leaves on-grid weights alone, and the step goes through
the registry, quantize, ONNX Runtime (bit-exact with the emulation) and save / load."""

from __future__ import annotations

import json

import pytest
import torch
from tests.persist.test_persist import net
from torch import nn

import lowbit
from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import INT4_WEIGHT, QuantSpec
from lowbit.ptq import AdaRound, BiasCorrection, Step, parse_step, parse_steps
from lowbit.ptq.adaround import _cache_rows, adaround
from lowbit.ptq.steps import CALIBRATED, STEPS
from lowbit.runtime import OrtModel, emulate_ort

pytestmark = pytest.mark.usefixtures("one_thread")

# every layer int4; min-max ranges (ten times faster to calibrate than the preset's MSE)
W4A8 = lowbit.CONFIGS["w4a8"].without_positions().with_observer("minmax").with_observer("minmax",
                                                                                       role="weight")
FAST = "adaround(iterations=150, batch_size=256)"


class ConvNet(nn.Module):
    """A conv, a strided grouped conv, a pool, a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


def _images(n_batches: int, seed: int, batch: int = 32) -> list[torch.Tensor]:
    """Smooth, channel-correlated noise: like photos, neighbouring inputs are correlated (with white
    inputs round to nearest is already the best rounding, and AdaRound has nothing to find)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]])
    blur = torch.nn.functional.avg_pool2d
    return [blur(torch.einsum("dc,nchw->ndhw", mix, torch.randn(batch, 3, 10, 10, generator=g)), 3, 1) * 2
            for _ in range(n_batches)]


CALIB, HELD_OUT = _images(4, 0), _images(2, 100)
LAYERS = ("conv1", "conv2", "fc")


def _weight_only(spec: QuantSpec) -> QuantConfig:
    return QuantConfig(name="w-only", default=LayerQuant(weight=TensorQuant(spec=spec, observer="minmax")))


@pytest.fixture(scope="module")
def pair():
    """The same model quantized W4A8 with round to nearest and with AdaRound."""
    nearest = lowbit.quantize(conv_net(), CALIB, W4A8, progress=False)
    rounded = lowbit.quantize(conv_net(), CALIB, W4A8, algorithms=[FAST], progress=False)
    return nearest, rounded


def _layer_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda _m, _a, y, n=n: outs.__setitem__(n, y))
               for n in LAYERS]
    with torch.no_grad():
        final = model(x)
    for h in handles:
        h.remove()
    return {**outs, "output": final}


def _errors(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Mean squared error of every layer's output (and the model's) against the float model, held out."""
    total = dict.fromkeys((*LAYERS, "output"), 0.0)
    for x in HELD_OUT:
        ours, ref = _layer_outputs(model, x), _layer_outputs(reference, x)
        for k in total:
            total[k] += float((ours[k] - ref[k]).pow(2).mean())
    return total


# -- what it achieves ---------------------------------------------------------------------------
def test_adaround_lowers_every_layers_and_the_models_error_on_held_out_inputs(pair):
    nearest, rounded = pair
    before, after = _errors(nearest, conv_net()), _errors(rounded, conv_net())
    for key in (*LAYERS, "output"):
        assert after[key] < 0.9 * before[key], (key, before[key], after[key])
    report = rounded.lowbit_summary.reports[-1]
    assert list(report) == list(LAYERS)
    for r in report.values():
        assert r["loss_adaround"] < r["loss_nearest"] and 0 < r["changed"] < 0.5
    assert json.loads(json.dumps(report)) == report


def test_integers_are_floor_or_ceil_of_the_float_weight_bit_for_bit(pair):
    nearest, rounded = pair
    for name in LAYERS:
        near, ada = nearest.get_submodule(name), rounded.get_submodule(name)
        ints = ada.integer_params().weight
        assert torch.equal(ints.scale, near.integer_params().weight.scale)  # the grid did not move
        per_channel = ints.scale.reshape(-1, *[1] * (ada.weight.dim() - 1))
        floor = torch.floor(conv_net().get_submodule(name).weight / per_channel)
        spec = ints.spec
        values = ints.values.int()
        down, up = floor.clamp(spec.qmin, spec.qmax).int(), (floor + 1).clamp(spec.qmin, spec.qmax).int()
        assert bool(((values == down) | (values == up)).all()), name
        assert not torch.equal(values, near.integer_params().weight.values.int()), name  # it did choose
        # the stored weight IS the dequantized choice: the frozen quantizer returns it unchanged
        assert torch.equal(ada.weight_quantizer(ada.weight), ada.weight)


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, granularity="tensor"),
    QuantSpec(bits=4, signed=False, symmetric=False, granularity="channel", axis=0),
    QuantSpec(bits=3, signed=False, symmetric=False, granularity="group", axis=1, group_size=8),
    QuantSpec(bits=8, narrow_range=True, granularity="channel", axis=0),
], ids=["int4-tensor", "uint4-affine-channel", "uint3-affine-group", "int8-narrow"])
def test_every_grid_layout_gets_floor_or_ceil_within_its_clamp_range(spec):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    data = [torch.randn(16, 16) for _ in range(4)]
    config = _weight_only(spec)
    nearest = lowbit.quantize(model, data, config, progress=False)
    qmodel = lowbit.quantize(model, data, config, progress=False)
    report = adaround(qmodel, data, iterations=100, batch_size=64)
    for name in ("0", "2"):
        weight = model.get_submodule(name).weight.detach()
        ints = qmodel.get_submodule(name).integer_params().weight
        scale, zero = _per_element(ints, spec, weight.shape)
        floor = torch.floor(weight / scale) + zero
        low, high = floor.clamp(spec.qmin, spec.qmax), (floor + 1).clamp(spec.qmin, spec.qmax)
        got = ints.values.float()
        assert bool(((got == low) | (got == high)).all()), name
        nearest_ints = nearest.get_submodule(name).integer_params().weight.values.float()
        assert bool((got != nearest_ints).any()), name  # it did choose
        assert report[name]["loss_adaround"] < report[name]["loss_nearest"]


def _per_element(ints, spec: QuantSpec, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every weight element, whatever the layout (through dequantize)."""
    scale = lowbit.numerics.dequantize(torch.ones(shape), ints.scale, None, spec)
    ones = torch.ones_like(ints.scale)
    zero = -lowbit.numerics.dequantize(torch.zeros(shape), ones, ints.zero_point.int(), spec)
    return scale, zero


def test_weights_already_on_the_grid_keep_their_rounding():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    qmodel = lowbit.quantize(model, CALIB, _weight_only(INT4_WEIGHT), progress=False)
    with torch.no_grad():  # put every weight on its grid: nearest rounding is exact
        for layer in (qmodel[0], qmodel[2]):
            layer.weight.copy_(layer.weight_quantizer(layer.weight))
    before = {n: p.clone() for n, p in qmodel.named_parameters()}
    report = adaround(qmodel, CALIB, iterations=100, batch_size=128)
    assert all(torch.equal(before[n], p) for n, p in qmodel.named_parameters())
    assert all(r["changed"] == 0 and r["loss_adaround"] == r["loss_nearest"] < 1e-10 for r in report.values())


def test_sequential_takes_the_quantized_models_inputs_and_the_float_targets(pair):
    nearest, seq = pair
    layer = nearest.conv2
    rows = {s: _cache_rows(nearest, layer, CALIB, {}, sequential=s, gen=torch.Generator().manual_seed(0))
            for s in (True, False)}
    assert torch.equal(rows[True].y, rows[False].y)  # the same positions, the same float target
    assert not torch.equal(rows[True].x, rows[False].x)  # conv1's quantization error upstream, or not
    with torch.no_grad():  # inputs as the layer sees them: on the layer's input grid
        assert torch.equal(layer.input_quantizer(rows[True].x), rows[True].x)
    non = lowbit.quantize(conv_net(), CALIB, W4A8, algorithms=[FAST.replace(")", ", sequential=false)")],
                          progress=False)
    assert torch.equal(seq.conv1.weight, non.conv1.weight)  # nothing upstream of the first layer
    assert not torch.equal(seq.conv2.weight, non.conv2.weight)


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 7)),
    (nn.Conv2d(4, 8, (3, 2), dilation=(2, 1), padding="same", groups=2, padding_mode="reflect"),
     (2, 4, 8, 8)),
    (nn.Conv2d(6, 6, 3, groups=6, padding=2, padding_mode="circular"), (1, 6, 5, 5)),
    (nn.Conv1d(4, 6, 5, stride=3, padding=2, bias=False), (3, 4, 17)),
    (nn.Linear(12, 5), (2, 3, 12)),
], ids=["strided", "dilated-same-grouped-reflect", "depthwise-circular", "conv1d", "linear-3d"])
def test_the_cached_rows_are_exactly_what_the_layer_contracts(layer, shape):
    """Every cached row times the float weight is the float layer's output at that position."""
    torch.manual_seed(3)
    data = [torch.randn(*shape) for _ in range(2)]
    qmodel = lowbit.quantize(nn.Sequential(layer.eval()), data, _weight_only(INT4_WEIGHT), progress=False)
    rows = _cache_rows(qmodel, qmodel[0], data, {}, sequential=False, gen=torch.Generator().manual_seed(0))
    from lowbit.ptq.adaround import _apply

    expected = _apply(rows.x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
    torch.testing.assert_close(expected, rows.y, rtol=1e-5, atol=1e-5)
    assert len(rows.y) == sum(y.numel() // y.shape[1 if isinstance(layer, nn.Conv1d | nn.Conv2d) else -1]
                              for y in map(layer, data))  # every position cached (below MAX_ROWS)


# -- the step -----------------------------------------------------------------------------------
def test_the_step_is_registered_and_round_trips():
    assert STEPS["adaround"] is AdaRound and AdaRound.phase == CALIBRATED and AdaRound.needs_data
    step = AdaRound(iterations=120, reg_weight=0.02, batch_size=512, batches=2, sequential=False, lr=0.005,
                    warmup=0.1)
    assert Step.from_dict(json.loads(json.dumps(step.to_dict()))) == step
    assert parse_step(str(step)) == step
    assert parse_steps("adaround(iterations=100),bias_correction")[0] == AdaRound(iterations=100)
    assert str(AdaRound(iterations=100)) == "adaround(iterations=100)" and str(AdaRound()) == "adaround"
    assert AdaRound(reg_weight=1) == AdaRound(reg_weight=1.0)


@pytest.mark.parametrize("bad, error, message", [
    ("adaround(iterations=0)", ValueError, r"AdaRound.iterations must be an integer >= 1, got 0"),
    ("adaround(iterations=1.5)", ValueError, r"AdaRound.iterations must be an integer >= 1, got 1.5"),
    ("adaround(batch_size=true)", ValueError, r"AdaRound.batch_size must be an integer >= 1, got True"),
    ("adaround(batches=-1)", ValueError, r"AdaRound.batches must be an integer >= 1"),
    ("adaround(reg_weight=-0.1)", ValueError, r"AdaRound.reg_weight must be a number in \[0.0, inf\]"),
    ("adaround(lr=0)", ValueError, r"AdaRound.lr must be a number in \(0.0, inf\]"),
    ("adaround(warmup=1.5)", ValueError, r"AdaRound.warmup must be a number in \[0.0, 1.0\]"),
    ("adaround(sequential=maybe)", TypeError, r"AdaRound.sequential must be true or false, got 'maybe'"),
    ("adaround(iteratons=10)", ValueError,
     r"unknown field\(s\) \['iteratons'\]; AdaRound takes \['iterations'"),
])
def test_bad_settings_are_named(bad, error, message):
    with pytest.raises(error, match=message):
        parse_steps(bad)


def test_no_calibration_data_is_a_clear_error(pair):
    with pytest.raises(ValueError, match=r"adaround needs calibration data"):
        lowbit.quantize(conv_net(), None, "w4a8", algorithms=["adaround"], progress=False)
    nearest, _ = pair
    with pytest.raises(ValueError, match="adaround needs calibration data: got an empty iterable"):
        adaround(nearest, [])
    with pytest.raises(ValueError, match="adaround needs calibration data"):
        adaround(nearest, None)


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployed():
    """``net`` (Conv-BN, a residual add, a pool, a Linear) through the preset w4a8 with AdaRound."""
    calib = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return lowbit.quantize(net(0), calib, "w4a8", algorithms=[FAST, "bias_correction"], progress=False)


def test_quantize_with_adaround_exports_and_ort_matches_the_emulation_bit_for_bit(deployed, tmp_path):
    summary = deployed.lowbit_summary
    assert summary.algorithms[1:] == (AdaRound(iterations=150, batch_size=256), BiasCorrection())
    assert set(summary.reports[1]) == {"stem.0", "stem.3", "body.0", "fc"}
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(9)) * 1.5
    path = tmp_path / "model.onnx"
    lowbit.export_onnx(deployed, path, x[:1])
    expected = OrtModel(path)(x)
    assert torch.equal(emulate_ort(deployed)(x), expected)
    with torch.no_grad():  # and the simulation is close to what ORT computes
        torch.testing.assert_close(deployed(x), expected, atol=0.1, rtol=0)


def test_save_and_load_give_identical_outputs(deployed, tmp_path):
    loaded = lowbit.load(net(1), lowbit.save(deployed, tmp_path / "m"))
    assert loaded.lowbit_summary.algorithms == deployed.lowbit_summary.algorithms
    assert loaded.lowbit_summary.reports == deployed.lowbit_summary.reports
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))


def test_layers_it_cannot_round_exactly_are_skipped_and_logged(caplog):
    qmodel = lowbit.quantize(conv_net(), CALIB, W4A8, progress=False)
    # a QAT conv-BN pair quantizes a folded weight, not its own: rounding written into .weight would be lost
    qmodel.conv2.quantized_weight_source = lambda: qmodel.conv2.weight * 2
    qmodel.fc.weight_quantizer.mode = "dynamic"
    before = qmodel.conv2.weight.clone(), qmodel.fc.weight.clone()
    with caplog.at_level("INFO", logger="lowbit.ptq.adaround"):
        report = adaround(qmodel, CALIB[:1], iterations=20)
    assert list(report) == ["conv1"]
    assert torch.equal(qmodel.conv2.weight, before[0]) and torch.equal(qmodel.fc.weight, before[1])
    assert "conv2 skipped: its quantized weight is not its plain weight" in caplog.text
    assert "fc skipped: its weight quantizer is 'dynamic', not frozen (static)" in caplog.text
