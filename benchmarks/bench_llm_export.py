"""SmolLM2-135M-Instruct exported with ``lowbit.export_llm``: file size, ONNX Runtime latency of
prefill and of one decode step against the FP32 file, fidelity to lowbit's simulation, and greedy
32-token agreement between the simulation and ONNX Runtime.

The quantized model is ``lowbit.quantize(model, None, --config)`` (round-to-nearest, weight-only;
``lm_head`` quantized too, the embedding int8 per row).  Every variant is written by the same
builder (``export_llm``: GroupQueryAttention with a KV cache, SkipSimplifiedLayerNormalization ...),
the FP32 one from the float model with plain ``MatMul``, so the comparison is of the weights alone:

* ``fp32``: the float model; ``int4-acc4`` / ``int4-acc0``: MatMulNBits with accuracy_level 4
  (activations rounded to int8 per block, integer kernels) or 0 (float arithmetic);
* ``-b32``: MatMulNBits blocks of 32 (each group-128 scale written 4 times: the same weights), so
  accuracy_level 4 rounds the activations to int8 per 32 values instead of per 128;
* ``-fused``: q/k/v and gate/up each as one MatMul(NBits) (``export_llm(fuse=True)``: fewer, wider
  kernels, the same numbers; the default is one node per Linear).

Latency: ``--threads`` intra-op threads, all sessions open in one process and measured in
interleaved rounds (each round: one prefill of ``--prefill`` tokens per variant, then
``--decode-steps`` one-token steps after that 512-token cache), median and minimum over the rounds.
On a shared machine the wall clock includes other processes' interference; with ``--profile`` each
variant is also run under ONNX Runtime's profiler and the per-node medians are summed (the kernels'
own cost, robust to preemption; it leaves out the executor's small overhead between nodes).

Fidelity: max |logit difference| to the PyTorch model (the simulation for the quantized files) over
the prefill window (real text: standard-library docstring sentences), and how many positions have the
same top token.  Greedy: ``generate(do_sample=False)`` on the simulation vs
``lowbit.export.llm.generate`` on the file, ``--new-tokens`` tokens after each prompt, EOS as the
model's generation config says.

    python benchmarks/bench_llm_export.py [--config w4a16-g128] [--runs 5] [--decode-steps 8]
                                          [--prefill 512] [--threads 2] [--new-tokens 32] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import logging
import os
import statistics
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
from lowbit.export.llm import SharedCache, generate, load_session, run_step

log = logging.getLogger("bench_llm_export")

# name -> (model: "float" or "quantized", accuracy_level, fuse, MatMulNBits block_size: None = the group)
VARIANTS = {
    "fp32": ("float", 4, False, None),
    "int4-acc4": ("quantized", 4, False, None),
    "int4-acc4-b32": ("quantized", 4, False, 32),
    "int4-acc0": ("quantized", 0, False, None),
    "fp32-fused": ("float", 4, True, None),
    "int4-acc4-fused": ("quantized", 4, True, None),
}
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Quantization reduces the size of a neural network by",
           "The Python standard library provides"]
TARGETS = {"decode": 0.35, "prefill": 1.0}  # the targets: x FP32 latency


def _text_ids(tokenizer, n: int) -> np.ndarray:
    """``n`` tokens of real English (standard-library docstring sentences), as ``(1, n)``."""
    from lowbit.zoo import english_sentences

    ids = tokenizer(" ".join(english_sentences(3000, seed=0)), add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"the sentences give {len(ids)} tokens, fewer than {n}")
    return np.asarray(ids[:n], dtype=np.int64)[None]


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean negative log-likelihood of each next token of ``ids`` (1, n) under ``logits`` (1, n, vocab)."""
    z = logits[0, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(z)), ids[0, 1:]].mean())


