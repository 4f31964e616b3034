"""``export_llm``: a decoder-only LM (Llama family) -> one ONNX graph for prefill and decode.

The graph is written node by node from the model's weights and, for quantized layers, the
integers the simulation uses (``integer_params()``): no tracing.  Inputs and outputs:

* ``input_ids`` int64 ``(batch, sequence_length)``;
* ``attention_mask`` int64 ``(batch, total_sequence_length)``: ones over past and new tokens;
* ``past_key_values.<i>.key`` / ``.value`` float ``(batch, kv_heads, past_sequence_length, head_dim)``
  per layer (``past_sequence_length`` 0 for the prompt);
* outputs ``logits`` float ``(batch, sequence_length, vocab)`` and ``present.<i>.key`` / ``.value``
  ``(batch, kv_heads, total_sequence_length, head_dim)``, the next step's past.

The same builder writes a float model (plain ``MatMul``) when given the float model, so the FP32
baseline runs the same fused ops (GroupQueryAttention, SkipSimplifiedLayerNormalization) and a
latency comparison measures the weights alone.  ``lowbit.export.llm.generate`` runs the file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import onnx
from torch import nn

from ...nn.modules import tied_table
from .. import _external
from . import _family
from ._layers import Context, write_decoder, write_embedding, write_mask_lengths
from ._linear import ACCURACY_LEVELS, fusable, prepare, write_linear, write_nbits
from ._writer import GraphWriter

log = logging.getLogger(__name__)

OPSET = 23  # RMSNormalization (the first norm); every other op is unchanged since opset 13-21
FLOAT, INT64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


def _inputs(w: GraphWriter, shape: _family.Shape) -> tuple[str, str, list[tuple[str, str]]]:
    ids = w.input("input_ids", INT64, ["batch_size", "sequence_length"])
    mask = w.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
    cache = ["batch_size", shape.kv_heads, "past_sequence_length", shape.head_dim]
    past = [(w.input(f"past_key_values.{i}.key", FLOAT, cache), w.input(f"past_key_values.{i}.value", FLOAT, cache))
            for i in range(shape.layers)]
    return ids, mask, past


def _outputs(w: GraphWriter, shape: _family.Shape) -> None:
    w.output("logits", FLOAT, ["batch_size", "sequence_length", shape.vocab])
    cache = ["batch_size", shape.kv_heads, "total_sequence_length", shape.head_dim]
    for i in range(shape.layers):
        w.output(f"present.{i}.key", FLOAT, cache)
        w.output(f"present.{i}.value", FLOAT, cache)


def build_llm(model: nn.Module, *, accuracy_level: int = 4, max_length: int | None = None,
              fuse: bool = False, block_size: int | None = None) -> onnx.ModelProto:
    """The ONNX model of ``model`` (see ``export_llm``), not written anywhere."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"export_llm: accuracy_level must be one of {ACCURACY_LEVELS} (MatMulNBits: 0 unset, "
                         f"1 fp32, 2 fp16, 3 bf16, 4 int8), got {accuracy_level!r}")
    family = _family.family_of(model)
    shape = _family.shape_of(model, family, max_length)
    w = GraphWriter()
    ids, mask, past = _inputs(w, shape)
    seqlens_k, total = write_mask_lengths(w, mask)
    cos, sin = _family.rotary_tables(model, family, shape)
    linears = {"quantized": 0, "float": 0}

    def project(modules: list[tuple[str, nn.Module]], x: str, fused_name: str, **kwargs) -> list[str]:
        parts = [(name, m, prepare(m, name, block_size)) for name, m in modules]
        for _, _, nb in parts:
            linears["float" if nb is None else "quantized"] += 1
        if len(parts) > 1 and fuse and fusable([nb for _, _, nb in parts]):
            return [write_linear(w, parts, x, fused_name, accuracy_level=accuracy_level)]
        return [write_linear(w, [part], x, part[0], accuracy_level=accuracy_level, **kwargs) for part in parts]

    ctx = Context(family=family, shape=shape, project=project, past=past, seqlens_k=seqlens_k, total=total,
                  cos=w.const("cos_cache", cos.numpy()), sin=w.const("sin_cache", sin.numpy()))
    embed, head = _family.get(model, family.embed), _family.get(model, family.lm_head)
    shared = None
    if tied_table(embed, head):  # one quantized table: the head's MatMulNBits initializers, gathered
        nb = prepare(head, family.lm_head, block_size)
        shared = (nb, write_nbits(w, family.lm_head, nb))
    x, table = write_embedding(w, embed, ids, family.embed, tied=shared)
    hidden = write_decoder(w, model, x, ctx)
    tied_t = None
    if table is not None and getattr(head, "weight", None) is embed.weight:  # a float head tied to the table
        tied_t = w.node("Transpose", [table], name=f"{family.lm_head}/Transpose", perm=[1, 0])
    project([(family.lm_head, head)], hidden, family.lm_head, float_weight_t=tied_t,
            nbits_consts=None if shared is None else shared[1], output="logits")
    _outputs(w, shape)
    log.info("export_llm: %d Linears in MatMulNBits, %d in float MatMul (accuracy_level %d, fuse %s)",
             linears["quantized"], linears["float"], accuracy_level, fuse)
    metadata = {"lowbit.family": family.name, "lowbit.accuracy_level": str(accuracy_level),
                "lowbit.max_length": str(shape.max_length), "lowbit.fused": str(int(fuse)),
                "lowbit.quantized_linears": str(linears["quantized"]), "lowbit.float_linears": str(linears["float"])}
    return w.model(opset=OPSET, graph_name=f"lowbit-{family.name}", producer="lowbit", metadata=metadata)


