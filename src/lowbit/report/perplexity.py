"""Perplexity of a causal language model over fixed token windows.

The standard definition (as in the GPTQ and AWQ papers' WikiText protocol): each window is
scored on its own, with no context carried over from the previous one; within a window of
``T`` tokens, the logits at positions ``0..T-2`` predict the tokens at ``1..T-1``; the
perplexity is ``exp`` of the mean negative log-likelihood over every predicted token of every
window.  ``T - 1`` tokens are predicted per window.

Any model works whose ``model(input_ids)`` returns an object with ``.logits`` (a Hugging Face
causal LM, or a copy of one quantized by ``lowbit.quantize``, which stays one) or the logits
tensor itself, shaped ``(batch, T, vocab)``.

Example::

    from lowbit.zoo import smollm2, english_text, token_windows
    from lowbit.report import perplexity
    model, tokenizer = smollm2()
    windows = token_windows(tokenizer, english_text("eval"), window=512, count=40)
    perplexity(model, windows).perplexity
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.walk import fixed_weights


@dataclass(frozen=True)
class Perplexity:
    """What ``perplexity`` measured.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood per predicted token, in nats.
        tokens: predicted tokens (``windows * (window length - 1)``).
        windows: windows scored.
        seconds: wall time of the forward passes.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seconds: float


def _logits(output, batch_index: int) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"perplexity: the model returned {type(output).__name__} for batch {batch_index}, "
                        "with no .logits tensor; the model must return logits (batch, tokens, vocab) "
                        "or an object with .logits, as Hugging Face causal LMs do")
    return logits


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window, in float64.

    Args:
        logits: ``(B, T, V)`` model outputs for ``input_ids``.
        input_ids: ``(B, T)`` token ids.

    Returns:
        ``(B,)`` float64: for window ``b``, the sum over ``t = 1..T-1`` of
        ``-log softmax(logits[b, t-1])[input_ids[b, t]]``.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"perplexity: logits of shape {tuple(logits.shape)} do not match input_ids "
                         f"{tuple(input_ids.shape)}; expected (batch, tokens, vocab)")
    predicted = logits[:, :-1].float()  # position t-1 predicts token t
    targets = input_ids[:, 1:].to(predicted.device)
    nll = F.cross_entropy(predicted.transpose(1, 2), targets, reduction="none")  # (B, T-1), float32
    return nll.double().sum(dim=1)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1,
               progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` on ``windows`` (see the module docstring for the definition).

    Args:
        model: a causal LM; called as ``model(input_ids)`` (it is not switched to eval mode:
            call ``model.eval()`` first if it has dropout).
        windows: LongTensor ``(n, T)`` of token ids, e.g. from ``lowbit.zoo.token_windows``;
            ``T >= 2``.
        batch_size: windows per forward pass (the result does not depend on it, up to
            float rounding).
        progress: show a progress bar over the batches.

    Returns:
        A ``Perplexity`` with the perplexity, the mean NLL per token and the token count.

    Raises:
        ValueError: bad windows, or a window whose loss is NaN/Inf (named, with what to check).
    """
    from tqdm.auto import tqdm

    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("perplexity: windows must be a LongTensor (n_windows, tokens), e.g. from "
                         f"lowbit.zoo.token_windows; got {type(windows).__name__} "
                         f"{getattr(windows, 'dtype', '')} {tuple(getattr(windows, 'shape', ()))}")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity: need at least one window of 2+ tokens, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be positive, got {batch_size}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total = 0.0
    start = time.perf_counter()
    batches = windows.split(batch_size)
    # No autograd graph; a quantized model's frozen weights fake-quantized once, not once per batch.
    with torch.no_grad(), fixed_weights(model):
        for i, batch in enumerate(tqdm(batches, desc="perplexity", unit="batch", disable=not progress)):
            batch = batch.to(device)
            nll = window_nll(_logits(model(batch), i), batch)
            bad = (~torch.isfinite(nll)).nonzero().flatten()
            if bad.numel():
                raise ValueError(f"perplexity: window {i * batch_size + int(bad[0])} has a non-finite loss "
                                 "(NaN/Inf logits); check the model's (quantized) weights and scales")
            total += float(nll.sum())
    seconds = time.perf_counter() - start
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean = total / tokens
    return Perplexity(perplexity=math.exp(mean), nll=mean, tokens=tokens, windows=windows.shape[0],
                      seconds=seconds)
