"""Watching a QAT run: TensorBoard (and, when installed, Weights & Biases offline).

What a QAT run adds to the usual loss / metric / learning-rate curves:

    scale/<quantizer>              each quantizer's scale over time (per-channel: /mean /min /max)
    quant_error/<layer>.weight     histogram of w - fakequant(w) for each quantized weight
    model/params/<dtype>           how many parameters are stored at each bit-width
    model/bit_widths               the same as a text table

The monitor only logs: the figures come from ``lowbit.report.layers``, which ``lowbit.qat``
may not import (report sits above the training algorithms), so the caller passes them in,
as figures (``log_scales(scales, step)``) or, to ``fit``, as the module that computes them
(``fit(..., figures=lowbit.report.layers)``; ``LayerFigures`` is what it must provide).

    from lowbit.report import layers
    with Monitor("runs/qat") as mon:
        counts = layers.bit_widths(qmodel)
        mon.log_bit_widths(counts, layers.bit_width_table(counts), step=0)
        ... mon.scalar("train/loss", loss, step); mon.log_scales(layers.quantizer_scales(qmodel), step) ...
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Protocol, Self

import torch
from torch import nn

log = logging.getLogger(__name__)


class LayerFigures(Protocol):
    """The per-layer figures ``fit`` logs; ``lowbit.report.layers`` provides them."""

    def quantizer_scales(self, model: nn.Module) -> dict[str, float]: ...

    def weight_errors(self, model: nn.Module) -> dict[str, torch.Tensor]: ...

    def bit_widths(self, model: nn.Module) -> dict[str, int]: ...

    def bit_width_table(self, counts: Mapping[str, int]) -> str: ...


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
    # Offline always (no network); WANDB_MODE=disabled, wandb's own switch, turns it off.
    mode = "disabled" if os.environ.get("WANDB_MODE") == "disabled" else "offline"
    return wandb.init(mode=mode, dir=str(log_dir), project="lowbit-qat", config=config or {})


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

    def histograms(self, values: Mapping[str, torch.Tensor], step: int) -> None:
        """One histogram per tag."""
        for tag, value in values.items():
            self.writer.add_histogram(tag, value, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Histogram(value.detach().float().cpu().numpy()) for tag, value in values.items()},
                           step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text (markdown) entry; W&B gets it as a one-cell table."""
        self.writer.add_text(tag, text, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Table(columns=["text"], data=[[text]])}, step=step)

    def log_scales(self, scales: Mapping[str, float], step: int) -> None:
        """Each quantizer's scale as ``scale/<name>`` (``lowbit.report.layers.quantizer_scales``)."""
        self.scalars({f"scale/{name}": value for name, value in scales.items()}, step)

    def log_weight_errors(self, errors: Mapping[str, torch.Tensor], step: int) -> None:
        """A histogram ``quant_error/<name>`` per quantized weight (``lowbit.report.layers.weight_errors``)."""
        self.histograms({f"quant_error/{name}": err for name, err in errors.items()}, step)

    def log_bit_widths(self, counts: Mapping[str, int], table: str, step: int) -> None:
        """Parameter counts per stored bit-width as scalars ``model/params/<dtype>``, and ``table``
        (``lowbit.report.layers.bit_widths`` / ``bit_width_table``) as text."""
        self.scalars({f"model/params/{k}": float(n) for k, n in counts.items()}, step)
        self.text("model/bit_widths", table, step)

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