def export_llm(model: nn.Module, path: str | os.PathLike, *, accuracy_level: int = 4,
               max_length: int | None = None, fuse: bool = False, block_size: int | None = None) -> onnx.ModelProto:
    """Write a Hugging Face causal LM (Llama family), quantized by lowbit or float, as one ONNX
    graph with a KV cache that ONNX Runtime runs for prefill and for one-token decode steps.

    Each Linear whose weight lowbit quantized (weight-only presets: ``w4a16-g128``, ``w4a16-g32``,
    ``w3a16-g128``, ``w8a16``) becomes ``com.microsoft.MatMulNBits`` holding exactly the
    simulation's integer codes and scales (``lm_head`` included); float Linears stay ``MatMul``.
    The embedding gathers rows of its (int8 or float) table.  Attention is
    ``GroupQueryAttention`` with its rotary embedding; norms are RMSNorm / SkipSimplifiedLayerNorm.

    Args:
        model: a ``LlamaForCausalLM`` (or a family in ``lowbit.export.llm.FAMILIES``), float or as
            returned by ``lowbit.quantize(model, None, "w4a16-g128")``.
        path: the ``.onnx`` file to write (with ``<path>.data`` beside it above 2 GiB).
        accuracy_level: MatMulNBits' ``accuracy_level``: 4 (default) lets ONNX Runtime round the
            activations to int8 per block and run integer kernels: fastest, and an error on top of
            the plain simulation's (SmolLM2 W4 g128 RTN, benchmarks/bench_llm_export.py on an Intel
            Xeon with ORT 1.32: perplexity 2.3% higher); simulate it with
            ``with lowbit.runtime.matmulnbits_inputs(model, 4): ...``, which rounds each layer's input
            exactly as ORT does.  0 keeps them float: the plain simulation's logits up to float
            rounding, slower to decode (8-bit weights at 0 are dequantized whole at every call:
            avoid that pair).
        max_length: the longest sequence (past + new tokens) the file runs: rows of the rotary
            tables; default ``config.max_position_embeddings``.
        fuse: write q/k/v as one MatMul(NBits) feeding GroupQueryAttention packed, and gate/up as
            one followed by a Split, where their weights share a layout (bits, block, K): the same
            numbers with fewer kernels, but measured no faster on SmolLM2 (decode the same, prefill
            a few percent slower: the Split and the packed-QKV path cost more than the launches
            saved).  Default False: one node per Linear.
        block_size: MatMulNBits' block, a power of two >= 16 dividing every group size (None: the
            group size; 128 or the largest power of two dividing K for per-channel weights).  A
            block smaller than the group repeats its scale, the same weights in a larger file; at
            accuracy_level 4 the activations are then rounded per block of that size: closer to
            the simulation, slower.

    Returns:
        The ModelProto written.

    Raises:
        TypeError: not a Hugging Face causal LM, a family not supported, or an unexpected layer.
        ValueError: a layer quantized in a way MatMulNBits cannot hold (activations quantized, a
            group size that is not a power of two >= 16 ...), named with the fix.

    Example::

        qmodel = lowbit.quantize(model, None, "w4a16-g128")
        export_llm(qmodel, "smollm2.int4.onnx")
        ids = generate(load_session("smollm2.int4.onnx"), [[1, 2, 3]], max_new_tokens=8)

    The attention mask must be all ones (no padding): GroupQueryAttention takes each row's
    positions from its count of ones.  Several new tokens after a cache (chunked prefill) run at
    batch 1 only (ONNX Runtime 1.32's GroupQueryAttention refuses larger batches there).
    """
    onnx_model = build_llm(model, accuracy_level=accuracy_level, max_length=max_length, fuse=fuse,
                           block_size=block_size)
    _external.save(onnx_model, path)
    log.info("export_llm: wrote %s (%.1f MB)", path, os.path.getsize(path) / 1e6)
    return onnx_model


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type (e.g. to check every quantized Linear became MatMulNBits)."""
    return dict(Counter(n.op_type for n in model.graph.node).most_common())
