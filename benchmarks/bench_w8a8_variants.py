"""Where W8A8 MobileNetV2 loses fidelity, fixed one step at a time: held-out top-1 agreement and KL
to FP32 in the PyTorch simulation for named variants of the recipe (activation ranges, bias
correction, CLE through ReLU6, ranges searched for the output's error, the first depthwise conv
and the first conv kept float).

Calibration: 64 photo crops ("calib" split); evaluation: 256 held-out crops ("eval" split), the
same sets as bench_autoquant's held-out table.  Each variant is a real ``lowbit.quantize`` call.

    python benchmarks/bench_w8a8_variants.py [--variants pct+bc pct+bc+dw1 ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import _machine
import torch
from _selection import CALIB_BATCH, command, image_batches, parse

import lowbit
from lowbit.analysis.metrics import agreement
from lowbit.config import Rule

DW1, CONV0 = "features.1.conv.0.0", "features.0.0"  # the first depthwise conv, the first conv


def _variants() -> dict[str, tuple[str, object, list[str]]]:
    """name -> (description, config, algorithms)."""
    pct = lowbit.CONFIGS["w8a8"].with_observer("percentile")
    floats = pct.with_rules(Rule.exact(DW1, None), Rule.exact(CONV0, None))
    out = {
        "pct+bc": ("percentile 99.99 ranges + bias correction", pct, ["bias_correction"]),
        "pct+cle-relu6+bc": ("+ CLE through ReLU6 (ReLU6 -> ReLU)", pct, ["cle(relu6_to_relu=True)", "bias_correction"]),
        "pct+bc+dw1": (f"+ {DW1} float", pct.with_rules(Rule.exact(DW1, None)), ["bias_correction"]),
        "pct+bc+dw1+conv0": (f"+ {DW1} and {CONV0} float", floats, ["bias_correction"]),
        "mse+bc+dw1+conv0": ("MSE ranges, the same two layers float",
                             lowbit.CONFIGS["w8a8"].with_rules(Rule.exact(DW1, None), Rule.exact(CONV0, None)),
                             ["bias_correction"]),
    }
    for objective in ("mse", "kl"):
        search = f"range_search(objective={objective})"
        out[f"pct+rs-{objective}+bc"] = (f"+ ranges searched for the output's {objective}", pct,
                                         [search, "bias_correction"])
        label = f"+ ranges searched for the output's {objective}, the same two layers float"
        out[f"pct+rs-{objective}+bc+dw1+conv0"] = (label, floats, [search, "bias_correction"])
    for p in (99.9, 99.95, 99.999):
        cfg = lowbit.CONFIGS["w8a8"].with_observer("percentile", percentile=p)
        out[f"pct{p}+bc+dw1+conv0"] = (f"percentile {p}, the same two layers float",
                                       cfg.with_rules(Rule.exact(DW1, None), Rule.exact(CONV0, None)),
                                       ["bias_correction"])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    variants = _variants()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    args, argv = parse(parser, argv)
    from lowbit.zoo import mobilenet_v2

    info = _machine.machine(("torch",))
    model = mobilenet_v2().eval()
    calib = image_batches(64, "calib", CALIB_BATCH)
    held = image_batches(256, "eval", 32)
    top1, kl = agreement(model, held, "top1_agreement"), agreement(model, held, "neg_kl")
    print(f"`{command('bench_w8a8_variants.py', argv)}`\n")
    print(_machine.machine_line(info, ("torch", "lowbit"), threads=True) + "\n")
    print("| variant | what | top-1 agreement | KL (nats) | quantize s |\n|---|---|---:|---:|---:|")
    for name in args.variants:
        what, config, algorithms = variants[name]
        start = time.perf_counter()
        qmodel = lowbit.quantize(model, calib, config, algorithms=algorithms, progress=False)
        seconds = time.perf_counter() - start
        print(f"| {name} | {what} | {top1(qmodel):.4f} | {-kl(qmodel):.4f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
