"""AdaRound on MobileNetV2 at 4-bit weights: fidelity against FP32, in PyTorch and in ONNX Runtime.

MobileNetV2 (torchvision's ImageNet weights) quantized W4A8 two ways:

* ``w4a8, all layers 4-bit``: the preset without its position rules, so the first conv and the
  classifier get int4 weights too (the hard case for rounding);
* ``w4a8 preset``: first and last layers at int8, the rest int4 per channel;

each with round-to-nearest, with ``adaround``, and with ``adaround,bias_correction`` (and
``bias_correction`` alone, the cheaper step it competes with).  Every model is scored against
the float model's logits on held-out photos (top-1 agreement, KL in nats; the eval crops never
overlap the calibration crops): once in the PyTorch fake-quant simulation and once from its
exported ONNX file run by ONNX Runtime (CPU provider), which must agree up to the integer
kernels' rounding of the requantization.  Quantize time includes calibration and AdaRound.

Peers: ONNX Runtime's quantization tools and NNCF are checked for an AdaRound (see ``peers``);
neither offers one for conv / gemm weights at these bits, and the output says what was found.

    python benchmarks/bench_adaround.py [--n-calib 64] [--n-eval 256] [--iterations 300]
                                        [--batches 4] [--methods nearest adaround ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
import time
from pathlib import Path

import _machine
import torch
from _selection import CALIB_BATCH, EVAL_BATCH, command, image_batches, log_to_stderr, parse

import lowbit
from lowbit.report import fidelity
from lowbit.runtime import OrtModel

log = logging.getLogger("bench_adaround")
PACKAGES = ("torch", "onnxruntime", "onnx", "nncf")
CONFIGS = {"w4a8, all layers 4-bit": lambda: lowbit.CONFIGS["w4a8"].without_positions(),
           "w4a8 preset (first/last int8)": lambda: lowbit.CONFIGS["w4a8"]}
METHODS = ("nearest", "bias_correction", "adaround", "adaround+bias_correction")


def peers() -> str:
    """What ONNX Runtime's quantization package and NNCF offer as AdaRound (searched, not assumed)."""
    lines = []
    ort = importlib.util.find_spec("onnxruntime.quantization")
    if ort is None or not ort.submodule_search_locations:
        lines.append("onnxruntime.quantization: not installed")
    else:
        folder = Path(next(iter(ort.submodule_search_locations)))
        hits = [p.relative_to(folder) for p in folder.rglob("*.py") if "adaround" in p.read_text().lower()]
        import onnxruntime

        lines.append(f"onnxruntime {onnxruntime.__version__} quantization tools: "
                     + (f"'adaround' appears in {', '.join(map(str, hits))}" if hits else
                        "no AdaRound (its 4-bit path is MatMulNBits weight-only RTN / GPTQ / HQQ for MatMul, "
                        "not conv / gemm at W4A8)"))
    nncf = importlib.util.find_spec("nncf")
    lines.append("nncf: not installed" if nncf is None else
                 "nncf: installed; it has no AdaRound (its data-aware weight methods are AWQ, GPTQ, "
                 "scale estimation for LLM weight compression)")
    return "; ".join(lines)


def algorithms(method: str, args) -> list[str]:
    ada = (f"adaround(iterations={args.iterations},batches={args.batches},sequential="
           f"{'true' if args.sequential else 'false'})")
    return {"nearest": [], "bias_correction": ["bias_correction"], "adaround": [ada],
            "adaround+bias_correction": [ada, "bias_correction"]}[method]


def run(model, calib, evals, reference, config, method, args, folder: Path) -> dict:
    start = time.perf_counter()
    qmodel = lowbit.quantize(model, calib, config, algorithms=algorithms(method, args), progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        sim = torch.cat([qmodel(x) for x in evals])
    path = folder / f"{method}.onnx"
    lowbit.export_onnx(qmodel, path, evals[0][:1])
    session = OrtModel(path, threads=torch.get_num_threads())
    ort = torch.cat([session(x) for x in evals])
    return {"seconds": seconds, "sim": fidelity(reference, sim), "ort": fidelity(reference, ort)}


def table(results: dict) -> list[str]:
    lines = ["| config | method | quantize s | sim top-1 | sim KL | ORT top-1 | ORT KL |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (config, method), r in results.items():
        lines.append(f"| {config} | {method} | {r['seconds']:.0f} | {r['sim']['top1_agreement']:.3f} | "
                     f"{r['sim']['kl']:.3f} | {r['ort']['top1_agreement']:.3f} | {r['ort']['kl']:.3f} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=lowbit.ptq.AdaRound().iterations)
    parser.add_argument("--batches", type=int, default=lowbit.ptq.AdaRound().batches,
                        help=f"calibration batches ({CALIB_BATCH} photos each) AdaRound reads")
    parser.add_argument("--non-sequential", dest="sequential", action="store_false",
                        help="AdaRound on float-model inputs (sequential=false)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args, argv = parse(parser, argv)
    log_to_stderr(log)
    from lowbit.zoo import mobilenet_v2

    model = mobilenet_v2()
    calib = image_batches(args.n_calib, "calib", CALIB_BATCH)
    evals = image_batches(args.n_eval, "eval", EVAL_BATCH)
    with torch.no_grad():
        reference = torch.cat([model(x) for x in evals])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            for method in args.methods:
                log.info("%s, %s ...", name, method)
                results[(name, method)] = run(model, calib, evals, reference, CONFIGS[name](), method, args,
                                              Path(tmp))
                log.info("  %s", results[(name, method)])
    info = _machine.machine(PACKAGES)
    print(f"MobileNetV2 (torchvision ImageNet weights), {args.n_calib} calibration photos, {args.n_eval} held-out "
          f"photos; fidelity against the FP32 model's logits; AdaRound {args.iterations} iterations/layer on "
          f"{min(args.batches * CALIB_BATCH, args.n_calib)} photos, sequential={args.sequential}.\n")
    print("\n".join(table(results)))
    print(f"\nPeers: {peers()}.")
    print(f"\n`{command('bench_adaround.py', argv)}`")
    print(_machine.machine_line(info, PACKAGES, threads=True))


if __name__ == "__main__":
    main()
