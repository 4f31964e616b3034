"""Measure lowbit's tensorrt target on MobileNetV2 and MiniLM (issue 14 point 5), on this CPU.

For each model: lowbit w8a8 quantized for x86-vnni (uint8 affine activations, ONNX Runtime's
layout) and for tensorrt (int8 symmetric activations), exported with lowbit.export; fidelity of
the simulation to FP32 (PyTorch), ONNX Runtime running each file against the simulation (the
TensorRT file's arithmetic, Q/DQ exactly as written, on the CPU: no GPU here), and what
check_tensorrt says would stay float in TensorRT.  Data: bench_ptq's workloads (_selection).

    python benchmarks/bench_tensorrt.py [--models mobilenet_v2 minilm]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bench_ptq as bp
import torch
from _selection import build_workload

import lowbit
from lowbit.export.tensorrt import check_tensorrt


def sim_outputs(w, qmodel, batches):
    outs = []
    with torch.no_grad():
        for b in batches:
            y = qmodel(*w.args(b))
            outs.append(w.compared([y.numpy()], b))
    return torch.cat(outs)


def run(w, target, tmp: Path, ref):
    calib = [w.args(b) for b in w.calib]
    options = {"smoothquant": w.smoothquant} if w.smoothquant else {}
    start = time.perf_counter()
    qmodel = lowbit.quantize(w.model, calib, "w8a8", target=target, progress=False, **options)
    quant_s = time.perf_counter() - start
    path = tmp / f"{w.name}_{target}.onnx"
    start = time.perf_counter()
    lowbit.export(qmodel, path, w.args(w.calib[0]), input_names=w.input_names, output_names=w.output_names,
                  dynamic_axes={n: {0: "batch"} for n in w.input_names})
    export_s = time.perf_counter() - start
    sim = sim_outputs(w, qmodel, w.evals)
    ort = bp.ort_outputs(w, path, w.evals, threads=2)
    row = {"target": target, "quant_s": quant_s, "export_s": export_s,
           "sim_vs_fp32": bp.score(w, ref, sim), "ort_vs_fp32": bp.score(w, ref, ort),
           "ort_vs_sim": bp.score(w, sim, ort), "max_abs_ort_sim": (ort - sim).abs().max().item()}
    if target == "tensorrt":
        layout = check_tensorrt(path)
        row["layout"] = {"violations": layout.violations, "int8": len(layout.int8_layers),
                         "float_layers": layout.float_layers, "float_adds": layout.float_adds}
    row["integer_fraction_ort"] = lowbit.inspect_onnx(path).integer_fraction
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "minilm"])
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-select", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            w = build_workload(name, args)
            ref = sim_outputs(w, w.model, w.evals)  # FP32 in PyTorch
            for target in ("x86-vnni", "tensorrt"):
                print(name, run(w, target, Path(tmp), ref), flush=True)


if __name__ == "__main__":
    main()
