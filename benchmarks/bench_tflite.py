"""TFLite / LiteRT: lowbit's fully-integer .tflite against the FP32 .tflite and LiteRT's own quantizer.

Per model, in one process, from the same float model and the same calibration inputs:

* FP32 .tflite: the float model converted by litert-torch (``export_tflite`` on a model without quantizers).
* lowbit: ``lowbit.quantize(model, calib, "w8a8", target="tflite")`` (the simulation also quantizes the
  outputs TFLite's int8 kernels write: logits, Linears before float ops), then ``export_tflite``
  (litert-torch's static-QDQ conversion carrying lowbit's scales).  Its time is quantize + export.
* ai-edge-quantizer: LiteRT's quantizer on the FP32 .tflite, recipe ``static_wi8_ai8`` (int8 weights and
  activations, min / max calibration on the same calibration inputs, one sample per item).

Fidelity on held-out inputs (``_selection``'s eval split), each run by LiteRT's interpreter at batch 1:
top-1 agreement / KL / cosine of logits with PyTorch FP32 (MobileNetV2), or cosine / nearest-neighbour
agreement of the mean-pooled sentence embeddings (MiniLM).  "sim vs file": lowbit's PyTorch simulation
against its own .tflite; "emulation vs file": ``lowbit.runtime.emulate_tflite`` (the same model computed
with XNNPACK's integer arithmetic in PyTorch) against it, where the model traces (MobileNetV2).
Latency: median / p90 of one ``invoke`` (XNNPACK delegate, LiteRT's CPU default)
at 1 and 2 threads, batch 1 (the files have static shapes), the three files' runs interleaved in rotating
rounds so that load from other processes falls on all alike.

    python benchmarks/bench_tflite.py [--models mobilenet_v2 minilm] [--n-calib 64] [--n-eval 128]
                                      [--runs 60] [--observer minmax] [--python PYTHON] [--out-md FILE]

``--python``: a Python with litert-torch (it pins typing-extensions < 4.13 through xdsl, so it may live in
its own venv); default ``$LOWBIT_LITERT_PYTHON``, else this one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import _machine
import torch
from _selection import Workload, add_models_argument, build_workload, command, log_to_stderr, parse
from bench_ptq import score

import lowbit
from lowbit.export.tflite import export_tflite
from lowbit.runtime import EmulationError, emulate_tflite
from lowbit.runtime.tflite import TFLiteModel, inspect_tflite

THREADS = (1, 2)
ROUNDS = 10
PACKAGES = ("torch", "ai-edge-litert", "ai-edge-quantizer", "litert-torch")
log = logging.getLogger("bench_tflite")


@dataclass
class Row:
    name: str
    path: Path
    make_s: float
    note: str = ""
    scores: dict = field(default_factory=dict)
    kernels: str = ""
    latency: dict = field(default_factory=dict)  # threads -> (median ms, p90 ms)


def one_by_one(w: Workload, batches: list[dict]) -> list[tuple[torch.Tensor, ...]]:
    """The batches' samples as batch-1 positional tuples (the .tflite files have static batch 1)."""
    return [tuple(t[i : i + 1] for t in w.args(b)) for b in batches for i in range(len(b[w.input_names[0]]))]


