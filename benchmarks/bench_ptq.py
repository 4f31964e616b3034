"""Static INT8 PTQ, end to end: lowbit against ONNX Runtime's quantizer and NNCF, same process.

Per model, every method starts from the same float model and the same calibration inputs,
and every number is measured on the exported ONNX file in ONNX Runtime (CPU provider):

* FP32: the float model exported once with ``lowbit.export_onnx``; this one file is the input
  of the ONNX peers and gives the reference outputs.
* ORT quantize_static: ``quant_pre_process`` (the pre-processing ORT's docs recommend: symbolic
  shape inference + graph optimization) then ``quantize_static``: QDQ, per-channel, uint8
  activations, int8 weights, MinMax calibration (its default).  For MiniLM a second row quantizes
  only MatMul (``op_types_to_quantize=["MatMul"]``): ORT's default op set wrecks this model
  (its MinMax ranges take in the attention mask's float-min values).
* NNCF: ``nncf.quantize`` on the FP32 ONNX model with its defaults (``model_type=TRANSFORMER``
  for MiniLM, as NNCF documents for transformers); skipped, with the reason, if not importable.
* lowbit: ``lowbit.quantize(model, calib, "w8a8")`` with default options, then ``export_onnx``.
* lowbit best calibrator: the activation observer among ``--calibrators`` whose ORT output is
  closest to FP32 on a separate *selection* set (never the evaluation set), then reported on the
  evaluation set like the others.  Its time is one calibration; the search line shows the rest.

Data: calibration, selection and evaluation inputs are disjoint draws (images: seeded random
crops of the 17 bundled photos, seeds 0 / 2 / 1; MiniLM: one draw of distinct sentences, split).
ResNet-18 has random weights: it is a latency target, its fidelity says little, and it gets no
calibrator search.

Latency: median and p90 of one ``session.run`` in ms at 1 and 2 intra-op threads x batch 1 and 8.
The methods' timed runs are interleaved (rounds in rotating order) so that load from other
processes on the machine falls on all of them alike.

    python benchmarks/bench_ptq.py [--models mobilenet_v2 resnet18 minilm] [--runs 50]
                                   [--calibrators minmax percentile mse entropy]
                                   [--json out.json] [--out-md out.md]
    python benchmarks/bench_ptq.py --only-walltime [--repeats 3] [--models ...]

``--only-walltime`` measures only the quantizer wall time: lowbit (quantize + export) against
ORT (quant_pre_process + quantize_static) from the same FP32 file and calibration inputs, in this
process, interleaved (the order alternates per repeat), and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _machine
import torch
from _selection import (
    Workload,
    add_models_argument,
    build_workload,
    command,
    default_observer,
    log_to_stderr,
    parse,
    recipe,
)
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

import lowbit
from lowbit.report import fidelity
from lowbit.runtime import OrtModel

THREADS = (1, 2)
BATCHES = (1, 8)
ROUNDS = 10  # latency runs are split into this many interleaved rounds (blocks of runs / ROUNDS)
CALIBRATORS = ("minmax", "percentile", "mse", "entropy")
PACKAGES = ("torch", "onnxruntime", "onnx", "nncf", "transformers")  # whose versions the header names

log = logging.getLogger("bench_ptq")


# -- methods: each writes one ONNX file and is timed end to end -----------------------------------
@dataclass
class Method:
    name: str
    path: Path | None = None
    quant_s: float | None = None  # wall time to produce the ONNX file from the method's input
    skipped: str = ""  # why there is no file
    note: str = ""
    scores: dict = field(default_factory=dict)
    size_mb: float | None = None
    kernels: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)  # "t{threads}b{batch}" -> {"median_ms", "p90_ms"}


def export_lowbit(w: Workload, model: nn.Module, path: Path) -> None:
    # Batch-only dynamic axes: the inputs are padded to SEQ_LEN, and ORT's quant_pre_process
    # (symbolic shape inference) gives up on MiniLM with a symbolic sequence length.
    lowbit.export_onnx(
        model, path, w.args(w.calib[0]), input_names=w.input_names, output_names=w.output_names,
        dynamic_axes={name: {0: "batch"} for name in w.input_names},
    )


def run_lowbit(w: Workload, observer: str | None, out: Path, smoothquant: float | None = None,
               target: str | None = None) -> Method:
    """lowbit w8a8 (its activation calibrator replaced by ``observer``, its integer ``target``
    named, where given): quantize and export, timed together."""
    name = f"lowbit w8a8, {observer} calibrator" if observer else f"lowbit w8a8 (default: {default_observer()})"
    if target is not None:
        name = f"lowbit w8a8, target {target}"
    if smoothquant is not None:
        name += f" + SmoothQuant {smoothquant:g}"
    calib = [w.args(b) for b in w.calib]
    options = {} if target is None else {"target": target}  # else quantize's default, "auto"
    start = time.perf_counter()
    qmodel = lowbit.quantize(w.model, calib, recipe("w8a8", observer=observer), progress=False,
                             smoothquant=smoothquant, **options)
    export_lowbit(w, qmodel, out)
    return Method(name, out, time.perf_counter() - start)


class Reader(CalibrationDataReader):
    """ORT's calibration input: the shared calibration batches, as numpy feeds."""

    def __init__(self, w: Workload):
        self._it = iter([w.feeds(b) for b in w.calib])

    def get_next(self):
        return next(self._it, None)


