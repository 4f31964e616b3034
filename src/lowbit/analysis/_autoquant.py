"""``autoquant``: climb from the cheapest fix to the dearest until the model is good enough.

    result = lowbit.autoquant(model, calib, eval_fn, max_drop=0.01, budget={"avg_weight_bits": 8},
                              example_inputs=batch)
    result.model        # the best model found (always returned)
    result.recipe       # replays it: lowbit quantize / lowbit export --recipe (with model and data)
    result.steps        # every rung: what was tried, metric, size, latency of the exported file, time
    result.reason       # which rung met the target, or why none did and what was kept instead

The rungs, in order (``lowbit.analysis._ladder``)::

    ptq         the preset config as it is
    ranges      other activation range estimators (percentile, entropy, min-max, MSE)
    algorithms  CLE, bias correction, SmoothQuant, AdaRound (weights under 8 bits) on the best ranges
    selective   the most sensitive layers (SQNR sensitivity) kept float, 1, 2, 4 ... of them
    mixed       mixed precision (lowbit.analysis.mixed_precision) on its Pareto front, cheapest first
    qat         quantization-aware training with distillation from FP32 (only with train_data)

Each rung starts from the best candidate of the rungs before it and the ladder stops at the
first rung with a candidate whose metric drop is at most ``max_drop`` and which fits
``budget``; of its candidates that did, the one with the fewest weight bits (then the highest
metric) is chosen.  Within a rung candidates go cheapest first and the rung stops at the first
that meets the target (the mixed rung bisects its Pareto front).  When none does, the result is the best trade-off found: the highest metric among
the candidates within budget (the smallest budget excess when none is), and ``reason`` says so.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..config import QuantConfig
from ._measure import Deployed, check_budget

log = logging.getLogger(__name__)

RUNGS = ("ptq", "ranges", "algorithms", "selective", "mixed", "qat")


@dataclass
class Rung:
    """One candidate the ladder tried."""

    rung: str  # which rung (RUNGS)
    tried: str  # what, in words: "w8a8, observer percentile, algorithms cle"
    metric: float | None  # eval_fn on the candidate (PyTorch simulation)
    drop: float | None  # FP32 metric - metric
    avg_weight_bits: float
    size_mb: float  # parameters at their storage width (lowbit.analysis._measure.footprint)
    onnx_mb: float | None = None  # the exported file, when example_inputs were given
    latency_ms: float | None = None  # median latency of the exported file in ONNX Runtime
    latency_ratio: float | None = None  # latency / the uniform-INT8 reference's latency
    seconds: float = 0.0  # time this candidate took (quantize, evaluate, export, time)
    within_budget: bool = True
    met: bool = False  # drop <= max_drop and within budget
    note: str = ""


@dataclass
class AutoQuantResult:
    """What ``autoquant`` returns; see the module docstring."""

    model: nn.Module  # the chosen quantized model
    config: QuantConfig  # its config
    recipe: dict  # config, algorithms / training and target: what lowbit replays
    steps: list[Rung]
    chosen: int  # index in steps of the chosen candidate
    met: bool  # whether the chosen candidate met max_drop and the budget
    reason: str
    fp32_metric: float
    max_drop: float
    budget: dict | None = None
    seconds: float = 0.0
    sensitivity: object = None  # the SensitivityReport the selective / mixed rungs used, if they ran
    mixed: object = None  # the MixedPrecisionResult of the mixed rung, if it ran
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything but the model, as JSON values."""
        out = {"format": "lowbit.AutoQuantResult", "version": 1, "met": self.met, "reason": self.reason,
               "chosen": self.chosen, "fp32_metric": self.fp32_metric, "max_drop": self.max_drop,
               "budget": self.budget, "seconds": self.seconds, "recipe": self.recipe,
               "steps": [asdict(s) for s in self.steps]}
        if self.sensitivity is not None:
            out["sensitivity"] = self.sensitivity.to_dict()
        if self.mixed is not None and hasattr(self.mixed, "to_dict"):
            out["mixed"] = self.mixed.to_dict()
        return out

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    def to_markdown(self) -> str:
        head = ["rung", "tried", "metric", "drop", "avg bits", "size MB", "latency ms", "vs INT8", "s", "met"]
        lines = [(f"autoquant: FP32 metric {self.fp32_metric:.4f}, max drop {self.max_drop}, "
                 f"budget {self.budget or 'none'}"), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, s in enumerate(self.steps):
            mark = " **(chosen)**" if i == self.chosen else ""
            cells = [s.rung, s.tried + mark, _fmt(s.metric), _fmt(s.drop), _fmt(s.avg_weight_bits, 2),
                     _fmt(s.size_mb, 2), _fmt(s.latency_ms, 2), _fmt(s.latency_ratio, 2), f"{s.seconds:.0f}",
                     "yes" if s.met else ("over budget" if not s.within_budget else "no")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", self.reason]
        return "\n".join(lines)


def _fmt(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def autoquant(
    model: nn.Module,
    calib_data: Iterable,
    eval_fn: Callable[[nn.Module], float],
    max_drop: float,
    *,
    budget: Mapping[str, float] | None = None,
    train_data: Iterable | None = None,
    config: QuantConfig | str = "w8a8",
    example_inputs=None,
    rungs: Sequence[str] = RUNGS,
    loss_fn: Callable | None = None,
    qat_epochs: int = 1,
    qat_lr: float = 1e-4,
    max_float_layers: int | None = None,
    target: str = "auto",
    progress: bool = False,
) -> AutoQuantResult:
    """Quantize ``model`` with the cheapest rung of the ladder that keeps ``eval_fn`` within
    ``max_drop`` of FP32 and fits ``budget`` (module docstring).

    Args:
        model: the float model (not changed).
        calib_data: calibration batches of model inputs (re-iterable).
        eval_fn: ``eval_fn(model) -> float``, higher is better (accuracy, top-1 agreement with
            FP32, negative perplexity ...), called on each candidate in eval mode.
        max_drop: the largest acceptable ``eval_fn(fp32) - eval_fn(candidate)``.
        budget: at most one of ``{"size_mb": ...}``, ``{"avg_weight_bits": ...}`` or
            ``{"latency_ratio": ...}`` (latency of the exported file relative to the model
            quantized uniformly with ``w8a8``; needs ``example_inputs``).
        train_data: ``(inputs, target)`` batches; enables the ``qat`` rung.
        config: the starting preset or config.
        example_inputs: one batch of model inputs; when given every candidate is exported to
            ONNX and timed in ONNX Runtime (1 thread).
        rungs: which rungs to climb, a subset of ``RUNGS`` in that order.
        loss_fn: the task loss for QAT, ``loss_fn(output, target)`` (default cross entropy).
        qat_epochs, qat_lr: QAT length and learning rate (AdamW), distilled from FP32.
        max_float_layers: the most layers the selective rung keeps float (default a quarter).
        target: the integer target, as for ``lowbit.quantize``.
        progress: progress bars.

    Returns:
        An ``AutoQuantResult``, whether or not the target was met.

    Raises:
        ValueError: a bad ``budget``, ``max_drop`` or rung name; a latency budget without
            ``example_inputs``.
    """
    from ._ladder import Ladder

    checked = check_budget(budget)
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or max_drop < 0:
        raise ValueError(f"max_drop must be a number >= 0, got {max_drop!r}")
    unknown = [r for r in rungs if r not in RUNGS]
    if unknown or not rungs:
        raise ValueError(f"unknown rung(s) {unknown}; choose from {RUNGS}" if unknown else "rungs is empty")
    if checked and checked[0] == "latency_ratio" and example_inputs is None:
        raise ValueError("a latency_ratio budget is measured on the exported file: pass example_inputs")
    start = time.perf_counter()
    ladder = Ladder(model, calib_data, eval_fn, float(max_drop), budget=checked, train_data=train_data,
                    config=config, deployed=None if example_inputs is None else Deployed(example_inputs),
                    loss_fn=loss_fn, qat_epochs=qat_epochs, qat_lr=qat_lr, max_float_layers=max_float_layers,
                    target=target, progress=progress)
    result = ladder.climb([r for r in RUNGS if r in rungs])
    result.seconds = time.perf_counter() - start
    return result
