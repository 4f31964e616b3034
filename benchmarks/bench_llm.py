"""SmolLM2-135M-Instruct: FP32 perplexity on held-out technical English, then round-to-nearest
(RTN) weight-only quantization, the baseline every LLM algorithm (GPTQ, AWQ) has to beat.

Text: the first ``--windows`` non-overlapping windows of ``--window`` tokens of the evaluation
split of ``lowbit.zoo.english_text`` (pages of Debian's python3.11-doc; calibration text, unused
by RTN, comes from other pages).  Perplexity: each window scored on its own, exp of the mean NLL
of its ``window - 1`` next-token predictions (``lowbit.report.perplexity``).

Configs (``--configs``): weight-only presets from ``lowbit.CONFIGS`` where they exist (every
Linear, ``lm_head`` included, on the grid; the embedding int8 per row), otherwise built here
the same way; ``w4a16-g32-asym`` (uint4 affine, group 32) is the grid nearest to the GGUF file's
own Q4_1 blocks (which have a float minimum, lowbit an integer zero-point).  A name ending in
``+float-head`` keeps ``lm_head`` in float, as ONNX Runtime's and NNCF's weight quantizers do:
SmolLM2 ties it to the embedding, which the GGUF file stores at 8 bits (Q8_0), so 4 or 3 bits
there cost more than in the Q4_1 linears.  Per config: wall time of ``lowbit.quantize(model,
None, config)`` (a deep copy, then the swap), of the perplexity run, and the peak resident
memory of each (sampled every 20 ms).  The simulation fake-quantizes every weight (lm_head's
28 M included) on each forward pass, which at one window per pass took longer than the pass
itself here; ``--batch-size`` windows share one pass (the perplexity changes only by float rounding).

    python benchmarks/bench_llm.py [--windows 40] [--window 512] [--threads 2] [--batch-size 4]
                                   [--configs w8a16 w4a16-g128 w4a16-g128+float-head ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import time
from collections.abc import Sequence

import _machine
import torch
from _selection import command, log_to_stderr, parse
from check_large_export import GIB, PeakRSS

import lowbit
from lowbit.config import LayerQuant, QuantConfig, Rule
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import INT8_WEIGHT, QuantSpec
from lowbit.report import perplexity

log = logging.getLogger("bench_llm")


def _group(bits: int, size: int, *, symmetric: bool = True) -> QuantSpec:
    if symmetric:
        return QuantSpec(bits=bits, granularity="group", axis=1, group_size=size)
    return QuantSpec(bits=bits, signed=False, symmetric=False, granularity="group", axis=1, group_size=size)


# What each config name means when lowbit has no preset of that name (w4a16-g32-asym never has one).
GRIDS: dict[str, tuple[str, QuantSpec]] = {
    "w8a16": ("int8 per channel, symmetric", INT8_WEIGHT),
    "w4a16-g128": ("int4 group 128, symmetric", _group(4, 128)),
    "w3a16-g128": ("int3 group 128, symmetric", _group(3, 128)),
    "w4a16-g32": ("int4 group 32, symmetric", _group(4, 32)),
    "w4a16-g32-asym": ("uint4 group 32, affine", _group(4, 32, symmetric=False)),
}


DEFAULT_CONFIGS = ["w8a16", "w4a16-g128", "w4a16-g128+float-head", "w3a16-g128", "w3a16-g128+float-head",
                   "w4a16-g32", "w4a16-g32-asym", "w4a16-g32-asym+float-head"]
FLOAT_HEAD = "+float-head"  # suffix: the same config with lm_head kept in float, as ORT's quantizer does


def config_for(name: str) -> tuple[QuantConfig, str]:
    """The QuantConfig for ``name`` and where it came from ("preset" or "built here").

    ``name + FLOAT_HEAD`` is that config with a first rule keeping ``lm_head`` in float (SmolLM2
    ties it to the embedding, which its GGUF file stores at 8 bits, Q8_0)."""
    if name.endswith(FLOAT_HEAD):
        config, origin = config_for(name.removesuffix(FLOAT_HEAD))
        rules = (Rule(pattern="lm_head", layer=None), *config.rules)
        return dataclasses.replace(config, name=name, rules=rules), origin
    if name in lowbit.CONFIGS:
        return lowbit.CONFIGS[name], "preset"
    if name not in GRIDS:
        raise SystemExit(f"unknown config {name!r}: not in lowbit.CONFIGS nor in {list(GRIDS)} "
                         f"(optionally with {FLOAT_HEAD!r})")
    embedding = Rule(pattern="type:Embedding", layer=LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT)))
    layer = LayerQuant(weight=TensorQuant(spec=GRIDS[name][1]))
    return QuantConfig(name=name, rules=(embedding,), default=layer), "built here"


def grid(name: str) -> str:
    base = name.removesuffix(FLOAT_HEAD)
    text = GRIDS[base][0] if base in GRIDS else "see lowbit.CONFIGS"
    return text + ("; lm_head float" if name.endswith(FLOAT_HEAD) else "")


def _measured(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its wall seconds and the peak RSS in GiB while it ran."""
    start = time.perf_counter()
    with PeakRSS() as rss:
        value = fn(*args, **kwargs)
    return value, time.perf_counter() - start, rss.peak / GIB


