"""Packed weights: ``lowbit.save(qmodel, path, packed=True)`` stores integers, not float32.

A layer whose weight quantizer has a frozen static grid (``mode == "static"``, 2 to 8 bits)
computes with ``fake_quant(weight)``, which depends on the float weight only through its
integers ``q = quantize(weight)``.  So the file can hold ``q`` instead of the weight, next to the
scale and zero-point the quantizer already stores, and ``load`` can put back
``dequantize(q) = scale * (q - zero_point)``: that weight lies exactly on the grid, the frozen
quantizer turns it into the same integers, and the model computes the same outputs bit for bit
(``save`` checks this on every weight it packs, through the quantizer itself, and keeps a weight
that does not pass in float).  The float weights themselves are not kept: a packed model is for
inference and export, not for training on.

Layouts (``"layout"`` of a manifest entry; the stored tensor's name is the weight's plus ``.packed``):

    nibbles   2, 3 and 4-bit codes, two a byte: the weight flattened row-major, element 2i in the
              low nibble of byte i and 2i+1 in its high nibble (the order of ONNX's INT4 / UINT4
              tensors and of MatMulNBits), a final 0 nibble when the count is odd; signed codes
              in two's complement.  uint8, ``ceil(numel / 2)`` bytes.
    bytes     5 to 8-bit codes, one a byte: int8 (signed) or uint8, the weight's shape.

What stays float, each logged with its reason: weights whose quantizer is not static (dynamic,
observing; learned LSQ scales, because such a model is still being trained and its float weights
are its state: ``lowbit.qat.convert`` fixes the ranges, after which its weights pack), weights
the quantizer sees transformed (QAT conv-BN quantizes the BN-folded weight,
``quantized_weight_source``), and weights tied to another name that each layer quantizes on its own
grid (SmolLM2's embedding and lm_head as the presets quantize them: no single set of integers is
exact for both).  A table tied with its quantizer too (``lowbit.ptq.tie``) packs once.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..nn.integer import weight_integers
from ..nn.modules import QuantLayer
from ..numerics import QuantSpec, dequantize

log = logging.getLogger(__name__)

SUFFIX = ".packed"  # the stored tensor is named after the weight it replaces
NIBBLES, BYTES = "nibbles", "bytes"
ENTRY_FIELDS = ("tensor", "layout", "shape", "dtype", "spec", "scale", "zero_point")
_FLOATS = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
_AGAIN = "save the model again with lowbit.save"


# -- codes <-> bytes -----------------------------------------------------------------------
def layout_for(spec: QuantSpec) -> str:
    return NIBBLES if spec.bits <= 4 else BYTES


def pack_codes(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (int8 / uint8 container, any shape) as the bytes of ``layout_for(spec)``."""
    if layout_for(spec) == BYTES:
        return codes.contiguous()
    flat = codes.reshape(-1)
    flat = (flat.view(torch.uint8) if flat.dtype == torch.int8 else flat) & 0x0F  # two's complement nibble
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def packed_bytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bytes the packed codes of a weight of ``shape`` take."""
    numel = math.prod(shape)
    return -(-numel // 2) if layout_for(spec) == NIBBLES else numel


def unpack_codes(raw: torch.Tensor, shape: tuple[int, ...], spec: QuantSpec, name: str) -> torch.Tensor:
    """The codes ``pack_codes`` wrote, in the spec's container dtype and ``shape``.

    Raises:
        ValueError: the wrong dtype or size, a nonzero padding nibble, or a code off the grid (named).
    """
    layout, numel = layout_for(spec), math.prod(shape)
    container = torch.int8 if spec.signed and layout == BYTES else torch.uint8
    expected = packed_bytes(shape, spec)
    if raw.dtype != container or raw.numel() != expected or (layout == BYTES and tuple(raw.shape) != shape):
        raise ValueError(f"packed tensor {name} is {raw.dtype} of shape {tuple(raw.shape)}, but its weight, "
                         f"{spec.describe()} of shape {shape}, packs into {expected} {container} values ({layout}): "
                         f"it is truncated or corrupted; {_AGAIN}")
    codes = raw
    if layout == NIBBLES:
        flat = torch.stack([raw & 0x0F, raw >> 4], dim=-1).reshape(-1)  # element 2i low, 2i+1 high
        if flat.numel() > numel and int(flat[numel]) != 0:
            raise ValueError(f"packed tensor {name}: its padding nibble is {int(flat[numel])}, not 0 (corrupted); "
                             f"{_AGAIN}")
        flat = flat[:numel]
        codes = (((flat.to(torch.int16) ^ 8) - 8).to(torch.int8) if spec.signed else flat).reshape(shape)
    if numel and (int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax):
        raise ValueError(f"packed tensor {name} holds codes in [{int(codes.min())}, {int(codes.max())}], off the "
                         f"{spec.describe()} grid [{spec.qmin}, {spec.qmax}] (corrupted); {_AGAIN}")
    return codes


def restore(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
            dtype: torch.dtype, name: str) -> torch.Tensor:
    """The weight ``scale * (codes - zero_point)`` in ``dtype``: on the grid, so the frozen quantizer
    maps it back to ``codes``.  ``save`` and ``load`` both compute it here, so they agree exactly."""
    return dequantize(codes, scale, zero_point, spec, name).to(dtype)


# -- save: which weights pack ----------------------------------------------------------------
def _why_float(layer: QuantLayer, prefix: str, tensors: dict[str, torch.Tensor], tied: dict[str, str],
               quantizers: dict[str, nn.Module]) -> str:
    """Why the weight of ``layer`` (state keys under ``prefix``) stays float; '' when it packs.
    ``quantizers``: each quantized layer's weight key -> its weight quantizer (a tied pair that
    shares one packs once)."""
    q, key = layer.weight_quantizer, prefix + "weight"
    if q is None or q.mode == "disabled":
        return "not quantized"
    if q.learn is not None:
        return (f"its quantizer learns its scale ({q.learn}): a model in training keeps its float weights "
                "(lowbit.qat.convert fixes the ranges; a converted model packs)")
    if q.mode != "static" or not q.is_frozen:
        return f"its quantizer is {q.mode!r}, not a frozen static grid"
    if q.spec.bits > 8:
        return f"{q.spec.bits}-bit codes (packing takes 2 to 8 bits)"
    if key in tied and quantizers.get(tied[key]) is not q:
        return f"tied to {tied[key]}, which shares the float tensor (each layer quantizes it on its own grid)"
    if key not in tensors or not tensors[key].is_floating_point() or key + SUFFIX in tensors:
        return "no float weight of its own in the state_dict"
    if any(f"{prefix}weight_quantizer.{leaf}" not in tensors for leaf in ("scale", "zero_point")):
        return "its scale / zero-point is shared with another tensor"
    if layer.quantized_weight_source() is not layer.weight:
        return "its quantizer sees a transformed weight (quantized_weight_source: QAT conv-BN folds BatchNorm in)"
    return ""


@torch.no_grad()
def _pack_one(layer: QuantLayer, prefix: str, out: dict[str, torch.Tensor], entries: dict[str, dict]) -> str:
    """Replace ``prefix + "weight"`` in ``out`` by its packed codes and record its entry; or return
    why not (the dequantized codes would not reproduce the quantized weight exactly)."""
    q, key, weight = layer.weight_quantizer, prefix + "weight", layer.weight.detach()
    ints = weight_integers(q, weight)
    restored = restore(ints.values, q.scale, q.zero_point, q.spec, weight.dtype, q.name)
    if not torch.equal(q(restored), q(weight)):  # what the forward computes: must not change
        log.warning("%s: the dequantized integers do not reproduce its quantized weight; it stays float", key)
        return "the dequantized integers do not reproduce its quantized weight"
    del out[key]
    out[key + SUFFIX] = pack_codes(ints.values, q.spec).cpu()
    entries[key] = {"tensor": key + SUFFIX, "layout": layout_for(q.spec), "shape": list(weight.shape),
                    "dtype": str(weight.dtype).removeprefix("torch."), "spec": q.spec.to_dict(),
                    "scale": f"{prefix}weight_quantizer.scale", "zero_point": f"{prefix}weight_quantizer.zero_point"}
    return ""


def pack_state(model: nn.Module, tensors: dict[str, torch.Tensor],
               aliases: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``(tensors, entries)``: ``tensors`` (from ``split_state``) with every weight that packs
    replaced by its codes, and the manifest's ``packed`` field, ``{weight key: entry}``.  Every
    weight that stays float is logged with its reason."""
    tied = {**{src: key for key, src in aliases.items()}, **aliases}  # either name -> the other
    out: dict[str, torch.Tensor] = dict(tensors)
    entries: dict[str, dict] = {}
    kept: list[str] = []
    layers = {(f"{name}." if name else ""): m for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    quantizers = {prefix + "weight": m.weight_quantizer for prefix, m in layers.items()}
    for prefix, layer in layers.items():
        key = prefix + "weight"
        if key in tied and key not in tensors and quantizers.get(tied[key]) is layer.weight_quantizer:
            log.info("%s is stored as %s, which it is tied to with its quantizer (lowbit.ptq.tie)", key, tied[key])
            continue  # (one table, one quantizer: the other name decides packed or float)
        reason = _why_float(layer, prefix, tensors, tied, quantizers) or _pack_one(layer, prefix, out, entries)
        if reason:
            kept.append(prefix + "weight")
            log.info("%sweight stays float in the packed file: %s", prefix, reason)
    before = sum(tensors[k].numel() * tensors[k].element_size() for k in entries)
    after = sum(out[e["tensor"]].numel() for e in entries.values())
    shown = ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else "")
    log.info("packed %d weight(s): %.2f MB of float -> %.2f MB of codes; %d quantized layer weight(s) stay "
             "float%s", len(entries), before / 1e6, after / 1e6, len(kept), f" ({shown})" if kept else "")
    return out, entries


