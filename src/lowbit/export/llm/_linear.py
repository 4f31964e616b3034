"""Linear layers as ONNX Runtime's ``com.microsoft.MatMulNBits`` (quantized) or ``MatMul`` (float).

MatMulNBits (ORT 1.32 schema) holds the weight ``W`` (``N`` outputs x ``K`` inputs, a Linear's own
layout) as unsigned ``bits``-wide codes, blockwise along K: ``B`` is uint8 ``(N, k_blocks,
block_size * bits / 8)`` with ``k_blocks = ceil(K / block_size)``, two 4-bit codes a byte (the first
in the low nibble); ``scales`` float ``(N, k_blocks)``; ``zero_points`` optional (uint8, packed like
``B`` along the blocks), default ``2 ** (bits - 1)``.  It computes ``A @ ((B - zero_point) * scale).T``.
``block_size`` must be a power of two >= 16; K need not be a multiple of it (a ragged last block).

From lowbit's integers (``layer.integer_params()``, exactly the codes the simulation dequantizes):

* the container: 4 bits for grids of 2-4 bits, 8 bits for 5-8 bits (ORT's CPU kernels take 4 and 8;
  a 3-bit grid (-4..3) is stored in 4-bit codes, exactly, at 4 bits' size and speed);
* a signed code ``v`` becomes ``v + 2 ** (bits - 1)`` and its zero-point ``z`` likewise, so a
  symmetric grid (``z = 0``) lands on the default zero-point and the file stores none;
* group-wise weights keep their groups as blocks (``group_size`` must be a power of two >= 16);
  per-channel and per-tensor scales are repeated over blocks of the largest power of two <= 128
  dividing K (128 when none >= 16 does);
* a ragged last block is padded with its zero-point's code, which dequantizes to exactly 0.

A float Linear is ``MatMul(x, W.T)`` (+ ``Add`` for a bias); a float ``lm_head`` tied to a float
embedding reads the embedding's table through a ``Transpose`` (stored once, as in the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...nn.integer import IntegerTensor
from ...nn.modules import QuantLinear
from ._writer import MS_DOMAIN, GraphWriter

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute


@dataclass(frozen=True)
class NBits:
    """One weight in MatMulNBits form (see the module docstring)."""

    packed: np.ndarray  # uint8 (N, k_blocks, block_size * bits // 8)
    scales: np.ndarray  # float32 (N, k_blocks)
    zero_points: np.ndarray | None  # uint8 (N, ceil(k_blocks * bits / 8)), or None: the default
    bits: int
    block_size: int
    k: int
    n: int


def _is_block(size: int) -> bool:
    return size >= 16 and size & (size - 1) == 0


def _default_block(k: int) -> int:
    """Block for weights without groups: the largest power of two <= 128 dividing K, else 128."""
    return next((b for b in (128, 64, 32, 16) if k % b == 0), 128)


def _check_block(block: int, group: int | None, layer: str) -> None:
    if not _is_block(block):
        raise ValueError(f"{layer}: block size {block} is not a MatMulNBits block (a power of two >= 16)")
    if group is not None and group % block:
        raise ValueError(f"{layer}: block size {block} does not divide the weight's group size {group}; pass a "
                         "block_size that does (or None for the group size)")


def _blocked_params(w: IntegerTensor, k: int, layer: str,
                    block: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scale and zero-point per (row, block), ``(N, k_blocks)`` each, and the block size.  A block
    smaller than the group repeats the group's scale and zero-point over its blocks (exact)."""
    spec, n = w.spec, w.values.shape[0]
    if spec.granularity == "group":
        if spec.resolved_axis(2, layer) != 1:
            raise ValueError(f"{layer}: its weight groups run along the output dimension (axis 0); MatMulNBits "
                             "blocks run along the input dimension: quantize it with axis=1")
        if not _is_block(spec.group_size):
            raise ValueError(f"{layer}: group_size {spec.group_size} cannot be a MatMulNBits block (a power of two "
                             ">= 16: 16, 32, 64, 128, 256); quantize it with such a group size")
        block = block or spec.group_size
        _check_block(block, spec.group_size, layer)
        blocks, split = -(-k // block), spec.group_size // block
        return (w.scale.repeat_interleave(split, dim=1)[:, :blocks],
                w.zero_point.repeat_interleave(split, dim=1)[:, :blocks], block)
    if spec.granularity == "channel" and spec.resolved_axis(2, layer) != 0:
        raise ValueError(f"{layer}: per-channel scales along the input dimension (axis 1) cannot be MatMulNBits "
                         "blocks; quantize the weight per output channel (axis 0) or group-wise along axis 1")
    block = block or _default_block(k)
    _check_block(block, None, layer)
    blocks = -(-k // block)
    scale = w.scale.reshape(-1, 1).expand(n, blocks)
    zero_point = w.zero_point.reshape(-1, 1).expand(n, blocks)
    return scale, zero_point, block


def block_of(module: QuantLinear, layer: str, block: int | None = None) -> int:
    """The MatMulNBits block size ``nbits_weight`` gives ``module``'s weight for a requested
    ``block`` (None: the group size, or ``_default_block(K)``), checked as it checks it."""
    spec = module.weight_quantizer.spec
    group = spec.group_size if spec.granularity == "group" else None
    chosen = block or group or _default_block(module.in_features)
    _check_block(chosen, group, layer)
    return chosen


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``(..., m)`` as bytes: 8-bit as they are, 4-bit two a byte, the first in the low nibble."""
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def nbits_weight(w: IntegerTensor, layer: str, block: int | None = None) -> NBits:
    """``w`` (a Linear weight's integers, ``(N, K)``) in MatMulNBits form, in blocks of ``block``
    (None: the group size, or for per-channel / per-tensor weights ``_default_block(K)``).

    Raises:
        ValueError: a grid wider than 8 bits, or scales MatMulNBits cannot express (naming ``layer``).
    """
    spec = w.spec
    if spec.bits > 8:
        raise ValueError(f"{layer}: {spec.bits}-bit weights have no MatMulNBits form (at most 8 bits)")
    n, k = w.values.shape
    scale, zero_point, block = _blocked_params(w, k, layer, block)
    bits = 4 if spec.bits <= 4 else 8
    offset = 2 ** (bits - 1) if spec.signed else 0
    blocks = -(-k // block)
    zp = zero_point.to(torch.int32) + offset  # (N, k_blocks), in [0, 2**bits)
    codes = w.values.to(torch.int32) + offset
    pad = blocks * block - k
    if pad:  # the ragged last block: pad with its zero-point's code, which dequantizes to 0
        codes = torch.cat([codes, zp[:, -1:].expand(n, pad)], dim=1)
    codes = codes.reshape(n, blocks, block).numpy().astype(np.uint8)
    if (zp == 2 ** (bits - 1)).all():
        zero_points = None
    else:
        zpc = zp.numpy().astype(np.uint8)
        if bits == 4 and blocks % 2:
            zpc = np.concatenate([zpc, np.full((n, 1), 2 ** (bits - 1), np.uint8)], axis=1)
        zero_points = _pack(zpc, bits)
    return NBits(packed=_pack(codes, bits), scales=scale.float().contiguous().numpy(), zero_points=zero_points,
                 bits=bits, block_size=block, k=k, n=n)


def _weight_quantized(module: nn.Module, layer: str) -> bool:
    """True when ``module``'s weight is quantized; errors for quantized activations, which
    MatMulNBits does not simulate."""
    if not isinstance(module, QuantLinear):
        return False
    for role in ("input", "output"):
        q = getattr(module, f"{role}_quantizer")
        if q is not None and q.mode != "disabled":
            raise ValueError(f"{layer}: its {role} is quantized ({q.spec.describe()}); export_llm writes weight-only "
                             "layers (MatMulNBits, float activations): quantize with a weight-only preset "
                             "(w4a16-g128, w4a16-g32, w3a16-g128, w8a16), or export with lowbit.export_onnx")
    q = module.weight_quantizer
    return q is not None and q.mode != "disabled"


def prepare(module: nn.Module, layer: str, block: int | None = None) -> NBits | None:
    """``module``'s weight in MatMulNBits form (blocks of ``block``, see ``nbits_weight``), or None
    when it stays float.

    Raises:
        TypeError: not a Linear.  ValueError: quantized activations, or a weight MatMulNBits cannot hold.
    """
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{layer}: export_llm expects an nn.Linear (or lowbit QuantLinear) here, got "
                        f"{type(module).__name__}")
    return nbits_weight(module.integer_params().weight, layer, block) if _weight_quantized(module, layer) else None


def fusable(weights: list[NBits | None]) -> bool:
    """True when these weights can be one MatMul(NBits) (outputs concatenated): all float, or all
    quantized with the same bits, block size and K."""
    if all(nb is None for nb in weights):
        return True
    if any(nb is None for nb in weights):
        return False
    return len({(nb.bits, nb.block_size, nb.k) for nb in weights}) == 1


def _concat_nbits(weights: list[NBits]) -> NBits:
    """Several weights with equal bits, block size and K as one, stacked along N."""
    if len(weights) == 1:
        return weights[0]
    first = weights[0]
    zero_points = None
    if any(nb.zero_points is not None for nb in weights):
        default = 2 ** (first.bits - 1)
        width = -(-first.scales.shape[1] * first.bits // 8)
        filler = default | (default << 4) if first.bits == 4 else default  # two default 4-bit codes a byte
        zero_points = np.concatenate([np.full((nb.n, width), filler, np.uint8) if nb.zero_points is None
                                      else nb.zero_points for nb in weights])
    return NBits(packed=np.concatenate([nb.packed for nb in weights]),
                 scales=np.concatenate([nb.scales for nb in weights]), zero_points=zero_points, bits=first.bits,
                 block_size=first.block_size, k=first.k, n=sum(nb.n for nb in weights))


def _bias(modules: list[nn.Module]) -> np.ndarray | None:
    if all(m.bias is None for m in modules):
        return None
    return np.concatenate([np.zeros(m.out_features, np.float32) if m.bias is None
                           else m.bias.detach().float().numpy() for m in modules])


def write_nbits(w: GraphWriter, name: str, nb: NBits) -> list[str]:
    """``nb``'s initializers as MatMulNBits takes them: ``[B, scales, zero_points or ""]``."""
    return [w.const(f"{name}.weight.packed", nb.packed), w.const(f"{name}.weight.scales", nb.scales),
            "" if nb.zero_points is None else w.const(f"{name}.weight.zero_points", nb.zero_points)]


def write_linear(w: GraphWriter, parts: list[tuple[str, nn.Module, NBits | None]], x: str, name: str, *,
                 accuracy_level: int, float_weight_t: str | None = None, nbits_consts: list[str] | None = None,
                 output: str | None = None) -> str:
    """One MatMulNBits (quantized) or MatMul (float) computing every part's ``module(x)``, their
    outputs concatenated along the last axis in order (``fusable`` must hold for more than one).

    Args:
        parts: ``(qualified name, Linear, prepare(Linear))`` per Linear.
        name: the node's name stem (the qualified name of a single part).
        float_weight_t: for a float layer, an already written ``(K, N)`` weight to use (a tied
            head reading the embedding table) instead of writing ``module.weight.T``.
        nbits_consts: for a quantized layer, its ``write_nbits`` initializers, already written (a
            head whose table the embedding also reads).
        output: the name of the result (default: derived from ``name``).
    """
    outputs = 1 if output is None else [output]
    modules, weights = [m for _, m, _ in parts], [nb for _, _, nb in parts]
    bias = _bias(modules)
    if weights[0] is not None:
        nb = _concat_nbits(weights)
        consts = nbits_consts or write_nbits(w, name, nb)
        inputs = [x, *consts, "", "" if bias is None else w.const(f"{name}.bias", bias)]
        while inputs[-1] == "":
            inputs.pop()
        return w.node("MatMulNBits", inputs, name=f"{name}/MatMulNBits", domain=MS_DOMAIN, K=nb.k, N=nb.n,
                      bits=nb.bits, block_size=nb.block_size, accuracy_level=accuracy_level, outputs=outputs)
    if float_weight_t is None:
        weight = torch.cat([m.weight.detach().float() for m in modules])
        float_weight_t = w.const(f"{name}.weight.T", weight.T.contiguous().numpy())
    if bias is None:
        return w.node("MatMul", [x, float_weight_t], name=f"{name}/MatMul", outputs=outputs)
    out = w.node("MatMul", [x, float_weight_t], name=f"{name}/MatMul")
    return w.node("Add", [out, w.const(f"{name}.bias", bias)], name=f"{name}/Add", outputs=outputs)
