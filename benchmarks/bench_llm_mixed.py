"""SmolLM2-135M-Instruct, mixed 4/8-bit weights chosen by the streamed reconstruction sensitivity
(``lowbit.analysis._llm_sensitivity``): how well its costs predict single-layer damage, and the
perplexity of the mixed model against uniform W4 at the same or more bits.

Part 1, ``--part correlation``: the costs of every linear at ``w4a16-g128`` (one streamed pass over
``--sens-batches`` calibration windows; Fisher from ``--fisher-batches``), then single-layer
ablations on a sample of layers (``SAMPLE``: lm_head, whole first and last blocks, q/v/down of three
middle blocks): only that linear rounded to nearest at 4 bits, the rest FP32, on ``--ablation-windows``
evaluation windows: the mean KL(FP32 || ablated) of the next-token distributions and the rise of the
mean NLL.  Spearman's rank correlation of each weighting (fisher, relative, raw) with both.

Part 2, ``--part perplexity``: perplexity on the first ``--windows`` evaluation windows of 512 tokens
(``lowbit.zoo.english_text("eval")``, as ``bench_llm.py``) of FP32; uniform W4 g128 symmetric;
lm_head at 8 bits and the rest W4; ``lowbit.mixed_precision`` at ``--budget`` average weight bits;
the same number of 8-bit weights given to random layers (``--random-seeds`` seeds).  Every quantized
model is ``lowbit.quantize(model, calib, config, algorithms=["gptq"])`` on ``--calib`` calibration
windows of 512 tokens (``lowbit.zoo.calibration_batches``).  Average weight bits are given three
ways: over every linear, lm_head included (what the solver budgets), over those plus the token
embedding (int8 per row in every config here; tied to lm_head in the float model, a separate table
once quantized), and over the decoder blocks' linears only (what NNCF's ``ratio`` counts).

    python benchmarks/bench_llm_mixed.py [--part correlation perplexity] [--windows 8] [--budget 4.5]
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Sequence

import _machine
import torch
import torch.nn.functional as F
from _selection import command, log_to_stderr, parse
from scipy.stats import spearmanr
from torch import nn

import lowbit
from lowbit.analysis import assignment_config
from lowbit.analysis._llm_sensitivity import WEIGHTINGS, reconstruction_sensitivities
from lowbit.ptq._awq_search import weight_rounder
from lowbit.report import perplexity

log = logging.getLogger("bench_llm_mixed")

W4, W8 = "w4a16-g128", "w8a16"
SAMPLE = (["lm_head"]
          + [f"model.layers.{k}.{p}" for k in (0, 29) for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                                  "self_attn.v_proj", "self_attn.o_proj",
                                                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
          + [f"model.layers.{k}.{p}" for k in (1, 10, 20) for p in ("self_attn.q_proj", "self_attn.v_proj",
                                                                      "mlp.down_proj")])


# -- part 1: does the cost predict the damage? -------------------------------------------------
def _logprobs(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.log_softmax(model(w[None]).logits[0, :-1].float(), -1) for w in windows])


def ablate(model: nn.Module, name: str, windows: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Only ``name`` rounded to nearest at 4 bits (a Parameter of its own, so a tied head leaves the
    embedding alone): mean KL(FP32 || ablated) per token and the mean NLL rise, in nats."""
    layer = model.get_submodule(name)
    tq = lowbit.CONFIGS[W4].resolve(name, layer)[0].weight
    original = layer.weight
    layer.weight = nn.Parameter(weight_rounder(tq, name)(original.detach()), requires_grad=False)
    try:
        logp = _logprobs(model, windows)
    finally:
        layer.weight = original
    targets = windows[:, 1:].reshape(-1)
    kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
    nll = float(-logp.gather(1, targets[:, None]).mean() + ref.gather(1, targets[:, None]).mean())
    return kl, nll


