"""The parts of a Llama-style decoder graph, in the ops ONNX Runtime runs fastest on CPU.

* embedding: ``Gather`` on the float table, or on the int8 table followed by ``Cast`` and ``Mul``
  by the gathered rows' scales (only ``batch x tokens`` rows are dequantized, not the table); a
  group-wise table, or one tied to the quantized head (``lowbit.ptq.tie``; the head's MatMulNBits
  initializers, stored once), is ``com.microsoft.GatherBlockQuantized``;
* norms: the first RMSNorm is ONNX's ``RMSNormalization`` (opset 23); every later one also adds
  the residual: ``com.microsoft.SkipSimplifiedLayerNormalization``, whose 4th output is the sum
  (the next residual);
* attention: q/k/v projections (one fused matmul whose output GroupQueryAttention takes as packed
  QKV, or three) -> ``com.microsoft.GroupQueryAttention`` (rotary embedding inside, from cos/sin
  tables stored as initializers; KV cache ``(batch, kv_heads, seq, head_dim)`` in and out) -> o
  projection;
* MLP: gate and up projections (one fused matmul and a ``Split``, or two), SiLU as ``Sigmoid`` x
  ``Mul`` (ORT fuses it into QuickGelu), ``Mul``, down projection.

GroupQueryAttention reads the sequence lengths from the attention mask: ``seqlens_k`` = number of
ones in each row minus 1 (int32), ``total_sequence_length`` = the mask's width.  With an empty
past it runs the prompt (positions ``0..S-1``, causal), with one new token it appends it at
position ``seqlens_k``; the mask must be all ones (no padding) for the positions to be those of
the unpadded sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from torch import nn

from ...nn.modules import QuantEmbedding
from ._family import Family, Shape, get
from ._linear import NBits, nbits_weight, write_nbits
from ._writer import MS_DOMAIN, GraphWriter


@dataclass(frozen=True)
class Context:
    """What every layer's nodes read: the family table, the sizes, the shared graph values."""

    family: Family
    shape: Shape
    # project([(qualified name, Linear), ...], x, fused name) -> [one output, the parts' outputs
    # concatenated] when it fuses them, else one output per part
    project: Callable[[list[tuple[str, nn.Module]], str, str], list[str]]
    past: list[tuple[str, str]]  # per layer: the past key and value inputs
    seqlens_k: str
    total: str
    cos: str
    sin: str


def write_mask_lengths(w: GraphWriter, mask: str) -> tuple[str, str]:
    """``(seqlens_k, total_sequence_length)`` for GroupQueryAttention from a ``(batch, total)`` mask."""
    base = "attention_mask"
    ones = w.node("ReduceSum", [mask, w.scalar([1], np.int64)], name=f"{base}/ReduceSum", keepdims=0)
    last = w.node("Sub", [ones, w.scalar(1, np.int64)], name=f"{base}/Sub")
    seqlens_k = w.node("Cast", [last], name=f"{base}/seqlens_k", to=onnx.TensorProto.INT32)
    width = w.node("Gather", [w.node("Shape", [mask], name=f"{base}/Shape"), w.scalar(1, np.int64)],
                   name=f"{base}/Gather", axis=0)
    total = w.node("Cast", [width], name=f"{base}/total_sequence_length", to=onnx.TensorProto.INT32)
    return seqlens_k, total


