"""AIMET (aimet-onnx) beside lowbit: PTQ and AdaRound on the same calibration data, and lowbit's
QNN encodings run by AIMET's QuantizationSimModel.

Rows, each scored against the FP32 model on held-out data (MobileNetV2: top-1 agreement and KL in
nats of the logits; MiniLM: mean cosine of the sentence embeddings), with the time to quantize
(wall and CPU seconds, calibration included):

* ``lowbit w8a8`` (``target="qnn"``), in its PyTorch simulation;
* the same model through ``lowbit.export.qnn.export_qnn`` (float ONNX + AIMET encodings), loaded
  into AIMET's ``QuantizationSimModel`` with ``load_encodings_to_sim``: the numbers Qualcomm's tool
  chain gets from lowbit's file, and their agreement with the simulation;
* ``AIMET PTQ``: ``QuantizationSimModel`` on the FP32 ONNX file (BatchNorms folded by AIMET), int8
  per-channel weights (AIMET's ``default_config_per_channel.json``), 8-bit asymmetric activations,
  ``compute_encodings`` with its default scheme (min-max; others with ``--schemes``).  On MiniLM
  AIMET's defaults also quantize the additive attention mask and the masked scores (range down to
  -3.4e38, which rounds every real score to 0), so MiniLM gets a second row per scheme with the
  quantizers whose range exceeds ``MASK_RANGE`` disabled after calibration, as a user would;
* MobileNetV2 only: ``AdaRound``, ``aimet_onnx.apply_adaround`` then ``compute_encodings``, and
  lowbit's ``adaround`` step, the same iterations per layer on the same photos; with ``--w4``, W4A8
  (first conv and classifier at 8 bits as in lowbit's ``w4a8`` preset; AIMET set the same).

aimet-onnx needs other package versions than lowbit's, so it runs in its own interpreter
(``--aimet-python``; default ``$LOWBIT_AIMET_PYTHON``, else ``runs/venvs/aimet/bin/python``) as a
worker (``--worker plan.json``): this file, run there without lowbit.

    python benchmarks/bench_aimet.py [--models mobilenet_v2 minilm] [--n-calib 64] [--n-eval 256]
                                     [--iterations 200] [--no-adaround] [--w4] [--schemes min_max ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_aimet")
PACKAGES = ("torch", "onnxruntime", "onnx", "transformers")
AIMET_CONFIG = "default_config_per_channel.json"  # per-channel weights, as lowbit's presets
ADAROUND_BATCHES = 4  # calibration batches (of 16 photos) AdaRound reads, in both tools
MASK_RANGE = 1e30  # an activation range beyond this comes from an additive attention mask (finfo.min)


# -- the AIMET side (runs in aimet-onnx's interpreter; imports no lowbit) -----------------------------
def _batches(path: str) -> list[dict[str, np.ndarray]]:
    """``{"<batch>/<input>": array}`` (an .npz) -> one feed dict per batch, in order."""
    data = np.load(path)
    out: dict[int, dict] = {}
    for key in data.files:
        i, name = key.split("/", 1)
        out.setdefault(int(i), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


def _aimet_sim(job: dict, plan: dict, calib: list[dict]):
    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
    from aimet_onnx.common import quantsim_config
    from aimet_onnx.quantsim import load_encodings_to_sim

    options = {"intra_op_num_threads": plan["threads"], "inter_op_num_threads": 1}
    if job["kind"] == "load":  # lowbit's float file and encodings
        sim = QuantizationSimModel(onnx.load(job["onnx"]), session_options_kwargs=options)
        load_encodings_to_sim(sim, job["encodings"], strict=False)  # tensors without one: disabled
        return sim
    model = onnx.load(plan["fp32"])
    fold_all_batch_norms_to_weight(model)
    layers = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    outputs = [o.name for o in model.graph.output]  # (the sim renames the graph outputs)
    config = os.path.join(os.path.dirname(quantsim_config.__file__), AIMET_CONFIG)
    sim = QuantizationSimModel(model, param_type=f"int{job['weight_bits']}", activation_type="int8",
                               quant_scheme=job["scheme"], config_file=config, session_options_kwargs=options)
    for weight in (layers[0], layers[-1]) if job["weight_bits"] < 8 else ():  # first / last at 8 bits
        sim.qc_quantize_op_dict[weight].set_bitwidth(8)
    for name in outputs if job.get("float_outputs") else ():  # left float, as lowbit leaves them
        sim.qc_quantize_op_dict[name].enabled = False
    if job["kind"] == "adaround":
        apply_adaround(sim, calib[:ADAROUND_BATCHES], num_iterations=job["iterations"])
    sim.compute_encodings(calib)
    if job.get("mask_float"):  # the additive attention mask's path: a -3.4e38 range zeroes every score
        for q in sim.qc_quantize_op_dict.values():
            enc = q.get_encodings() if q.enabled else None
            if enc and max(abs(enc[0].min), abs(enc[0].max)) > MASK_RANGE:
                q.enabled = False
    return sim


def worker(plan_path: str) -> None:
    """Run every job of the plan in aimet-onnx; write outputs and times beside it."""
    import aimet_onnx
    import torch

    plan = json.loads(Path(plan_path).read_text())
    torch.set_num_threads(plan["threads"])
    calib, evals = _batches(plan["calib"]), _batches(plan["eval"])
    results = {"aimet_onnx": aimet_onnx.__version__}
    for job in plan["jobs"]:
        wall, cpu = time.perf_counter(), time.process_time()
        sim = _aimet_sim(job, plan, calib)
        seconds = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        np.savez(job["output"], *[sim.session.run(None, feeds)[0] for feeds in evals])
        results[job["name"]] = seconds
        Path(plan["results"]).write_text(json.dumps(results))  # after every job: a long run killed keeps them
        print(f"{job['name']}: {seconds}", file=sys.stderr, flush=True)


# -- the lowbit side -----------------------------------------------------------------------------------
def _timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def _adaround(args) -> str:
    return f"adaround(iterations={args.iterations},batches={ADAROUND_BATCHES},sequential=true)"


def _onnx_options(w) -> dict:
    # Batch-only dynamic axes (MiniLM's inputs are padded to a fixed length), as bench_ptq writes them.
    return {"input_names": w.input_names, "output_names": w.output_names,
            "dynamic_axes": {name: {0: "batch"} for name in w.input_names}}


def _recipes(w, args) -> dict[str, tuple[str, list[str]]]:
    """lowbit's rows: name -> (config, algorithms)."""
    recipes = {"lowbit w8a8": ("w8a8", [])}
    if w.smoothquant:  # MiniLM: lowbit's recipe for it (as bench_ptq runs it)
        recipes[f"lowbit w8a8 + SmoothQuant {w.smoothquant:g}"] = ("w8a8", [f"smoothquant(alpha={w.smoothquant:g})"])
    if args.adaround and not w.embedding:
        recipes["lowbit w8a8 + AdaRound"] = ("w8a8", [_adaround(args)])
    if args.w4 and not w.embedding:
        recipes["lowbit w4a8 + AdaRound"] = ("w4a8", [_adaround(args)])
    return recipes


