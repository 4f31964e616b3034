"""The token embedding read from the output head's quantized table (one table, as the float model
stores one when its head is tied to the embedding).

Causal LMs such as SmolLM2 tie ``lm_head`` to the token embedding.  Quantizing the two on their own
grids (the presets: the head group-wise at 4 bits, the embedding int8 per row) stores the table
twice, and the int8 copy is a fifth of a 4-bit SmolLM2's file.  ``tie_embedding`` makes the
embedding hold the head's weight Parameter and weight quantizer, so the embedding looks up rows of
exactly the weights the head multiplies with, GPTQ's or AWQ's changes included; ``export_llm`` then
writes the table once (``MatMulNBits`` for the head, ``com.microsoft.GatherBlockQuantized`` on the
same initializer for the embedding) and ``lowbit.save`` stores it once.

Run it after the steps that change the head's weight (GPTQ unties the head to write its own weight;
this ties them again): ``algorithms=["gptq", "tie_embedding"]``.
"""

from __future__ import annotations

from torch import nn

from ..nn.modules import QuantEmbedding, QuantLinear


def _module(model: nn.Module, name: str | None, getter: str, role: str) -> tuple[str, nn.Module]:
    """``(name, module)``: ``model.get_submodule(name)``, or the Hugging Face getter's module when None."""
    if name is None:
        found = getattr(model, getter, lambda: None)()
        if found is None:
            raise ValueError(f"tie_embedding: {type(model).__name__} has no {getter}(); name the {role} "
                             f"({role}=...)")
        name = next(n for n, m in model.named_modules() if m is found)
    return name, model.get_submodule(name)


def tie_embedding(model: nn.Module, embedding: str | None = None, head: str | None = None) -> dict:
    """Make the embedding ``embedding`` (default: ``model.get_input_embeddings()``) hold the weight
    and the weight quantizer of the output head ``head`` (default: ``model.get_output_embeddings()``),
    in place.  Both must be lowbit layers (a ``QuantEmbedding``, a ``QuantLinear`` with a weight
    quantizer) of the same shape; the head's quantizer applies to the embedding's ``(vocab, hidden)``
    table as to the head's ``(out, in)`` weight, which is the same array.

    Returns:
        ``{"embedding": name, "head": name}``, for the report and ``rebuild``.

    Raises:
        ValueError: a module missing, not quantized, or of another shape.
    """
    embed_name, embed = _module(model, embedding, "get_input_embeddings", "embedding")
    head_name, out = _module(model, head, "get_output_embeddings", "head")
    if not isinstance(embed, QuantEmbedding):  # (a config that leaves it float: a value, not a type, error)
        raise ValueError(f"tie_embedding: {embed_name} is a {type(embed).__name__}, not a quantized "  # noqa: TRY004
                         "embedding; give the config a rule for type:Embedding (the presets have one)")
    if not isinstance(out, QuantLinear) or out.weight_quantizer is None or out.weight_quantizer.mode == "disabled":
        raise ValueError(f"tie_embedding: {head_name} has no quantized weight to share; quantize it (the presets do)")
    if tuple(embed.weight.shape) != tuple(out.weight.shape):
        raise ValueError(f"tie_embedding: {embed_name} is {tuple(embed.weight.shape)} and {head_name} "
                         f"{tuple(out.weight.shape)}; a tied table needs one shape")
    embed.weight = out.weight
    embed.weight_quantizer = out.weight_quantizer
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False  # tied here, by lowbit; transformers must not tie them its own way
    return {"embedding": embed_name, "head": head_name}
