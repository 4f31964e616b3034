"""export_llm on tiny random Llamas (lowbit.zoo.tiny_llama): the file passes onnx.checker, ONNX Runtime
runs it, its logits equal lowbit's PyTorch simulation (and the float model's), decoding with the KV
cache equals a full re-run, and every quantized Linear is a MatMulNBits.

Tolerances (logits of these models reach ~1.3): accuracy_level 0 computes in float32 on the same
dequantized weights as the simulation, so only the summation order differs: measured ~3e-7, asserted
1e-5 of the logits' scale.  accuracy_level 4 rounds each MatMulNBits input to int8 per block (a
relative error up to 1/254 per element): measured 4e-3..6e-3 (0.3-0.5% of the scale), asserted 2%.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import lowbit
from lowbit.export import export_llm
from lowbit.export.llm import SharedCache, count_ops, load_session, run_step
from lowbit.nn.modules import QuantLinear
from lowbit.zoo import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = ["w4a16-g32", "w4a16-g128", "w8a16", "w3a16-g128"]
TOL = {0: 1e-5, 4: 2e-2}  # max |ORT - simulation| / max |simulation| (see the module docstring)


@pytest.fixture(scope="module")
def float_model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def qmodels(float_model):
    return {c: lowbit.quantize(float_model, None, c, progress=False) for c in CONFIGS}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _export(model, tmp_path, name="m", **kwargs):
    path = tmp_path / f"{name}.onnx"
    proto = export_llm(model, path, max_length=64, **kwargs)
    return proto, load_session(path, threads=1)


def _simulate(model, ids):
    with torch.no_grad():
        return model(ids).logits.numpy()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_prefill_logits_equal_the_simulation(qmodels, ids, tmp_path, config, accuracy_level):
    model = qmodels[config]
    proto, session = _export(model, tmp_path, accuracy_level=accuracy_level)
    onnx.checker.check_model(proto)
    logits, present = run_step(session, ids.numpy())
    ref = _simulate(model, ids)
    assert logits.shape == ref.shape == (2, 24, 256)
    assert np.abs(logits - ref).max() <= TOL[accuracy_level] * np.abs(ref).max()
    assert present["past_key_values.1.value"].shape == (2, 2, 24, 16)  # (batch, kv heads, tokens, head dim)


def test_float_export_equals_the_float_model(float_model, ids, tmp_path):
    proto, session = _export(float_model, tmp_path)
    assert "MatMulNBits" not in count_ops(proto)
    logits, _ = run_step(session, ids.numpy())
    ref = _simulate(float_model, ids)
    assert np.abs(logits - ref).max() <= TOL[0] * np.abs(ref).max()
    # the tied head reads the embedding table: stored once
    assert sum(t.name == "model.embed_tokens.weight" for t in proto.graph.initializer) == 1
    assert not any(t.name.startswith("lm_head") for t in proto.graph.initializer)


@pytest.mark.parametrize("config", ["w4a16-g128", "w8a16"])
def test_every_quantized_linear_is_one_matmulnbits(qmodels, tmp_path, config):
    model = qmodels[config]
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert quantized == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    proto, _ = _export(model, tmp_path)  # the default: one node per Linear
    ops = count_ops(proto)
    assert ops["MatMulNBits"] == quantized and "MatMul" not in ops
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 2 * 2
    assert {a.key: a.value for a in proto.metadata_props}["lowbit.quantized_linears"] == str(quantized)
    bits = {a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {4 if config.startswith("w4") else 8}


def test_fused_projections_give_the_same_logits(qmodels, ids, tmp_path):
    """fuse=True writes q/k/v as one MatMulNBits (packed QKV into GroupQueryAttention) and gate/up as one
    (then a Split): 4 per layer instead of 7, the same numbers."""
    model = qmodels["w4a16-g32"]
    fused, s_fused = _export(model, tmp_path, "fused", fuse=True, accuracy_level=0)
    _, s_plain = _export(model, tmp_path, "plain", fuse=False, accuracy_level=0)
    assert count_ops(fused)["MatMulNBits"] == 2 * 4 + 1
    assert {a.key: a.value for a in fused.metadata_props}["lowbit.quantized_linears"] == "15"
    a, _ = run_step(s_fused, ids.numpy())
    b, _ = run_step(s_plain, ids.numpy())
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_smaller_blocks_hold_the_same_weights(qmodels, ids, tmp_path):
    """block_size=32 on group-128 weights repeats each group's scale over 4 blocks: the same logits
    at accuracy_level 0 (accuracy_level 4 then rounds the activations per 32 values)."""
    model = qmodels["w4a16-g128"]
    _, s_plain = _export(model, tmp_path, "plain", accuracy_level=0)
    small, s_small = _export(model, tmp_path, "small", accuracy_level=0, block_size=32)
    blocks = {a.i for n in small.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {32}
    scales = {t.name: t.dims for t in small.graph.initializer}
    assert scales["model.layers.0.mlp.down_proj.weight.scales"] == [64, 5]  # K = 160: 5 blocks (1 group + 1 short)
    a, _ = run_step(s_plain, ids.numpy())
    b, _ = run_step(s_small, ids.numpy())
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", ["w4a16-g128", None])
def test_decoding_with_the_cache_equals_a_full_rerun(qmodels, float_model, ids, tmp_path, config):
    """Prefill 16 tokens, then 8 one-token steps, each fed the previous step's cache: every step's
    logits equal those of the same position in one run over all 24 tokens."""
    model = float_model if config is None else qmodels[config]
    _, session = _export(model, tmp_path, accuracy_level=4)
    full, full_cache = run_step(session, ids.numpy())
    logits, past = run_step(session, ids[:, :16].numpy())
    np.testing.assert_allclose(logits, full[:, :16], rtol=0, atol=1e-5)
    for t in range(16, 24):
        logits, past = run_step(session, ids[:, t:t + 1].numpy(), past)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=0, atol=1e-5)
    for name, value in past.items():
        np.testing.assert_allclose(value, full_cache[name], rtol=0, atol=1e-5)


def test_a_shared_cache_buffer_gives_the_same_logits(qmodels, ids, tmp_path):
    """SharedCache binds past and present to one buffer (GroupQueryAttention writes in place): the
    same logits as a full re-run, step by step, and again after truncating the cache."""
    _, session = _export(qmodels["w4a16-g128"], tmp_path, accuracy_level=4)
    full, _ = run_step(session, ids.numpy())
    cache = SharedCache(session, batch=2, capacity=24)
    np.testing.assert_allclose(cache.step(ids[:, :16].numpy()), full[:, :16], rtol=0, atol=1e-5)
    for t in range(16, 24):
        np.testing.assert_allclose(cache.step(ids[:, t:t + 1].numpy())[:, 0], full[:, t], rtol=0, atol=1e-5)
    cache.truncate(20)
    np.testing.assert_allclose(cache.step(ids[:, 20:21].numpy())[:, 0], full[:, 20], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the capacity 24"):
        cache.step(ids[:, :4].numpy())


def test_a_chunk_after_the_cache_equals_a_full_rerun(qmodels, ids, tmp_path):
    """Several new tokens after a cache (chunked prefill): GroupQueryAttention takes it at batch 1."""
    _, session = _export(qmodels["w4a16-g32"], tmp_path, accuracy_level=0)
    full, _ = run_step(session, ids[:1].numpy())
    _, past = run_step(session, ids[:1, :10].numpy())
    logits, _ = run_step(session, ids[:1, 10:].numpy(), past)
    np.testing.assert_allclose(logits, full[:, 10:], rtol=0, atol=1e-5)


def test_biases_and_an_untied_head(tmp_path, ids):
    """Attention and MLP biases (MatMulNBits' bias input, fused ones concatenated), a separate lm_head."""
    model = tiny_llama(seed=3, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    for name, m in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(m, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    for qm, fuse in [(model, True), (lowbit.quantize(model, None, "w4a16-g32", progress=False), True),
                     (lowbit.quantize(model, None, "w8a16", progress=False), False)]:
        _, session = _export(qm, tmp_path, fuse=fuse, accuracy_level=0)
        logits, _ = run_step(session, ids.numpy())
        ref = _simulate(qm, ids)
        assert np.abs(logits - ref).max() <= TOL[0] * np.abs(ref).max()


def test_the_file_is_smaller_than_fp32(qmodels, float_model, tmp_path):
    fp32 = len(export_llm(float_model, tmp_path / "f.onnx").SerializeToString())
    int4 = len(export_llm(qmodels["w4a16-g32"], tmp_path / "q.onnx").SerializeToString())
    assert (tmp_path / "q.onnx").stat().st_size == int4
    assert int4 < 0.45 * fp32  # int8 embedding table, int4 linears (the rest, cos/sin tables, stays float)


def test_unsupported_models_and_options_are_refused(float_model, qmodels, tmp_path):
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match="'gpt2'.*not supported.*llama"):
        export_llm(gpt2, tmp_path / "g.onnx")
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        export_llm(torch.nn.Linear(4, 4), tmp_path / "l.onnx")
    with pytest.raises(ValueError, match="accuracy_level"):
        export_llm(qmodels["w4a16-g32"], tmp_path / "a.onnx", accuracy_level=5)
    w8a8 = lowbit.quantize(float_model, None, "w8a8-dynamic", progress=False)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: its input is quantized"):
        export_llm(w8a8, tmp_path / "d.onnx")
    assert not list(tmp_path.glob("*.onnx"))  # nothing written for a refused model