# -- load: the float weights again -------------------------------------------------------------
def _check_entry(key: str, entry: object, where: str) -> QuantSpec:
    """The spec of a manifest entry, after checking its fields (errors name the weight)."""
    if not isinstance(entry, dict) or set(entry) != set(ENTRY_FIELDS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{where}: packed entry {key} has fields {got}, expected {sorted(ENTRY_FIELDS)}; {_AGAIN}")
    try:
        spec = QuantSpec.from_dict(entry["spec"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: packed entry {key} has a bad spec ({exc}); {_AGAIN}") from None
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"{where}: packed entry {key} has shape {shape!r}, not a list of sizes; {_AGAIN}")
    if entry["dtype"] not in _FLOATS or entry["layout"] != layout_for(spec) or spec.bits > 8:
        raise ValueError(f"{where}: packed entry {key} has dtype {entry['dtype']!r} and layout {entry['layout']!r}; "
                         f"this lowbit reads dtypes {sorted(_FLOATS)} and layout {layout_for(spec)!r} for "
                         f"{spec.describe()}; {_AGAIN}")
    return spec


def unpack_state(tensors: dict[str, torch.Tensor], entries: dict[str, dict], where: str) -> dict[str, torch.Tensor]:
    """``tensors`` as read from a packed file, each packed weight replaced by its float weight
    (``restore``).  ``where`` (the file) starts every error message.

    Raises:
        ValueError: a malformed entry, or a packed tensor, scale or zero-point that is missing,
            truncated or corrupted (named).
    """
    out = dict(tensors)
    for key, entry in entries.items():
        spec = _check_entry(key, entry, where)
        names = (entry["tensor"], entry["scale"], entry["zero_point"])
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"{where}: the packed weight {key} needs {missing}, which the file lacks; {_AGAIN}")
        raw, scale, zero_point = (out.pop(names[0]), out[names[1]], out[names[2]])
        try:
            codes = unpack_codes(raw, tuple(entry["shape"]), spec, entry["tensor"])
            out[key] = restore(codes, scale, zero_point, spec, _FLOATS[entry["dtype"]], key)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return out
