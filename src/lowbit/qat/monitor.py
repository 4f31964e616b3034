"""Watching a QAT run: TensorBoard (and, when installed, Weights & Biases offline).

What a QAT run adds to the usual loss / metric / learning-rate curves:

    scale/<quantizer>              each quantizer's scale over time (per-channel: /mean /min /max)
    quant_error/<layer>.weight     histogram of w - fakequant(w) for each quantized weight
    model/params/<dtype>           how many parameters are stored at each bit-width
    model/bit_widths               the same as a text table

    with Monitor("runs/qat") as mon:
        mon.log_bit_widths(qmodel, step=0)
        ... mon.scalar("train/loss", loss, step); mon.log_quantizers(qmodel, step) ...

The functions ``quantizer_scales``, ``weight_errors`` and ``bit_widths`` compute the same
numbers without logging them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Self

import torch
from torch import nn

from ..numerics import fake_quantize
from .prepare import _weight_source, quantizers_by_role

log = logging.getLogger(__name__)

def _has_range(q) -> bool:
    """A range to read now: fixed, learned, dynamic, or observed from at least one batch (a
    learnable quantizer still observing is waiting for its first batch)."""
    return q.mode in ("static", "learned", "dynamic") or (q.mode == "observing" and q.is_frozen and q.learn is None)


# -- what gets logged -----------------------------------------------------------------------
def _weight_quantizers(model: nn.Module):
    for module, role, q in quantizers_by_role(model):
        if role == "weight" and isinstance(getattr(module, "weight", None), torch.Tensor):
            yield module, q


@torch.no_grad()
def quantizer_scales(model: nn.Module) -> dict[str, float]:
    """``{tag: value}`` for every quantizer with a range: ``scale/<name>`` for a per-tensor
    scale, ``scale/<name>/mean|min|max`` for per-channel or group-wise scales.  Dynamic
    weight quantizers report the scale of the current weight; dynamic activation
    quantizers, which have no scale between batches, are left out."""
    out: dict[str, float] = {}
    for module, role, q in quantizers_by_role(model):
        if not _has_range(q):
            continue
        if q.mode == "dynamic":
            if role != "weight":
                continue
            scale, _ = q.qparams_for(_weight_source(module).detach())
        else:
            scale, _ = q.qparams_for(torch.empty(0))
        scale = scale.float()
        if scale.numel() == 1:
            out[f"scale/{q.name}"] = float(scale)
        else:
            out[f"scale/{q.name}/mean"] = float(scale.mean())
            out[f"scale/{q.name}/min"] = float(scale.min())
            out[f"scale/{q.name}/max"] = float(scale.max())
    return out


@torch.no_grad()
def weight_errors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{quantizer name: w - fakequant(w)}`` for each quantized weight (the BN-folded weight
    of a conv-BN layer, as its quantizer sees it).  Changes no state."""
    out = {}
    for module, q in _weight_quantizers(model):
        if not _has_range(q):
            continue
        w = _weight_source(module).detach()
        scale, zero_point = q.qparams_for(w)
        out[q.name] = (w - fake_quantize(w, scale, zero_point, q.spec, name=q.name)).flatten()
    return out


def bit_widths(model: nn.Module) -> dict[str, int]:
    """How many parameters the deployed model stores at each bit-width: quantized weights
    under their integer type (``"int4"``, ``"int8"``...), everything else under ``"float32"``
    (biases, BatchNorm, float layers, quantizer scales)."""
    counts: Counter[str] = Counter()
    quantized: set[int] = set()
    for module, q in _weight_quantizers(model):
        if q.mode == "disabled":
            continue
        counts[f"{'int' if q.spec.signed else 'uint'}{q.spec.bits}"] += module.weight.numel()
        quantized.add(id(module.weight))
    for p in model.parameters():
        if id(p) not in quantized:
            counts["float32"] += p.numel()
    return dict(sorted(counts.items()))


def _bit_width_table(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    bits = sum(n * int("".join(c for c in k if c.isdigit())) for k, n in counts.items())
    rows = [f"| {k} | {n:,} | {100 * n / total:.1f}% |" for k, n in counts.items()]
    return "\n".join(["| stored as | parameters | share |", "|---|---:|---:|", *rows, "",
                      f"mean bits per parameter: {bits / total:.2f}"])


# -- the writer ----------------------------------------------------------------------------
def _summary_writer(log_dir: str | os.PathLike):
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it, with a vaguer message)
    except ImportError as exc:
        if exc.name != "tensorboard":
            raise
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install 'lowbit[qat]' "
                          "(or pass log_dir=None)") from None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def _wandb_run(log_dir, config: dict | None, required: bool):
    try:
        import wandb
    except ImportError as exc:
        if exc.name != "wandb":
            raise
        if required:
            raise ImportError("wandb=True needs the wandb package (pip install wandb), or pass wandb=None") from None
        return None
    return wandb.init(mode="offline", dir=str(log_dir), project="lowbit-qat", config=config or {})


class Monitor:
    """TensorBoard event files for a QAT run, mirrored to an offline W&B run.

    Args:
        log_dir: folder for the event files (TensorBoard: ``tensorboard --logdir``).
        wandb: True: also log to Weights & Biases in offline mode (needs ``wandb``);
            None: do so when ``wandb`` is installed; False: never.
        config: run settings recorded with the W&B run.
    """

    def __init__(self, log_dir: str | os.PathLike, *, wandb: bool | None = None, config: dict | None = None):
        self.writer = _summary_writer(log_dir)
        self.wandb = None if wandb is False else _wandb_run(log_dir, config, required=wandb is True)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars({tag: value}, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(dict(values), step=step)

    def log_quantizers(self, model: nn.Module, step: int) -> None:
        """Each quantizer's scale (see ``quantizer_scales``)."""
        self.scalars(quantizer_scales(model), step)

    def log_weight_errors(self, model: nn.Module, step: int) -> None:
        """A histogram of ``w - fakequant(w)`` per quantized weight."""
        for name, err in weight_errors(model).items():
            self.writer.add_histogram(f"quant_error/{name}", err, step)

    def log_bit_widths(self, model: nn.Module, step: int) -> None:
        """Parameter counts per stored bit-width, as scalars and a text table."""
        counts = bit_widths(model)
        self.scalars({f"model/params/{k}": float(n) for k, n in counts.items()}, step)
        self.writer.add_text("model/bit_widths", _bit_width_table(counts), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
