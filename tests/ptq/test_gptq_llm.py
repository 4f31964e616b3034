"""The GPTQ step on tiny random causal LMs built here (lowbit.ptq._blocks): streamed block by block,
each layer's Hessian is the one the quantized model itself gives (checked against hooks on the
finished model), the model's next-token distribution stays closer to the float model's than with
round to nearest, ONNX Runtime runs the export to the same logits, a tied lm_head is untied
without touching the embedding, blocks with their own masks (sliding windows) are followed, and
save / load and the step's serialisations round-trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.config import LayerQuant, QuantConfig, Rule
from lowbit.nn.modules import TensorQuant
from lowbit.nn.walk import run_model
from lowbit.numerics import INT8_WEIGHT, QuantSpec
from lowbit.ptq import GPTQ, RTN, Step, _gptq_layers, parse_step, parse_steps
from lowbit.ptq._blocks import _probe, find_blocks
from lowbit.ptq.gptq import Hessian
from lowbit.ptq.steps import CALIBRATED, STEPS
from lowbit.runtime.ort import OrtModel

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256
INT4_G32 = QuantSpec(bits=4, granularity="group", axis=1, group_size=32)


def weight_only(spec: QuantSpec) -> QuantConfig:
    """``spec`` on every Linear (lm_head too), embeddings float (export writes no group-wise tables)."""
    return QuantConfig(name="w-only", rules=(Rule(pattern="type:Embedding", layer=None),),
                       default=LayerQuant(weight=TensorQuant(spec=spec)))


W4 = weight_only(INT4_G32)


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64) -> torch.nn.Module:
    """A random LlamaForCausalLM whose lm_head is tied to the token embedding (as SmolLM2's)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def batches(n: int, seed: int, size: int = 4, length: int = 32) -> list[dict]:
    """Token batches with an attention mask; the first row of each is right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length * 3 // 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


CALIB, HELD_OUT = batches(4, 0), batches(2, 100)


@pytest.fixture(scope="module")
def pair():
    """tiny_llama W4 g32 with round to nearest and with GPTQ."""
    rtn = lowbit.quantize(tiny_llama(), CALIB, W4, progress=False)
    gptq = lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=["gptq"], progress=False)
    return rtn, gptq


def _logits(model, items) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**item).logits for item in items])


def _kl_to_float(model) -> float:
    """KL(float || quantized) of the next-token distributions on the held-out batches."""
    ref, out = _logits(tiny_llama(), HELD_OUT), _logits(model, HELD_OUT)
    return float(F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"))


# -- what it achieves --------------------------------------------------------------------------
def test_gptq_stays_closer_to_the_float_model_than_round_to_nearest(pair):
    rtn, gptq = pair
    report = gptq.lowbit_summary.reports[-1]
    assert report["mode"] == "blocks" and report["blocks"] == 2
    per_block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = [f"model.layers.{b}.{n}" for b in (0, 1) for n in per_block] + ["lm_head"]
    assert list(report["layers"]) == expected
    for name, r in report["layers"].items():
        assert r["kept"] == "gptq" and r["objective_gptq"] < r["objective_rtn"], name
    # On random tokens a random model's loss is noise; what quantization costs is the distance
    # to the float model's predictions (measured: KL 0.0078 round to nearest, 0.0065 GPTQ).
    assert _kl_to_float(gptq) < 0.9 * _kl_to_float(rtn)
    ref = _logits(tiny_llama(), HELD_OUT)
    assert (_logits(gptq, HELD_OUT) - ref).pow(2).mean() < (_logits(rtn, HELD_OUT) - ref).pow(2).mean()
    assert json.loads(json.dumps(report)) == report


def recording(monkeypatch) -> dict[str, torch.Tensor]:
    """Record the Hessian GPTQ is given for each layer."""
    seen = {}
    original = _gptq_layers.gptq_layer

    def record(layer, h, *, name, **options):
        seen[name] = h.clone()
        return original(layer, h, name=name, **options)

    monkeypatch.setattr(_gptq_layers, "gptq_layer", record)
    return seen


def reference_hessians(model, items, names) -> dict[str, torch.Tensor]:
    """Each layer's Hessian from hooks on the finished model, run whole on the items."""
    hessians = {n: Hessian(model.get_submodule(n), n) for n in names}
    for name, inputs in layer_inputs(model, items, names).items():
        for x in inputs:
            hessians[name].add(x)
    return {n: h.matrix() for n, h in hessians.items()}


def layer_inputs(model, items, names) -> dict[str, list[torch.Tensor]]:
    """What each layer of ``names`` receives from ``model`` on the items, call by call."""
    seen = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0]))
               for n in names]
    with torch.no_grad():
        for item in items:
            run_model(model, item)
    for h in handles:
        h.remove()
    return seen