def run_config(model, windows: torch.Tensor, name: str, fp32: float, batch_size: int) -> str:
    """One table row: quantize ``model`` with config ``name``, measure its perplexity."""
    config, origin = config_for(name)
    try:
        qmodel, q_s, q_rss = _measured(lowbit.quantize, model, None, config, progress=False)
    except (ValueError, RuntimeError) as e:  # e.g. a group size the numerics refuse: report it, go on
        log.warning("%s: quantize failed: %s", name, e)
        return f"| {name} ({origin}) | {grid(name)} | failed: {str(e)[:160]} | | | | |"
    result, p_s, p_rss = _measured(perplexity, qmodel, windows, batch_size=batch_size, progress=False)
    log.info("%s: perplexity %.3f (%.1f s)", name, result.perplexity, p_s)
    del qmodel
    gc.collect()
    return (f"| {name} ({origin}) | {grid(name)} | {q_s:.1f} | {p_s:.1f} | {result.perplexity:.3f} | "
            f"{result.perplexity / fp32:.3f} | {max(q_rss, p_rss):.2f} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="windows per forward pass (the simulation fake-quantizes the weights once per pass)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    args, argv = parse(parser, argv)
    log_to_stderr(log)
    torch.set_num_threads(args.threads)
    from lowbit.zoo import english_text, smollm2, token_windows

    (model, tokenizer), load_s, load_rss = _measured(smollm2)
    windows = token_windows(tokenizer, english_text("eval"), window=args.window, count=args.windows)
    fp32, fp32_s, fp32_rss = _measured(perplexity, model, windows, batch_size=args.batch_size, progress=False)
    log.info("fp32: perplexity %.3f (%.1f s)", fp32.perplexity, fp32_s)
    info = _machine.machine(("torch", "transformers"))
    out = ["## LLM: SmolLM2-135M-Instruct, round-to-nearest weight-only quantization", "",
           f"`{command('bench_llm.py', argv)}`", "",
           _machine.machine_line(info, ("torch", "transformers", "lowbit"), threads=True), "",
           (f"Evaluation text: the first {fp32.windows} windows of {args.window} tokens of "
            f"`lowbit.zoo.english_text(\"eval\")` ({fp32.tokens} predicted tokens), {args.batch_size} windows "
            f"per forward pass. Model loaded in "
            f"{load_s:.1f} s (peak RSS {load_rss:.2f} GiB)."), "",
           "| config | weight grid | quantize s | perplexity s | perplexity | x FP32 | peak RSS GiB |",
           "|---|---|---:|---:|---:|---:|---:|",
           f"| fp32 | float32 | | {fp32_s:.1f} | {fp32.perplexity:.3f} | 1.000 | {fp32_rss:.2f} |"]
    for name in args.configs:
        out.append(run_config(model, windows, name, fp32.perplexity, args.batch_size))
    print("\n".join(out))


if __name__ == "__main__":
    main()
