"""Staged QAT of a causal LM (a Hugging Face Llama-family model, float or from ``lowbit.quantize``).

A fine-tune that recovers what 3- or 4-bit weights lost: learned scales (LSQ), distillation
from the FP32 model on calibration text, and a schedule that unfreezes the model in stages::

    stage 0      the quantizers' scales of the decoder blocks and the head (LSQ), nothing else
    stage 1..S   plus the weights of a group of decoder blocks, one more group per stage
                 (the last blocks first by default, as in gradual unfreezing: Howard & Ruder 2018)
    never        the embedding table and the norms (``llm_frozen``), and the head's weight unless
                 ``head=True`` (on SmolLM2 it is tied to the embedding: RTN keeps the tie, GPTQ
                 unties it)

The stages are plain module-name globs for ``QATSchedule`` (``llm_stages`` / ``llm_frozen`` build
them from the model's decoder blocks, found as GPTQ finds them: ``lowbit.ptq._blocks``), so a
user changes the schedule by editing two lists.  With the reference loop::

    ptq = lowbit.quantize(model, calib, "w4a16-g128", algorithms=["gptq"])
    qat = lowbit.qat.from_ptq(ptq)             # scales learned from GPTQ's, its codes kept (rescale)
    sched = lowbit.qat.llm_schedule(qat, steps_per_stage=100, stages=2)
    opt = torch.optim.AdamW(lowbit.qat.param_groups(qat, lr=1e-5, scale_lr=1e-5, weight_decay=0.0))
    lowbit.qat.fit(qat, lm_batches(windows, 2), causal_lm_loss, epochs=1, optimizer=opt, schedule=sched,
                   teacher=model, distill_weight=1.0, temperature=1.0)
    export_llm(lowbit.qat.convert(qat), "lm.int4.onnx")

or your own loop (the same six lines as for any model)::

    for ids in windows.split(2):
        with torch.no_grad():
            teacher_logits = model(ids, use_cache=False).logits
        loss = lowbit.qat.distillation_loss(qat(ids, use_cache=False).logits, teacher_logits, temperature=1.0)
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()

Memory: distillation holds the student's and the teacher's logits, ``batch x tokens x vocab``
float32 each, plus their log-softmax and the student's gradient: about 6 such tensors, 0.6 GB for
2 x 256 tokens of SmolLM2's 49,152-token vocabulary (2.4 GB at 2 x 1024).  Shorter windows (128-256
tokens) keep it small; context beyond that matters little for recovering a quantization error.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..ptq._blocks import find_blocks
from .fit import _logits
from .schedule import QATSchedule

log = logging.getLogger(__name__)

Order = Literal["last_first", "first_last"]


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def decoder_blocks(model: nn.Module) -> list[str]:
    """Module names of the decoder blocks of ``model``, in order (as GPTQ streams them).

    Raises:
        ValueError: no stack of decoder blocks (not a causal LM of a known layout, and no
            ``ModuleList`` of two or more blocks of one class).
    """
    stack = find_blocks(model)
    if stack is None:
        raise ValueError(f"{type(model).__name__} has no stack of decoder blocks (a ModuleList of 2+ blocks of "
                         "one class); build QATSchedule(stages=...) with your own module-name globs")
    names = _module_names(model)
    return [names[id(b)] for b in stack.blocks]


def _head(model: nn.Module) -> str | None:
    """Name of the output projection (``lm_head``), or None when the model does not say."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return None if head is None else _module_names(model).get(id(head))


def _globbed(names: Sequence[str]) -> list[str]:
    """Names with each block index turned into ``*`` (``model.layers.*.input_layernorm``), deduplicated."""
    return list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names))


def _matching(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    names = [name for name, _ in model.named_modules()]
    return [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)]


