"""Peak memory of quantizing SmolLM2-135M-Instruct against the size of its FP32 weights.

Each variant runs in a fresh process (``--worker``), which measures its resident set (RSS):

1. after importing torch, transformers and lowbit (the interpreter's own footprint);
2. after loading the model (``lowbit.zoo.smollm2``) and tokenizing the calibration windows;
3. the peak while ``lowbit.quantize(model, calib, --config, algorithms=[--algorithm])`` runs,
   ``inplace=True`` (the model's own weights become the quantized ones: what a script that only
   wants the quantized model does) or ``inplace=False`` (a deep copy: the float model is kept).

The issue's bound is peak memory <= 2x the FP32 model; the table gives the quantization's peak
above the interpreter's footprint (3 - 1) over the FP32 weights' bytes, and the peak above the
loaded model (3 - 2), which is what GPTQ's streaming itself holds (hidden states of every
calibration window, one block's Hessians, a copy of the tied table for lm_head).

    python benchmarks/bench_llm_memory.py [--calib 64] [--algorithm gptq] [--config w4a16-g128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

GIB = 2**30


def worker(args: argparse.Namespace, inplace: bool) -> dict:
    import torch
    import transformers  # noqa: F401  (counted with the interpreter, not the model)
    from check_large_export import PeakRSS, _rss

    import lowbit
    from lowbit.zoo import english_text, smollm2, token_windows

    torch.set_num_threads(args.threads)
    base = _rss()
    model, tokenizer = smollm2()
    model.eval()
    calib = [{"input_ids": w[None]} for w in
             token_windows(tokenizer, english_text("calib"), window=512, count=args.calib)]
    loaded = _rss()
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    with PeakRSS() as rss:
        lowbit.quantize(model, calib, args.config, algorithms=[args.algorithm], progress=False, inplace=inplace)
    return {"inplace": inplace, "interpreter": base, "loaded": loaded, "peak": rss.peak, "weights": weights}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--algorithm", default="gptq")
    parser.add_argument("--config", default="w4a16-g128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("inplace", "copy"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, args.worker == "inplace")))
        return
    import _machine
    from _selection import command

    rows = []
    for variant in ("inplace", "copy"):
        out = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                              "--worker", variant], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    w = rows[0]["weights"]
    print(f"SmolLM2-135M-Instruct, FP32 weights {w / GIB:.2f} GiB (tied table once); `{args.config}`, "
          f"{args.algorithm} on {args.calib} windows of 512 tokens.\n")
    print("| quantize | RSS after imports GiB | after loading GiB | peak while quantizing GiB "
          "| peak above imports / FP32 weights | peak above the loaded model / FP32 weights |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'in place' if r['inplace'] else 'on a copy'} | {r['interpreter'] / GIB:.2f} | "
              f"{r['loaded'] / GIB:.2f} | {r['peak'] / GIB:.2f} | {(r['peak'] - r['interpreter']) / w:.2f}x | "
              f"{(r['peak'] - r['loaded']) / w:.2f}x |")
    print(f"\n`{command('bench_llm_memory.py', sys.argv[1:] if argv is None else list(argv))}`")
    print(_machine.machine_line(_machine.machine(("torch", "transformers")), ("torch", "transformers", "lowbit"),
                                threads=True))


if __name__ == "__main__":
    main()