def perplexities(sessions: dict, models: dict, windows: np.ndarray) -> dict[str, float]:
    """Perplexity over ``windows`` (n, length), each window scored on its own: per model kind (the
    PyTorch model) and per file."""
    out = {}
    for which, m in models.items():
        with torch.no_grad():
            out[which] = [_nll(m(torch.from_numpy(w[None])).logits.numpy(), w[None]) for w in windows]
    for name, s in sessions.items():
        out[name] = [_nll(run_step(s, w[None])[0], w[None]) for w in windows]
    return {k: float(np.exp(np.mean(v))) for k, v in out.items()}


def export_variants(models: dict, names: Sequence[str], folder: Path, max_length: int) -> dict[str, Path]:
    paths = {}
    for name in names:
        which, level, fuse, block = VARIANTS[name]
        start = time.perf_counter()
        paths[name] = folder / f"{name}.onnx"
        export_llm(models[which], paths[name], accuracy_level=level, fuse=fuse, block_size=block,
                   max_length=max_length)
        log.info("exported %s in %.1f s", name, time.perf_counter() - start)
    return paths


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def time_variants(sessions: dict, ids: np.ndarray, runs: int, decode_steps: int) -> dict[str, dict[str, list]]:
    """Wall-clock seconds of prefill and of decode steps after it, in interleaved rounds.  Decode two
    ways: ``run_step`` (the cache handed in and a new one returned: GroupQueryAttention copies it)
    and ``SharedCache`` (past and present in one buffer, written in place; what ``generate`` uses)."""
    pasts = {name: run_step(s, ids)[1] for name, s in sessions.items()}  # also the warm-up
    caches = {name: SharedCache(s, 1, ids.shape[1] + 1) for name, s in sessions.items()}
    for cache in caches.values():
        cache.step(ids)
    token = ids[:, -1:]
    times = {name: {"prefill": [], "decode": [], "decode_shared": []} for name in sessions}
    for r in range(runs):
        for name, s in sessions.items():
            times[name]["prefill"].append(_timed(run_step, s, ids))
            for _ in range(decode_steps):
                times[name]["decode"].append(_timed(run_step, s, token, pasts[name]))
                caches[name].truncate(ids.shape[1])
                times[name]["decode_shared"].append(_timed(caches[name].step, token))
        log.info("round %d/%d done", r + 1, runs)
    return times


def kernel_medians(path: Path, ids: np.ndarray, runs: int, threads: int) -> dict[str, float]:
    """Sum over nodes of each node's median kernel time (ms), per prefill and per decode step."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    _, past = run_step(session, ids)
    for _ in range(runs):
        run_step(session, ids)
    for _ in range(runs):
        run_step(session, ids[:, -1:], past)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    phases = {"prefill": range(1, 1 + runs), "decode": range(1 + runs, 1 + 2 * runs)}  # run 0: the warm-up
    per_node = {phase: collections.defaultdict(lambda: collections.defaultdict(float)) for phase in phases}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        run = next(i for i, (a, b) in enumerate(spans) if a <= e["ts"] <= b)
        for phase, rng in phases.items():
            if run in rng:
                per_node[phase][e["name"]][run] += e["dur"]
    return {phase: sum(statistics.median(v.values()) for v in nodes.values()) / 1e3
            for phase, nodes in per_node.items()}


def fidelity(session, reference: np.ndarray, ids: np.ndarray) -> tuple[float, float]:
    """Max |logit difference| to ``reference`` over the window, and the share of same top tokens."""
    logits, _ = run_step(session, ids)
    return float(np.abs(logits - reference).max()), float((logits.argmax(-1) == reference.argmax(-1)).mean())


def frozen_simulation(model, qmodel):
    """A float copy of ``model`` holding ``qmodel``'s fake-quantized weights: the same forward
    (``F.linear`` / ``F.embedding`` on the same tensors) without re-quantizing every weight at every
    step, which makes ``generate`` on the simulation ~7x slower here.  ``main`` checks that its logits
    equal the simulation's bit for bit.  Tied weights come apart: each layer keeps its own grid."""
    frozen = copy.deepcopy(model)
    modules = dict(frozen.named_modules())
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            q = getattr(m, "weight_quantizer", None)
            if q is not None and q.mode != "disabled":
                modules[name].weight = torch.nn.Parameter(q(m.weight).detach().clone(), requires_grad=False)
    return frozen.eval()