def _split(blocks: list[str], groups: int) -> list[list[str]]:
    """``blocks`` in ``groups`` contiguous runs, sizes differing by at most one (larger first)."""
    size, extra = divmod(len(blocks), groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (g < extra)
        out.append(blocks[start:end])
        start = end
    return out


def llm_stages(model: nn.Module, stages: int = 3, *, scales_first: bool = True, order: Order = "last_first",
               head: bool = False) -> list[list[str]]:
    """The stage patterns of a staged LLM QAT run, for ``QATSchedule(stages=...)``.

    Args:
        model: the QAT model (``from_ptq`` or ``prepare_qat`` of a causal LM).
        stages: groups of decoder blocks whose weights unfreeze one group per stage
            (contiguous runs of blocks; 0 trains the scales only).
        scales_first: a stage 0 that trains only the quantizers' scales of the blocks and the
            head; False trains them from the start together with the first group of blocks.
        order: ``"last_first"`` unfreezes the blocks next to the head first, ``"first_last"``
            the blocks next to the embedding first.
        head: the head's weight trains too, with the group next to it.

    Returns:
        One list of module-name globs per stage (stage k trains the patterns of stages 0..k).

    Raises:
        ValueError: ``stages`` is negative, larger than the number of blocks, or 0 without
            ``scales_first``; an unknown ``order``; the model has no decoder blocks.
    """
    blocks = decoder_blocks(model)
    if not isinstance(stages, int) or not (0 <= stages <= len(blocks)) or (stages == 0 and not scales_first):
        raise ValueError(f"llm_stages: stages must be an int in [{0 if scales_first else 1}, {len(blocks)}] "
                         f"(the model has {len(blocks)} decoder blocks), got {stages!r}")
    if order not in ("last_first", "first_last"):
        raise ValueError(f"llm_stages: order must be 'last_first' or 'first_last', got {order!r}")
    head_name = _head(model)
    prefix = blocks[0].rpartition(".")[0]
    scales = _matching(model, [f"{prefix}.*_quantizer", *([f"{head_name}.*_quantizer"] if head_name else [])])
    groups = _split(blocks, stages) if stages else []
    if head and head_name and groups:
        groups[-1].append(head_name)  # the head joins the blocks next to it
    if order == "last_first":
        groups.reverse()
    if scales_first:
        return [scales, *groups]
    return [[*scales, *groups[0]], *groups[1:]]


def llm_frozen(model: nn.Module, *, head: bool = False) -> list[str]:
    """Module-name globs of what never trains in a staged LLM QAT run, for
    ``QATSchedule(frozen=...)``: the embedding table(s) and every norm (block indices globbed:
    ``model.layers.*.input_layernorm``) and, unless ``head``, the head's weight (its quantizer's
    scale still trains when a stage names it, as ``llm_stages`` does)."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) or ("norm" in type(m).__name__.lower() and any(True for _ in m.parameters())):
            names.append(name)
    head_name = _head(model)
    if not head and head_name:
        names.append(head_name)
    return _globbed(names)


def llm_schedule(model: nn.Module, steps_per_stage: int, *, stages: int = 3, scales_first: bool = True,
                 order: Order = "last_first", head: bool = False) -> QATSchedule:
    """A ``QATSchedule`` over ``llm_stages`` and ``llm_frozen`` (see those for the arguments): the
    staged schedule as one call.  ``schedule.stages`` and ``schedule.frozen`` say what it does."""
    sched = QATSchedule(model, stages=llm_stages(model, stages, scales_first=scales_first, order=order, head=head),
                        steps_per_stage=steps_per_stage, frozen=llm_frozen(model, head=head))
    log.info("llm_schedule: %d stages of %d steps; stages %s; frozen %s", len(sched.stages), steps_per_stage,
             sched.stages, sched.frozen)
    return sched


def lm_batches(windows: torch.Tensor, batch_size: int = 1) -> list[tuple[dict, torch.Tensor]]:
    """Training batches for ``fit`` from token windows ``(n, T)`` (``lowbit.zoo.token_windows``):
    ``({"input_ids": ids, "use_cache": False}, ids)``, the target being the ids themselves
    (``causal_lm_loss`` shifts them); no KV cache is built in training."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("lm_batches: windows must be a LongTensor (n_windows, tokens), e.g. from "
                         f"lowbit.zoo.token_windows; got {type(windows).__name__} {tuple(getattr(windows, 'shape', ()))}")
    if batch_size < 1:
        raise ValueError(f"lm_batches: batch_size must be positive, got {batch_size}")
    return [({"input_ids": ids, "use_cache": False}, ids) for ids in windows.split(batch_size)]


def causal_lm_loss(output, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM's output (logits at position t predict token t+1)."""
    logits = _logits(output)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten().to(logits.device))
