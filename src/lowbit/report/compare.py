"""``compare``: accuracy, size and latency of a quantized model against FP32.

Every figure says where it was measured: ``pytorch`` (fake-quant simulation) or
``ort`` (the exported ONNX file in ONNX Runtime's CPU provider).  With an ONNX file,
``parity`` also says how closely PyTorch predicts ORT: the float simulation, and the
integer emulation of ORT's kernels (``lowbit.runtime.emulate_ort``), which should
match bit for bit wherever it applies.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..nn.walk import run_model
from ..runtime.emulate import EmulationError, emulate_ort
from ..runtime.ort import OrtModel, measure_latency
from .fidelity import fidelity, first_tensor, token_mask


def _slice_batch(inputs, n: int):
    """The first ``n`` rows of a tensor, a tuple of tensors or a dict of keyword tensors."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:n]
    if isinstance(inputs, Mapping):
        return {k: v[:n] for k, v in inputs.items()}
    return tuple(v[:n] for v in inputs)


def _batch_rows(inputs) -> int:
    """Rows (dimension 0) of one batch of model inputs; the smallest, if its tensors disagree."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return min(len(v) for v in values)


@dataclass
class Comparison:
    """Rows of measurements; prints as markdown, saves as JSON."""

    rows: list[dict] = field(default_factory=list)
    latency: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # PyTorch vs ORT on the quantized model: "simulation", "integer emulation" -> fidelity metrics
    parity: dict[str, dict] = field(default_factory=dict)

    def to_markdown(self) -> str:
        metric_keys = sorted({k for r in self.rows for k in r["metrics"]})
        lines = ["| model | measured in | size (MB) | " + " | ".join(metric_keys) + " |",
                 "|---|---|---:|" + "---:|" * len(metric_keys)]
        for r in self.rows:
            size = "" if r["size_mb"] is None else f"{r['size_mb']:.2f}"
            cells = [_fmt(r["metrics"].get(k)) for k in metric_keys]
            lines.append(f"| {r['model']} | {r['where']} | {size} | " + " | ".join(cells) + " |")
        if self.latency:
            lines += ["", "| model | threads | batch | median ms | p90 ms | vs FP32 |", "|---|---:|---:|---:|---:|---:|"]
            base = {(x["threads"], x["batch"]): x["median_ms"] for x in self.latency if x["model"] == "fp32"}
            for x in self.latency:
                ratio = x["median_ms"] / base[(x["threads"], x["batch"])] if (x["threads"], x["batch"]) in base else None
                lines.append(f"| {x['model']} | {x['threads']} | {x['batch']} | {x['median_ms']:.3f} | "
                             f"{x['p90_ms']:.3f} | {_fmt(ratio, 'x')} |")
        lines += [f"\n{n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = to_markdown

    def to_dict(self) -> dict:
        return {"rows": self.rows, "latency": self.latency, "notes": self.notes, "parity": self.parity}

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


def _fmt(value, suffix: str = "") -> str:
    if value is None:
        return ""
    return f"{value:.4f}{suffix}" if abs(value) < 100 else f"{value:.1f}{suffix}"


def compare(
    fp32_model: nn.Module,
    qmodel: nn.Module,
    eval_fn: Callable[[Callable], float | dict] | None = None,
    *,
    inputs,
    onnx: str | Path | None = None,
    fp32_onnx: str | Path | None = None,
    threads: Sequence[int] = (1,),
    batch_sizes: Sequence[int] = (1,),
    latency_runs: int = 50,
    emulate: bool = True,
) -> Comparison:
    """Measure ``qmodel`` (and its exported ONNX file) against ``fp32_model``.

    Args:
        fp32_model: the float model.
        qmodel: its quantized copy (PyTorch fake-quant simulation).
        eval_fn: optional user metric: called as ``eval_fn(predict)`` where
            ``predict(batch) -> outputs`` runs one model; returns a float or a dict of
            floats.  Without it, fidelity to FP32 on ``inputs`` is reported (top-1
            agreement, KL and cosine for logits).
        inputs: one batch of model inputs (tensor, tuple, or dict of keyword tensors such
            as a tokenizer's output), used for fidelity and, sliced to each of
            ``batch_sizes``, for latency.  A dict is fed to the ONNX files by name: export
            them with the same dict (``export_onnx`` names the inputs after its keys).
        onnx: the exported quantized model; enables the ORT rows, latency and
            simulation-vs-ORT parity.
        fp32_onnx: the exported float model; exported to a temporary file when None.
        threads, batch_sizes: latency grid (ORT intra-op threads, batch size).
        latency_runs: timed runs per latency cell (after 10 warm-up runs).
        emulate: with ``onnx``, also run ``qmodel`` as ORT's integer kernels in PyTorch
            (``lowbit.runtime.emulate_ort``) and report its parity with ORT; where the
            emulation does not apply, a note says why.

    Returns:
        A ``Comparison``; ``print(result)`` shows markdown tables.
    """
    too_big = [b for b in batch_sizes if b > _batch_rows(inputs)]
    if onnx is not None and too_big:
        raise ValueError(f"compare: batch_sizes {too_big} exceed the {_batch_rows(inputs)} rows of inputs; "
                         "pass a larger batch or smaller batch_sizes")
    report = Comparison()
    fp32_model.eval()
    qmodel.eval()
    with torch.no_grad():
        ref = first_tensor(run_model(fp32_model, inputs))
        sim = first_tensor(run_model(qmodel, inputs))
    predictors: dict[str, tuple[str, Callable, torch.Tensor, float | None]] = {
        "fp32": ("pytorch", fp32_model, ref, None),
        "quantized": ("pytorch", qmodel, sim, None),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if onnx is not None:
            if fp32_onnx is None:
                from ..export import export_onnx

                fp32_onnx = Path(tmp) / "fp32.onnx"
                export_onnx(fp32_model, fp32_onnx, inputs)
            ort_fp32, ort_q = OrtModel(fp32_onnx, threads=max(threads)), OrtModel(onnx, threads=max(threads))
            predictors["fp32 onnx"] = ("ort", ort_fp32, first_tensor(run_model(ort_fp32, inputs)),
                                       os.path.getsize(fp32_onnx) / 1e6)
            predictors["quantized onnx"] = ("ort", ort_q, first_tensor(run_model(ort_q, inputs)),
                                            os.path.getsize(onnx) / 1e6)
            ort_out = predictors["quantized onnx"][2]
            report.parity["simulation"] = fidelity(sim, ort_out)
            report.notes.append("Simulation vs ORT parity (quantized PyTorch vs quantized ONNX): "
                                + _metrics(report.parity["simulation"]))
            if emulate:
                _emulation_parity(report, qmodel, inputs, ort_out)
            report.latency = _latency_grid(fp32_onnx, onnx, inputs, threads, batch_sizes, latency_runs)
        mask = token_mask(inputs, ref)
        if mask is not None:
            report.notes.append("Fidelity to FP32 counts real tokens only (the inputs' attention_mask): "
                                "padding positions hold values no consumer reads.")
        for name, (where, predict, out, size) in predictors.items():
            metrics = fidelity(ref, out, mask)
            if eval_fn is not None:
                with torch.no_grad():
                    user = eval_fn(lambda batch, p=predict: first_tensor(run_model(p, batch)))
                metrics.update(user if isinstance(user, Mapping) else {"metric": float(user)})
            report.rows.append({"model": name, "where": where, "size_mb": size, "metrics": metrics})
    report.notes.append(f"Latency: ONNX Runtime CPU provider, {platform.machine()}, inter-op threads 1, "
                        f"{latency_runs} timed runs after 10 warm-up runs.")
    return report


def _metrics(parity: dict) -> str:
    return ", ".join(f"{k} {v:.5f}" for k, v in parity.items())


def _emulation_parity(report: Comparison, qmodel: nn.Module, inputs, ort_out: torch.Tensor) -> None:
    """Run ``qmodel`` as ORT's integer kernels (``emulate_ort``) and add its parity with ORT."""
    try:
        emulated = first_tensor(run_model(emulate_ort(qmodel), inputs))
    except (EmulationError, OverflowError) as exc:
        report.notes.append(f"Integer emulation of ORT: not applicable to this model ({exc})")
        return
    report.parity["integer emulation"] = fidelity(emulated, ort_out)
    exact = " (bit-exact)" if torch.equal(emulated, ort_out) else ""
    report.notes.append("Integer emulation vs ORT parity (ORT's integer kernels in PyTorch, "
                        f"lowbit.runtime.emulate_ort){exact}: " + _metrics(report.parity["integer emulation"]))


def _latency_grid(fp32_onnx, onnx, inputs, threads, batch_sizes, runs) -> list[dict]:
    out = []
    for t in threads:
        models = {"fp32": OrtModel(fp32_onnx, threads=t), "quantized": OrtModel(onnx, threads=t)}
        for b in batch_sizes:
            batch = _slice_batch(inputs, b)
            for name, m in models.items():
                # a dict feeds the ONNX inputs by name; a tuple by position
                feeds = m.feeds(*batch) if isinstance(batch, tuple) else m.feeds(batch)
                stats = measure_latency(m, feeds, runs=runs, batch=b)
                out.append({"model": name, **stats.to_dict()})
    return out
