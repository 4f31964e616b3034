"""OpenVINO: lowbit's IR against OpenVINO FP32 and NNCF's quantizer, all run by OpenVINO's CPU plugin.

Per model (bench_ptq's workloads: MobileNetV2 on photo crops, all-MiniLM-L6-v2 on sentences,
the same calibration and evaluation inputs), every method is an OpenVINO IR run in this process:

* FP32: the float model through ``export_openvino`` (its QDQ-free ONNX, ``convert_model``), run
  at inference precision f32; its outputs are the reference.
* FP32, OpenVINO's default precision: the same IR with no precision hint (bf16 on CPUs with
  AVX512-BF16 / AMX): what a user gets from OpenVINO without quantizing.
* NNCF: ``nncf.quantize`` on the FP32 ``openvino.Model`` with its defaults (``model_type=TRANSFORMER``
  for MiniLM), the same calibration inputs, one per item; its usual route to OpenVINO.
* lowbit w8a8: ``lowbit.quantize(model, calib, "w8a8")`` then ``export_openvino`` (uint8 affine
  activations per tensor, int8 symmetric weights per output channel).
* lowbit w8a8 + SmoothQuant 0.8 (MiniLM only, as in bench_ptq).
* lowbit w8a8, s8 symmetric activations: the same with int8 symmetric activations (``--no-sym``
  drops it): which activation grid OpenVINO runs faster.

Fidelity to FP32 on the evaluation set (top-1 agreement, KL and cosine of logits; MiniLM:
nearest-neighbour agreement and cosine of sentence embeddings, as bench_ptq).  For lowbit's rows
also: the PyTorch simulation against OpenVINO, ONNX Runtime against OpenVINO on the same QDQ file,
and the simulation against ONNX Runtime.  "int8 layers": compute layers (Convolution,
FullyConnected, MatMul) whose runtime precision in the compiled model is u8/i8, over all of them.
Latency: median / p90 ms of one synchronous inference at batch 1, 1 and 2 threads (one stream),
static input shapes for every method, the methods' runs interleaved (rounds in rotating order).

    python benchmarks/bench_openvino.py [--models mobilenet_v2 minilm] [--runs 50] [--no-sym]
                                        [--json out.json] [--out-md out.md]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _machine
import bench_ptq as bp
import torch
from _selection import Workload, build_workload, command, log_to_stderr, parse

import lowbit
from lowbit.config import LayerQuant
from lowbit.export.openvino import export_openvino, import_openvino
from lowbit.runtime import OrtModel
from lowbit.runtime.openvino import OpenVINOModel

MODELS = ("mobilenet_v2", "minilm")
THREADS = (1, 2)
ROUNDS = 10
PACKAGES = ("torch", "openvino", "nncf", "onnxruntime", "onnx", "transformers")

log = logging.getLogger("bench_openvino")


@dataclasses.dataclass
class Method(bp.Method):
    precision: str | None = "f32"  # OpenVINO inference precision hint (None: OpenVINO's default)
    report: dict = dataclasses.field(default_factory=dict)
    parity: dict = dataclasses.field(default_factory=dict)  # lowbit rows: simulation / ORT / OpenVINO


def s8_symmetric(config: str = "w8a8") -> lowbit.QuantConfig:
    """``config`` with int8 symmetric per-tensor activations instead of uint8 affine."""
    base = lowbit.CONFIGS[config]
    spec = dataclasses.replace(base.default.input.spec, signed=True, symmetric=True)
    act = dataclasses.replace(base.default.input, spec=spec)
    return dataclasses.replace(base, name=f"{config}-s8sym", default=LayerQuant(weight=base.default.weight, input=act))


def export_ir(w: Workload, model, path: Path) -> Path:
    """``export_openvino`` with bench_ptq's export options (batch-only dynamic axes), the ONNX kept."""
    return export_openvino(model, path, w.args(w.calib[0]), input_names=w.input_names, output_names=w.output_names,
                           dynamic_axes={n: {0: "batch"} for n in w.input_names}, keep_onnx=True)


def run_lowbit(w: Workload, config, name: str, out: Path, smoothquant: float | None = None
               ) -> tuple[Method, torch.nn.Module]:
    calib = [w.args(b) for b in w.calib]
    start = time.perf_counter()
    qmodel = lowbit.quantize(w.model, calib, config, progress=False, smoothquant=smoothquant)
    export_ir(w, qmodel, out)
    return Method(name, out, time.perf_counter() - start, note="quantize + export_openvino"), qmodel


def run_nncf(w: Workload, fp32: Path, out: Path) -> Method:
    try:
        import nncf
    except ImportError as exc:
        return Method("NNCF -> OpenVINO", skipped=f"nncf not importable ({exc})")
    ov = import_openvino()
    items = [{n: t[i: i + 1] for n, t in w.feeds(b).items()} for b in w.calib for i in range(len(b[w.input_names[0]]))]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its progress bars, off the markdown
        qmodel = nncf.quantize(ov.Core().read_model(fp32), nncf.Dataset(items), subset_size=len(items),
                               **w.nncf_options)
    ov.save_model(qmodel, out, compress_to_fp16=False)
    options = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in w.nncf_options.items()) or "defaults"
    return Method("NNCF -> OpenVINO", out, time.perf_counter() - start, note=f"nncf {nncf.__version__} ({options})")


