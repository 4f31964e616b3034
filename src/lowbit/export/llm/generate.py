"""Run an ``export_llm`` file in ONNX Runtime: one step (prefill or decode) and greedy decoding.

A step feeds ``input_ids`` with the KV cache of the tokens before them (empty for the prompt) and
an all-ones ``attention_mask`` over past and new tokens; it returns the logits of the new tokens
and the cache that now includes them.  ``run_step`` passes the cache in and gets a new one back
(simple; GroupQueryAttention copies the whole cache each step); ``SharedCache`` keeps it in
buffers that are both past and present, written in place.  ``generate`` runs the prompt once
(prefill), then one token per step (decode) on a ``SharedCache``, each time taking the most likely
token (greedy, as Hugging Face's ``generate(do_sample=False)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

PAST, PRESENT = "past_key_values.", "present."


def load_session(path: str | os.PathLike, *, threads: int | None = None):
    """An ONNX Runtime CPU session on ``path`` with all graph optimizations.

    Args:
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
    """
    import onnxruntime as ort  # a dependency of lowbit; imported when a file is run
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def _cache_inputs(session) -> list:
    return [i for i in session.get_inputs() if i.name.startswith(PAST)]


def _check_length(session, total: int) -> None:
    """ValueError when ``total`` tokens exceed the rotary tables of an ``export_llm`` file (ORT's own
    message names no fix)."""
    limit = session.get_modelmeta().custom_metadata_map.get("lowbit.max_length")
    if limit is not None and total > int(limit):
        raise ValueError(f"{total} tokens exceed the {limit} this file was exported for; export it again with "
                         f"export_llm(..., max_length={total}) or more")


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """The cache of no tokens: ``(batch, kv_heads, 0, head_dim)`` per past input."""
    past = {}
    for i in _cache_inputs(session):
        _, kv_heads, _, head_dim = i.shape
        past[i.name] = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    return past


def run_step(session, input_ids, past: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """One forward: logits ``(batch, seq, vocab)`` of ``input_ids`` after the tokens cached in ``past``
    (None: none), and the cache after them (as the next step's ``past``)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, sequence), got shape {ids.shape}")
    past = empty_past(session, ids.shape[0]) if past is None else past
    done = next(iter(past.values())).shape[2] if past else 0
    _check_length(session, done + ids.shape[1])
    feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], done + ids.shape[1]), np.int64), **past}
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(names, feeds), strict=True))
    present = {PAST + name.removeprefix(PRESENT): value for name, value in results.items() if name.startswith(PRESENT)}
    return results["logits"], present


class SharedCache:
    """A KV cache in preallocated buffers that each step reads as its past and writes as its present.

    ``run_step`` hands ONNX Runtime the past and takes a new present back, which GroupQueryAttention
    fills by copying the whole past plus the new tokens: every decode step copies the cache of every
    layer.  Here past and present are bound (ORT IOBinding) to the same ``(batch, kv_heads,
    capacity, head_dim)`` buffers, so GroupQueryAttention writes only the new tokens, in place (the
    "past-present shared buffer" of onnxruntime-genai); the attention mask says how many are valid.
    The logits equal ``run_step``'s.

    Example::

        cache = SharedCache(session, batch=1, capacity=prompt_len + 32)
        logits = cache.step(prompt_ids)          # prefill
        logits = cache.step(next_token_ids)      # one decode step
    """

    def __init__(self, session, batch: int, capacity: int) -> None:
        import onnxruntime as ort
        _check_length(session, capacity)
        self.session, self.batch, self.capacity, self.length = session, batch, capacity, 0
        self._buffers = {}
        for i in _cache_inputs(session):
            _, kv_heads, _, head_dim = i.shape
            self._buffers[i.name] = ort.OrtValue.ortvalue_from_numpy(
                np.zeros((batch, kv_heads, capacity, head_dim), np.float32))
        self._binding = session.io_binding()
        for name, buffer in self._buffers.items():
            self._binding.bind_ortvalue_input(name, buffer)

    def _bind_outputs(self) -> None:
        """Logits first (``get_outputs`` lists outputs in binding order), left to ORT to allocate at
        this step's shape; the presents into the buffers."""
        self._binding.clear_binding_outputs()
        self._binding.bind_output("logits")
        for name, buffer in self._buffers.items():
            self._binding.bind_ortvalue_output(PRESENT + name.removeprefix(PAST), buffer)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (the slots after them are overwritten by the next step)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"SharedCache.truncate: length must be in 0..{self.length}, got {length}")
        self.length = length

    def step(self, input_ids) -> np.ndarray:
        """Logits ``(batch, seq, vocab)`` of ``input_ids`` after the cached tokens; caches them too."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"input_ids must be ({self.batch}, sequence), got shape {ids.shape}")
        total = self.length + ids.shape[1]
        if total > self.capacity:
            raise ValueError(f"SharedCache: {total} tokens exceed the capacity {self.capacity}; make a larger cache")
        self._binding.bind_cpu_input("input_ids", ids)
        self._binding.bind_cpu_input("attention_mask", np.ones((self.batch, total), np.int64))
        self._bind_outputs()
        self.session.run_with_iobinding(self._binding)
        self.length = total
        return self._binding.get_outputs()[0].numpy()


def _prompt_ids(prompt, tokenizer) -> np.ndarray:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("generate: a text prompt needs tokenizer=...")
        prompt = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.cpu().numpy()
    ids = np.asarray(prompt, dtype=np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"generate: the prompt must be (batch, tokens) with at least one token, got {ids.shape}")
    return ids


def generate(session, prompt: str | Sequence | np.ndarray | torch.Tensor, max_new_tokens: int = 32, *,
             tokenizer=None, eos_token_id: int | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding with the KV cache (a ``SharedCache``): one prefill of ``prompt``, then one
    token per step.

    Args:
        session: ``load_session(path)`` of an ``export_llm`` file.
        prompt: token ids (``(tokens,)`` or ``(batch, tokens)``; rows of one length, no padding),
            or a text with ``tokenizer``.
        max_new_tokens: tokens to add.
        eos_token_id: stop a row at this token (later tokens of that row are ``pad_token_id``,
            default ``eos_token_id``), and stop when every row has; None: always ``max_new_tokens``.

    Returns:
        int64 ``(batch, tokens + new)``: the prompt followed by the generated tokens, as Hugging
        Face's ``generate`` returns them.
    """
    ids = _prompt_ids(prompt, tokenizer)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    out, finished = [ids], np.zeros(ids.shape[0], dtype=bool)
    cache = SharedCache(session, ids.shape[0], ids.shape[1] + max_new_tokens)
    logits = cache.step(ids)
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            token = np.where(finished, pad, token)
            finished |= token == eos_token_id
        out.append(token[:, None].astype(np.int64))
        if step + 1 == max_new_tokens or finished.all():
            break
        logits = cache.step(token[:, None].astype(np.int64))
    return np.concatenate(out, axis=1)
