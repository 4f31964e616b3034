"""GPTQ's options on SmolLM2-135M-Instruct at W4 g128 (every Linear incl. lm_head, embedding int8 per
row, as ``bench_llm_peers.py``'s lowbit rows): one configuration per run, its PyTorch perplexity on the
peers' evaluation windows appended to ``--rows`` as a JSON line, so options can be compared one at a
time without the peers' other stages.

    python benchmarks/bench_gptq_options.py --gptq "gptq(true_sequential=true,asymmetric=true)" [--calib 64]
    python benchmarks/bench_gptq_options.py --awq --gptq gptq --calib 128 --awq-batches 64
    python benchmarks/bench_gptq_options.py --render ROWS

The GPTQ step is given in its short form (``lowbit.ptq.parse_step``); ``--awq`` puts AWQ (reading
``--awq-batches`` windows) before it.  Perplexity: the first ``--windows`` non-overlapping windows of
512 tokens of ``english_text("eval")``, each on its own; calibration: the first ``--calib`` windows of
``english_text("calib")``.  Wall seconds: the ``lowbit.quantize`` call alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import _machine
import torch
from _llm_peers import lowbit_config
from _selection import command, log_to_stderr, parse

import lowbit
from lowbit.report import perplexity

log = logging.getLogger("bench_gptq_options")


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    from lowbit.zoo import english_text, smollm2, token_windows

    model, tokenizer = smollm2()
    model.eval()
    windows = token_windows(tokenizer, english_text("eval"), window=512, count=args.windows)
    calib = token_windows(tokenizer, english_text("calib"), window=512, count=args.calib)
    steps = ([lowbit.ptq.AWQ(batches=args.awq_batches)] if args.awq else []) + [lowbit.ptq.parse_step(args.gptq)]
    start = time.perf_counter()
    qmodel = lowbit.quantize(model, [{"input_ids": w[None]} for w in calib], lowbit_config(4, "all"),
                             algorithms=steps, progress=False)
    wall = time.perf_counter() - start
    fp32 = perplexity(model, windows, batch_size=4, progress=False).perplexity
    ppl = perplexity(qmodel, windows, batch_size=4, progress=False).perplexity
    info = _machine.machine(("torch", "transformers"))
    return {"steps": ", ".join(map(str, steps)), "calib": args.calib, "windows": args.windows, "fp32": fp32,
            "perplexity": ppl, "ratio": ppl / fp32, "wall_s": wall, "command": command("bench_gptq_options.py", argv),
            "machine": _machine.machine_line(info, ("torch", "transformers", "lowbit"), threads=True)}


def render(rows: list[dict]) -> str:
    lines = ["| steps | calib windows | perplexity (x FP32) | quantize wall s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['steps']} | {r['calib']} | {r['perplexity']:.3f} ({r['ratio']:.3f}x) | {r['wall_s']:.0f} |"
              for r in rows]
    machines = sorted({r["machine"] for r in rows})
    return "\n".join([*lines, "", *machines, "", *(f"`{r['command']}`" for r in rows)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptq", default="gptq", help="the GPTQ step's short form")
    parser.add_argument("--awq", action="store_true", help="AWQ before GPTQ")
    parser.add_argument("--awq-batches", type=int, default=None, help="windows AWQ's search reads (default all)")
    parser.add_argument("--calib", type=int, default=64, help="calibration windows")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="gptq_options_rows.jsonl", help="JSON lines the row is appended to")
    parser.add_argument("--render", metavar="ROWS", help="only print the table of this rows file")
    args, argv = parse(parser, argv)
    if args.render:
        print(render([json.loads(line) for line in Path(args.render).read_text().splitlines() if line.strip()]))
        return
    log_to_stderr(log)
    torch.set_num_threads(args.threads)
    row = run(args, argv)
    with open(args.rows, "a") as f:
        f.write(json.dumps(row) + "\n")
    log.info("%s: %.3f (%.3fx FP32), %.0f s", row["steps"], row["perplexity"], row["ratio"], row["wall_s"])


if __name__ == "__main__":
    main()
