"""autoquant on real models: the rung that met the target, its fidelity in the simulation and in
ONNX Runtime, and its latency against ONNX Runtime's own quantizer, in one process.

* The metric autoquant climbs on is fidelity to FP32 on the *selection* set (MobileNetV2: top-1
  agreement of logits; MiniLM: mean cosine of the sentence embeddings), computed in the
  PyTorch simulation; ``--max-drop`` is its largest acceptable drop from FP32's 1.0.
* The chosen model is then measured on the held-out *evaluation* set, in the simulation and on
  its exported file in ONNX Runtime, next to ORT's ``quantize_static`` (benchmarks/bench_ptq.py's
  recipe) from the same FP32 file and calibration inputs.
* Latency: batch 1, 1 thread, the files' runs interleaved (bench_ptq.interleaved_latency).

    python benchmarks/bench_autoquant.py [--models mobilenet_v2 minilm] [--max-drop 0.01]
                                         [--rungs ptq ranges algorithms selective mixed]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import _machine
import torch
from _selection import Workload, build_workload, command, log_to_stderr, parse
from bench_ptq import PACKAGES, Method, export_lowbit, interleaved_latency, ort_outputs, run_ort_static, score

import lowbit
from lowbit.analysis import RUNGS, autoquant
from lowbit.analysis._measure import layer_bits

log = logging.getLogger("bench_autoquant")
METRIC = {False: "top1_agreement", True: "cosine"}  # by Workload.embedding


def eval_on(w: Workload, batches: list[dict]):
    """``eval_fn(model)``: the workload's fidelity metric of ``model`` against FP32 on ``batches``."""
    with torch.no_grad():
        refs = [w.compared([w.model(*w.args(b)).numpy()], b) for b in batches]
    ref = torch.cat(refs)

    def eval_fn(model) -> float:
        with torch.no_grad():
            outs = torch.cat([w.compared([model(*w.args(b)).numpy()], b) for b in batches])
        return score(w, ref, outs)[METRIC[w.embedding]]

    return eval_fn


def simulation_outputs(w: Workload, model, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([w.compared([model(*w.args(b)).numpy()], b) for b in batches])


def bench_model(w: Workload, args, tmp: Path) -> str:
    calib = [w.args(b) for b in w.calib]
    start = time.perf_counter()
    result = autoquant(w.model, calib, eval_on(w, w.select), args.max_drop, budget=args.budget,
                       example_inputs=w.args({k: v[:1] for k, v in w.evals[0].items()}), rungs=args.rungs)
    seconds = time.perf_counter() - start
    fp32 = tmp / "fp32.onnx"
    export_lowbit(w, w.model, fp32)
    ours = Method("lowbit autoquant", tmp / "autoquant.onnx")
    export_lowbit(w, result.model, ours.path)
    ort = run_ort_static(w, fp32, tmp / "ort.onnx")
    fp32_method = Method("FP32", fp32)
    interleaved_latency(w, [fp32_method, ours, ort], args.runs, thread_counts=(1,), batches=(1,))
    ref = ort_outputs(w, fp32, w.evals)
    rows = [("lowbit autoquant, simulation", score(w, ref, simulation_outputs(w, result.model, w.evals)), None),
            ("lowbit autoquant, ONNX Runtime", score(w, ref, ort_outputs(w, ours.path, w.evals)), ours),
            ("ORT quantize_static, ONNX Runtime", score(w, ref, ort_outputs(w, ort.path, w.evals)), ort)]
    keys = list(rows[0][1])
    base = fp32_method.latency["t1b1"]["median_ms"]
    lines = [f"### {w.title}", "", (f"autoquant: {seconds:.0f} s, max drop {args.max_drop} of "
             f"{METRIC[w.embedding]} on {w.n(w.select)} selection inputs; budget {args.budget or 'none'}"), "",
             result.to_markdown(), "", (f"Held-out evaluation ({w.n(w.evals)} inputs) and latency (batch 1, "
             "1 thread, median ms, interleaved):"), "",
             "| model | " + " | ".join(keys) + " | latency ms | vs FP32 |", "|---" * (len(keys) + 3) + "|"]
    for name, s, m in rows:
        lat = "" if m is None else f"{m.latency['t1b1']['median_ms']:.2f}"
        ratio = "" if m is None else f"{m.latency['t1b1']['median_ms'] / base:.2f}"
        lines.append(f"| {name} | " + " | ".join(f"{s[k]:.4f}" for k in keys) + f" | {lat} | {ratio} |")
    lines.append("| FP32, ONNX Runtime | " + " | ".join("" for _ in keys) + f" | {base:.2f} | 1.00 |")
    ratio = ours.latency["t1b1"]["median_ms"] / ort.latency["t1b1"]["median_ms"]
    lines += ["", f"- lowbit autoquant / ORT quantize_static latency: {ratio:.2f}"]
    if args.html:
        write_html(args.html.with_name(f"{args.html.stem}-{w.name}.html"), w, result, ours.path)
    return "\n".join(lines) + "\n"


def write_html(path: Path, w: Workload, result, onnx: Path) -> None:
    """The result as ``lowbit report`` shows it: the ladder, sensitivity, bits, front, kernels."""
    mixed = result.mixed.to_dict() if result.mixed is not None else {}
    lowbit.report.html(path, title=f"autoquant: {w.title}", sensitivity=result.sensitivity,
                       bits=layer_bits(result.model), front=mixed or None, ladder=result.to_dict(),
                       kernels=lowbit.inspect_onnx(onnx),
                       notes=[(f"Metric: {METRIC[w.embedding]} with FP32 on the selection inputs (PyTorch "
                              "simulation); latency of each candidate's exported file in ONNX Runtime.")])
    log.info("wrote %s", path)


def _budget(text: str | None) -> dict | None:
    if text is None:
        return None
    key, _, value = text.partition("=")
    return {key: float(value)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "minilm"], choices=["mobilenet_v2", "minilm"])
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--budget", type=_budget, help="KEY=NUMBER, e.g. latency_ratio=1.0")
    parser.add_argument("--rungs", nargs="+", default=[r for r in RUNGS if r != "qat"], choices=list(RUNGS))
    parser.add_argument("--runs", type=int, default=100, help="timed latency runs per file")
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-select", type=int, default=128)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--out-md", type=Path)
    parser.add_argument("--html", type=Path, help="also write an HTML report per model (NAME-<model>.html)")
    args, argv = parse(parser, argv)
    log_to_stderr(log)
    logging.getLogger("lowbit.analysis").setLevel(logging.INFO)
    torch.manual_seed(0)
    info = _machine.machine(PACKAGES)
    text = f"`{command('bench_autoquant.py', argv)}`\n\n{_machine.machine_line(info, (*PACKAGES, 'lowbit'))}\n"
    print(text, flush=True)
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix=f"bench_autoquant_{name}_") as tmp:
            table = bench_model(build_workload(name, args), args, Path(tmp))
        print(table, flush=True)
        text += "\n" + table
    if args.out_md:
        args.out_md.write_text(text)


if __name__ == "__main__":
    main()
