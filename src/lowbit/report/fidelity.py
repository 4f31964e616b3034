"""How close a quantized model's outputs are to FP32's, when there are no labels."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..nn.walk import first_tensor  # noqa: F401 - re-exported: report.fidelity.first_tensor


def token_mask(inputs, output: torch.Tensor) -> torch.Tensor | None:
    """The inputs' ``attention_mask`` when the output is per token (``(batch, sequence, ...)``)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or output.dim() < 3 or tuple(mask.shape) != tuple(output.shape[:2]):
        return None
    return mask


def fidelity(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Agreement of ``candidate`` outputs with ``reference`` outputs (same shape, batch first).

    ``mask``: for per-token outputs ``(batch, sequence, ...)``, a ``(batch, sequence)`` mask of
    the positions that count (a tokenizer's ``attention_mask``); the others are left out of
    every figure.  Padding positions carry values no consumer reads (attention and pooling
    mask them), and they can differ a lot between two models that agree on every real token.

    Returns:
        ``cosine``: mean per-sample cosine similarity of the flattened outputs;
        ``max_abs_diff``: largest absolute difference;
        for 2-D outputs (logits), also ``top1_agreement`` (fraction of samples with
        the same argmax) and ``kl`` (mean KL(softmax(ref) || softmax(cand)), nats).
    """
    ref = reference.detach().float()
    cand = candidate.detach().float()
    if ref.shape != cand.shape:
        raise ValueError(f"output shapes differ: reference {tuple(ref.shape)} vs candidate {tuple(cand.shape)}")
    if mask is not None:
        if tuple(mask.shape) != tuple(ref.shape[:2]) or ref.dim() < 3:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not cover outputs {tuple(ref.shape)} "
                             "(expected (batch, sequence) for outputs (batch, sequence, ...))")
        keep = mask.bool().reshape(*mask.shape, *([1] * (ref.dim() - 2)))
        ref, cand = ref * keep, cand * keep  # left-out positions: zero in both, no part in any figure
    flat_r, flat_c = ref.reshape(ref.shape[0], -1), cand.reshape(cand.shape[0], -1)
    cosine = F.cosine_similarity(flat_r, flat_c, dim=1, eps=1e-12)
    # Two all-zero samples are identical: count them as cosine 1, not 0.
    both_zero = (flat_r.abs().amax(1) == 0) & (flat_c.abs().amax(1) == 0)
    out = {
        "cosine": torch.where(both_zero, torch.ones_like(cosine), cosine).mean().item(),
        "max_abs_diff": (ref - cand).abs().max().item(),
    }
    if ref.dim() == 2 and ref.shape[1] > 1:
        out["top1_agreement"] = (ref.argmax(1) == cand.argmax(1)).float().mean().item()
        out["kl"] = F.kl_div(F.log_softmax(cand, 1), F.log_softmax(ref, 1), log_target=True,
                             reduction="batchmean").item()
    return out