def test_with_true_sequential_every_hessian_is_the_finished_models_own(monkeypatch):
    """Group by group (q/k/v, o, gate/up, down), the inputs a layer was quantized on are those it
    gets in the finished model: block k's inputs come from blocks 0..k-1 as quantized, masks and
    rotary embeddings as the model passes them, lm_head's from the final norm."""
    seen = recording(monkeypatch)
    qmodel = lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=[GPTQ(true_sequential=True)], progress=False)
    reference = reference_hessians(qmodel, CALIB, list(seen))
    assert len(seen) == 15
    for name, h in seen.items():
        torch.testing.assert_close(h, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_one_pass_per_block_shares_the_hessian_of_layers_fed_one_tensor(monkeypatch):
    seen = recording(monkeypatch)
    qmodel = lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=["gptq"], progress=False)
    first = [f"model.layers.{b}.self_attn.{p}_proj" for b in (0, 1) for p in "qkv"] + ["lm_head"]
    reference = reference_hessians(qmodel, CALIB, first)
    for name in first:  # the layers whose inputs do not depend on their own block's weights
        torch.testing.assert_close(seen[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    for b in (0, 1):
        block = f"model.layers.{b}"
        assert torch.equal(seen[f"{block}.self_attn.q_proj"], seen[f"{block}.self_attn.v_proj"])
        assert torch.equal(seen[f"{block}.mlp.gate_proj"], seen[f"{block}.mlp.up_proj"])


def test_the_float_target_pairs_each_layers_float_model_inputs_with_the_quantized_models(monkeypatch):
    """``GPTQ(asymmetric=True, true_sequential=True)``: each layer's shift ``2/n sum (x_float - x)^T x``
    pairs what the float model feeds it with what the finished quantized model feeds it, token by token
    (block 0's q/k/v: the same tensor, no shift); the model ends closer to the float one than plain GPTQ."""
    shifts = {}
    original = _gptq_layers.gptq_layer

    def record(layer, h, *, name, shift=None, **options):
        shifts[name] = shift.clone()
        return original(layer, h, name=name, shift=shift, **options)

    monkeypatch.setattr(_gptq_layers, "gptq_layer", record)
    qmodel = lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=[GPTQ(asymmetric=True, true_sequential=True)],
                             progress=False)
    assert len(shifts) == 15
    floats, quantized = layer_inputs(tiny_llama(), CALIB, shifts), layer_inputs(qmodel, CALIB, shifts)
    for name, shift in shifts.items():
        rows = [(f.reshape(-1, f.shape[-1]), q.reshape(-1, q.shape[-1])) for f, q in zip(floats[name], quantized[name],
                                                                                        strict=True)]
        n = sum(q.shape[0] for _, q in rows)
        want = sum((f - q).double().T @ q.double() for f, q in rows) * (2.0 / n)
        torch.testing.assert_close(shift, want, rtol=1e-4, atol=1e-6, msg=name)
    assert not shifts["model.layers.0.self_attn.q_proj"].any() and shifts["lm_head"].abs().max() > 0
    monkeypatch.setattr(_gptq_layers, "gptq_layer", original)
    plain = lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=[GPTQ(true_sequential=True)], progress=False)
    assert _kl_to_float(qmodel) < _kl_to_float(plain)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Exporting aten")
