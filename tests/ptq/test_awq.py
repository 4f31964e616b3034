"""The AWQ step (lowbit.ptq.awq, searches in lowbit.ptq._awq_search) on tiny random Llamas built here,
with a few outlier input channels planted (large RMSNorm weights, as real LLMs have): the folded
scales leave the float model's function unchanged, AWQ lowers the quantized model's error against
round to nearest, alpha = 0 is round to nearest bit for bit, both searches agree with brute-force
references built on lowbit's own quantizers, AWQ then GPTQ exports to what ONNX Runtime computes,
and save / load and the step's serialisations round-trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tests.ptq.test_gptq_llm import batches
from torch import nn

import lowbit
from lowbit.config import get_config
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import QuantSpec
from lowbit.ptq import AWQ, GPTQ, Step, parse_step, parse_steps
from lowbit.ptq._awq_search import linear_loss, module_loss, search_clip, weight_rounder
from lowbit.ptq.awq import awq_model
from lowbit.ptq.steps import FLOAT, STEPS
from lowbit.runtime.ort import OrtModel

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256
OUTLIERS = [3, 17, 40]  # hidden channels whose norm weights are planted large
W4 = "w4a16-g32"


def tiny_llama(seed: int = 0, kv_heads: int = 2, outliers: bool = True) -> nn.Module:
    """A random LlamaForCausalLM (lm_head tied to the embedding, as SmolLM2's); ``kv_heads=2``:
    grouped-query attention (v_proj -> o_proj cannot be scaled), 4: multi-head.  ``outliers``: the
    OUTLIERS channels of every RMSNorm weight x20, so a few input channels of q/k/v and gate/up are
    large, as in trained LLMs."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    if outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[OUTLIERS] *= 20
    return model


CALIB, HELD_OUT = batches(4, 0), batches(2, 100)


def _logits(model, items=HELD_OUT) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**item).logits for item in items])


def _kl_to_float(model, float_model) -> float:
    """KL(float || quantized) of the next-token distributions on the held-out batches."""
    ref, out = _logits(float_model), _logits(model)
    return float(F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"))


@pytest.fixture(scope="module")
def awq_w4():
    return lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=["awq"], progress=False)


# -- the float model ---------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads, scaled", [(2, 6), (4, 8)], ids=["gqa", "mha"])
def test_the_scales_leave_the_float_models_outputs_unchanged(kv_heads, scaled):
    model, reference = tiny_llama(kv_heads=kv_heads), tiny_llama(kv_heads=kv_heads)
    report = awq_model(model, CALIB, get_config(W4), clip=False, progress=False)
    assert report["mode"] == "blocks" and len(report["groups"]) == scaled
    if kv_heads == 2:  # v_proj has 32 outputs, o_proj 64 inputs
        assert [s["producer"] for s in report["skipped"]] == [f"model.layers.{b}.self_attn.v_proj" for b in (0, 1)]
        assert all("grouped-query attention" in s["why"] for s in report["skipped"])
    assert any(g["alpha"] > 0 for g in report["groups"])
    for name in ("input_layernorm", "post_attention_layernorm"):  # 1/s went into every norm
        assert not torch.equal(model.model.layers[0].get_submodule(name).weight,
                               reference.model.layers[0].get_submodule(name).weight)
    ref = _logits(reference)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    # the tied embedding is neither scaled nor untied: lm_head is outside every scale group
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert "tied" in report["left"]["lm_head"]


def test_models_without_scale_groups_are_left_as_they_are():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = copy.deepcopy(model.state_dict())
    report = awq_model(model, [torch.randn(4, 8)], get_config(W4), progress=False)
    assert report["mode"] == "none" and "AWQ changed nothing" in report["left"]["model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -- what it achieves --------------------------------------------------------------------------
def test_awq_lowers_the_quantized_models_error_against_round_to_nearest(awq_w4):
    """Measured: KL to the float model 0.039 with round to nearest, 0.020 with AWQ."""
    rtn = lowbit.quantize(tiny_llama(), CALIB, W4, progress=False)
    float_model = tiny_llama()
    assert _kl_to_float(awq_w4, float_model) < 0.7 * _kl_to_float(rtn, float_model)
    report = awq_w4.lowbit_summary.reports[-1]
    assert json.loads(json.dumps(report)) == report
    for group in report["groups"]:
        assert group["alpha"] in [i / 20 for i in range(20)]
        assert group["error_awq"] <= group["error_rtn"], group
    per_block = ["self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert list(report["clip"]) == [f"model.layers.{b}.{n}" for b in (0, 1) for n in per_block]
    for name, clip in report["clip"].items():
        assert clip["objective_after"] <= clip["objective_before"] and 0.5 < clip["ratio_min"] <= 1, name
    assert sorted(report["not_clipped"]) == [f"model.layers.{b}.self_attn.{p}_proj" for b in (0, 1) for p in "kq"]


def test_alpha_zero_without_clipping_is_round_to_nearest_bit_for_bit():
    rtn = lowbit.quantize(tiny_llama(), CALIB, W4, progress=False)
    zero = lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=[AWQ(grid=1, clip=False)], progress=False)
    for group in zero.lowbit_summary.reports[-1]["groups"]:
        assert group["alpha"] == 0 and group["error_awq"] == group["error_rtn"]
    mine = zero.state_dict()
    for key, value in rtn.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, mine[key]), key
    assert torch.equal(_logits(zero), _logits(rtn))


