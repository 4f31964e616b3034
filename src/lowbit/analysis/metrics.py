"""A metric when there are no labels: how closely a model's outputs follow FP32's.

    eval_fn = agreement(model, held_out_batches)            # top-1 agreement for logits, else cosine
    result = lowbit.autoquant(model, calib, eval_fn, max_drop=0.01)

The FP32 outputs are computed once; per-token outputs count real tokens only (the batch's
``attention_mask``), as ``lowbit.report.fidelity`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..nn.walk import fixed_weights, run_model
from ..report.fidelity import fidelity, first_tensor, token_mask

METRICS = ("auto", "top1_agreement", "cosine", "neg_kl")


def agreement(fp32_model: nn.Module, batches: Iterable, metric: str = "auto") -> Callable[[nn.Module], float]:
    """``eval_fn(model) -> float``: the fidelity of ``model``'s outputs to ``fp32_model``'s on
    ``batches``, averaged over batches weighted by their rows; higher is better.

    Args:
        fp32_model: the reference.
        batches: model inputs (tensors, tuples or dicts); kept as a list.
        metric: ``"top1_agreement"`` (logits), ``"cosine"``, ``"neg_kl"`` (minus the KL
            divergence, logits) or ``"auto"``: top-1 agreement for 2-D outputs with more than
            one column, cosine otherwise.  FP32 itself scores 1 (0 for ``neg_kl``).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("agreement needs at least one batch of inputs")
    with torch.no_grad():
        fp32_model.eval()
        references = [first_tensor(run_model(fp32_model, b)).detach() for b in batches]
    if metric == "auto":
        ref = references[0]
        metric = "top1_agreement" if ref.dim() == 2 and ref.shape[1] > 1 else "cosine"

    def eval_fn(model: nn.Module) -> float:
        total = rows = 0.0
        with torch.no_grad(), fixed_weights(model):
            for batch, ref in zip(batches, references, strict=True):
                out = first_tensor(run_model(model, batch))
                got = fidelity(ref, out, token_mask(batch, ref))
                value = -got["kl"] if metric == "neg_kl" else got[metric]
                total += value * ref.shape[0]
                rows += ref.shape[0]
        return total / rows

    eval_fn.metric = metric  # what it measures, for reports
    return eval_fn