def compared(w: Workload, out: torch.Tensor, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What fidelity is measured on: logits, or MiniLM's pooled sentence embedding."""
    return w.compared([out.numpy()], dict(zip(w.input_names, args, strict=True)))


def run_litert_quantizer(fp32: Path, out: Path, samples: list[tuple]) -> Row:
    """ai-edge-quantizer's static int8 recipe on the FP32 file, calibrated on ``samples``."""
    from ai_edge_quantizer import quantizer, recipe

    reader = TFLiteModel(fp32)
    items = [dict(zip(reader.input_names, reader.feeds(*s), strict=True)) for s in samples]
    start = time.perf_counter()
    qt = quantizer.Quantizer(str(fp32), recipe.static_wi8_ai8())
    with contextlib.redirect_stdout(sys.stderr):
        result = qt.calibrate({"serving_default": items})
        qt.quantize(result).export_model(str(out), overwrite=True)
    return Row("ai-edge-quantizer static_wi8_ai8", out, time.perf_counter() - start,
               note="min/max calibration (its default algorithm)")


def latency(rows: list[Row], sample: tuple, runs: int) -> None:
    """Interleaved timing of ``invoke`` per row and thread count, into ``row.latency``."""
    for threads in THREADS:
        models = [TFLiteModel(r.path, threads=threads) for r in rows]
        feeds = [m.feeds(*sample) for m in models]
        times: list[list[float]] = [[] for _ in rows]
        for m, f in zip(models, feeds, strict=True):
            for _ in range(10):
                m.run(f)
        for k in range(ROUNDS):
            for j in range(len(rows)):
                i = (j + k) % len(rows)
                for _ in range(max(1, runs // ROUNDS)):
                    start = time.perf_counter()
                    models[i].run(feeds[i])
                    times[i].append((time.perf_counter() - start) * 1e3)
        for row, ts in zip(rows, times, strict=True):
            ts.sort()
            row.latency[threads] = (statistics.median(ts), ts[min(len(ts) - 1, round(0.9 * (len(ts) - 1)))])


def kernels(path: Path) -> str:
    report = inspect_tflite(path)
    n_int, n_float = sum(report.integer_ops.values()), sum(report.float_ops.values())
    floats = ", ".join(f"{k} x{v}" for k, v in sorted(report.float_ops.items())) or "none"
    return f"{n_int}/{n_int + n_float} int8; float: {floats}"


def bench(w: Workload, args: argparse.Namespace, folder: Path) -> str:
    calib = [w.args(b) for b in w.calib]
    example = tuple(t[:1] for t in calib[0])
    log.info("%s: FP32 .tflite", w.name)
    start = time.perf_counter()
    fp32 = export_tflite(w.model, folder / "fp32.tflite", example, python=args.python)
    rows = [Row("FP32 (litert-torch)", fp32, time.perf_counter() - start)]
    log.info("%s: lowbit w8a8 -> .tflite", w.name)
    start = time.perf_counter()
    qmodel = lowbit.quantize(w.model, calib, "w8a8", target="tflite", progress=False)
    quant_s = time.perf_counter() - start
    export_tflite(qmodel, folder / "lowbit.tflite", example, calibration=calib, observer=args.observer,
                  python=args.python)
    outputs = len(qmodel.lowbit_summary.options.get("quantized_outputs", ()))
    rows.append(Row("lowbit w8a8", folder / "lowbit.tflite", time.perf_counter() - start,
                    note=f"quantize {quant_s:.1f} s + export; {outputs} layer outputs quantized in the simulation "
                         "as TFLite's kernels write them"))
    log.info("%s: ai-edge-quantizer", w.name)
    rows.append(run_litert_quantizer(fp32, folder / "aeq.tflite", one_by_one(w, w.calib)))

    evals = one_by_one(w, w.evals)
    with torch.no_grad():
        ref = torch.cat([compared(w, w.model(*s), s) for s in evals])
        sim = torch.cat([compared(w, qmodel(*s), s) for s in evals])
    outs = {}
    for row in rows:
        model = TFLiteModel(row.path, threads=2)
        outs[row.name] = torch.cat([compared(w, model(*s), s) for s in evals])
        row.scores = score(w, ref, outs[row.name])
        row.kernels = kernels(row.path)
    sim_scores, file_vs_sim = score(w, ref, sim), score(w, sim, outs["lowbit w8a8"])
    emulation = emulation_line(w, qmodel, evals, outs["lowbit w8a8"])
    latency(rows, evals[0], args.runs)
    return table(w, rows, sim_scores, file_vs_sim, len(evals)) + emulation


def emulation_line(w: Workload, qmodel, evals: list[tuple], file_out: torch.Tensor) -> str:
    """``emulate_tflite`` (XNNPACK's integer arithmetic in PyTorch) against the file: equal outputs, agreement."""
    try:
        emulated = emulate_tflite(qmodel)
    except EmulationError as exc:
        return f"\nlowbit integer emulation (emulate_tflite): not run ({exc})\n"
    with torch.no_grad():
        outs = [emulated(*s) for s in evals]
    emu = torch.cat([compared(w, o, s) for o, s in zip(outs, evals, strict=True)])
    equal = sum(bool(torch.equal(a, b)) for a, b in zip(emu, file_out, strict=True))
    scores = ", ".join(f"{k} {v:.4f}" for k, v in score(w, emu, file_out).items())
    return (f"\nlowbit integer emulation (emulate_tflite) vs its .tflite: {equal} of {len(evals)} outputs bit-identical; "
            f"{scores}\n")


def table(w: Workload, rows: list[Row], sim: dict, file_vs_sim: dict, n_eval: int) -> str:
    keys = list(rows[0].scores)
    head = ["method", *keys, "make s", "int8 kernels"] + [f"{t}T b1 ms (p90)" for t in THREADS] + \
           [f"{t}T vs FP32" for t in THREADS]
    lines = [f"### {w.title}", "", f"Fidelity against PyTorch FP32 on {n_eval} held-out inputs.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp32 = rows[0].latency
    for r in rows:
        cells = [r.name, *(f"{r.scores[k]:.4f}" for k in keys), f"{r.make_s:.1f}", r.kernels]
        cells += [f"{r.latency[t][0]:.2f} ({r.latency[t][1]:.2f})" for t in THREADS]
        cells += [f"{r.latency[t][0] / fp32[t][0]:.2f}x" for t in THREADS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "lowbit simulation (PyTorch) vs FP32: " + ", ".join(f"{k} {v:.4f}" for k, v in sim.items()),
              "", "lowbit simulation vs its .tflite: " + ", ".join(f"{k} {v:.4f}" for k, v in file_vs_sim.items()),
              "", *(f"- {r.name}: {r.note}" for r in rows if r.note), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_models_argument(parser)
    parser.set_defaults(models=["mobilenet_v2", "minilm"])
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=128)
    parser.add_argument("--runs", type=int, default=60, help="timed invokes per file and thread count")
    parser.add_argument("--python", default=os.environ.get("LOWBIT_LITERT_PYTHON"),
                        help="a Python with litert-torch (default: $LOWBIT_LITERT_PYTHON, else this one)")
    parser.add_argument("--observer", default="minmax",
                        help="export_tflite's range estimator for outputs no lowbit quantizer reads (none "
                             "with target='tflite')")
    parser.add_argument("--out-md", type=Path)
    args, argv = parse(parser, argv)
    args.n_select = 1  # (the workloads build a selection split; this benchmark does not use it)
    log_to_stderr(log)
    info = _machine.machine(PACKAGES)
    if args.python:  # the converter's own venv
        info["litert-torch"] = subprocess.run(
            [args.python, "-c", "import importlib.metadata as m; print(m.version('litert-torch'))"],
            capture_output=True, text=True, check=False).stdout.strip() or "absent"
    parts = [f"Command: `{command('bench_tflite.py', argv)}`", "",
             _machine.machine_line(info, PACKAGES, threads=True), ""]
    with tempfile.TemporaryDirectory(prefix="bench-tflite-") as tmp:
        for name in args.models:
            folder = Path(tmp, name)
            folder.mkdir()
            started = time.perf_counter()
            parts.append(bench(build_workload(name, args), args, folder))
            parts.append(f"({name}: {time.perf_counter() - started:.0f} s in all)\n")
            print("\n".join(parts[-2:]), flush=True)
    if args.out_md:
        args.out_md.write_text("\n".join(parts))


if __name__ == "__main__":
    main()