# -- the searches against brute force ----------------------------------------------------------
def _scales(s_x: torch.Tensor, alpha: float) -> torch.Tensor:
    s = s_x.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _inputs_of(model, name: str) -> torch.Tensor:
    """What module ``name`` of the float model receives on the calibration batches, stacked."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        for item in CALIB:
            model(**item)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("group, inspect, consumers", [
    ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj", ["down_proj"]),  # Gram path
    ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp", ["gate_proj", "up_proj"]),  # a module run
], ids=["down_proj", "gate_up"])
def test_the_scale_search_finds_the_brute_force_best_alpha(group, inspect, consumers):
    """For every alpha: the float module with ``W * s`` in the consumers, quantized by lowbit.quantize
    itself, fed ``x / s``, against the float module on ``x``."""
    float_model = tiny_llama()
    x = _inputs_of(float_model, group)
    s_x = x.abs().reshape(-1, x.shape[-1]).double().mean(0).float()
    module = float_model.get_submodule(inspect)
    errors = []
    with torch.no_grad():
        ref = module(x)
        for i in range(20):
            s = _scales(s_x, i / 20)
            scaled = copy.deepcopy(module)
            for name in consumers:
                layer = scaled if isinstance(scaled, nn.Linear) else scaled.get_submodule(name)
                layer.weight.mul_(s)
            config = get_config(W4).skip(*[n for n, m in scaled.named_modules()
                                           if isinstance(m, nn.Linear) and n not in consumers and n])
            errors.append(float((lowbit.quantize(scaled, None, config)(x / s) - ref).double().pow(2).mean()))
    report = awq_model(tiny_llama(), CALIB, get_config(W4), clip=False, progress=False)
    entry = next(g for g in report["groups"] if group in g["consumers"])
    assert entry["error_rtn"] == pytest.approx(errors[0], rel=1e-4)
    assert entry["error_awq"] == pytest.approx(errors[round(entry["alpha"] * 20)], rel=1e-4)
    assert entry["error_awq"] <= min(errors) * (1 + 1e-4)


def test_a_linears_gram_loss_is_its_output_mean_square_error():
    layer = nn.Linear(24, 16)
    x = torch.randn(3, 10, 24)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        reference = layer(x)
        layer.weight.add_(0.01 * torch.randn_like(original))
    flat = x.reshape(-1, 24)
    gram_loss = linear_loss(layer, original, (flat.T @ flat).double(), flat.shape[0])
    run_loss = module_loss(layer, [((x,), {})], [reference], lambda out: out)
    assert gram_loss() == pytest.approx(run_loss(), rel=1e-4)


def _brute_force_clip(weight, x, spec, ratios):
    """errors[r, row, group]: mean over tokens of the group's squared partial output error with the
    weight clamped naively, group by group, to ratio r of its range and quantized by lowbit.quantize."""
    rows, cols = weight.shape
    starts = range(0, cols, spec.group_size)
    errors = torch.zeros(len(ratios), rows, len(starts), dtype=torch.float64)
    for k, r in enumerate(ratios):
        clamped = weight.clone()
        for o in range(rows):
            for a in starts:
                b = min(a + spec.group_size, cols)
                lo, hi = float(weight[o, a:b].min().clamp(max=0)), float(weight[o, a:b].max().clamp(min=0))
                if spec.symmetric:
                    lo, hi = -max(-lo, hi), max(-lo, hi)
                clamped[o, a:b] = weight[o, a:b].clamp(r * lo, r * hi)
        layer = nn.Linear(cols, rows, bias=False)
        with torch.no_grad():
            layer.weight.copy_(clamped)
        config = lowbit.config.QuantConfig(default=lowbit.config.LayerQuant(weight=TensorQuant(spec=spec)))
        qlayer = lowbit.quantize(layer, None, config)
        q = qlayer.weight_quantizer(qlayer.weight).detach()
        for o in range(rows):
            for g, a in enumerate(starts):
                b = min(a + spec.group_size, cols)
                partial = x[:, a:b].double() @ (q[o, a:b] - weight[o, a:b]).double()
                errors[k, o, g] = partial.pow(2).mean()
    return errors


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, granularity="group", axis=1, group_size=32),
    QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", axis=1, group_size=32),
], ids=["symmetric", "affine"])
def test_the_clip_search_keeps_each_groups_brute_force_best_ratio(spec):
    """80 columns in groups of 32: the last group is ragged (16)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 80, generator=g)
    weight[:, [5, 50, 70]] *= 6  # a few large weights: worth clipping some groups
    x = torch.randn(64, 80, generator=g)
    choice = search_clip(weight, x, weight_rounder(TensorQuant(spec=spec), "w"), 32, symmetric=spec.symmetric)
    ratios = [1 - i / 20 for i in range(10)]
    errors = _brute_force_clip(weight, x, spec, ratios)
    best, where = errors.min(0)
    assert choice.objective_after <= choice.objective_before
    assert choice.objective_before == pytest.approx(float(errors[0].sum()) / 8, rel=1e-4)
    assert choice.objective_after == pytest.approx(float(best.sum()) / 8, rel=1e-4)
    assert bool((choice.ratios < 1).any())
    chosen = torch.tensor(ratios)[where].float()
    clear = (errors.sort(0).values[1] - best) > 1e-4 * best  # groups whose best ratio wins clearly
    assert torch.equal(choice.ratios[clear], chosen[clear])


