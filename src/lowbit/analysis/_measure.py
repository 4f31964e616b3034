"""What a candidate model costs: weight bits and size from its quantizers, latency and file size
measured on its exported ONNX file in ONNX Runtime.

    footprint(qmodel)            {"avg_weight_bits": 5.1, "size_mb": 2.9}
    Deployed(example_inputs).measure(qmodel, folder)   {"onnx_mb": 3.6, "latency_ms": 4.2}

``size_mb`` counts every parameter at its storage width: a quantized layer's weight at its bits
(packed, as a packed checkpoint or MatMulNBits holds it), everything else at 32 bits.
``avg_weight_bits`` averages the decision layers' weight bits weighted by their element count
(float layers count 32).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..nn.modules import is_quantized
from ..nn.registry import contraction_types
from ._layers import FLOAT_BITS

log = logging.getLogger(__name__)

BUDGET_KEYS = ("avg_weight_bits", "size_mb", "latency_ratio")


def check_budget(budget: Mapping | None) -> tuple[str, float] | None:
    """``(key, limit)`` of a budget mapping with exactly one of ``BUDGET_KEYS``; None for None."""
    if budget is None:
        return None
    if not isinstance(budget, Mapping) or len(budget) != 1 or next(iter(budget)) not in BUDGET_KEYS:
        raise ValueError(f"budget must be a mapping with exactly one of {', '.join(BUDGET_KEYS)}, e.g. "
                         f'{{"avg_weight_bits": 5.0}}; got {budget!r}')
    key, limit = next(iter(budget.items()))
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise ValueError(f"budget {key} must be a positive number, got {limit!r}")
    return key, float(limit)


def _weight_bits(module: nn.Module) -> int:
    q = getattr(module, "weight_quantizer", None) if is_quantized(module) else None
    return FLOAT_BITS if q is None or q.mode == "disabled" else q.spec.bits


def layer_bits(qmodel: nn.Module) -> dict[str, int]:
    """Weight bits of each compute layer, in module order (``FLOAT_BITS`` for a float one)."""
    compute = contraction_types()
    return {name: _weight_bits(m) for name, m in qmodel.named_modules() if name and isinstance(m, compute)}


def footprint(qmodel: nn.Module) -> dict[str, float]:
    """``avg_weight_bits`` over the compute layers and ``size_mb`` of every parameter (see the
    module docstring), read from ``qmodel``'s quantizers."""
    compute = contraction_types()
    bits_total = weights_total = 0
    bytes_total = 0.0
    counted = set()
    for _, module in qmodel.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(weight, "numel") or id(weight) in counted:
            continue
        bits = _weight_bits(module)
        counted.add(id(weight))
        bytes_total += weight.numel() * bits / 8
        if isinstance(module, compute):
            bits_total += weight.numel() * bits
            weights_total += weight.numel()
    for p in qmodel.parameters():
        if id(p) not in counted:
            counted.add(id(p))
            bytes_total += p.numel() * 4
    return {"avg_weight_bits": bits_total / weights_total if weights_total else float(FLOAT_BITS),
            "size_mb": bytes_total / 1e6}


@dataclass
class Deployed:
    """Exports a model and times it in ONNX Runtime (``runs`` timed runs after ``warmup``, on
    ``threads`` threads), with ``example_inputs`` as the batch."""

    example_inputs: object
    threads: int = 1
    runs: int = 30
    warmup: int = 5

    def measure(self, model: nn.Module, folder: str | os.PathLike, name: str) -> dict[str, float]:
        """``onnx_mb`` and ``latency_ms`` (median) of ``model`` exported to ``folder/name.onnx``."""
        from ..export import export_onnx
        from ..runtime.ort import OrtModel, measure_latency

        path = Path(folder) / f"{name}.onnx"
        export_onnx(model, path, self.example_inputs)
        session = OrtModel(path, threads=self.threads)
        inputs = self.example_inputs
        feeds = session.feeds(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
        stats = measure_latency(session, feeds, warmup=self.warmup, runs=self.runs)
        return {"onnx_mb": path.stat().st_size / 1e6, "latency_ms": stats.median_ms}
