"""QAT monitoring: TensorBoard event files hold loss, lr, metric and the per-layer figures
(scales, errors, bit-widths) that lowbit.report.layers computes and the monitor only logs."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lowbit.nn.quantizer import Quantizer
from lowbit.qat import Monitor, fit, prepare_qat
from lowbit.report import layers
from lowbit.report.layers import bit_widths, quantizer_scales, weight_errors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails: as on a machine without it


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _setup(config="w4a8"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    qmodel = prepare_qat(Net().eval(), config, [batches[0][0]], progress=False)
    return qmodel, batches


def _events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_fit_writes_loss_lr_metric_scales_errors_and_bit_widths(tmp_path):
    qmodel, batches = _setup()
    result = fit(qmodel, batches, F.cross_entropy, epochs=2, lr=2e-3, eval_fn=lambda m: 0.25, log_dir=tmp_path,
                 log_every=2, figures=layers, progress=False)
    acc = _events(tmp_path)
    tags = acc.Tags()

    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 7)) and loss[-1].value == pytest.approx(result.final_loss)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([2e-3] * 6)
    assert [(e.step, e.value) for e in acc.Scalars("eval/metric")] == [(3, 0.25), (6, 0.25)]

    # per-tensor scales as one curve, per-channel as mean / min / max; logged every 2 steps + each epoch end
    per_tensor = qmodel.features[0].input_quantizer
    assert [e.step for e in acc.Scalars(f"scale/{per_tensor.name}")] == [2, 3, 4, 6]
    assert acc.Scalars(f"scale/{per_tensor.name}")[-1].value == pytest.approx(float(per_tensor.scale.detach().abs()))
    w = qmodel.fc.weight_quantizer
    stats = {s: acc.Scalars(f"scale/{w.name}/{s}")[-1].value for s in ("mean", "min", "max")}
    assert stats["min"] <= stats["mean"] <= stats["max"]
    assert stats["max"] == pytest.approx(float(w.scale.detach().abs().max()))
    assert stats["min"] < stats["max"]  # really per channel

    # a histogram of w - fakequant(w) per quantized weight, each epoch
    hist_tags = {t for t in tags["histograms"] if t.startswith("quant_error/")}
    assert hist_tags == {"quant_error/features.0.weight", "quant_error/features.3.weight", "quant_error/fc.weight"}
    fc_hist = acc.Histograms("quant_error/fc.weight")
    assert [h.step for h in fc_hist] == [3, 6] and fc_hist[-1].histogram_value.num == qmodel.fc.weight.numel()

    # bit-widths: int4 weights, the first and last layers int8 (the w4a8 preset), the rest float
    n_int4 = qmodel.features[3].weight.numel()
    n_int8 = qmodel.features[0].weight.numel() + qmodel.fc.weight.numel()
    assert acc.Scalars("model/params/int4")[0].value == n_int4
    assert acc.Scalars("model/params/int8")[0].value == n_int8
    n_float = sum(p.numel() for p in qmodel.parameters()) - n_int4 - n_int8
    assert acc.Scalars("model/params/float32")[0].value == n_float
    text = acc.Tensors("model/bit_widths/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| int4 | {n_int4:,} |" in text and f"| int8 | {n_int8:,} |" in text
    assert "mean bits per parameter" in text


def test_weight_errors_stay_within_half_a_step_and_change_no_state():
    qmodel, _ = _setup("w8a8")
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if isinstance(v, torch.Tensor)}
    errors = weight_errors(qmodel)
    assert set(errors) == {"features.0.weight", "features.3.weight", "fc.weight"}
    scale = qmodel.fc.weight_quantizer.scale.detach().abs()
    err = errors["fc.weight"].reshape(qmodel.fc.weight.shape)
    assert bool((err.abs() <= scale[:, None] / 2 + 1e-7).all())  # int8 per channel: nothing clips
    for k, v in qmodel.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_scales_and_bit_widths_of_observed_and_dynamic_ranges():
    torch.manual_seed(0)
    qmodel = prepare_qat(Net().eval(), "w8a8", None, learn=None, progress=False)  # weights: dynamic
    scales = quantizer_scales(qmodel)
    assert "fc.weight/mean" in scales  # from the current weight
    assert not any("input" in tag for tag in scales)  # observing, no batch seen yet: no range to log
    qmodel(torch.randn(4, 1, 6, 6))  # one training batch: the observed ranges exist now
    scales = quantizer_scales(qmodel)
    assert scales["features.0.input"] == pytest.approx(float(qmodel.features[0].input_quantizer.scale))
    counts = bit_widths(qmodel)
    assert set(counts) == {"int8", "float32"} and sum(counts.values()) == sum(p.numel() for p in qmodel.parameters())
    assert all(q.mode in ("observing", "dynamic") for q in qmodel.modules() if isinstance(q, Quantizer))


def test_without_figures_fit_logs_only_the_training_curves(tmp_path):
    qmodel, batches = _setup()
    fit(qmodel, batches, F.cross_entropy, epochs=1, log_dir=tmp_path, log_every=1, progress=False)
    acc = _events(tmp_path)
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(acc.Tags()["scalars"])
    assert not [t for t in acc.Tags()["scalars"] if t.startswith(("scale/", "model/"))]
    assert not acc.Tags()["histograms"]
    with pytest.raises(ValueError, match="pass log_dir as well"):
        fit(qmodel, batches, F.cross_entropy, epochs=1, figures=layers, progress=False)


def test_monitor_logs_the_figures_it_is_given(tmp_path):
    with Monitor(tmp_path) as mon:
        mon.log_scales({"fc.input": 0.5, "fc.weight/max": 0.25}, step=1)
        mon.log_weight_errors({"fc.weight": torch.tensor([0.1, -0.1, 0.0])}, step=1)
        mon.log_bit_widths({"int8": 24, "float32": 8}, "the table", step=0)
    acc = _events(tmp_path)
    assert acc.Scalars("scale/fc.input")[0].value == 0.5 and acc.Scalars("scale/fc.weight/max")[0].value == 0.25
    assert acc.Histograms("quant_error/fc.weight")[0].histogram_value.num == 3
    assert [acc.Scalars(f"model/params/{k}")[0].value for k in ("int8", "float32")] == [24, 8]
    assert acc.Tensors("model/bit_widths/text_summary")[0].tensor_proto.string_val[0].decode() == "the table"


def test_wandb_offline_mirror_when_installed(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", dict(values), step)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # (tests/conftest.py disables W&B elsewhere)
    with Monitor(tmp_path, config={"lr": 1e-4}) as mon:
        mon.scalar("train/loss", 0.5, step=3)
    assert calls[0] == ("init", {"mode": "offline", "dir": str(tmp_path), "project": "lowbit-qat",
                                 "config": {"lr": 1e-4}})
    assert calls[1:] == [("log", {"train/loss": 0.5}, 3), ("finish",)]
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb's own off switch is obeyed
    Monitor(tmp_path).close()
    assert calls[-2][1]["mode"] == "disabled"


def test_missing_packages_are_clear_errors_or_skipped(tmp_path, monkeypatch):
    mon = Monitor(tmp_path)  # wandb=None and wandb missing: TensorBoard only
    assert mon.wandb is None
    mon.close()
    with pytest.raises(ImportError, match="wandb=True needs the wandb package"):
        Monitor(tmp_path, wandb=True)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'lowbit\[qat\]'"):
        Monitor(tmp_path)
