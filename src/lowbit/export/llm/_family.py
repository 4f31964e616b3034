"""Where each decoder-only family keeps its parts: the one model-specific table of the LLM exporter.

A ``Family`` names, as attribute paths, the modules of a Hugging Face ``*ForCausalLM`` that the
graph builder reads (embedding, decoder layers, final norm, head, rotary embedding) and, inside
one decoder layer, the norms, the attention projections and the gated MLP.  Everything else
(head counts, widths, epsilon) is read from the model's config through ``Shape``.  A family
whose layers differ only in these names is one more table entry; one that differs in structure
(a fused QKV Linear, a non-gated MLP, parallel attention) needs builder code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, kw_only=True)
class Family:
    """Attribute paths of one family's modules (from the CausalLM, then from one decoder layer)."""

    name: str
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    attention: str = "self_attn"


# model_type (config.model_type) -> family.  SmolLM2 is "llama".
FAMILIES: dict[str, Family] = {"llama": Family(name="llama")}

ROPE_TYPES = ("default", "linear", "llama3")  # fixed frequencies: one cos/sin table serves every length


@dataclass(frozen=True)
class Shape:
    """The sizes the graph needs, read from the model's config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    eps: float
    scale: float  # attention logits are multiplied by this (head_dim ** -0.5 in Llama)
    max_length: int  # rows of the rotary cos/sin tables: the longest sequence the file runs


def get(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (AttributeError naming the path when it is missing)."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(f"{type(root).__name__} has no {path!r} (missing {part!r})")
        module = getattr(module, part)
    return module


def family_of(model: nn.Module) -> Family:
    """The ``Family`` of a Hugging Face causal LM, by ``config.model_type``.

    Raises:
        TypeError: not a Hugging Face model with a config, or a family not in ``FAMILIES``.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"export_llm needs a Hugging Face causal LM (a model with .config.model_type), got "
                        f"{type(model).__name__}; export other models with lowbit.export_onnx")
    if model_type not in FAMILIES:
        raise TypeError(f"export_llm: model family {model_type!r} ({type(model).__name__}) is not supported; "
                        f"supported: {', '.join(sorted(FAMILIES))}. A family laid out like Llama is one entry in "
                        "lowbit.export.llm._family.FAMILIES")
    return FAMILIES[model_type]


def shape_of(model: nn.Module, family: Family, max_length: int | None) -> Shape:
    """The ``Shape`` of ``model``; checks what the builder assumes (SiLU MLP, fixed rotary frequencies).

    Raises:
        ValueError: an activation other than SiLU, a rotary embedding whose frequencies depend on
            the sequence length, or widths that do not add up (naming the config field).
    """
    c = model.config
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"export_llm: hidden_act {c.hidden_act!r} is not supported (the builder writes SiLU)")
    if heads % kv_heads:
        raise ValueError(f"export_llm: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    rope = getattr(get(model, family.rotary), "rope_type", "default")
    if rope not in ROPE_TYPES:
        raise ValueError(f"export_llm: rope type {rope!r} changes its frequencies with the sequence length; "
                         f"the file holds one cos/sin table (supported: {', '.join(ROPE_TYPES)})")
    layer0 = get(model, family.layers)[0]
    attention = get(layer0, family.attention)
    norm = get(layer0, family.input_norm)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or c.rms_norm_eps
    length = max_length or c.max_position_embeddings
    return Shape(hidden=c.hidden_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=c.vocab_size,
                 layers=len(get(model, family.layers)), eps=float(eps),
                 scale=float(getattr(attention, "scaling", head_dim ** -0.5)), max_length=int(length))


@torch.no_grad()
def rotary_tables(model: nn.Module, family: Family, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions ``0..max_length-1``, ``(max_length, head_dim / 2)`` each, as the
    model's own rotary module computes them (its scaling and ``attention_scaling`` included).

    GroupQueryAttention rotates the two halves of each head (``rotary_interleaved=0``, HF's
    ``rotate_half``) and takes only the first half of the frequencies, which repeat in the second.
    """
    rotary = get(model, family.rotary)
    positions = torch.arange(shape.max_length).unsqueeze(0)
    probe = torch.zeros(1, 1, shape.head_dim, dtype=torch.float32)
    cos, sin = rotary(probe, positions)
    if cos.shape[-1] != shape.head_dim:
        raise ValueError(f"export_llm: the rotary embedding covers {cos.shape[-1]} of {shape.head_dim} head "
                         "dimensions (partial rotary) which the builder does not write")
    half = shape.head_dim // 2
    if not torch.equal(cos[0, :, :half], cos[0, :, half:]):
        raise ValueError("export_llm: the rotary frequencies differ between the two halves of a head; "
                         "GroupQueryAttention needs HF's rotate_half layout")
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()