def run_ort_static(w: Workload, fp32: Path, out: Path, suffix: str = "", weight_type=QuantType.QInt8,
                   **options) -> Method:
    """ORT's quant_pre_process + quantize_static (QDQ, per channel, uint8 activations, MinMax)."""
    reader = Reader(w)
    pre = out.with_name(out.stem + ".pre.onnx")
    start = time.perf_counter()
    quant_pre_process(str(fp32), str(pre))
    # calibrate_method is left at its default, MinMax.
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=weight_type, **options)
    extra = "".join(f", {k}={v}" for k, v in options.items())
    weights = "S8" if weight_type == QuantType.QInt8 else "U8"
    note = f"quant_pre_process + quantize_static(QDQ, per_channel, U8 act, {weights} weight, MinMax{extra})"
    return Method("ORT quantize_static" + suffix, out, time.perf_counter() - start, note=note)


def run_nncf(w: Workload, fp32: Path, out: Path) -> Method:
    try:
        import nncf
    except ImportError as exc:
        return Method(
            "NNCF", skipped=f"nncf not importable ({exc}); it is installed only if it leaves torch alone"
        )
    import onnx

    # One calibration item per sample: NNCF's statistics assume batch 1 items.
    items = [
        {n: t[i : i + 1] for n, t in w.feeds(b).items()}
        for b in w.calib
        for i in range(len(b[w.input_names[0]]))
    ]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its progress bars, off the markdown
        qmodel = nncf.quantize(
            onnx.load(str(fp32)), nncf.Dataset(items), subset_size=len(items), **w.nncf_options
        )
    onnx.save(qmodel, str(out))
    options = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in w.nncf_options.items()) or "defaults"
    return Method(
        "NNCF", out, time.perf_counter() - start, note=f"nncf {nncf.__version__} quantize ({options})"
    )


# -- measurements ---------------------------------------------------------------------------------
def ort_outputs(w: Workload, path: Path, batches: list[dict], threads: int = 2) -> torch.Tensor:
    session = OrtModel(path, threads=threads)
    return torch.cat([w.compared(session.run(w.feeds(b)), b) for b in batches])


def score(w: Workload, ref: torch.Tensor, cand: torch.Tensor) -> dict:
    """Fidelity to FP32: top-1 / KL / cosine of logits, or cosine / nearest-neighbour of embeddings."""
    if not w.embedding:
        f = fidelity(ref, cand)
        return {"top1_agreement": f["top1_agreement"], "kl": f["kl"], "cosine": f["cosine"]}
    cos = (ref * cand).sum(1)  # rows are unit vectors
    # Nearest neighbour (the other sentence most similar to each) under FP32 vs the candidate.
    eye = torch.eye(len(ref), dtype=torch.bool)
    nn_ref = (ref @ ref.T).masked_fill(eye, -2).argmax(1)
    nn_cand = (cand @ cand.T).masked_fill(eye, -2).argmax(1)
    return {
        "nn_agreement": (nn_ref == nn_cand).float().mean().item(),
        "min_cosine": cos.min().item(),
        "cosine": cos.mean().item(),
    }


