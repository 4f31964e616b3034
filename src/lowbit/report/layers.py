"""Per-layer figures of a quantized model, PTQ or QAT: scales, weight errors, bit-widths.

Each function reads a model that ``lowbit.quantize`` or ``lowbit.prepare_qat`` returned (or any
model holding lowbit's quantized layers), changes no state, and returns plain numbers or tensors
keyed by layer or quantizer name, to print, plot or log (``lowbit.qat.Monitor`` logs them;
``lowbit.qat.fit(..., figures=lowbit.report.layers)`` does so during training).

This module imports only ``lowbit.nn`` and ``lowbit.numerics``: the figures are those of the
quantized layers themselves, measured in the PyTorch simulation.

    from lowbit.report import layers
    layers.layer_errors(qmodel)          # {"features.0": 0.0031, "fc": 0.0, ...}  (fc kept float)
    print(layers.bit_width_table(layers.bit_widths(qmodel)))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..nn.quantizer import Quantizer
from ..nn.walk import quantizers_by_role
from ..numerics import fake_quantize

__all__ = ["bit_width_table", "bit_widths", "layer_errors", "quantizer_scales", "weight_errors"]


def _has_range(q: Quantizer) -> bool:
    """A range to read now: fixed, learned, dynamic, or observed from at least one batch (a
    learnable quantizer still observing is waiting for its first batch)."""
    return q.mode in ("static", "learned", "dynamic") or (q.mode == "observing" and q.is_frozen and q.learn is None)


def _weight_quantizers(model: nn.Module) -> Iterator[tuple[nn.Module, Quantizer]]:
    for module, role, q in quantizers_by_role(model):
        if role == "weight" and isinstance(getattr(module, "weight", None), torch.Tensor):
            yield module, q


def _fake_quantized_weight(module: nn.Module, q: Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, fakequant(w)) as the layer's weight quantizer sees (the BN-folded weight of a QAT
    conv-BN layer) and rounds it now."""
    w = module.quantized_weight_source().detach()
    scale, zero_point = q.qparams_for(w)
    return w, fake_quantize(w, scale, zero_point, q.spec, name=q.name)


@torch.no_grad()
def quantizer_scales(model: nn.Module) -> dict[str, float]:
    """The scale of every quantizer that has a range.

    Returns:
        ``{quantizer name: scale}`` for a per-tensor scale, and ``<name>/mean``, ``<name>/min``,
        ``<name>/max`` for per-channel or group-wise scales.  Dynamic weight quantizers report the
        scale of the current weight; dynamic activation quantizers, which have no scale between
        batches, are left out.

    Example:
        >>> quantizer_scales(qmodel)["fc.input"]
        0.0213
    """
    out: dict[str, float] = {}
    for module, role, q in quantizers_by_role(model):
        if not _has_range(q) or (q.mode == "dynamic" and role != "weight"):
            continue
        source = module.quantized_weight_source().detach() if q.mode == "dynamic" else torch.empty(0)
        scale = q.qparams_for(source)[0].float()
        if scale.numel() == 1:
            out[q.name] = float(scale)
        else:
            out.update({f"{q.name}/mean": float(scale.mean()), f"{q.name}/min": float(scale.min()),
                        f"{q.name}/max": float(scale.max())})
    return out


@torch.no_grad()
def weight_errors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The rounding error of each quantized weight, element by element.

    Returns:
        ``{quantizer name: (w - fakequant(w)).flatten()}`` for each weight quantizer with a range
        (the BN-folded weight of a conv-BN layer, as its quantizer sees it); a histogram of it
        shows clipping as tails beyond half a step.
    """
    out = {}
    for module, q in _weight_quantizers(model):
        if _has_range(q):
            w, wq = _fake_quantized_weight(module, q)
            out[q.name] = (w - wq).flatten()
    return out


@torch.no_grad()
def layer_errors(model: nn.Module) -> dict[str, float]:
    """How far each layer's weight moves when quantized: ``||w - fakequant(w)|| / ||w||``.

    Every layer with a weight matrix or kernel (2-D or more) is listed under its module name:
    a layer kept in float (skipped by the config, unsupported, or its weight quantizer disabled)
    counts 0.0; a quantized layer whose range is not known yet (a learnable quantizer before its
    first training batch) is left out.  The error grows as the layer's weight bits drop.

    Example:
        >>> errors = layer_errors(lowbit.quantize(model, calib, "w4a8"))
        >>> max(errors, key=errors.get)      # the layer that lost the most
        'features.3'
    """
    quantized = {id(module): q for module, q in _weight_quantizers(model)}
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        q = quantized.get(id(module))
        if q is not None and q.mode != "disabled":
            if _has_range(q):
                w, wq = _fake_quantized_weight(module, q)
                norm = float(w.double().norm())
                out[name] = float((w - wq).double().norm()) / norm if norm > 0 else 0.0
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() >= 2:
            out[name] = 0.0  # the weight stays float
    return out


def bit_widths(model: nn.Module) -> dict[str, int]:
    """How many parameters the deployed model stores at each bit-width.

    Returns:
        ``{"int4": n, "int8": m, ..., "float32": k}``, sorted by name: quantized weights under
        their integer type, everything else under ``"float32"`` (biases, norms, float layers,
        quantizer scales).
    """
    counts: Counter[str] = Counter()
    quantized: set[int] = set()
    for module, q in _weight_quantizers(model):
        if q.mode != "disabled":
            counts[f"{'int' if q.spec.signed else 'uint'}{q.spec.bits}"] += module.weight.numel()
            quantized.add(id(module.weight))
    for p in model.parameters():
        if id(p) not in quantized:
            counts["float32"] += p.numel()
    return dict(sorted(counts.items()))


def bit_width_table(counts: Mapping[str, int]) -> str:
    """``bit_widths``' counts as a markdown table, with the mean bits per parameter."""
    total = sum(counts.values()) or 1
    bits = sum(n * int("".join(c for c in k if c.isdigit())) for k, n in counts.items())
    rows = [f"| {k} | {n:,} | {100 * n / total:.1f}% |" for k, n in counts.items()]
    return "\n".join(["| stored as | parameters | share |", "|---|---:|---:|", *rows, "",
                      f"mean bits per parameter: {bits / total:.2f}"])