def correlation(model, windows, calib, args) -> list[str]:
    start, cpu = time.perf_counter(), time.process_time()
    reports = reconstruction_sensitivities(model, calib, [W4], batches=args.sens_batches,
                                           fisher_batches=args.fisher_batches, progress=True)
    sens_s, sens_cpu = time.perf_counter() - start, time.process_time() - cpu
    rows = {r.name: r.values for r in reports[W4].layers}
    ab = windows[:args.ablation_windows]
    ref = _logprobs(model, ab)
    measured = {}
    for name in SAMPLE:
        measured[name] = ablate(model, name, ab, ref)
        log.info("%s: KL %.4g, dNLL %.4g, predicted %.4g", name, *measured[name], rows[name]["fisher"])
    out = [(f"Costs of all {len(rows)} linears at {W4}: {sens_s:.0f} s wall, {sens_cpu:.0f} s CPU "
           f"({args.sens_batches} x 512 calibration tokens, Fisher from {args.fisher_batches}). Single-layer "
           f"ablations on {len(SAMPLE)} layers, {len(ab)} evaluation windows."), "",
           "| weighting | Spearman vs KL | Spearman vs NLL rise |", "|---|---:|---:|"]
    for w in WEIGHTINGS:
        predicted = [rows[n][w] for n in SAMPLE]
        out.append(f"| {w} | {spearmanr(predicted, [measured[n][0] for n in SAMPLE])[0]:.3f} | "
                   f"{spearmanr(predicted, [measured[n][1] for n in SAMPLE])[0]:.3f} |")
    out += ["", "| layer | predicted (fisher, nats) | measured KL | measured NLL rise | relative | raw |",
            "|---|---:|---:|---:|---:|---:|"]
    for n in sorted(SAMPLE, key=lambda n: -measured[n][0]):
        v = rows[n]
        out.append(f"| {n} | {v['fisher']:.3g} | {measured[n][0]:.3g} | {measured[n][1]:.3g} | "
                   f"{v['relative']:.3g} | {v['raw']:.3g} |")
    return out


# -- part 2: perplexity at a bit budget --------------------------------------------------------
def bit_counts(model: nn.Module, assignment: dict[str, str]) -> tuple[float, float, float]:
    """Average weight bits over every linear, over those plus the token embedding (int8), and over
    the decoder blocks' linears only."""
    params = {n: model.get_submodule(n).weight.numel() for n in assignment}
    bits = {n: 8 if c == W8 else 4 for n, c in assignment.items()}
    total = sum(params[n] * bits[n] for n in params)
    embedding = model.get_input_embeddings().weight.numel()
    blocks = [n for n in params if n.startswith("model.layers.")]
    return (total / sum(params.values()), (total + 8 * embedding) / (sum(params.values()) + embedding),
            sum(params[n] * bits[n] for n in blocks) / sum(params[n] for n in blocks))


def random_assignment(model: nn.Module, layers: Sequence[str], budget: float, seed: int) -> dict[str, str]:
    """Layers in a seeded random order moved to 8 bits while the average over the linears stays within
    ``budget`` (each one that fits)."""
    params = {n: model.get_submodule(n).weight.numel() for n in layers}
    room = (budget - 4) * sum(params.values())  # 8 bits cost 4 more per weight
    assignment = dict.fromkeys(layers, W4)
    order = list(layers)
    random.Random(seed).shuffle(order)
    for n in order:
        if 4 * params[n] <= room:
            assignment[n], room = W8, room - 4 * params[n]
    return assignment


def measure(model, calib, windows, config, label: str, fp32: float, assignment, batch_size: int) -> str:
    start, cpu = time.perf_counter(), time.process_time()
    qmodel = lowbit.quantize(model, calib, config=config, algorithms=["gptq"], progress=False)
    q_s, q_cpu = time.perf_counter() - start, time.process_time() - cpu
    ppl = perplexity(qmodel, windows, batch_size=batch_size, progress=False).perplexity
    del qmodel
    linears, with_embedding, blocks = bit_counts(model, assignment)
    eights = sum(c == W8 for c in assignment.values())
    log.info("%s: perplexity %.3f", label, ppl)
    return (f"| {label} | {eights} | {linears:.3f} | {with_embedding:.3f} | {blocks:.3f} | {ppl:.3f} | "
            f"{ppl / fp32:.3f} | {q_s:.0f} ({q_cpu:.0f}) |")


