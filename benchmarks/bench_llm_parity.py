"""Does the simulation say what the exported file does?  SmolLM2-135M-Instruct, ``export_llm`` at each
``--levels`` MatMulNBits accuracy_level, in ONNX Runtime against lowbit's PyTorch model.

Two simulations of the same quantized model: *plain* (float activations: what the weights alone
cost) and *of the file* (``lowbit.runtime.matmulnbits_inputs(qmodel, level)``: at accuracy_level 4
each MatMulNBits input rounded to int8 per block as ONNX Runtime rounds it; at 0 the same as plain).
For each level:

* perplexity over ``--windows`` windows of ``--window`` tokens of ``english_text("eval")`` (each
  window one prefill, ``lowbit.report.perplexity``'s definition), in both simulations and in ORT;
* the share of positions where ORT's top token is the simulation-of-the-file's;
* greedy decoding of ``--new-tokens`` tokens after each of ``PROMPTS``: Hugging Face
  ``generate(do_sample=False)`` on the simulation of the file against ``lowbit.export.llm.generate``
  on the file (KV cache, one token a step): prompts whose tokens are all equal, and the mean
  number of leading tokens that agree.

    python benchmarks/bench_llm_parity.py [--config w4a16-g128] [--algorithms gptq] [--levels 4 0]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import _machine
import numpy as np
import torch
from _selection import command, log_to_stderr, parse

import lowbit
from lowbit.export import export_llm
from lowbit.export.llm import generate, load_session, run_step
from lowbit.nn.walk import fixed_weights
from lowbit.report.perplexity import window_nll
from lowbit.runtime import matmulnbits_inputs

log = logging.getLogger("bench_llm_parity")

PROMPTS = ("The Python standard library provides", "def read_config(path):\n    ",
           "To open a file for writing,", "In the beginning", "A list comprehension is",
           "The following example shows how to", "Exceptions are raised when", "import os\nimport sys\n")


def score(logits: np.ndarray, window: torch.Tensor) -> tuple[float, np.ndarray]:
    """One window's summed next-token NLL (``lowbit.report.perplexity``'s definition) and top tokens."""
    return float(window_nll(torch.from_numpy(logits)[None], window[None])[0]), logits.argmax(-1)


def ort_scores(session, windows: torch.Tensor) -> list[tuple[float, np.ndarray]]:
    return [score(run_step(session, w[None].numpy())[0][0], w) for w in windows]


def torch_scores(model, windows: torch.Tensor) -> list[tuple[float, np.ndarray]]:
    with torch.no_grad():
        return [score(model(w[None]).logits[0].numpy(), w) for w in windows]


def ppl_of(scores: Sequence[tuple[float, np.ndarray]], windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL over every window."""
    return float(np.exp(sum(nll for nll, _ in scores) / (windows.shape[0] * (windows.shape[1] - 1))))


def greedy(qmodel, session, tokenizer, new_tokens: int) -> tuple[int, float]:
    """(prompts whose greedy tokens are all equal, mean count of leading equal tokens)."""
    cfg = qmodel.generation_config
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
    equal, leading = 0, []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            sim = qmodel.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                  eos_token_id=eos)[0, ids.shape[1]:].tolist()
        ort = generate(session, ids, new_tokens, eos_token_id=eos, pad_token_id=pad)[0, ids.shape[1]:].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(sim, ort)) if a != b), min(len(sim), len(ort)))
        equal += sim == ort
        leading.append(agree)
    return equal, float(np.mean(leading))


def measure_level(qmodel, tokenizer, windows, level: int, folder: Path, args, plain: list) -> str:
    path = folder / f"level{level}.onnx"
    export_llm(qmodel, path, accuracy_level=level, max_length=max(args.window, 256))
    session = load_session(path, threads=args.threads)
    start = time.perf_counter()
    ort = ort_scores(session, windows)
    with matmulnbits_inputs(qmodel, level), fixed_weights(qmodel):  # weights fake-quantized once, not per call
        of_file = torch_scores(qmodel, windows)
        equal, leading = greedy(qmodel, session, tokenizer, args.new_tokens)
    same_top = float(np.mean(np.concatenate([a == b for (_, a), (_, b) in zip(ort, of_file, strict=True)])))
    p_plain, p_file, p_ort = ppl_of(plain, windows), ppl_of(of_file, windows), ppl_of(ort, windows)
    log.info("level %d: %.4f / %.4f / %.4f in %.0f s", level, p_plain, p_file, p_ort, time.perf_counter() - start)
    return (f"| {level} | {p_plain:.3f} | {p_file:.3f} | {p_ort:.3f} | {100 * (p_ort / p_plain - 1):+.2f}% | "
            f"{100 * (p_ort / p_file - 1):+.3f}% | {same_top:.2%} | {equal} of {len(PROMPTS)} | "
            f"{leading:.1f} of {args.new_tokens} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="w4a16-g128")
    parser.add_argument("--algorithms", nargs="*", default=[], help="e.g. gptq (calibrates on --calib windows)")
    parser.add_argument("--calib", type=int, default=16, help="512-token calibration windows for the algorithms")
    parser.add_argument("--levels", nargs="+", type=int, default=[4, 0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args, argv = parse(parser, argv)
    log_to_stderr(log)
    torch.set_num_threads(args.threads)
    from lowbit.zoo import english_text, smollm2, token_windows

    model, tokenizer = smollm2()
    windows = token_windows(tokenizer, english_text("eval"), window=args.window, count=args.windows)
    calib = None
    if args.algorithms:
        calib = [{"input_ids": w[None]} for w in token_windows(tokenizer, english_text("calib"), 512, count=args.calib)]
    qmodel = lowbit.quantize(model, calib, args.config, algorithms=args.algorithms or None, progress=False)
    with fixed_weights(qmodel):
        plain = torch_scores(qmodel, windows)
    info = _machine.machine(("torch", "onnxruntime", "transformers"))
    algorithms = " + ".join(args.algorithms) or "round to nearest"
    lines = [f"`{command('bench_llm_parity.py', argv)}`", "",
             _machine.machine_line(info, ("torch", "onnxruntime", "transformers", "lowbit"), threads=True), "",
             (f"SmolLM2-135M-Instruct, {args.config} ({algorithms}); {args.windows} windows of {args.window} "
              f"tokens of `english_text(\"eval\")`; greedy: {len(PROMPTS)} prompts, {args.new_tokens} new tokens."), "",
             ("| accuracy_level | perplexity, plain simulation | simulation of the file | ONNX Runtime | ORT vs plain "
              "| ORT vs simulation of the file | same top token (ORT, simulation of the file) | greedy: prompts "
              "all equal | greedy: leading tokens equal |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for level in args.levels:
            lines.append(measure_level(qmodel, tokenizer, windows, level, Path(tmp), args, plain))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
