"""Per-layer sensitivity of MobileNetV2 (ImageNet weights): the three methods' wall time and how
far their rankings agree.

Per config (``--configs``, default w4a8 and w8a8), the model is quantized ONCE with the choice
on every layer (``analysis.choice_config``) and that quantized model is reused by every method
(``sensitivity(..., qmodel=...)``, so no method pays for calibration).  Each method measures on
the same ``--batches`` evaluation batches of ``--batch-size`` photo crops (the "eval" split;
calibration uses the disjoint "calib" split): SQNR and ablation (no eval_fn: the logits' KL to
FP32) run two forward passes per layer, the Hessian ``--probes`` Hessian-vector products per
batch on the float weights.  Issue targets on this model: SQNR <= 1 min, Hessian <= 3 min,
ablation <= 5 min.

Agreement: Spearman rank correlation between the methods' per-layer costs (every decision
layer; ties share their mean rank).

    python benchmarks/bench_sensitivity.py [--configs w4a8 w8a8] [--methods sqnr hessian ablation]
                                           [--batches 4] [--batch-size 8] [--probes 16] [--n-calib 64]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import _machine
import numpy as np
import torch
from _selection import CALIB_BATCH, command, image_batches, log_to_stderr, parse

import lowbit
from lowbit.analysis import SensitivityReport, choice_config, sensitivity

log = logging.getLogger("bench_sensitivity")
TARGETS_S = {"sqnr": 60, "hessian": 180, "ablation": 300}  # the targets on MobileNetV2, 2 cores


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the ranks (ties: mean rank)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def run_config(model, calib, evals, config: str, methods: Sequence[str], args) -> tuple[list[str], float]:
    start = time.perf_counter()
    qmodel = lowbit.quantize(model, calib, choice_config(config), progress=False)
    quantize_s = time.perf_counter() - start
    reports: dict[str, SensitivityReport] = {}
    for method in methods:
        log.info("%s: %s ...", config, method)
        reports[method] = sensitivity(model, calib, config, method=method, eval_data=evals, batches=args.batches,
                                      probes=args.probes, qmodel=qmodel, seed=0)
        log.info("%s: %s took %.1f s", config, method, reports[method].seconds)
    lines = [f"### {config}: {len(next(iter(reports.values())).layers)} layers, quantized once in {quantize_s:.1f} s",
             "", "| method | seconds | issue target | baseline |", "|---|---:|---:|---|"]
    for method, r in reports.items():
        base = ", ".join(f"{k} {v:.4g}" for k, v in r.baseline.items())
        lines.append(f"| {method} | {r.seconds:.1f} | <= {TARGETS_S[method]} | {base} |")
    lines += ["", "Spearman rank correlation of the per-layer costs:", "",
              "| | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for a in methods:
        cells = [f"{spearman(list(reports[a].costs().values()), list(reports[b].costs().values())):.3f}"
                 for b in methods]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "Top 5 layers by cost:", "", "| rank | " + " | ".join(methods) + " |",
              "|---:|" + "---|" * len(methods)]
    for i in range(5):
        lines.append(f"| {i + 1} | " + " | ".join(reports[m].ranked()[i].name for m in methods) + " |")
    if "hessian" in reports:
        rows = reports["hessian"].layers
        rel = [r.values["trace_ci95"] / abs(r.values["trace"]) for r in rows if r.values["trace"]]
        lines += ["", (f"Hessian trace CI95 / |trace|: median {np.median(rel):.2f}, max {max(rel):.2f} "
                       f"({args.probes} probes)")]
    return lines, quantize_s


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["w4a8", "w8a8"])
    parser.add_argument("--methods", nargs="+", default=["sqnr", "hessian", "ablation"],
                        choices=["sqnr", "hessian", "ablation"])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--n-calib", type=int, default=64)
    args, argv = parse(parser, argv)
    log_to_stderr(log)
    from lowbit.zoo import mobilenet_v2

    info = _machine.machine(("torch",))
    model = mobilenet_v2().eval()
    calib = image_batches(args.n_calib, "calib", CALIB_BATCH)
    evals = image_batches(args.batches * args.batch_size, "eval", args.batch_size)
    out = ["## Sensitivity: MobileNetV2 (ImageNet weights)", "",
           f"`{command('bench_sensitivity.py', argv)}`", "",
           _machine.machine_line(info, ("torch", "lowbit"), threads=True), "",
           (f"Evaluation: {args.batches} batches x {args.batch_size} photo crops; calibration: {args.n_calib} "
            f"crops; Hessian: {args.probes} probes."), ""]
    for config in args.configs:
        lines, _ = run_config(model, calib, evals, config, args.methods, args)
        out += [*lines, ""]
    print("\n".join(out))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
