"""Integer targets: lowbit's x86 targets against ONNX Runtime's quantizer (with and without its
reduce_range, and its U8U8 layout), fidelity and latency on this machine's CPU.

Per model (MobileNetV2, ResNet-18, MiniLM; bench_ptq's workloads: same calibration and
evaluation data), every method's ONNX file is run by ONNX Runtime on this CPU:

* lowbit ``quantize(..., "w8a8", target=T)`` for T in x86-vnni (int8 weights),
  x86-avx2-u8u8 (uint8 weights, zero point 128) and x86-avx2-w7 (7-bit weights), then export;
* ORT ``quantize_static`` (QDQ, per channel, MinMax): U8 activations x S8 weights (default),
  the same with ``reduce_range=True`` (7-bit weights), and U8 x U8 weights.

Fidelity is to the FP32 file's outputs (top-1 agreement and KL for logits; mean cosine and
nearest-neighbour agreement for MiniLM's sentence embeddings).  Latency: median ms of one run,
1 thread, batch 1 and 8, the methods interleaved, as a ratio to FP32 in the same run.  With
``--qemu`` the fidelity is measured again with ORT under ``qemu-x86_64 -cpu EPYC-Milan`` (an
x86 CPU without VNNI; see check_non_vnni.py), where no timing is taken.

    python benchmarks/bench_targets.py [--models mobilenet_v2 resnet18 minilm] [--qemu]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import bench_ptq as bp
import torch
from _selection import Workload, add_models_argument, build_workload, command, parse
from onnxruntime.quantization import QuantType

from lowbit.targets import cpu_info

LOWBIT_TARGETS = ("x86-vnni", "x86-avx2-u8u8", "x86-avx2-w7")
ORT_VARIANTS = ((" (U8 x S8)", {}),  # (row suffix, quantize_static options)
                (", reduce_range", {"reduce_range": True}),
                (" (U8 x U8)", {"weight_type": QuantType.QUInt8}))


def run_ort(w: Workload, fp32: Path, out: Path, suffix: str, options: dict) -> bp.Method:
    if w.name == "minilm":  # ORT's default op set wrecks MiniLM (see bench_ptq); its MatMuls only
        suffix, options = suffix + ", MatMul only", {**options, "op_types_to_quantize": ["MatMul"]}
    return bp.run_ort_static(w, fp32, out, suffix, **options)


def qemu_outputs(w: Workload, methods: list[bp.Method]) -> dict[str, torch.Tensor]:
    """Each method's compared outputs on the evaluation set, from ORT on an x86 CPU without VNNI."""
    import numpy as np
    from check_non_vnni import _ort_without_vnni

    feeds = {n: np.concatenate([w.feeds(b)[n] for b in w.evals]) for n in w.input_names}
    if len(feeds) != 1:
        raise SystemExit("--qemu runs single-input models only (the image models)")
    with tempfile.TemporaryDirectory() as tmp:
        for i, m in enumerate(methods):
            Path(tmp, f"m{i}.onnx").write_bytes(m.path.read_bytes())
        got = _ort_without_vnni(tmp, {f"m{i}": next(iter(feeds.values())) for i in range(len(methods))})
    return {m.name: torch.from_numpy(got[f"m{i}"]) for i, m in enumerate(methods)}


def measure(w: Workload, args, tmp: Path) -> tuple[list[bp.Method], dict[str, dict]]:
    """Every method's file, scored against FP32 in ORT here (and without VNNI under qemu), and timed."""
    fp32 = tmp / "fp32.onnx"
    bp.export_lowbit(w, w.model, fp32)
    methods = [bp.Method("FP32", fp32)]
    methods += [bp.run_lowbit(w, None, tmp / f"lowbit_{t}.onnx", target=t) for t in LOWBIT_TARGETS]
    methods += [run_ort(w, fp32, tmp / f"ort{i}.onnx", suffix, opts) for i, (suffix, opts) in enumerate(ORT_VARIANTS)]
    ref = bp.ort_outputs(w, fp32, w.evals)
    for m in methods[1:]:
        m.scores = bp.score(w, ref, bp.ort_outputs(w, m.path, w.evals))
        bp.describe_file(m)
    no_vnni = {}
    if args.qemu:
        outs = qemu_outputs(w, methods)
        no_vnni = {name: bp.score(w, outs["FP32"], out) for name, out in outs.items() if name != "FP32"}
    bp.interleaved_latency(w, methods, args.runs, thread_counts=(1,), batches=(1, 8))
    return methods, no_vnni


def bench(w: Workload, args, tmp: Path) -> str:
    methods, no_vnni = measure(w, args, tmp)
    base = methods[0].latency
    key = "nn_agreement" if w.embedding else "top1_agreement"
    metric = "cosine" if w.embedding else "kl"
    head = f"| method | {key} | {metric} | integer kernels | b1 vs FP32 | b8 vs FP32 |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if no_vnni:
        head += f" {key}, no VNNI (qemu) | {metric}, no VNNI |"
        rule += "---:|---:|"
    lines = [f"### {w.title}", "", head, rule]
    for m in methods[1:]:
        ratio = [m.latency[f"t1b{b}"]["median_ms"] / base[f"t1b{b}"]["median_ms"] for b in (1, 8)]
        row = (f"| {m.name} | {m.scores[key]:.1%} | {m.scores[metric]:.4f} | "
               f"{m.kernels['integer_fraction']:.0%} | {ratio[0]:.2f}x | {ratio[1]:.2f}x |")
        if no_vnni:
            row += f" {no_vnni[m.name][key]:.1%} | {no_vnni[m.name][metric]:.4f} |"
        lines.append(row)
    fp = ", ".join(f"batch {b}: {base[f't1b{b}']['median_ms']:.2f} ms" for b in (1, 8))
    lines.append(f"\nFP32 at 1 thread: {fp}; {w.n(w.evals)} evaluation inputs.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_models_argument(parser)
    parser.add_argument("--runs", type=int, default=60, help="timed runs per method and batch size")
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--qemu", action="store_true", help="also measure fidelity on a CPU without VNNI (qemu)")
    args, argv = parse(parser, argv)
    args.n_select = 32  # the workloads draw a selection set; unused here
    torch.manual_seed(0)
    info = bp.machine()
    print(f"`{command('bench_targets.py', argv)}`\n\n"
          f"Machine: {cpu_info().describe()}, {info['cores']} cores; onnxruntime {info['onnxruntime']}, "
          f"torch {info['torch']}\n", flush=True)
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix=f"bench_targets_{name}_") as tmp:
            w = build_workload(name, args)
            qemu = args.qemu and len(w.input_names) == 1
            print(bench(w, argparse.Namespace(**{**vars(args), "qemu": qemu}), Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