def _eos(model) -> tuple[int | None, int | None]:
    cfg = model.generation_config
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    return eos, cfg.pad_token_id


def hf_greedy(model, tokenizer, new_tokens: int) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Per prompt: its ids and the tokens ``model.generate(do_sample=False)`` adds (once per model: on
    the simulation every step fake-quantizes every weight, so this is the slow part)."""
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append((ids, model.generate(ids, max_new_tokens=new_tokens, do_sample=False).numpy()[0, ids.shape[1]:]))
    return out


def agreement(session, expected: list[tuple[torch.Tensor, np.ndarray]], new_tokens: int, eos, pad) -> list[str]:
    """Per prompt: leading tokens the file generates equal to the simulation's, of those generated."""
    cells = []
    for ids, want in expected:
        got = generate(session, ids, new_tokens, eos_token_id=eos, pad_token_id=pad)[0, ids.shape[1]:]
        n = min(len(got), len(want))
        same = int(np.argmin(got[:n] == want[:n])) if (got[:n] != want[:n]).any() else n
        cells.append(f"{same}/{len(want)}" + ("" if len(got) == len(want) else f" (ORT {len(got)})"))
    return cells


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} ({min(values) * 1e3:.1f})"


def latency_table(times: dict, sizes: dict, kernels: dict | None) -> list[str]:
    base = times["fp32"]
    lines = ["| variant | file MB | size x FP32 | prefill ms median (min) | x FP32 | decode ms median (min) | x FP32 "
             "| decode, shared cache | x FP32 |" + (" kernels prefill / decode ms | x FP32 |" if kernels else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if kernels else "")]
    for name, t in times.items():
        ratio = {p: statistics.median(t[p]) / statistics.median(base[p]) for p in ("prefill", "decode", "decode_shared")}
        row = (f"| {name} | {sizes[name] / 1e6:.1f} | {sizes[name] / sizes['fp32']:.3f} | {_ms(t['prefill'])} | "
               f"{ratio['prefill']:.2f} | {_ms(t['decode'])} | {ratio['decode']:.2f} | {_ms(t['decode_shared'])} | "
               f"{ratio['decode_shared']:.2f} |")
        if kernels:
            k, kb = kernels[name], kernels["fp32"]
            row += (f" {k['prefill']:.0f} / {k['decode']:.1f} | {k['prefill'] / kb['prefill']:.2f} / "
                    f"{k['decode'] / kb['decode']:.2f} |")
        lines.append(row)
    return lines