def badness(w: Workload, scores: dict) -> float:
    """What the calibrator search minimises: KL for logits, 1 - mean cosine for embeddings."""
    return 1 - scores["cosine"] if w.embedding else scores["kl"]


def describe_file(m: Method) -> None:
    m.size_mb = m.path.stat().st_size / 1e6
    report = lowbit.inspect_onnx(m.path)
    m.kernels = {
        "integer_fraction": report.integer_fraction,
        "integer": report.count("integer"),
        "float_compute": report.count("float_compute"),
        "float_compute_nodes": report.float_compute_nodes,
    }


def interleaved_latency(w: Workload, methods: list[Method], runs: int, thread_counts=THREADS,
                        batches=BATCHES) -> None:
    """Median / p90 ms of one run per method and (threads, batch), the methods' runs interleaved."""
    per_round = max(1, math.ceil(runs / ROUNDS))
    for threads in thread_counts:
        sessions = [OrtModel(m.path, threads=threads) for m in methods]
        for batch in batches:
            feeds = w.feeds(w.evals[0], batch)
            times: list[list[float]] = [[] for _ in methods]
            for s in sessions:
                for _ in range(3):
                    s.run(feeds)
            for r in range(ROUNDS):
                for k in range(len(methods)):
                    i = (k + r) % len(methods)  # rotate who goes first
                    sessions[i].run(feeds)  # untimed: wakes this session's threads after the others ran
                    for _ in range(per_round):
                        start = time.perf_counter()
                        sessions[i].run(feeds)
                        times[i].append((time.perf_counter() - start) * 1e3)
            for m, t in zip(methods, times):
                t.sort()
                m.latency[f"t{threads}b{batch}"] = {
                    "median_ms": statistics.median(t),
                    "p90_ms": t[min(len(t) - 1, round(0.9 * (len(t) - 1)))],
                }


# -- one model ------------------------------------------------------------------------------------
def search_calibrator(
    w: Workload, default: Method, tmp: Path, calibrators: list[str]
) -> tuple[Method | None, list]:
    """Quantize with each calibrator, keep the one closest to FP32 on the selection set."""
    ref = ort_outputs(w, tmp / "fp32.onnx", w.select)
    trials = []  # (observer, selection badness, quant seconds, Method)
    for observer in calibrators:
        if observer == default_observer():  # the default row already has this calibrator: reuse it
            m = default
        else:
            m = run_lowbit(w, observer, tmp / f"lowbit_{observer}.onnx")
        trials.append((observer, badness(w, score(w, ref, ort_outputs(w, m.path, w.select))), m.quant_s, m))
        log.info("%s: calibrator %s -> %.4f on the selection set", w.name, observer, trials[-1][1])
    best = min(trials, key=lambda t: t[1])
    summary = [{"calibrator": o, "selection_badness": b, "quant_s": s} for o, b, s, _ in trials]
    if best[0] == default_observer():
        return None, summary  # the default row is the best
    best[3].note = f"best of {', '.join(calibrators)} on the selection set"
    return best[3], summary


