"""smooth_quant: pair discovery by tensor identity and probes, exactness of the float model
(toy models and a tiny transformers BERT), the report, bad input, and the gain at W8A8."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lowbit.config import W8A8
from lowbit.passes import smooth as smooth_module
from lowbit.passes import smooth_quant
from lowbit.passes.smooth import SmoothedInput
from lowbit.ptq import quantize


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _outlier_norm(width: int, kind: type[nn.Module] = nn.LayerNorm, channel: int = 3, factor: float = 40.0):
    """A norm whose affine weight makes one output channel ~``factor`` x the others."""
    norm = kind(width)
    with torch.no_grad():
        norm.weight[channel] = factor
    return norm


class NormFeedsTwo(nn.Module):
    """norm -> (fc1, fc2), nothing else reads the norm's output: 1/s folds into the norm."""

    def __init__(self, width=16, kind=nn.LayerNorm):
        super().__init__()
        self.ln = _outlier_norm(width, kind)
        self.fc1, self.fc2 = nn.Linear(width, 8), nn.Linear(width, 8)

    def forward(self, x):
        h = self.ln(x)
        return self.fc1(h) * self.fc2(h)


class Chains(nn.Module):
    """fc1 -> ReLU -> fc2 (folds: ReLU is positively homogeneous); fc2 -> GELU -> fc3 (no);
    ln -> fc4 with the LN output also added back (a residual: no)."""

    def __init__(self, width=16):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(width, width) for _ in range(3))
        self.ln, self.fc4 = _outlier_norm(width), nn.Linear(width, width)

    def forward(self, x):
        x = self.fc3(nn.functional.gelu(self.fc2(torch.relu(self.fc1(x)))))
        h = self.ln(x)
        return self.fc4(h) + h


def _calib(width=16, batches=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 5, width, generator=gen) for _ in range(batches)]


def _check_exact(model, calib, **options):
    run = lambda: model(*calib[0]) if isinstance(calib[0], tuple) else model(calib[0])
    with torch.no_grad():
        expected = run()
    report = smooth_quant(model, calib, **options)
    with torch.no_grad():
        assert _rel(run(), expected) < 1e-5
    return report


@pytest.mark.parametrize("kind", [nn.LayerNorm, nn.RMSNorm])
def test_norm_feeding_two_linears_folds_into_the_norm(kind):
    model = NormFeedsTwo(kind=kind).eval()
    ln_weight = model.ln.weight.detach().clone()
    report = _check_exact(model, _calib(), alpha=0.5)
    assert [(g.consumers, g.producer) for g in report.folded] == [(("fc1", "fc2"), "ln")]
    assert report.inserted == [] and report.left == [] and report.batches == 3
    assert report.output_change < 1e-5
    assert not any(isinstance(m, SmoothedInput) for m in model.modules())  # parameters only
    # The outlier channel of the norm's output shrank relative to the others.
    ratio = lambda w: float(w[3].abs() / w.abs().median())
    assert ratio(model.ln.weight.detach()) < ratio(ln_weight) / 3


def test_tuple_inputs_small_batches_and_a_norm_without_affine():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 4)

        def forward(self, x, y):
            return self.fc(self.ln(x)) + y

    calib = [(torch.randn(3, 16), torch.randn(3, 4)) for _ in range(2)]  # 3 items: probed uncut
    report = _check_exact(TwoInputs().eval(), calib, insert_scales=True)
    assert report.inserted[0].consumers == ("fc",) and "no affine weight" in report.inserted[0].note


def test_probes_refuse_gelu_and_residual_pairs_and_say_why():
    model = Chains().eval()
    report = _check_exact(model, _calib())
    assert [(g.consumers, g.producer) for g in report.folded] == [(("fc2",), "fc1")]
    why = {g.consumers: g.note for g in report.left}
    assert "not linear per channel" in why[("fc3",)]
    assert "also feeds other ops" in why[("fc4",)]
    assert "no norm or Linear" in why[("fc1",)]  # the model input: nothing can absorb 1/s
    assert any("fc4" in line and "left" in line for line in report.lines())


def test_insert_scales_smooths_what_cannot_fold_and_stays_exact():
    model = Chains().eval()
    calib = _calib()
    report = _check_exact(model, calib, insert_scales=True)
    assert {g.consumers for g in report.inserted} == {("fc1",), ("fc3",), ("fc4",)}
    assert report.left == []
    assert isinstance(model.fc4, SmoothedInput) and type(model.fc4.linear) is nn.Linear
    # A second run finds the wrapped layers already smoothed and changes nothing.
    with torch.no_grad():
        before = model(calib[0])
    again = smooth_quant(model, calib, insert_scales=True)
    assert {g.consumers for g in again.left} >= {("fc1",), ("fc3",), ("fc4",)}
    with torch.no_grad():
        assert _rel(model(calib[0]), before) < 1e-5


def test_a_layer_run_twice_is_left():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.fc(self.ln(x)))

    report = _check_exact(Twice().eval(), _calib(), insert_scales=True)
    assert report.folded == [] and report.inserted == []
    assert "runs 2 times per forward" in report.left[0].note


# -- a tiny BERT from transformers: the real HF structure, random weights ---------------------