def write_embedding(w: GraphWriter, module: nn.Module, ids: str, name: str,
                    tied: tuple[NBits, list[str]] | None = None) -> tuple[str, str | None]:
    """``module(ids)``; returns the output and, for a float table, its name (a tied float head reads it).
    ``tied``: the head's MatMulNBits weight and its initializers, which the table is (``tie_embedding``)."""
    if not isinstance(module, nn.Embedding) or module.max_norm is not None:
        raise TypeError(f"{name}: export_llm expects an nn.Embedding without max_norm, got {module!r}")
    q = module.weight_quantizer if isinstance(module, QuantEmbedding) else None
    if q is None or q.mode == "disabled":
        table = w.const(f"{name}.weight", module.weight.detach().float().numpy())
        return w.node("Gather", [table, ids], name=f"{name}/Gather", axis=0), table
    if module.output_quantizer is not None and module.output_quantizer.mode != "disabled":
        raise ValueError(f"{name}: its output is quantized; export_llm writes float activations (weight-only)")
    if tied is not None:
        return _gather_blocks(w, *tied, ids, name), None
    ip = module.integer_params().weight
    spec = ip.spec
    if spec.granularity == "group" and spec.resolved_axis(2, name) == 1:
        nb = nbits_weight(ip, name)
        return _gather_blocks(w, nb, write_nbits(w, name, nb), ids, name), None
    if spec.granularity == "group" or (spec.granularity == "channel" and spec.resolved_axis(2, name) != 0):
        raise ValueError(f"{name}: the table is quantized {spec.describe()}; export_llm writes a table with one "
                         "scale per row (or per tensor), or group-wise along the hidden axis (axis 1)")
    values = w.const(f"{name}.weight.quantized", ip.values.numpy())
    rows = w.node("Cast", [w.node("Gather", [values, ids], name=f"{name}/Gather", axis=0)], name=f"{name}/Cast",
                  to=onnx.TensorProto.FLOAT)
    per_row = spec.granularity == "channel"
    params = {"zero_point": ip.zero_point.float().numpy(), "scale": ip.scale.float().numpy()}
    if per_row:
        params = {k: v.reshape(-1, 1) for k, v in params.items()}  # (vocab, 1): gathered as (batch, seq, 1)

    def param(kind: str) -> str:
        const = w.const(f"{name}.weight.{kind}", params[kind])
        return w.node("Gather", [const, ids], name=f"{name}/Gather_{kind}", axis=0) if per_row else const

    if np.any(params["zero_point"]):
        rows = w.node("Sub", [rows, param("zero_point")], name=f"{name}/Sub")
    return w.node("Mul", [rows, param("scale")], name=f"{name}/Mul"), None


def _gather_blocks(w: GraphWriter, nb: NBits, consts: list[str], ids: str, name: str) -> str:
    """Rows ``ids`` of a table in MatMulNBits form (``consts``: its B and scales initializers), as
    ``com.microsoft.GatherBlockQuantized`` reads B ``(rows, k_blocks, bytes)``: blocks along the last
    axis, scales ``(rows, k_blocks, 1)`` (a Reshape of MatMulNBits' ``(rows, k_blocks)``), then the
    gathered ``(batch, seq, k_blocks, block)`` as ``(batch, seq, K)``."""
    packed, scales, zero_points = consts
    if zero_points:
        raise ValueError(f"{name}: a table read by GatherBlockQuantized must be symmetric (no zero points); "
                         "quantize it with a symmetric spec")
    blocks = nb.scales.shape[1]
    scales = w.node("Reshape", [scales, w.scalar([nb.n, blocks, 1], np.int64)], name=f"{name}/Reshape_scales")
    rows = w.node("GatherBlockQuantized", [packed, ids, scales], name=f"{name}/GatherBlockQuantized",
                  domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=nb.block_size, bits=nb.bits)
    flat = w.node("Reshape", [rows, w.scalar([0, 0, blocks * nb.block_size], np.int64)], name=f"{name}/Reshape")
    if blocks * nb.block_size == nb.k:
        return flat
    return w.node("Slice", [flat, w.scalar([0], np.int64), w.scalar([nb.k], np.int64), w.scalar([2], np.int64)],
                  name=f"{name}/Slice")


def write_norm(w: GraphWriter, module: nn.Module, x: str, name: str, eps: float,
               residual: str | None = None, last: bool = False) -> tuple[str, str | None]:
    """RMSNorm of ``x`` (of ``x + residual`` when given); returns (normalized, the sum or None)."""
    weight = w.const(f"{name}.weight", module.weight.detach().float().numpy())
    if residual is None:
        return w.node("RMSNormalization", [x, weight], name=f"{name}/RMSNormalization", axis=-1,
                      epsilon=eps, stash_type=1), None
    outputs = [f"{name}/output_0"] if last else [f"{name}/output_0", "", "", f"{name}/output_3"]
    out = w.node("SkipSimplifiedLayerNormalization", [x, residual, weight], name=f"{name}/SkipSimplifiedLayerNorm",
                 outputs=outputs, domain=MS_DOMAIN, epsilon=eps)
    return (out, None) if last else (out[0], out[3])


