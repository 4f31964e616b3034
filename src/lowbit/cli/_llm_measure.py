"""What ``lowbit quantize`` measures on a causal LM, in PyTorch and in ONNX Runtime.

* perplexity (``lowbit.report.perplexity``) of a PyTorch model, or of an ``export_llm`` file run by
  ONNX Runtime through ``OrtCausalLM`` (each window one prefill from an empty cache);
* ONNX Runtime latency of a prefill of ``seq_len`` tokens and of one decode step after that cache;
* greedy decoding of a few prompts: Hugging Face ``generate(do_sample=False)`` on the PyTorch model
  against ``lowbit.export.llm.generate`` on the file, and how many leading tokens agree.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

# Windows per forward pass: the PyTorch simulation fake-quantizes every weight on each pass, so passes
# of several windows cost less per token; ONNX Runtime gains nothing from it and would hold more logits.
EVAL_BATCH = {"pytorch": 4, "onnxruntime": 1}
PROMPTS = ("The Python standard library provides", "def read_config(path):\n    ")
DECODE_STEPS = 4  # one-token steps timed per round, each after the same prefilled cache


class OrtCausalLM(nn.Module):
    """An ``export_llm`` file as a causal LM: ``model(input_ids)`` -> logits tensor, each call one
    prefill from an empty KV cache (what ``lowbit.report.perplexity`` needs)."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from ..export.llm import run_step

        logits, _ = run_step(self.session, input_ids.cpu().numpy())
        return torch.from_numpy(logits)


def perplexity_of(model: nn.Module, windows: torch.Tensor, progress: bool) -> dict:
    """``lowbit.report.perplexity`` as a JSON-ready dict (perplexity, nll, tokens, windows, seconds)."""
    from dataclasses import asdict

    from ..report.perplexity import perplexity

    batch = EVAL_BATCH["onnxruntime" if isinstance(model, OrtCausalLM) else "pytorch"]
    return asdict(perplexity(model, windows, batch_size=batch, progress=progress))


def session_of(path, threads: int):
    """An ONNX Runtime session on an ``export_llm`` file."""
    from ..export.llm import load_session

    return load_session(path, threads=threads)


def latency(sessions: dict, ids, rounds: int) -> dict[str, dict[str, float]]:
    """Median milliseconds of a prefill of ``ids`` (1, T) and of one decode step after it, per session.

    The sessions take turns within each round (a load change on a shared machine hits them alike);
    a warm-up prefill per session first.  Each round: one prefill, then ``DECODE_STEPS`` one-token
    steps, each after the same T-token cache.  Decode steps run as ``generate`` runs them: past and
    present in one ``SharedCache`` buffer that GroupQueryAttention extends in place (handing the
    cache in and out with ``run_step`` would add a copy of every layer's cache to each step)."""
    from ..export.llm import SharedCache, run_step

    ids = ids.cpu().numpy()
    caches = {name: SharedCache(s, 1, ids.shape[1] + 1) for name, s in sessions.items()}
    for cache in caches.values():  # warm-up, and the cache every decode step starts from
        cache.step(ids)
    token = ids[:, -1:]
    times = {name: {"prefill": [], "decode": []} for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            run_step(s, ids)
            times[name]["prefill"].append(time.perf_counter() - start)
            for _ in range(DECODE_STEPS):
                caches[name].truncate(ids.shape[1])
                start = time.perf_counter()
                caches[name].step(token)
                times[name]["decode"].append(time.perf_counter() - start)
    return {name: {phase: 1e3 * statistics.median(v) for phase, v in t.items()} for name, t in times.items()}


def _eos_and_pad(model) -> tuple[int | None, int]:
    cfg = model.generation_config
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
    return eos, pad


def greedy(model: nn.Module, session, tokenizer, new_tokens: int) -> list[dict]:
    """Per prompt: the tokens greedy decoding adds in PyTorch and in ONNX Runtime, and how many
    leading ones are equal (``agree`` of ``generated``)."""
    from ..export.llm import generate

    eos, pad = _eos_and_pad(model)
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch_ids = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                       eos_token_id=eos)[0, ids.shape[1]:].tolist()
        ort_ids = generate(session, ids, new_tokens, eos_token_id=eos, pad_token_id=pad)
        ort_ids = ort_ids[0, ids.shape[1]:].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(torch_ids, ort_ids)) if a != b),
                     min(len(torch_ids), len(ort_ids)))
        out.append({"prompt": prompt, "pytorch": torch_ids, "onnxruntime": ort_ids, "agree": agree,
                    "generated": len(torch_ids)})
    return out
