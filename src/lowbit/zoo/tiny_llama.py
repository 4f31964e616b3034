"""A tiny random Llama (``LlamaForCausalLM``) for tests of LLM algorithms, and a byte tokenizer.

``tiny_llama()`` has SmolLM2's structure in miniature: grouped-query attention (4 query heads
sharing 2 key/value heads), a SiLU-gated MLP, RMSNorm, rotary positions, and the input
embedding tied to ``lm_head``.  It builds in milliseconds; its weights are random (seeded), so
it measures algorithms (reconstruction error, export agreement), not language.  Its widths are
chosen to exercise the awkward cases: the MLP's 160 columns are not a multiple of 128 (a group-128
quantizer gets a short last group), nor of 64.

``ByteTokenizer`` maps text to its UTF-8 bytes, one token per byte: exactly the default 256-token
vocabulary, so real text (``lowbit.zoo.english_text``) can be fed to the tiny model through the
same helpers as to SmolLM2 (``token_windows``, ``calibration_batches``).

Example::

    from lowbit.zoo import tiny_llama, ByteTokenizer, token_windows
    model = tiny_llama(seed=0)                       # 2 layers, hidden 64
    ids = token_windows(ByteTokenizer(), "some text " * 100, window=64)
    logits = model(ids).logits                       # (n, 64, 256)
"""

from __future__ import annotations

import torch
from torch import nn

from ._optional import import_optional

INSTALL_HINT = "pip install transformers  (or the lowbit[zoo] extra)"

# Fields of transformers.LlamaConfig; any of them can be overridden through tiny_llama(**overrides).
DEFAULTS = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 160,  # not a multiple of 128 or 64: group-wise quantizers see a ragged group
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, as in SmolLM2 (9 heads, 3 KV heads)
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A small random ``LlamaForCausalLM`` in eval mode, float32, built from ``DEFAULTS``.

    Args:
        seed: seeds the weight initialisation (the global torch RNG is left as it was).
        **overrides: ``LlamaConfig`` fields replacing the defaults, e.g. ``num_hidden_layers=4``
            or ``tie_word_embeddings=False``.

    Returns:
        The model; the same ``seed`` and overrides give the same weights.

    Example::

        model = tiny_llama(seed=1, hidden_size=128, intermediate_size=352)
    """
    transformers = import_optional("transformers", "lowbit.zoo.tiny_llama", INSTALL_HINT)
    config = transformers.LlamaConfig(**{**DEFAULTS, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.float().eval()


class ByteTokenizer:
    """Text to UTF-8 bytes and back: token ``i`` is byte ``i`` (vocabulary 256, no special tokens).

    Called like a Hugging Face tokenizer (``tokenizer(text)["input_ids"]``, ``return_tensors="pt"``
    for a ``(1, n)`` LongTensor), so the zoo's text helpers accept it.
    """

    vocab_size = 256

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None) -> dict:
        ids = list(text.encode("utf-8"))
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids], dtype=torch.long)}
        if return_tensors is not None:
            raise ValueError(f"ByteTokenizer: return_tensors must be None or 'pt', got {return_tensors!r}")
        return {"input_ids": ids}

    def decode(self, ids) -> str:
        """The text of ``ids`` (a list or tensor of byte values); broken UTF-8 becomes U+FFFD."""
        return bytes(torch.as_tensor(ids).flatten().tolist()).decode("utf-8", errors="replace")