@pytest.mark.parametrize("config", [W4, weight_only(INT8_WEIGHT)], ids=["int4-g32", "int8-channel"])
def test_onnx_runtime_runs_the_export_to_the_simulated_logits(config, tmp_path):
    qmodel = lowbit.quantize(tiny_llama(), CALIB, config, algorithms=["gptq"], progress=False)
    qmodel.config.use_cache = False  # the file returns logits only
    example = HELD_OUT[0]
    lowbit.export_onnx(qmodel, tmp_path / "m.onnx", example)
    ort = OrtModel(tmp_path / "m.onnx", optimization="basic")  # DQ -> float MatMul, as the simulation
    with torch.no_grad():
        simulated = qmodel(**example).logits
    torch.testing.assert_close(ort(example), simulated, rtol=1e-5, atol=1e-5)


# -- tied weights, save and load ---------------------------------------------------------------
def test_a_tied_lm_head_is_untied_and_the_embedding_keeps_its_values(pair):
    _, gptq = pair
    float_model = tiny_llama()
    assert float_model.lm_head.weight is float_model.model.embed_tokens.weight
    assert gptq.lowbit_summary.reports[-1]["untied"] == ["lm_head"]
    assert gptq.lm_head.weight is not gptq.model.embed_tokens.weight
    assert torch.equal(gptq.model.embed_tokens.weight, float_model.model.embed_tokens.weight)
    assert not torch.equal(gptq.lm_head.weight, float_model.lm_head.weight)  # GPTQ wrote its own
    assert not gptq.config.tie_word_embeddings  # so transformers does not tie them again
    gptq.tie_weights()
    assert gptq.lm_head.weight is not gptq.model.embed_tokens.weight
    assert float_model.config.tie_word_embeddings  # quantize worked on a copy


def test_save_and_load_rebuild_the_gptq_model_bit_for_bit(pair, tmp_path):
    _, gptq = pair
    loaded = lowbit.load(tiny_llama(seed=1), lowbit.save(gptq, tmp_path / "m"))
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight  # GPTQ.rebuild untied it
    saved, mine = gptq.state_dict(), loaded.state_dict()
    assert saved.keys() == mine.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, mine[key]), key
    assert torch.equal(_logits(loaded, HELD_OUT), _logits(gptq, HELD_OUT))
    assert loaded.lowbit_summary.algorithms == gptq.lowbit_summary.algorithms
    assert loaded.lowbit_summary.reports == gptq.lowbit_summary.reports