def fidelity_section(sessions: dict, model, qmodel, tokenizer, ids: np.ndarray, args) -> list[str]:
    """Logit fidelity over the prefill window, greedy agreement and perplexity, as markdown."""
    frozen = frozen_simulation(model, qmodel)
    with torch.no_grad():
        refs = {"float": model(torch.from_numpy(ids)).logits.numpy(),
                "quantized": qmodel(torch.from_numpy(ids)).logits.numpy()}
        if not np.array_equal(frozen(torch.from_numpy(ids)).logits.numpy(), refs["quantized"]):
            raise SystemExit("the frozen copy's logits differ from the simulation's (a benchmark bug)")
    fid = {name: fidelity(s, refs[VARIANTS[name][0]], ids) for name, s in sessions.items()}
    models = {"float": model, "quantized": frozen}  # frozen: the simulation's logits, bit for bit
    plain = {name: s for name, s in sessions.items() if not VARIANTS[name][2]}  # -fused: the same numbers
    expected = {which: hf_greedy(models[which], tokenizer, args.new_tokens) for which in {VARIANTS[n][0] for n in plain}}
    agree = {name: agreement(s, expected[VARIANTS[name][0]], args.new_tokens, *_eos(model)) for name, s in plain.items()}
    windows = _text_ids(tokenizer, 512 * (args.ppl_windows + 1))[0, 512:].reshape(-1, 512)
    ppl = perplexities(plain, models, windows) if len(windows) else {}
    out = [(f"Fidelity over the {args.prefill}-token prefill window (vs the float model for fp32, the simulation "
            "otherwise), perplexity, and greedy agreement (leading tokens equal / generated):"), "",
           "| variant | max abs logit diff | same top token | perplexity (PyTorch) | "
           + " | ".join(f"prompt {i + 1}" for i in range(len(PROMPTS))) + " |", "|---|---:|---:|---:|" + "---:|" * len(PROMPTS)]
    for name, (diff, same) in fid.items():
        cells = agree.get(name, ["-"] * len(PROMPTS))
        p = f"{ppl[name]:.3f} ({ppl[VARIANTS[name][0]]:.3f})" if name in ppl else "-"
        out.append(f"| {name} | {diff:.2e} | {100 * same:.1f}% | {p} | " + " | ".join(cells) + " |")
    return out + ["", "Prompts: " + "; ".join(repr(p) for p in PROMPTS), "",
                  (f"Perplexity: {len(windows)} windows of 512 tokens after the prefill window, each scored on its "
                   "own; in brackets the PyTorch model's (the simulation's for the quantized files). Greedy on the "
                   "simulation runs a float copy holding its fake-quantized weights (logits checked bit-identical).")]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="w4a16-g128")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ppl-windows", type=int, default=4, help="512-token windows for perplexity (0: none)")
    parser.add_argument("--profile", action="store_true", help="also sum per-node median kernel times")
    args, argv = parse(parser, argv)
    if "fp32" not in args.variants:
        parser.error("--variants needs fp32 (the baseline)")
    log_to_stderr(log)
    torch.set_num_threads(args.threads)
    from lowbit.zoo import smollm2

    info = _machine.machine(("torch", "onnxruntime", "onnx", "transformers"))
    load = os.getloadavg()[0]
    model, tokenizer = smollm2()
    start = time.perf_counter()
    qmodel = lowbit.quantize(model, None, args.config, progress=False)
    quantize_s = time.perf_counter() - start
    ids = _text_ids(tokenizer, args.prefill)
    with tempfile.TemporaryDirectory(prefix="bench_llm_export_") as tmp:
        paths = export_variants({"float": model, "quantized": qmodel}, args.variants, Path(tmp),
                                max_length=max(args.prefill, 512) + args.new_tokens + 64)
        sizes = {name: p.stat().st_size for name, p in paths.items()}
        sessions = {name: load_session(p, threads=args.threads) for name, p in paths.items()}
        times = time_variants(sessions, ids, args.runs, args.decode_steps)
        end_load = os.getloadavg()[0]
        kernels = ({name: kernel_medians(p, ids, args.runs, args.threads) for name, p in paths.items()}
                   if args.profile else None)
        fidelity_lines = fidelity_section(sessions, model, qmodel, tokenizer, ids, args)
    out = [f"## SmolLM2-135M-Instruct exported with export_llm: {args.config} (RTN) vs FP32 in ONNX Runtime", "",
           f"`{command('bench_llm_export.py', argv)}`", "",
           _machine.machine_line(info, ("torch", "onnxruntime", "onnx", "transformers", "lowbit")), "",
           (f"ORT intra-op threads {args.threads}; {args.runs} interleaved rounds, each one prefill of {args.prefill} "
            f"tokens and {args.decode_steps} one-token decode steps after a {args.prefill}-token cache; load average "
            f"(1 min) {load:.1f} before the timing, {end_load:.1f} after it. lowbit.quantize took {quantize_s:.1f} s. "
            f"Issue targets: decode <= {TARGETS['decode']}x FP32, prefill <= {TARGETS['prefill']}x."), "",
           *latency_table(times, sizes, kernels), "", *fidelity_lines]
    print("\n".join(out))


if __name__ == "__main__":
    main()
