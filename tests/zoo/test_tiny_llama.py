"""tiny_llama: a small random Llama for algorithm tests; ByteTokenizer: text <-> UTF-8 bytes."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers: pip install -c constraints.txt transformers")

from lowbit.zoo.tiny_llama import DEFAULTS, ByteTokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shape_gqa_and_tied_head():
    model = tiny_llama()
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (2, 64, 256)
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)  # grouped-query attention
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.k_proj.out_features == attn.v_proj.out_features == 32 == attn.q_proj.out_features // 2
    assert mlp.down_proj.in_features == 160 and 160 % 128 and 160 % 64  # a ragged group at 128 and 64
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_seed_fixes_the_weights_and_leaves_the_global_rng_alone():
    tiny_llama()  # the first build imports transformers' Llama code; time a later one
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    start = time.perf_counter()
    a = tiny_llama(seed=0)
    assert time.perf_counter() - start < 1.0
    torch.testing.assert_close(torch.rand(3), expected_next, rtol=0, atol=0)  # global RNG untouched
    b, c = tiny_llama(seed=0), tiny_llama(seed=1)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(),
                                  strict=True):
        assert torch.equal(pa, pb), name
        if name.endswith("proj.weight"):
            assert not torch.equal(pa, pc), name


def test_overrides_reach_the_config():
    model = tiny_llama(num_hidden_layers=3, hidden_size=32, intermediate_size=96, tie_word_embeddings=False)
    assert len(model.model.layers) == 3 and model.config.hidden_size == 32
    assert model.model.layers[0].mlp.up_proj.out_features == 96
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert DEFAULTS["tie_word_embeddings"] is True  # the defaults themselves are not changed


def test_forward_and_generate_with_the_byte_tokenizer():
    model, tok = tiny_llama(), ByteTokenizer()
    ids = tok("Hello, world", return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 12) and ids.dtype == torch.long
    assert model(ids).logits.shape == (1, 12, 256)
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17) and torch.equal(out[:, :12], ids)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — 景太郎\n"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8")) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text == tok.decode(torch.tensor([ids]))
    assert tok.decode([0xE6]) == "\ufffd"  # a cut multi-byte character does not raise
    with pytest.raises(ValueError, match="return_tensors"):
        tok(text, return_tensors="np")
