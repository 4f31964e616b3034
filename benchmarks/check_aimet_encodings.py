"""Does AIMET's QuantizationSimModel quantize with lowbit's encodings exactly?  Per tensor, not only at
the output.

lowbit quantizes the model (``--config``, ``target="qnn"``) and writes the float ONNX + AIMET encodings
pair (``lowbit.export.qnn.export_qnn``).  Then, on the held-out batches:

* **outputs**: lowbit's simulation (PyTorch) against (a) AIMET's QuantSim loaded with the pair
  (``load_encodings_to_sim``), and (b) the same pair run as ONNX Q/DQ in ONNX Runtime's float kernels
  (``encodings_as_qdq``: lowbit's grid, ONNX's arithmetic, no AIMET), and (c) lowbit's own QDQ export
  in the same float kernels (how far any float runtime of this quantized model is from the PyTorch
  simulation): top-1 agreement (or cosine for an embedding model), cosine of the outputs;
* **per tensor, teacher-forced**: each of AIMET's activation quantizers against the encoding applied,
  as the 1.0.0 format documents it (``round(x / scale - offset)``, ONNX half-to-even rounding), to
  *AIMET's own input of that quantizer*, so errors do not propagate: how many codes differ, and how
  many of those sit on an exact rounding tie; each weight quantizer's output against lowbit's
  on-grid weight in the float file (bit for bit);
* **per tensor, end to end**: AIMET's quantized tensors against those of (b), in graph order: how the
  first differences grow with depth.

The AIMET side runs in aimet-onnx's own interpreter (``--aimet-python``, as ``bench_aimet.py``) as a
worker of this file; it imports no lowbit.

    python benchmarks/check_aimet_encodings.py [--models mobilenet_v2 minilm] [--n-calib 64] [--n-eval 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_aimet import _batches, _default_aimet_python, _onnx_options, _save_batches

_TIE = 1e-3  # |frac(v) - 0.5| below this: the value sits on a rounding tie (float32 of x / scale)


# -- the AIMET side (aimet-onnx's interpreter; no lowbit) --------------------------------------------
def worker(job_path: str) -> None:
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel, load_encodings_to_sim
    from onnx import TensorProto, helper, numpy_helper

    job = json.loads(Path(job_path).read_text())
    float_model = onnx.load(job["onnx"])
    weights = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    sim = QuantizationSimModel(float_model, session_options_kwargs={"intra_op_num_threads": job["threads"]})
    load_encodings_to_sim(sim, job["encodings"], strict=False)  # tensors without an encoding: disabled
    doc = json.loads(Path(job["encodings"]).read_text())
    acts = {e["name"]: (np.float32(e["scale"][0]), np.float32(e["offset"][0])) for e in doc["activation_encodings"]}
    params = [e["name"] for e in doc["param_encodings"] if e["name"] in weights and e["bw"] <= 16]
    graph = sim.model.model.graph
    produced = {o for node in graph.node for o in node.output}
    exposed = [t for name in acts for t in (name, f"{name}_updated") if t in produced]
    exposed += [f"{name}_qdq" for name in params if f"{name}_qdq" in produced]
    have = {o.name for o in graph.output}
    graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in exposed if t not in have)
    sim._rebuild_session()  # (the documented way to pick up a changed graph: aimet_onnx 2.x)
    names = [o.name for o in sim.session.get_outputs()]
    batches = _batches(job["inputs"])
    stats = {"codes": 0, "differ": 0, "at_tie": 0, "worst_tensor": 0.0, "weights": len(params), "weights_exact": 0}
    outputs, tensors = [], {}
    for b, feeds in enumerate(batches):
        got = dict(zip(names, sim.session.run(None, feeds), strict=True))
        outputs.append(got[names[0]])
        for name, (scale, offset) in acts.items():
            if name not in got or f"{name}_updated" not in got:
                continue
            v = got[name] / scale - offset
            documented = (np.clip(np.round(v), 0, 255) + offset) * scale
            differ = np.abs(documented - got[f"{name}_updated"]) > 0.5 * scale
            stats["codes"] += v.size
            stats["differ"] += int(differ.sum())
            stats["at_tie"] += int((differ & (np.abs(v - np.floor(v) - 0.5) < _TIE)).sum())
            stats["worst_tensor"] = max(stats["worst_tensor"], float(differ.mean()))
            if b == 0:
                tensors[name] = got[f"{name}_updated"]
        if b == 0:
            stats["weights_exact"] = sum(bool(np.array_equal(got[f"{n}_qdq"], weights[n])) for n in params
                                         if f"{n}_qdq" in got)
    np.savez(job["outputs"], *outputs)
    np.savez(job["tensors"], **{f"t{i}": tensors[n] for i, n in enumerate(tensors)})
    stats["tensor_names"] = list(tensors)
    Path(job["stats"]).write_text(json.dumps(stats))


# -- the lowbit side ------------------------------------------------------------------------------------
def _float_kernels(path: Path, threads: int):
    """``path`` in ONNX Runtime as written (no fusion into integer kernels)."""
    from lowbit.runtime import OrtModel

    return OrtModel(path, threads=threads, optimization="disable")


def _exposing_dq(model, path: Path) -> Path:
    """``model`` with every DequantizeLinear output a graph output too, saved at ``path``."""
    import onnx

    quantized = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in quantized)
    onnx.save(model, path)
    return path


def _agreement(w, a, b) -> str:
    from lowbit.report import fidelity

    f = fidelity(a, b)
    return f"cosine {f['cosine']:.4f}" if w.embedding else f"top-1 {f['top1_agreement']:.3f} (cosine {f['cosine']:.4f})"


def check_model(name: str, args, folder: Path) -> list[str]:
    import torch
    from _selection import build_workload

    import lowbit
    from lowbit.export.qnn import encodings_as_qdq, encodings_path, export_qnn

    w = build_workload(name, args)
    qmodel = lowbit.quantize(w.model, [w.args(b) for b in w.calib], args.config, target="qnn", progress=False)
    path = export_qnn(qmodel, folder / f"{name}.onnx", w.args(w.calib[0]), **_onnx_options(w))
    with torch.no_grad():
        sim = torch.cat([w.compared([qmodel(*w.args(b)).numpy()], b) for b in w.evals])
    lowbit.export_onnx(qmodel, folder / f"{name}.qdq.onnx", w.args(w.calib[0]), **_onnx_options(w), target="qnn")
    own = _float_kernels(folder / f"{name}.qdq.onnx", args.threads)
    own_qdq = torch.cat([w.compared([own.run(w.feeds(b))[0]], b) for b in w.evals])
    qdq_model = _float_kernels(_exposing_dq(encodings_as_qdq(path), folder / f"{name}.encodings.qdq.onnx"), args.threads)
    qdq_names = [o.name for o in qdq_model.session.get_outputs()]
    qdq_out, qdq_tensors = [], {}
    for i, b in enumerate(w.evals):
        got = dict(zip(qdq_names, qdq_model.run(w.feeds(b)), strict=True))
        qdq_out.append(w.compared([got[qdq_names[0]]], b))
        if i == 0:
            qdq_tensors = {n[:-len("@dq")]: v for n, v in got.items() if n.endswith("@dq")}
    qdq = torch.cat(qdq_out)

    _save_batches(folder / f"{name}.in.npz", w, w.evals)
    job = {"onnx": str(path), "encodings": str(encodings_path(path)), "inputs": str(folder / f"{name}.in.npz"),
           "threads": args.threads, "outputs": str(folder / f"{name}.out.npz"),
           "tensors": str(folder / f"{name}.tensors.npz"), "stats": str(folder / f"{name}.stats.json")}
    (folder / f"{name}.job.json").write_text(json.dumps(job))
    subprocess.run([args.aimet_python, __file__, "--worker", str(folder / f"{name}.job.json")], check=True,
                   stdout=sys.stderr)
    stats = json.loads(Path(job["stats"]).read_text())
    outs = np.load(job["outputs"])
    aimet = torch.cat([w.compared([outs[f"arr_{i}"]], b) for i, b in enumerate(w.evals)])
    saved = np.load(job["tensors"])
    aimet_tensors = {n: saved[f"t{i}"] for i, n in enumerate(stats["tensor_names"])}

    rows = [("AIMET QuantSim (lowbit's encodings) vs lowbit's simulation", sim, aimet),
            ("the encodings as ONNX Q/DQ, ORT float kernels, vs lowbit's simulation", sim, qdq),
            ("AIMET QuantSim vs the encodings as ONNX Q/DQ", qdq, aimet),
            ("lowbit's own QDQ export (`target=\"qnn\"`), ORT float kernels, vs lowbit's simulation", sim, own_qdq),
            ("the encodings as ONNX Q/DQ vs lowbit's own QDQ export, both ORT float kernels", own_qdq, qdq)]
    share = stats["differ"] / max(1, stats["codes"])
    title = (f"**{w.title}**, `{args.config}` (`target=\"qnn\"`), {w.n(w.calib)} calibration and "
             f"{w.n(w.evals)} held-out inputs.")
    lines = [title, "", "| compared | agreement |", "|---|---|",
             *(f"| {label} | {_agreement(w, a, b)} |" for label, a, b in rows), "",
             (f"Teacher-forced, every activation quantizer on its own input: {stats['differ']:,} of "
              f"{stats['codes']:,} codes differ from the documented arithmetic ({share:.1e}; worst tensor "
              f"{stats['worst_tensor']:.1e}), {stats['at_tie']:,} of them on an exact rounding tie; weights: "
              f"{stats['weights_exact']} of {stats['weights']} quantized weights equal lowbit's bit for bit."), ""]
    scales = {e["name"]: e["scale"][0] for e in json.loads(encodings_path(path).read_text())["activation_encodings"]}
    growth = [(t, float((np.abs(qdq_tensors[t] - aimet_tensors[t]) > 0.5 * scales[t]).mean()))
              for t in stats["tensor_names"] if t in qdq_tensors]  # graph order (the encodings' order)
    if growth:
        picks = sorted({0, len(growth) // 4, len(growth) // 2, 3 * len(growth) // 4, len(growth) - 1})
        steps = "; ".join(f"{growth[i][0]} (#{i + 1} of {len(growth)}) {growth[i][1]:.2%}" for i in picks)
        lines += [(f"End to end, AIMET's quantized tensors against the Q/DQ graph's (first held-out batch), "
                   f"codes that differ: {steps}"), ""]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2"], choices=["mobilenet_v2", "minilm"])
    parser.add_argument("--config", default="w8a8")
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aimet-python", default=_default_aimet_python())
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    import _machine
    import torch
    from _selection import command

    torch.set_num_threads(args.threads)
    args.n_select = 1  # (the workloads' selection split: unused here)
    with tempfile.TemporaryDirectory() as tmp:
        lines = [line for name in args.models for line in check_model(name, args, Path(tmp))]
    version = subprocess.run([args.aimet_python, "-c", "import importlib.metadata as m; print(m.version('aimet-onnx'))"],
                             capture_output=True, text=True, check=False).stdout.strip()
    print("\n".join(lines))
    print(f"`{command('check_aimet_encodings.py', sys.argv[1:] if argv is None else list(argv))}`")
    packages = ("torch", "onnxruntime", "onnx")
    print(_machine.machine_line(_machine.machine(packages), packages, threads=True) + f"; aimet-onnx {version}")


if __name__ == "__main__":
    main()