@pytest.fixture(scope="module")
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    last = model.encoder.layer[-1].output.LayerNorm
    with torch.no_grad():  # an outlier feature channel in the residual stream, as in trained BERTs
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m is not last:  # (so the output is not all channel 5)
                m.weight[5] = 8.0
    gen = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 64, (8, 12), generator=gen),
              "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(3)]
    return model, calib


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_bert_pairs_found_without_fx(tiny_bert):
    model, calib = copy.deepcopy(tiny_bert[0]), tiny_bert[1]
    expected = _hidden(model, calib[0])
    report = smooth_quant(model, calib)
    assert _rel(_hidden(model, calib[0]), expected) < 1e-5
    folded = {g.consumers: g.producer for g in report.folded}
    layers = [f"encoder.layer.{i}.attention" for i in range(2)]
    assert folded == {(f"{layer}.output.dense",): f"{layer}.self.value" for layer in layers}
    why = {g.consumers: g.note for g in report.left}
    qkv = tuple(f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value"))
    # Post-LN: the LayerNorm output is also the residual input of the next LayerNorm.
    assert why[qkv] == ("embeddings.LayerNorm's output also feeds other ops (e.g. a residual add): "
                        "folding changes the output of encoder.layer.0.attention.output.LayerNorm")
    assert "attention.output.LayerNorm's output also feeds" in why[("encoder.layer.1.intermediate.dense",)]
    assert "not linear per channel" in why[("encoder.layer.1.output.dense",)]  # GELU


def test_bert_with_inserted_scales_is_exact_and_quantizes(tiny_bert):
    model, calib = copy.deepcopy(tiny_bert[0]), tiny_bert[1]
    expected = _hidden(model, calib[0])
    report = smooth_quant(model, calib, alpha=0.8, insert_scales=True)
    assert _rel(_hidden(model, calib[0]), expected) < 1e-5
    assert len(report.folded) == 2 and len(report.inserted) == 2 * 3 + 1 and report.left == []
    query = model.encoder.layer[0].attention.self.query
    assert isinstance(query, SmoothedInput)
    assert query.inv_scale is model.encoder.layer[0].attention.self.key.inv_scale  # one scale per input
    qmodel = quantize(model, calib, "w8a8", quantize_adds=False, progress=False)  # (BertModel: no fx)
    assert len(qmodel.lowbit_summary.layers.quantized) == 2 * 6 + 1 + 3


def _w8a8_error(model, calib, test):
    # Embeddings stay float: with the outlier LayerNorm their weight rounding dominates the error.
    qmodel = quantize(model, calib, W8A8.skip("type:Embedding"), quantize_adds=False, progress=False)
    return _rel(_hidden(qmodel, test), _hidden(model, test))


def test_smoothing_reduces_the_w8a8_error_of_an_outlier_channel(tiny_bert):
    model, calib = tiny_bert
    test = {"input_ids": torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(9)),
            "attention_mask": torch.ones(16, 12, dtype=torch.long)}
    plain = _w8a8_error(model, calib, test)
    smoothed = copy.deepcopy(model)
    smooth_quant(smoothed, calib, alpha=0.8, insert_scales=True)
    assert _w8a8_error(smoothed, calib, test) < 0.5 * plain  # measured 8e-4 -> 3e-4


def test_toy_norm_linear_w8a8_error_drops():
    model, calib = NormFeedsTwo().eval(), _calib()
    with torch.no_grad():
        ref = model(calib[0])
    plain = _rel(quantize(model, calib, "w8a8", progress=False)(calib[0]).detach(), ref)
    smooth_quant(model, calib, alpha=0.5)
    smoothed = _rel(quantize(model, calib, "w8a8", progress=False)(calib[0]).detach(), ref)
    assert smoothed < 0.5 * plain


# -- bad input ---------------------------------------------------------------------------------

def test_bad_input_names_the_fix():
    model = NormFeedsTwo().eval()
    with pytest.raises(ValueError, match="calibration data is empty"):
        smooth_quant(model, [])
    with pytest.raises(ValueError, match="needs calibration data"):
        smooth_quant(model, None)
    for alpha in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="alpha must be a number in"):
            smooth_quant(model, _calib(), alpha=alpha)
    bad = _calib()
    bad[1][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 1: the input of 0 holds NaN"):
        smooth_quant(nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 4)).eval(), bad)
    with pytest.raises(RuntimeError, match="batch 0 failed in the model"):
        smooth_quant(model, [torch.randn(2, 7)])


def test_scales_are_clamped_and_dead_channels_keep_scale_one():
    amax = torch.tensor([0.0, 1.0, 1e12, 1e-30])
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    s = smooth_module._scales(amax, [w], alpha=0.5)
    assert torch.isfinite(s).all() and s[0] == 1 and s[1] == 1
    assert 0.99e-4 <= float(s.min()) and float(s.max()) <= 1.01e4


def test_model_is_put_back_when_the_final_check_fails(monkeypatch, caplog):
    model, calib = Chains().eval(), _calib()
    with torch.no_grad():
        expected = model(calib[0])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Wrongly trust every pair that has a producer (fc4's LN also feeds the residual add).
    trust = lambda model, data, group, *rest: "" if group.producer else "no producer"
    monkeypatch.setattr(smooth_module, "_why_not_foldable", trust)
    with pytest.raises(RuntimeError, match="undone"):
        smooth_quant(model, calib, insert_scales=True)
    assert not any(isinstance(m, SmoothedInput) for m in model.modules())
    with torch.no_grad():
        assert _rel(model(calib[0]), expected) < 1e-5
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n], rtol=1e-5, atol=1e-6)


def test_logs_the_insert_scales_hint(caplog):
    with caplog.at_level(logging.INFO, logger="lowbit.passes"):
        smooth_quant(Chains().eval(), _calib())
    assert "insert_scales=True" in caplog.text