# -- measurements ---------------------------------------------------------------------------------
def ov_outputs(w: Workload, m: Method, threads: int = 2) -> torch.Tensor:
    model = OpenVINOModel(m.path, threads=threads, precision=m.precision)
    return torch.cat([w.compared(model.run(w.feeds(b)), b) for b in w.evals])


def sim_outputs(w: Workload, qmodel) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([w.compared([qmodel(*w.args(b)).numpy()], b) for b in w.evals])


def ort_outputs(w: Workload, onnx_path: Path) -> torch.Tensor:
    session = OrtModel(onnx_path, threads=2)
    return torch.cat([w.compared(session.run(w.feeds(b)), b) for b in w.evals])


def parity(w: Workload, a: torch.Tensor, b: torch.Tensor) -> dict:
    """How closely two runs of one quantized model agree: top-1 agreement and max |Δ| of logits, or
    mean / min cosine of sentence embeddings."""
    if w.embedding:
        cos = (a * b).sum(1)  # rows are unit vectors
        return {"cosine": cos.mean().item(), "min_cosine": cos.min().item()}
    return {"top1_agreement": (a.argmax(1) == b.argmax(1)).float().mean().item(),
            "max_abs": (a - b).abs().max().item()}


def describe(m: Method) -> None:
    m.size_mb = (m.path.stat().st_size + m.path.with_suffix(".bin").stat().st_size) / 1e6
    report = OpenVINOModel(m.path, threads=1, precision=m.precision).int8_report()
    m.report = {"integer_fraction": report.integer_fraction, "integer": report.count("integer"),
                "float_compute": report.count("float_compute"), "float_compute_layers": report.float_compute_layers,
                "float_other": report.float_other, "precision": report.inference_precision,
                "counts": {f"{t} {p}": n for (t, p), n in report.counts().items()}}


def interleaved_latency(w: Workload, methods: list[Method], runs: int) -> None:
    """Median / p90 ms of one batch-1 inference per method and thread count, interleaved."""
    feeds = w.feeds(w.evals[0], 1)
    shapes = {n: a.shape for n, a in feeds.items()}
    per_round = max(1, math.ceil(runs / ROUNDS))
    for threads in THREADS:
        models = [OpenVINOModel(m.path, threads=threads, precision=m.precision, shapes=shapes) for m in methods]
        times: list[list[float]] = [[] for _ in methods]
        for model in models:
            for _ in range(5):
                model.run(feeds)
        for r in range(ROUNDS):
            for k in range(len(methods)):
                i = (k + r) % len(methods)  # rotate who goes first
                models[i].run(feeds)  # untimed: wakes this model's threads after the others ran
                for _ in range(per_round):
                    start = time.perf_counter()
                    models[i].run(feeds)
                    times[i].append((time.perf_counter() - start) * 1e3)
        for m, t in zip(methods, times):
            t.sort()
            m.latency[f"t{threads}b1"] = {"median_ms": statistics.median(t),
                                          "p90_ms": t[min(len(t) - 1, round(0.9 * (len(t) - 1)))]}


def bench_model(w: Workload, args, tmp: Path) -> dict:
    fp32 = Method("FP32 (f32)", export_ir(w, w.model, tmp / "fp32.xml"))
    default = Method("FP32, OpenVINO default precision", fp32.path, precision=None)
    methods, qmodels = [fp32, default, run_nncf(w, fp32.path, tmp / "nncf.xml")], {}
    variants = [("lowbit w8a8", lowbit.CONFIGS["w8a8"], None)]
    if w.smoothquant is not None:  # MiniLM: bench_ptq's SmoothQuant row too
        variants.append((f"lowbit w8a8 + SmoothQuant {w.smoothquant:g}", lowbit.CONFIGS["w8a8"], w.smoothquant))
    if args.sym:
        variants.append(("lowbit w8a8, s8 symmetric activations", s8_symmetric(), None))
    for i, (name, config, alpha) in enumerate(variants):
        m, qmodels[name] = run_lowbit(w, config, name, tmp / f"lowbit{i}.xml", smoothquant=alpha)
        methods.append(m)
    ready = [m for m in methods if m.path is not None]
    ref = ov_outputs(w, fp32)
    with torch.no_grad():
        torch_ref = torch.cat([w.compared([w.model(*w.args(b)).numpy()], b) for b in w.evals])
    for m in ready:
        out = ov_outputs(w, m)
        m.scores = bp.score(w, ref, out)
        if m.name in qmodels:
            sim, ort = sim_outputs(w, qmodels[m.name]), ort_outputs(w, m.path.with_suffix(".onnx"))
            m.parity = {"sim_vs_openvino": parity(w, sim, out), "ort_vs_openvino": parity(w, ort, out),
                        "sim_vs_ort": parity(w, sim, ort)}
        describe(m)
    interleaved_latency(w, ready, args.runs)
    return {"model": w.name, "title": w.title, "embedding": w.embedding, "n_calib": w.n(w.calib),
            "n_eval": w.n(w.evals), "fp32_vs_torch_max_abs": (ref - torch_ref).abs().max().item(),
            "methods": [{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(m).items()} for m in methods]}


