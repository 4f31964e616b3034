"""Mixed W4/W8 precision on MobileNetV2: does the solver's choice of 8-bit layers beat the usual ones?

At the same weight budget, an average of ``--bits`` (5.0) weight bits per parameter over the
decision layers (every Conv / Linear), on MobileNetV2 with torchvision's ImageNet weights:

* uniform w4a8: every layer at 4 bits (``choice_config("w4a8")``: the preset without its rules
  for the first and last layer); the floor (4.0 bits);
* first/last at 8 bits: the ``w4a8`` preset as it is (the usual protocol for 4-bit networks);
* random (mean of ``--random`` draws): layers taken in a random order, each raised to 8 bits if
  the average stays within the budget (so each draw ends as close to it as the layers allow);
* mixed (method): ``lowbit.analysis.mixed_precision`` with choices ("w4a8", "w8a8") and the
  budget ``{"avg_weight_bits": bits}``, its costs from ``lowbit.analysis.sensitivity`` with each
  method (sqnr, hessian, ablation), measured on the selection photos.

Every assignment is built as a user builds it, ``lowbit.quantize(model, calib, config)`` with
the assignment's config (``lowbit.analysis.assignment_config``; for the solver, ``result.config``),
calibrated on the same photos with the defaults.  (Composing a mixed model from the two uniform
models' quantizers, layer by layer, is not the same model: its logits differed by up to 1.8 from
the replayed config's on MobileNetV2.)
Each model is compared with FP32 on held-out evaluation photos (``lowbit.report.fidelity.fidelity``: top-1
agreement with FP32's argmax, KL(FP32 || quantized) in nats), in the PyTorch simulation.  Calibration,
selection and evaluation photos are disjoint crops (``benchmarks/_selection.py``).

    .venv/bin/python benchmarks/bench_mixed.py [--bits 5.0] [--methods sqnr hessian ablation]
        [--n-calib 32] [--n-select 64] [--n-eval 256] [--random 5] [--batches 2] [--probes 8]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time

import _machine  # benchmarks/_machine.py (the script's folder is on sys.path)
import _selection
import torch

import lowbit
from lowbit.analysis import assignment_config, choice_config, decision_layers, mixed_precision
from lowbit.report.fidelity import fidelity

log = logging.getLogger("bench_mixed")


def _outputs(model, batches: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x in batches])


def _score(qmodel, evals, reference, name: str, params: dict[str, int], bits: dict[str, int]) -> dict:
    """Compare ``qmodel`` with FP32 on ``evals``; ``bits``: layer -> weight bits."""
    fid = fidelity(reference, _outputs(qmodel, evals))
    total = sum(params.values())
    return {"name": name, "avg_bits": sum(params[n] * bits[n] for n in params) / total,
            "at8": sum(b == 8 for b in bits.values()), "top1": fid["top1_agreement"], "kl": fid["kl"]}


def _layer_bits(model, config) -> dict[str, int]:
    """The weight bits ``config`` gives each decision layer (after position rules are bound)."""
    config = config.bind(model)
    return {n: config.resolve(n, model.get_submodule(n))[0].weight.spec.bits for n in decision_layers(model)}


def _random_assignment(params: dict[str, int], budget: float, seed: int) -> dict[str, str]:
    """Every layer 4-bit, then, in a random order, each raised to 8 bits while the average fits."""
    total, used = sum(params.values()), 4.0
    assignment = dict.fromkeys(params, "w4a8")
    order = list(params)
    random.Random(seed).shuffle(order)
    for n in order:
        if used + 4 * params[n] / total <= budget + 1e-12:
            assignment[n], used = "w8a8", used + 4 * params[n] / total
    return assignment


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=float, default=5.0)
    parser.add_argument("--methods", nargs="+", default=["sqnr", "hessian", "ablation"],
                        choices=["sqnr", "hessian", "ablation"])
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--n-select", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--random", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2, help="selection batches the sensitivity reads")
    parser.add_argument("--probes", type=int, default=8, help="Hessian probes per layer")
    args, argv = _selection.parse(parser, argv)
    _selection.log_to_stderr(log)
    work = _selection.build_workload("mobilenet_v2", args)
    model = work.model
    calib = [b["input"] for b in work.calib]
    select = [b["input"] for b in work.select]
    evals = [b["input"] for b in work.evals]
    reference = _outputs(model, evals)
    layers = decision_layers(model)
    params = {n: model.get_submodule(n).weight.numel() for n in layers}

    qmodels = {c: lowbit.quantize(model, calib, choice_config(c), progress=False) for c in ("w4a8", "w8a8")}
    log.info("calibrated")

    def score(assignment: dict[str, str], name: str) -> dict:
        bits = {n: 4 if c == "w4a8" else 8 for n, c in assignment.items()}
        config = assignment_config(model, assignment, base="w8a8", name=name)
        return _score(lowbit.quantize(model, calib, config, progress=False), evals, reference, name, params, bits)

    rows = [_score(qmodels["w4a8"], evals, reference, "uniform w4a8", params, dict.fromkeys(layers, 4))]
    for method in args.methods:  # the solver's assignments first: the rows this benchmark is for
        start = time.perf_counter()
        options = {"probes": args.probes} if method == "hessian" else {}
        reports = {c: lowbit.analysis.sensitivity(model, calib, config=c, method=method, eval_data=select,
                                                  batches=args.batches, qmodel=q, **options)
                   for c, q in qmodels.items()}
        result = mixed_precision(model, calib, ("w4a8", "w8a8"), {"avg_weight_bits": args.bits}, sensitivities=reports)
        seconds = time.perf_counter() - start
        rows.append({**score(result.assignment, f"mixed ({method})"), "seconds": seconds})
        log.info("%s: %s; 8-bit layers: %s", method, rows[-1], [n for n, c in result.assignment.items() if c == "w8a8"])
    preset = _layer_bits(model, lowbit.CONFIGS["w4a8"])  # first and last layers at 8 bits
    rows.append(score({n: "w8a8" if preset[n] == 8 else "w4a8" for n in layers}, "first/last at 8 bits (w4a8 preset)"))
    draws = []
    for seed in range(args.random):
        draws.append(score(_random_assignment(params, args.bits, seed), f"random {seed}"))
        log.info("%s", draws[-1])
    rows.append({"name": f"random (mean of {args.random})",
                 **{k: statistics.fmean(d[k] for d in draws) for k in ("avg_bits", "at8", "top1", "kl")}})

    info = _machine.machine(["torch", "onnxruntime", "scipy"])
    print(f"MobileNetV2 (ImageNet weights), weights W4/W8 at <= {args.bits} average bits, activations uint8; "
          f"fidelity to FP32 on {work.n(work.evals)} held-out photo crops (PyTorch simulation)\n")
    print(f"| assignment | avg weight bits | layers at 8 bits (of {len(layers)}) | top-1 agreement | KL (nats) | "
          "analysis + solve s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        secs = f"{r['seconds']:.0f}" if "seconds" in r else ""
        print(f"| {r['name']} | {r['avg_bits']:.3f} | {r['at8']:.1f} | {r['top1']:.4f} | {r['kl']:.4f} | {secs} |")
    print(f"\n`{_selection.command('bench_mixed.py', argv)}`\n")
    print(_machine.machine_line(info, ["torch", "onnxruntime", "scipy"], threads=True))


if __name__ == "__main__":
    main()