def bench_model(w: Workload, args, tmp: Path) -> dict:
    fp32 = Method("FP32", tmp / "fp32.onnx")
    start = time.perf_counter()
    export_lowbit(w, w.model, fp32.path)
    fp32_export_s = time.perf_counter() - start
    with torch.no_grad():  # the exported float file against the torch model, first eval batch
        first = w.compared([w.model(*w.args(w.evals[0])).numpy()], w.evals[0])
    export_check = (first - ort_outputs(w, fp32.path, w.evals[:1])).abs().max().item()

    methods = [
        fp32,
        *(
            run_ort_static(w, fp32.path, tmp / f"ort{i}.onnx", suffix, **options)
            for i, (suffix, options) in enumerate(w.ort_variants)
        ),
        run_nncf(w, fp32.path, tmp / "nncf.onnx"),
        run_lowbit(w, None, tmp / "lowbit.onnx"),
    ]
    search = []
    if args.calibrators and not w.latency_only:
        best, search = search_calibrator(w, methods[-1], tmp, args.calibrators)
        if best is not None:
            methods.append(best)
    if w.smoothquant is not None:
        methods.append(run_lowbit(w, None, tmp / "lowbit_smooth.onnx", smoothquant=w.smoothquant))
    ready = [m for m in methods if m.path is not None]

    ref = ort_outputs(w, fp32.path, w.evals)
    for m in ready:
        m.scores = score(w, ref, ort_outputs(w, m.path, w.evals))
        describe_file(m)
    load_before = os.getloadavg()
    interleaved_latency(w, ready, args.runs)
    return {
        "model": w.name,
        "title": w.title,
        "embedding": w.embedding,
        "latency_only": w.latency_only,
        "n_calib": w.n(w.calib),
        "n_select": w.n(w.select),
        "n_eval": w.n(w.evals),
        "fp32_export_s": fp32_export_s,
        "fp32_onnx_vs_torch_max_abs": export_check,
        "loadavg_before_latency": load_before,
        "loadavg_after_latency": os.getloadavg(),
        "calibrator_search": search,
        "methods": [
            {k: (str(v) if isinstance(v, Path) else v) for k, v in m.__dict__.items()} for m in methods
        ],
    }


def walltime_model(w: Workload, repeats: int, tmp: Path) -> dict:
    """Median wall time of lowbit (quantize + export; its default and the min-max calibrator), of
    each ORT variant and of the FP32 export that ORT starts from, interleaved."""
    fp32 = tmp / "fp32.onnx"
    export_lowbit(w, w.model, fp32)

    def fp32_export() -> Method:
        start = time.perf_counter()
        export_lowbit(w, w.model, tmp / "fp32_again.onnx")
        return Method("FP32 export", tmp / "fp32_again.onnx", time.perf_counter() - start)

    runs: dict[str, Callable[[], Method]] = {
        "lowbit": lambda: run_lowbit(w, None, tmp / "lowbit.onnx"),
        "lowbit, minmax calibrator": lambda: run_lowbit(w, "minmax", tmp / "lowbit_minmax.onnx"),
        "FP32 export": fp32_export,
        **{
            f"ORT quantize_static{suffix}": (
                lambda i=i, suffix=suffix, options=options: run_ort_static(
                    w, fp32, tmp / f"ort{i}.onnx", suffix, **options
                )
            )
            for i, (suffix, options) in enumerate(w.ort_variants)
        },
    }
    names = list(runs)
    runs[names[0]]()  # warm-up: first-call imports and allocations count for neither side
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for k in range(len(names)):
            n = names[(k + r) % len(names)]  # rotate who goes first
            times[n].append(runs[n]().quant_s)
    medians = {n: statistics.median(t) for n, t in times.items()}
    out = {"model": w.name, "times_s": times, "median_s": medians, "ratios": {},
           "calibration_forward_s": calibration_forward(w, fp32, repeats)}
    for ort in (n for n in names if n.startswith("ORT")):
        for mine in (n for n in names if n.startswith("lowbit")):
            out["ratios"][(mine, ort)] = (medians[mine] / medians[ort],
                                          medians[mine] / (medians[ort] + medians["FP32 export"]))
    return out


def calibration_forward(w: Workload, fp32: Path, repeats: int) -> dict[str, float]:
    """Median seconds to run the calibration inputs through the float model once: in PyTorch
    (eager, what lowbit's calibration runs) and in ONNX Runtime (the FP32 file, what ORT's
    calibration runs), with torch's thread count for both."""
    session = OrtModel(fp32, threads=torch.get_num_threads())

    def torch_pass() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for b in w.calib:
                w.model(*w.args(b))
        return time.perf_counter() - start

    def ort_pass() -> float:
        start = time.perf_counter()
        for b in w.calib:
            session.run(w.feeds(b))
        return time.perf_counter() - start

    torch_pass(), ort_pass()  # warm-up
    n = max(3, repeats)
    return {"pytorch": statistics.median(torch_pass() for _ in range(n)),
            "onnxruntime": statistics.median(ort_pass() for _ in range(n))}