# -- other layouts -----------------------------------------------------------------------------
def test_blocks_with_masks_of_their_own_are_each_given_theirs(monkeypatch):
    """Qwen2 with a sliding window on its second layer: the two blocks get different masks, so each
    block's keyword arguments are kept, and the Hessians are still the finished model's own."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                      tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    stack = find_blocks(model)
    with torch.no_grad():
        assert _probe(model, stack.blocks, CALIB[0]) == (True, False)  # chained, masks differ
    seen = recording(monkeypatch)
    qmodel = lowbit.quantize(model, CALIB, W4, algorithms=["gptq(true_sequential=true)"], progress=False)
    assert qmodel.lowbit_summary.reports[-1]["untied"] == []
    reference = reference_hessians(qmodel, CALIB, list(seen))
    assert len(seen) == 15
    for name, h in seen.items():
        torch.testing.assert_close(h, reference[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Exporting aten")
def test_the_w4a16_g128_preset_with_ragged_groups_takes_gptq_by_name(tmp_path):
    """hidden 192 = 128 + 64: every group-128 row ends in a short group; the preset quantizes the
    (tied) embedding int8 per row, from its float table, which GPTQ leaves alone."""
    qmodel = lowbit.quantize(tiny_llama(hidden=192), CALIB, "w4a16-g128", algorithms=["gptq"], progress=False)
    report = qmodel.lowbit_summary.reports[-1]
    assert report["mode"] == "blocks" and report["untied"] == ["lm_head"] and len(report["layers"]) == 15
    for name, r in report["layers"].items():
        assert r["kept"] == "gptq" and r["objective_gptq"] < r["objective_rtn"], name
    assert qmodel.lm_head.weight_quantizer.scale.shape == (VOCAB, 2)  # 128 + 64
    assert torch.equal(qmodel.model.embed_tokens.weight, tiny_llama(hidden=192).model.embed_tokens.weight)
    qmodel.config.use_cache = False
    lowbit.export_onnx(qmodel, tmp_path / "m.onnx", HELD_OUT[0])
    with torch.no_grad():
        simulated = qmodel(**HELD_OUT[0]).logits
    ort = OrtModel(tmp_path / "m.onnx", optimization="basic")
    torch.testing.assert_close(ort(HELD_OUT[0]), simulated, rtol=1e-5, atol=1e-5)


# -- the steps ---------------------------------------------------------------------------------
def test_the_steps_are_registered_and_round_trip():
    assert STEPS["gptq"] is GPTQ and GPTQ.phase == CALIBRATED and GPTQ.needs_data
    assert STEPS["rtn"] is RTN and RTN.phase == CALIBRATED and not RTN.needs_data
    step = GPTQ(block_size=64, damp=0.05, act_order=False, static_groups=False, true_sequential=True,
                batches=8)
    assert Step.from_dict(json.loads(json.dumps(step.to_dict()))) == step
    assert parse_step(str(step)) == step
    assert str(GPTQ()) == "gptq" and str(GPTQ(damp=0.1)) == "gptq(damp=0.1)" and str(RTN()) == "rtn"
    assert parse_steps("rtn,gptq(batches=2)") == (RTN(), GPTQ(batches=2))
    assert GPTQ(damp=1) == GPTQ(damp=1.0)


@pytest.mark.parametrize("bad, message", [
    ("gptq(block_size=0)", r"GPTQ.block_size must be an integer >= 1, got 0"),
    ("gptq(damp=0)", r"GPTQ.damp must be a number in \(0.0, 1.0\]"),
    ("gptq(batches=0)", r"GPTQ.batches must be an integer >= 1, got 0"),
    ("gptq(static_groups=false)", r"static_groups=False with act_order=True .* set act_order=False"),
    ("gptq(dampening=0.1)", r"unknown field\(s\) \['dampening'\]; GPTQ takes \['block_size'"),
])
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_steps(bad)


def test_rtn_changes_nothing_and_says_so(pair):
    rtn, _ = pair
    named = lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=["rtn"], progress=False)
    assert "round to nearest" in named.lowbit_summary.reports[-1]
    assert torch.equal(_logits(named, HELD_OUT), _logits(rtn, HELD_OUT))


def test_missing_calibration_data_is_a_clear_error():
    with pytest.raises(ValueError, match=r"gptq needs calibration data \(an iterable"):
        lowbit.quantize(tiny_llama(), None, W4, algorithms=["gptq"], progress=False)
    with pytest.raises(ValueError, match="gptq needs calibration data: got an empty iterable"):
        lowbit.quantize(tiny_llama(), [], W4, algorithms=["gptq"], progress=False)


def test_gptq_searches_ranges_unless_awq_clipped_them(pair):
    _, gptq = pair
    report = gptq.lowbit_summary.reports[-1]
    assert report["clip"] is True
    assert all("clipped" in layer for layer in report["layers"].values())
    both = lowbit.quantize(tiny_llama(), CALIB, W4, algorithms=["awq", "gptq"], progress=False)
    after_awq = both.lowbit_summary.reports[-1]
    assert after_awq["clip"] is False and not any("clipped" in layer for layer in after_awq["layers"].values())