def write_attention(w: GraphWriter, layer: nn.Module, i: int, x: str, ctx: Context) -> str:
    """One layer's attention on the normalized ``x``: q/k/v, GroupQueryAttention, o; returns o's output."""
    fam, shape = ctx.family, ctx.shape
    prefix = f"{fam.layers}.{i}"
    qkv = ctx.project([(f"{prefix}.{p}", get(layer, p)) for p in (fam.q_proj, fam.k_proj, fam.v_proj)], x,
                      f"{prefix}.{fam.attention}.qkv_proj")
    q, k, v = qkv if len(qkv) == 3 else (qkv[0], "", "")  # one packed QKV input when fused
    past_k, past_v = ctx.past[i]
    attn = w.node(
        "GroupQueryAttention",
        [q, k, v, past_k, past_v, ctx.seqlens_k, ctx.total, ctx.cos, ctx.sin],
        name=f"{prefix}.{fam.attention}/GroupQueryAttention", domain=MS_DOMAIN,
        outputs=[f"{prefix}.{fam.attention}/output_0", f"present.{i}.key", f"present.{i}.value"],
        num_heads=shape.heads, kv_num_heads=shape.kv_heads, scale=shape.scale, do_rotary=1,
        rotary_interleaved=0, local_window_size=-1)[0]
    return ctx.project([(f"{prefix}.{fam.o_proj}", get(layer, fam.o_proj))], attn, f"{prefix}.{fam.o_proj}")[0]


def write_mlp(w: GraphWriter, layer: nn.Module, i: int, x: str, ctx: Context) -> str:
    """One layer's gated MLP on the normalized ``x``: ``down(silu(gate(x)) * up(x))``."""
    fam = ctx.family
    prefix = f"{fam.layers}.{i}"
    mlp = f"{prefix}.{fam.gate_proj.rsplit('.', 1)[0]}"
    gate_up = ctx.project([(f"{prefix}.{p}", get(layer, p)) for p in (fam.gate_proj, fam.up_proj)], x,
                          f"{mlp}.gate_up_proj")
    if len(gate_up) == 1:  # fused: split the concatenated outputs
        width = get(layer, fam.gate_proj).out_features
        gate_up = w.node("Split", [gate_up[0], w.scalar([width, width], np.int64)], name=f"{mlp}/Split",
                         outputs=2, axis=-1)
    gate, up = gate_up
    silu = w.node("Mul", [gate, w.node("Sigmoid", [gate], name=f"{mlp}/act/Sigmoid")], name=f"{mlp}/act/Mul")
    hidden = w.node("Mul", [silu, up], name=f"{mlp}/Mul")
    return ctx.project([(f"{prefix}.{fam.down_proj}", get(layer, fam.down_proj))], hidden,
                       f"{prefix}.{fam.down_proj}")[0]


def write_decoder(w: GraphWriter, model: nn.Module, x: str, ctx: Context) -> str:
    """Every decoder layer and the final norm on the embeddings ``x``; returns the normalized output."""
    fam = ctx.family
    eps = ctx.shape.eps
    layers = get(model, fam.layers)
    residual, pending = x, None  # pending: the last sub-block's output, not yet added to the residual
    for i, layer in enumerate(layers):
        prefix = f"{fam.layers}.{i}"
        h, total = write_norm(w, get(layer, fam.input_norm), pending or x, f"{prefix}.{fam.input_norm}", eps,
                              residual=None if pending is None else residual)
        residual = total or residual
        attn = write_attention(w, layer, i, h, ctx)
        h, residual = write_norm(w, get(layer, fam.post_attention_norm), attn,
                                 f"{prefix}.{fam.post_attention_norm}", eps, residual=residual)
        pending = write_mlp(w, layer, i, h, ctx)
    out, _ = write_norm(w, get(model, fam.final_norm), pending, fam.final_norm, eps, residual=residual, last=True)
    return out