def lowbit_rows(w, folder: Path, args) -> tuple[dict, list[dict]]:
    """lowbit's rows (compared outputs, times) and the AIMET jobs that load lowbit's encodings."""
    import torch

    import lowbit
    from lowbit.export.qnn import encodings_path, export_qnn

    rows, jobs = {}, []
    for name, (config, steps) in _recipes(w, args).items():
        log.info("%s ...", name)
        qmodel, seconds = _timed(lowbit.quantize, w.model, [w.args(b) for b in w.calib], config, algorithms=steps,
                                 target="qnn", progress=False)
        with torch.no_grad():
            outs = torch.cat([w.compared([qmodel(*w.args(b)).numpy()], b) for b in w.evals])
        rows[name] = {"outputs": outs, **seconds}
        path = export_qnn(qmodel, folder / f"lowbit{len(jobs)}.onnx", w.args(w.calib[0]), **_onnx_options(w))
        jobs.append({"name": f"{name} -> AIMET QuantSim (lowbit's encodings)", "kind": "load", "onnx": str(path),
                     "encodings": str(encodings_path(path)), "simulation": name})
    return rows, jobs


def aimet_jobs(w, args) -> list[dict]:
    jobs = [{"name": f"AIMET PTQ w8a8 ({scheme})", "kind": "ptq", "scheme": scheme, "weight_bits": 8}
            for scheme in args.schemes]
    jobs += [{**job, "name": job["name"] + ", outputs float", "float_outputs": True} for job in jobs]
    if w.embedding:  # AIMET's defaults quantize the masked attention scores: also without those quantizers
        jobs += [{**job, "name": job["name"] + ", attention-mask tensors float", "mask_float": True}
                 for job in jobs if not job.get("float_outputs")]
    if args.adaround and not w.embedding:
        jobs.append({"name": "AIMET AdaRound w8a8 (min_max)", "kind": "adaround", "scheme": "min_max",
                     "weight_bits": 8, "iterations": args.iterations})
    if args.w4 and not w.embedding:
        jobs.append({"name": "AIMET AdaRound w4a8 (min_max)", "kind": "adaround", "scheme": "min_max",
                     "weight_bits": 4, "iterations": args.iterations})
    return jobs


def _save_batches(path: Path, w, batches: list[dict]) -> None:
    np.savez(path, **{f"{i}/{name}": b[name].numpy() for i, b in enumerate(batches) for name in w.input_names})


