"""Does GPTQ's gain carry over from the calibration text to held-out text?  SmolLM2's decoder, W4 g128.

For each weight grid (``--grids``: ``signed``, each group's largest-magnitude value on -8, the
presets' grid; ``plain``, scale = max |w| / 7.5) and each number of calibration windows
(``--calib``, windows of 512 tokens of ``english_text("calib")``), the decoder's Linears (lm_head and
embedding float) are quantized by round to nearest and by GPTQ (``lowbit.quantize(...,
algorithms=["gptq"])``, defaults), and measured:

* perplexity on ``--windows`` held-out windows of ``english_text("eval")``;
* for every Linear of the GPTQ model, the squared output error ``|x (W - Q)^T|^2`` summed over its
  inputs ``x`` in that model, of GPTQ's weight ``Q`` over that of round to nearest on the same grid,
  on the calibration windows (what GPTQ minimised) and on the held-out windows; the table gives the
  median over the layers of each kind and the largest ratio.  A ratio near 1 on held-out text where
  it is far below 1 on the calibration text is GPTQ fitting its calibration set.

    python benchmarks/bench_gptq_transfer.py [--grids signed plain] [--calib 16 64] [--windows 8]
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Sequence

import _machine
import torch
from _llm_peers import lowbit_config
from _selection import command, log_to_stderr, parse

import lowbit
from lowbit.ptq.gptq import grid_of
from lowbit.report import perplexity
from lowbit.zoo import english_text, smollm2, token_windows

log = logging.getLogger("bench_gptq_transfer")
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def error_ratios(qmodel: torch.nn.Module, model: torch.nn.Module, windows: torch.Tensor) -> dict[str, float]:
    """Per quantized Linear of ``qmodel`` (GPTQ'd): output error of its weight over round to
    nearest's, both against ``model``'s float weight, summed over its inputs on ``windows``."""
    floats = dict(model.named_modules())
    sums: dict[str, list[float]] = {}
    handles = []
    for name, layer in qmodel.named_modules():
        if not name.endswith(KINDS) or getattr(layer, "weight_quantizer", None) is None:
            continue
        w = floats[name].weight.detach()
        d_gptq = w - layer.weight_quantizer(layer.weight).detach()
        d_rtn = w - grid_of(layer.weight_quantizer, w).round_all(w)
        sums[name] = [0.0, 0.0]

        def hook(mod, args, name=name, d_gptq=d_gptq, d_rtn=d_rtn):
            x = mod._quant_input(args[0]).reshape(-1, d_gptq.shape[1]).float()
            sums[name][0] += float((x @ d_gptq.T).square().sum())
            sums[name][1] += float((x @ d_rtn.T).square().sum())
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        for w in windows:
            qmodel(w[None])
    finally:
        for h in handles:
            h.remove()
    return {name: g / r for name, (g, r) in sums.items() if r > 0}


def _cells(calib: dict[str, float], held: dict[str, float], kind: str) -> str:
    names = [n for n in calib if n.endswith(kind)]
    on_calib, on_held = (statistics.median(d[n] for n in names) for d in (calib, held))
    worst = max(names, key=held.get)
    return f"{on_calib:.2f} / {on_held:.2f} ({held[worst]:.1f} at block {worst.split('.')[2]})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", nargs="+", choices=("signed", "plain"), default=["signed", "plain"])
    parser.add_argument("--calib", nargs="+", type=int, default=[16, 64], help="calibration windows")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows (perplexity, errors)")
    parser.add_argument("--threads", type=int, default=2)
    args, argv = parse(parser, argv)
    log_to_stderr(log)
    torch.set_num_threads(args.threads)
    model, tokenizer = smollm2()
    model.eval()
    held = token_windows(tokenizer, english_text("eval"), window=512, count=args.windows)
    calib = token_windows(tokenizer, english_text("calib"), window=512, count=max(args.calib))
    fp32 = perplexity(model, held, batch_size=4, progress=False).perplexity
    kinds = ("q_proj", "o_proj", "up_proj", "down_proj")
    lines = ["| grid | calib windows | perplexity RTN | perplexity GPTQ | "
             + " | ".join(f"{k} GPTQ/RTN error, calib / held-out (worst held-out)" for k in kinds) + " |",
             "|---|---:|---:|---:|" + "---|" * len(kinds)]
    for grid in args.grids:
        config = lowbit_config(4, "decoder", signed_scale=grid == "signed")
        rtn = perplexity(lowbit.quantize(model, None, config, progress=False), held, batch_size=4, progress=False).perplexity
        for n in args.calib:
            items = [{"input_ids": w[None]} for w in calib[:n]]
            qmodel = lowbit.quantize(model, items, config, algorithms=["gptq"], progress=False)
            ppl = perplexity(qmodel, held, batch_size=4, progress=False).perplexity
            on_calib, on_held = error_ratios(qmodel, model, calib[:n]), error_ratios(qmodel, model, held)
            log.info("%s, %d windows: RTN %.3f GPTQ %.3f", grid, n, rtn, ppl)
            lines.append(f"| {grid} | {n} | {rtn:.3f} | {ppl:.3f} | "
                         + " | ".join(_cells(on_calib, on_held, k) for k in kinds) + " |")
            del qmodel
    print(f"SmolLM2-135M-Instruct, decoder Linears W4 g128 (lm_head and embedding float); FP32 perplexity "
          f"{fp32:.3f} on {args.windows} held-out windows of 512 tokens.\n")
    print("\n".join(lines))
    print(f"\n`{command('bench_gptq_transfer.py', argv)}`")
    print(_machine.machine_line(_machine.machine(("torch", "transformers")), ("torch", "transformers", "lowbit"),
                                threads=True))


if __name__ == "__main__":
    main()
