"""`make demo`: post-training quantization of MobileNetV2 (ImageNet weights) end to end.

1. load MobileNetV2 with torchvision's ImageNet weights (shipped in a package);
2. calibrate on real photos (crops of scikit-image / scikit-learn sample photos);
3. quantize to W8A8 (fake-quant simulation in PyTorch);
4. export FP32 and INT8 ONNX files, list which ORT kernels run in integers;
5. measure fidelity to FP32 on held-out photos, file size and ORT latency.

Every figure printed is measured in this run.

    python -m lowbit.demo [--calib 64] [--eval 256] [--config w8a8] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

import lowbit
from lowbit.targets import cpu_info
from lowbit.zoo import imagenet_photos, mobilenet_v2, photo_batches

log = logging.getLogger("lowbit.demo")


def run(*, calib: int, n_eval: int, config: str, out: Path, threads, batches, runs: int) -> dict:
    """Quantize, export and measure; returns the figures (also written under ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    model = mobilenet_v2()
    calib_data = photo_batches(calib, seed=0, batch_size=16)
    eval_inputs = imagenet_photos(n_eval, seed=1)  # disjoint crops: seed 1 vs 0

    start = time.perf_counter()
    qmodel = lowbit.quantize(model, calib_data, config)
    quant_s = time.perf_counter() - start
    start = time.perf_counter()
    lowbit.export_onnx(qmodel, out / "mobilenet_v2.int8.onnx", eval_inputs[:1])
    export_s = time.perf_counter() - start
    lowbit.export_onnx(model, out / "mobilenet_v2.fp32.onnx", eval_inputs[:1])

    kernels = lowbit.inspect_onnx(out / "mobilenet_v2.int8.onnx")
    report = lowbit.compare(model, qmodel, inputs=eval_inputs, onnx=out / "mobilenet_v2.int8.onnx",
                            fp32_onnx=out / "mobilenet_v2.fp32.onnx", threads=threads, batch_sizes=batches,
                            latency_runs=runs)
    text = "\n\n".join([
        (f"MobileNetV2 (torchvision ImageNet weights), config {config}, {calib} calibration photos, "
        f"{n_eval} held-out evaluation photos; quantize {quant_s:.1f} s, export {export_s:.1f} s; "
        f"integer target {qmodel.lowbit_summary.target} (this CPU: {cpu_info().describe()})"),
        str(report),
        str(kernels),
    ])
    (out / "report.md").write_text(text + "\n")
    report.save_json(out / "report.json")
    return {"text": text, "report": report, "kernels": kernels, "quantize_s": quant_s, "export_s": export_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="lowbit demo: MobileNetV2 PTQ to ONNX Runtime integer kernels")
    parser.add_argument("--calib", type=int, default=64, help="calibration photos")
    parser.add_argument("--eval", type=int, default=256, help="held-out photos for fidelity")
    parser.add_argument("--config", default="w8a8")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--runs", type=int, default=50, help="timed ORT runs per latency cell")
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    result = run(calib=args.calib, n_eval=args.eval, config=args.config, out=Path(args.out),
                 threads=args.threads, batches=args.batch, runs=args.runs)
    print(result["text"])
    print(f"\nwrote {args.out}/report.md, report.json and the two ONNX files")


if __name__ == "__main__":
    main()