# -- with GPTQ, export, save / load ------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Exporting aten")
def test_awq_then_gptq_exports_to_what_onnx_runtime_computes(tmp_path):
    qmodel = lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=["awq", "gptq"], progress=False)
    awq, gptq = qmodel.lowbit_summary.reports[-2:]
    assert awq["mode"] == "blocks" and gptq["mode"] == "blocks" and gptq["untied"] == ["lm_head"]
    assert all(r["objective_gptq"] <= r["objective_rtn"] for r in gptq["layers"].values())
    qmodel.config.use_cache = False  # the file returns logits only
    example = HELD_OUT[0]
    lowbit.export_onnx(qmodel, tmp_path / "m.onnx", example)
    with torch.no_grad():
        simulated = qmodel(**example).logits
    ort = OrtModel(tmp_path / "m.onnx", optimization="basic")  # DQ -> float MatMul, as the simulation
    torch.testing.assert_close(ort(example), simulated, rtol=1e-5, atol=1e-5)


def test_save_and_load_rebuild_the_awq_model_bit_for_bit(awq_w4, tmp_path):
    loaded = lowbit.load(tiny_llama(seed=1, outliers=False), lowbit.save(awq_w4, tmp_path / "m"))
    saved, mine = awq_w4.state_dict(), loaded.state_dict()
    assert saved.keys() == mine.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, mine[key]), key
    assert torch.equal(_logits(loaded), _logits(awq_w4))
    assert loaded.lowbit_summary.algorithms == awq_w4.lowbit_summary.algorithms
    assert loaded.lowbit_summary.reports == awq_w4.lowbit_summary.reports


# -- the step ----------------------------------------------------------------------------------
def test_the_step_is_registered_and_round_trips():
    assert STEPS["awq"] is AWQ and AWQ.phase == FLOAT and AWQ.needs_data
    step = AWQ(grid=10, clip=False, clip_grid=40, max_shrink=0.25, clip_tokens=None, batches=8)
    assert Step.from_dict(json.loads(json.dumps(step.to_dict()))) == step
    assert parse_step(str(step)) == step
    assert str(AWQ()) == "awq" and str(AWQ(grid=10)) == "awq(grid=10)"
    assert parse_steps("awq(clip=false),gptq") == (AWQ(clip=False), GPTQ())
    assert AWQ(max_shrink=0) == AWQ(max_shrink=0.0)


@pytest.mark.parametrize("bad, message", [
    ("awq(grid=0)", r"AWQ.grid must be an integer >= 1, got 0"),
    ("awq(max_shrink=1)", r"AWQ.max_shrink must be below 1"),
    ("awq(clip_tokens=0)", r"AWQ.clip_tokens must be an integer >= 1, got 0"),
    ("awq(alpha=0.5)", r"unknown field\(s\) \['alpha'\]; AWQ takes \['grid'"),
])
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_steps(bad)


def test_awq_after_a_calibrated_step_or_without_data_is_a_clear_error():
    with pytest.raises(ValueError, match=r"algorithms out of order: awq runs on the float model"):
        lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=["gptq", "awq"], progress=False)
    with pytest.raises(ValueError, match=r"awq needs calibration data \(an iterable"):
        lowbit.quantize(tiny_llama(), None, W4, algorithms=["awq"], progress=False)