def walltime_main(args, argv: list[str]) -> None:
    print(header(argv, machine()), flush=True)
    print("lowbit's time is quantize + export of the INT8 file from the PyTorch model; ORT's is quant_pre_process + "
          "quantize_static from the FP32 ONNX file, whose export (timed in the same rotation) is the last column's "
          "addition.\n")
    print("| model | lowbit method | lowbit s | ORT variant | ORT s | FP32 export s | lowbit / ORT | "
          "lowbit / (FP32 export + ORT) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    results = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix=f"bench_ptq_{name}_") as tmp:
            r = walltime_model(build_workload(name, args), args.repeats, Path(tmp))
        med = r["median_s"]
        for (mine, ort), (ratio, end_to_end) in r["ratios"].items():
            print(f"| {name} | {mine} | {med[mine]:.2f} | {ort} | {med[ort]:.2f} | {med['FP32 export']:.2f} | "
                  f"{ratio:.2f}x | {end_to_end:.2f}x |", flush=True)
        r["ratios"] = [{"lowbit": m, "ort": o, "ratio": a, "ratio_with_fp32_export": b}
                       for (m, o), (a, b) in r["ratios"].items()]
        results.append(r)
    print(f"\nOne pass of the {args.n_calib} calibration inputs through the float model, median s "
          f"({torch.get_num_threads()} threads): " + "; ".join(
              f"{r['model']}: PyTorch eager {r['calibration_forward_s']['pytorch']:.2f}, ONNX Runtime "
              f"{r['calibration_forward_s']['onnxruntime']:.2f}" for r in results))
    if args.json:
        args.json.write_text(json.dumps({"argv": argv, "machine": machine(), "walltime": results}, indent=2))


# -- report ---------------------------------------------------------------------------------------
def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _latency_cell(m: dict, key: str, base: dict | None) -> str:
    lat = m["latency"].get(key)
    if lat is None:
        return "–"
    cell = f"{lat['median_ms']:.2f} / {lat['p90_ms']:.2f}"
    if base is not None and m is not base:
        cell += f" ({lat['median_ms'] / base['latency'][key]['median_ms']:.2f}×)"
    return cell


def _ratio_row(label: str, num: dict, den: dict, keys: list[str], n_fid: int) -> str:
    cells = [f"**{label}**"] + [""] * n_fid
    cells.append(_fmt(num["quant_s"] / den["quant_s"], ".2f") + "×")
    cells.append(_fmt(num["size_mb"] / den["size_mb"], ".2f") + "×")
    cells.append("")
    cells += [f"{num['latency'][k]['median_ms'] / den['latency'][k]['median_ms']:.2f}×" for k in keys]
    return "| " + " | ".join(cells) + " |"


def _fidelity_columns(r: dict) -> tuple[list[str], list[str]]:
    """(column titles, score keys) of the fidelity columns: embeddings or logits."""
    if r["embedding"]:
        return ["NN@1 agree", "min cos", "mean cos"], ["nn_agreement", "min_cosine", "cosine"]
    return ["top-1 agree", "KL", "cosine"], ["top1_agreement", "kl", "cosine"]


def _method_row(m: dict, fid_keys: list[str], keys: list[str], base: dict, width: int) -> str:
    if m["skipped"]:
        return f"| {m['name']} | " + " | ".join(["–"] * (width - 1)) + " |"
    k = m["kernels"]
    ints = (f"{k['integer_fraction']:.0%} ({k['integer']}/{k['integer'] + k['float_compute']})"
            if k["integer_fraction"] is not None else "0%")
    cells = [m["name"], *(f"{m['scores'][f]:.4f}" if f != "kl" else f"{m['scores'][f]:.3f}" for f in fid_keys),
             _fmt(m["quant_s"], ".1f"), f"{m['size_mb']:.1f}", ints, *(_latency_cell(m, c, base) for c in keys)]
    return "| " + " | ".join(cells) + " |"


def _ratio_rows(r: dict, keys: list[str], n_fid: int) -> list[str]:
    """Each lowbit row over each ORT row: quant time, size and latency ratios."""
    rows = []
    for ort in (m for m in r["methods"] if m["name"].startswith("ORT")):
        for m in r["methods"]:
            if m["name"].startswith("lowbit"):
                label = (m["name"].replace("lowbit w8a8", "lowbit") + " / "
                         + ort["name"].replace(" quantize_static", ""))
                rows.append(_ratio_row(label, m, ort, keys, n_fid))
    return rows


def _notes(r: dict) -> list[str]:
    """The bullets under a model's table: skips, float kernels left, the calibrator search, load."""
    lines = []
    for m in r["methods"]:
        if m["skipped"]:
            lines.append(f"- {m['name']} skipped: {m['skipped']}")
        elif m["name"].startswith("lowbit") and m["kernels"]["float_compute_nodes"]:
            nodes = m["kernels"]["float_compute_nodes"]
            more = f", ... ({len(nodes)} in all)" if len(nodes) > 6 else ""
            lines.append(f"- {m['name']}: float compute left in ORT: {', '.join(nodes[:6])}{more}")
    if r["calibrator_search"]:
        what = "1 - mean cosine" if r["embedding"] else "KL"
        trials = ", ".join(f"{t['calibrator']} {t['selection_badness']:.4f} ({t['quant_s']:.0f} s)"
                           for t in r["calibrator_search"])
        best = min(r["calibrator_search"], key=lambda t: t["selection_badness"])["calibrator"]
        lines.append(f"- lowbit calibrator search ({what} on the selection set; quantize + export time): {trials}; "
                     f"best: {best}")
    load = ", ".join(f"{a:.1f}" for a in r["loadavg_before_latency"])
    lines.append(f"- load average before the latency runs: {load}")
    return lines


def model_markdown(r: dict) -> str:
    keys = [f"t{t}b{b}" for t in THREADS for b in BATCHES]
    fid, fid_keys = _fidelity_columns(r)
    unit = "sentences" if r["embedding"] else "images"
    head = ["method", *fid, "quant s", "MB", "int kernels", *(f"{t}T b{b} ms" for t in THREADS for b in BATCHES)]
    intro = (
        f"{r['n_calib']} calibration / {r['n_select']} selection / {r['n_eval']} evaluation {unit}. "
        f"Fidelity vs the FP32 ONNX in ORT on the evaluation set. Latency: median / p90 ms of one "
        f"`session.run` (× FP32 median), interleaved. FP32 export {r['fp32_export_s']:.1f} s "
        f"(not in the peers' quant s); FP32 ONNX vs torch max |Δ| {r['fp32_onnx_vs_torch_max_abs']:.1e}."
    )
    base = next(m for m in r["methods"] if m["name"] == "FP32")
    lines = [f"### {r['model']}: {r['title']}", "", intro, "", "| " + " | ".join(head) + " |",
             "|" + "---|" + "---:|" * (len(head) - 1),
             *(_method_row(m, fid_keys, keys, base, len(head)) for m in r["methods"]),
             *_ratio_rows(r, keys, len(fid)), "", *_notes(r)]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    return _machine.machine(PACKAGES)


def header(argv: list[str], info: dict) -> str:
    return f"`{command('bench_ptq.py', argv)}`\n\n{_machine.machine_line(info, (*PACKAGES, 'lowbit'))}\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_models_argument(parser)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per method and setting")
    parser.add_argument("--calibrators", nargs="*", default=list(CALIBRATORS), choices=CALIBRATORS,
                        help="lowbit activation observers to search (none: no search row)")
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-select", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--out-md", type=Path, help="write the markdown here too")
    parser.add_argument("--only-walltime", action="store_true",
                        help="only time lowbit (quantize + export) against ORT quantize_static, interleaved")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats for --only-walltime")
    return parser


def main(argv: list[str] | None = None) -> None:
    args, argv = parse(_parser(), argv)
    log_to_stderr(log)
    torch.manual_seed(0)
    if args.only_walltime:
        walltime_main(args, argv)
        return

    info = machine()
    text = header(argv, info)
    print(text, flush=True)
    results = []
    for name in args.models:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"bench_ptq_{name}_") as tmp:
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