# -- report ---------------------------------------------------------------------------------------
def _row(m: dict, fid_keys: list[str], base: dict) -> str:
    if m["skipped"]:
        return f"| {m['name']} | skipped: {m['skipped']} |"
    r = m["report"]
    ints = "–" if r["integer_fraction"] is None else \
        f"{r['integer_fraction']:.0%} ({r['integer']}/{r['integer'] + r['float_compute']})"
    cells = [m["name"], r["precision"], *(f"{m['scores'][k]:.4f}" if k != "kl" else f"{m['scores'][k]:.3f}"
                                          for k in fid_keys),
             bp._fmt(m["quant_s"], ".1f"), f"{m['size_mb']:.1f}", ints]
    for t in THREADS:
        lat, ref = m["latency"][f"t{t}b1"], base["latency"][f"t{t}b1"]
        ratio = "" if m is base else f" ({lat['median_ms'] / ref['median_ms']:.2f}×)"
        cells.append(f"{lat['median_ms']:.2f} / {lat['p90_ms']:.2f}{ratio}")
    return "| " + " | ".join(cells) + " |"


def _parity_rows(r: dict) -> list[str]:
    what = "cosine (mean / min)" if r["embedding"] else "top-1 agreement / max |Δ logit|"
    lines = ["", f"Simulation vs runtime, {what}, on the evaluation set:", "",
             "| lowbit row | simulation vs OpenVINO | ONNX Runtime vs OpenVINO (same QDQ file) | simulation vs ONNX Runtime |",
             "|---|---:|---:|---:|"]
    for m in (m for m in r["methods"] if m["parity"]):
        p = m["parity"]
        cell = (lambda s: f"{s['cosine']:.5f} / {s['min_cosine']:.5f}") if r["embedding"] else \
            (lambda s: f"{s['top1_agreement']:.2%} / {s['max_abs']:.3f}")
        lines.append(f"| {m['name']} | {cell(p['sim_vs_openvino'])} | {cell(p['ort_vs_openvino'])} | "
                     f"{cell(p['sim_vs_ort'])} |")
    return lines


def _float_notes(r: dict) -> list[str]:
    lines = []
    for m in r["methods"]:
        if m["skipped"] or m["name"].startswith("FP32"):
            continue
        rep = m["report"]
        compute = ", ".join(rep["float_compute_layers"][:4]) + (" ..." if len(rep["float_compute_layers"]) > 4 else "")
        other = ", ".join(f"{t} ×{n}" for t, n in rep["float_other"].items()) or "none"
        lines.append(f"- {m['name']}: float compute layers: {rep['float_compute'] or 'none'}"
                     f"{f' ({compute})' if compute else ''}; other float layers: {other}")
    return lines


def model_markdown(r: dict) -> str:
    fid, fid_keys = bp._fidelity_columns(r)
    unit = "sentences" if r["embedding"] else "images"
    head = ["method", "precision", *fid, "quant s", "MB", "int8 layers", *(f"{t}T b1 ms" for t in THREADS)]
    base = r["methods"][0]
    intro = (f"{r['n_calib']} calibration / {r['n_eval']} evaluation {unit}. Fidelity vs the FP32 IR in OpenVINO "
             f"(f32); FP32 IR vs torch max |Δ| {r['fp32_vs_torch_max_abs']:.1e}. Latency: median / p90 ms "
             "(× FP32 f32), batch 1, interleaved.")
    lines = [f"### {r['model']}: {r['title']}", "", intro, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2),
             *(_row(m, fid_keys, base) for m in r["methods"])]
    lines += _parity_rows(r)
    lines += ["", "What stayed in float (from the compiled models' execution graphs):", *_float_notes(r)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=50, help="timed runs per method and thread count")
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--no-sym", dest="sym", action="store_false", help="skip the s8 symmetric activations row")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out-md", type=Path)
    args, argv = parse(parser, argv)
    args.n_select = 32  # the workloads draw a selection set; unused here
    log_to_stderr(log)
    torch.manual_seed(0)
    info = _machine.machine(PACKAGES)
    text = (f"`{command('bench_openvino.py', argv)}`\n\n"
            f"{_machine.machine_line(info, (*PACKAGES, 'lowbit'), threads=True)}\n")
    print(text, flush=True)
    results = []
    for name in args.models:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"bench_openvino_{name}_") as tmp:
            result = bench_model(build_workload(name, args), args, Path(tmp))
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
        table = model_markdown(result) + f"- whole model benchmark: {result['wall_s']:.0f} s\n"
        print(table, flush=True)
        text += "\n" + table
    if args.out_md:
        args.out_md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"argv": argv, "machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