def perplexities(model, windows, calib, args) -> list[str]:
    layers = lowbit.analysis.decision_layers(model)
    fp32 = perplexity(model, windows, batch_size=args.batch_size, progress=False).perplexity
    start, cpu = time.perf_counter(), time.process_time()
    result = lowbit.mixed_precision(model, calib, (W4, W8), {"avg_weight_bits": args.budget},
                                    batches=args.sens_batches, fisher_batches=args.fisher_batches)
    mixed_s, mixed_cpu = time.perf_counter() - start, time.process_time() - cpu
    uniform = dict.fromkeys(layers, W4)
    head8 = {**uniform, "lm_head": W8}
    runs = [("uniform W4 g128", uniform), ("lm_head W8, rest W4", head8),
            (f"mixed by sensitivity, budget {args.budget}", result.assignment)]
    runs += [(f"random at budget {args.budget}, seed {s}", random_assignment(model, layers, args.budget, s))
             for s in range(args.random_seeds)]
    out = [(f"mixed_precision (sensitivity + solver): {mixed_s:.0f} s wall, {mixed_cpu:.0f} s CPU; "
           f"8-bit layers chosen: {', '.join(n for n, c in result.assignment.items() if c == W8)}"), "",
           ("| model (GPTQ on every quantized linear) | 8-bit linears | avg bits, linears | + embedding | "
           "block linears only | perplexity | x FP32 | quantize s wall (CPU) |"),
           "|---|---:|---:|---:|---:|---:|---:|---:|",
           f"| FP32 | | 32 | 32 | 32 | {fp32:.3f} | 1.000 | |"]
    print("\n".join(out), flush=True)  # each row as soon as it is measured (GPTQ runs take minutes)
    for label, assignment in runs:
        config = assignment_config(model, assignment, W8, name=label.split(",")[0].replace(" ", "-"))
        print(measure(model, calib, windows, config, label, fp32, assignment, args.batch_size), flush=True)
    return []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", default=["correlation", "perplexity"],
                        choices=["correlation", "perplexity"])
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    parser.add_argument("--ablation-windows", type=int, default=4, help="evaluation windows per ablation")
    parser.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens (GPTQ)")
    parser.add_argument("--sens-batches", type=int, default=8, help="calibration windows for the sensitivity")
    parser.add_argument("--fisher-batches", type=int, default=4, help="of those, windows of the gradient pass")
    parser.add_argument("--budget", type=float, default=4.5, help="average weight bits over the linears")
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="evaluation windows per forward pass")
    parser.add_argument("--threads", type=int, default=2)
    args, argv = parse(parser, argv)
    log_to_stderr(log)
    logging.getLogger("lowbit.analysis._llm_sensitivity").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    from lowbit.zoo import calibration_batches, english_text, smollm2, token_windows

    model, tokenizer = smollm2()
    windows = token_windows(tokenizer, english_text("eval"), window=512, count=args.windows)
    calib = calibration_batches(tokenizer, n=args.calib, seq=512)
    info = _machine.machine(("torch", "transformers"))
    print("\n".join(["### Mixed 4/8-bit weights by sensitivity, SmolLM2-135M-Instruct", "",
                     f"`{command('bench_llm_mixed.py', argv)}`", "",
                     _machine.machine_line(info, ("torch", "transformers", "lowbit"), threads=True), ""]), flush=True)
    for part in args.part:
        lines = (correlation if part == "correlation" else perplexities)(model, windows, calib, args)
        print("\n".join([*lines, ""]), flush=True)


if __name__ == "__main__":
    main()