def run_aimet(w, jobs: list[dict], folder: Path, args) -> dict:
    """Run ``jobs`` in aimet-onnx's interpreter; returns ``{name: {"outputs", "wall_s", "cpu_s", "job"}}``."""
    import torch

    _save_batches(folder / "calib.npz", w, w.calib)
    _save_batches(folder / "eval.npz", w, w.evals)
    for i, job in enumerate(jobs):
        job["output"] = str(folder / f"aimet{i}.npz")
    plan = {"fp32": str(folder / "fp32.onnx"), "calib": str(folder / "calib.npz"), "eval": str(folder / "eval.npz"),
            "threads": args.threads, "jobs": jobs, "results": str(folder / "results.json")}
    (folder / "plan.json").write_text(json.dumps(plan))
    # AIMET logs on stdout: keep it off the printed markdown
    subprocess.run([args.aimet_python, __file__, "--worker", str(folder / "plan.json")], check=True, stdout=sys.stderr)
    times = json.loads((folder / "results.json").read_text())
    out = {"aimet_onnx": times.pop("aimet_onnx")}
    for job in jobs:
        logits = np.load(job["output"])
        outs = torch.cat([w.compared([logits[f"arr_{i}"]], b) for i, b in enumerate(w.evals)])
        out[job["name"]] = {"outputs": outs, **times[job["name"]], "job": job}
    return out


def table(w, reference, rows: dict) -> list[str]:
    from lowbit.report import fidelity

    scores = ["cosine to FP32"] if w.embedding else ["top-1 = FP32", "KL(FP32 ‖ q)"]
    same = "cosine to lowbit's simulation" if w.embedding else "top-1 = lowbit's simulation"
    lines = [f"| method | {' | '.join(scores)} | quantize wall s | quantize CPU s | {same} |",
             "|---|" + "---:|" * (len(scores) + 3)]
    for name, r in rows.items():
        f = fidelity(reference, r["outputs"])
        cells = [f"{f['cosine']:.4f}"] if w.embedding else [f"{f['top1_agreement']:.3f}", f"{f['kl']:.3f}"]
        sim = r.get("job", {}).get("simulation")
        agree = ""
        if sim:
            g = fidelity(rows[sim]["outputs"], r["outputs"])
            agree = f"{g['cosine']:.4f}" if w.embedding else f"{g['top1_agreement']:.3f} (cosine {g['cosine']:.4f})"
        timing = ["(lowbit's file)", ""] if sim else [f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}"]
        lines.append("| " + " | ".join([name, *cells, *timing, agree]) + " |")
    return lines


def _default_aimet_python() -> str:
    return os.environ.get("LOWBIT_AIMET_PYTHON") or str(Path(__file__).resolve().parents[1] / "runs" / "venvs" /
                                                        "aimet" / "bin" / "python")


def bench_model(name: str, args) -> list[str]:
    """One model's table (markdown lines)."""
    import torch
    from _selection import build_workload

    import lowbit

    w = build_workload(name, args)
    with torch.no_grad():
        reference = torch.cat([w.compared([w.model(*w.args(b)).numpy()], b) for b in w.evals])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # the float file AIMET starts from
        lowbit.export_onnx(w.model, folder / "fp32.onnx", w.args(w.calib[0]), **_onnx_options(w))
        rows, load_jobs = lowbit_rows(w, folder, args)
        rows.update(run_aimet(w, load_jobs + aimet_jobs(w, args), folder, args))
    args.aimet_version = rows.pop("aimet_onnx")
    what = "sentences" if w.embedding else "photos"
    ada = "" if w.embedding or not args.adaround else (
        f" AdaRound: {args.iterations} iterations per layer on {ADAROUND_BATCHES} x 16 photos in both tools.")
    return [f"**{w.title}**: {w.n(w.calib)} calibration {what}, {w.n(w.evals)} held-out {what}.{ada}", "",
            *table(w, reference, rows), ""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2"], choices=["mobilenet_v2", "minilm"])
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=200, help="AdaRound iterations per layer (both tools)")
    parser.add_argument("--schemes", nargs="+", default=["min_max"], help="AIMET PTQ calibration schemes")
    parser.add_argument("--no-adaround", dest="adaround", action="store_false")
    parser.add_argument("--w4", action="store_true", help="also W4A8 with AdaRound in both tools")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aimet-python", default=_default_aimet_python())
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    import _machine
    import torch
    from _selection import command, log_to_stderr

    log_to_stderr(log)
    torch.set_num_threads(args.threads)
    args.n_select = 1  # (the workloads' selection split: unused here, and not allowed empty)
    lines = [line for name in args.models for line in bench_model(name, args)]
    print(f"Fidelity against the FP32 model on held-out data. AIMET: {AIMET_CONFIG}, 8-bit asymmetric "
          "activations on every op output (model output included; lowbit leaves its outputs float).\n")
    print("\n".join(lines))
    print(f"`{command('bench_aimet.py', sys.argv[1:] if argv is None else list(argv))}`")
    print(_machine.machine_line(_machine.machine(PACKAGES), PACKAGES, threads=True) + f"; aimet-onnx "
          f"{args.aimet_version} (its own venv, {args.threads} threads)")


if __name__ == "__main__":
    main()
