"""from_ptq: continue a PTQ model (``lowbit.quantize``: round to nearest, GPTQ, AWQ ...) with QAT.

``prepare_qat`` starts from a float model and sets every range itself.  A model that PTQ already
quantized holds what PTQ chose: each weight quantizer's frozen scale (MSE-searched, clipped by
AWQ) and, after GPTQ, weights written onto that grid with GPTQ's rounding choices.  ``from_ptq``
keeps all of it and only makes the frozen ranges learnable (LSQ), so that

* the first QAT forward pass equals the PTQ model's output bit for bit (same scales, same
  weights, hence the same rounding; LSQ's forward is the plain fake-quantization), and
* training moves on from the PTQ solution instead of from round to nearest.

A weight that PTQ wrote onto its grid (GPTQ) defeats LSQ: LSQ's scale gradient is
``round(w/s) - w/s`` per element, exactly 0 there, and once Adam moves the weights by ``lr`` in
the direction of their gradients, that term takes the gradient's sign everywhere, so every
scale only shrinks (measured on SmolLM2 after GPTQ: the scales-only stage changed nothing and
the perplexity then rose 19.7 -> 90 in two stages).  Such weights learn ``"rescale"`` instead
(``learn="auto"``, the default): the codes PTQ chose stay fixed by the PTQ scale (the
``anchor``) and the learned scale multiplies them, gradient ``q`` per element, as in PEQA
(Kim et al. 2023) and EfficientQAT's E2E-QP (Chen et al. 2024); a weight still changes a code
when training moves it across a rounding boundary of the anchored grid.  Weights PTQ left
float (round to nearest) and activations learn by LSQ.

    ptq = lowbit.quantize(model, calib, "w4a16-g128", algorithms=["gptq"])
    qat = lowbit.qat.from_ptq(ptq)                      # learned scales start at GPTQ's
    ... train (lowbit.qat.fit or your own loop) ...
    deployable = lowbit.qat.convert(qat)                # static again: export / save as the PTQ model

The PTQ model's ``lowbit_summary`` is kept: after ``convert`` the model has the PTQ model's
structure (the same modules, static quantizers), so ``lowbit.save`` and export treat it as one.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Literal

import torch
from torch import nn

from ..nn.walk import quantizers_by_role
from .prepare import shared_input_groups, tie_learned

log = logging.getLogger(__name__)

FromPtqLearn = Literal["auto", "lsq", "lsq+", "rescale"] | None
_LEARN = ("auto", "lsq", "lsq+", "rescale", None)


def _shared_tensors(model: nn.Module) -> set[int]:
    """ids of the parameters that two or more modules hold (tied weights)."""
    counts = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    return {key for key, n in counts.items() if n > 1}


@torch.no_grad()
def _on_grid(module: nn.Module, q) -> bool:
    """True when the layer's weight equals its fake-quantized self (PTQ wrote it onto the grid)."""
    weight = getattr(module, "weight", None)
    source = getattr(module, "quantized_weight_source", None)
    if weight is None or not callable(source) or source() is not weight:
        return False
    return torch.equal(q(weight), weight)


def _kind(module: nn.Module, role: str, q, learn: FromPtqLearn, shared: set[int]) -> str:
    """The learn kind of one quantizer: "rescale" only for an untied weight (convert rewrites it)."""
    rescalable = role == "weight" and id(getattr(module, "weight", None)) not in shared
    if learn == "auto":
        return "rescale" if rescalable and _on_grid(module, q) else "lsq"
    if learn == "rescale" and not rescalable:
        return "lsq"
    return learn


def _has_quantizers(model: nn.Module) -> bool:
    return any(True for _ in quantizers_by_role(model))


def from_ptq(qmodel: nn.Module, *, learn: FromPtqLearn = "auto", inplace: bool = False) -> nn.Module:
    """A QAT model, in training mode, that starts exactly where the PTQ model ``qmodel`` is.

    Every static (frozen) quantizer, weights and activations alike, becomes learnable from
    its PTQ scale / zero-point; dynamic and disabled quantizers stay as they are.  Weights
    are not touched (a GPTQ weight stays on its grid until the first optimizer step).

    Args:
        qmodel: a model from ``lowbit.quantize`` (a copy is made unless ``inplace``).
        learn: ``"auto"``: ``"rescale"`` for weights on their grid (GPTQ's), ``"lsq"`` for the
            rest; ``"lsq"`` learns each scale, ``"lsq+"`` also the zero-points of affine grids;
            ``"rescale"`` learns each weight scale as a multiplier of the PTQ codes (activations
            and tied weights: LSQ); None keeps the PTQ ranges fixed (the weights train through
            the straight-through estimator on the PTQ grid).
        inplace: change ``qmodel`` itself.

    Returns:
        The model to train; build the optimizer after this call (learned scales are new
        Parameters).  ``lowbit.qat.convert`` fixes the trained ranges for export.

    Raises:
        ValueError: ``qmodel`` has no quantizer (a float model: use ``prepare_qat``), or an
            unknown ``learn``.

    Example:
        >>> ptq = lowbit.quantize(model, calib, "w4a16-g128", algorithms=["gptq"])
        >>> qat = lowbit.qat.from_ptq(ptq)
        >>> torch.equal(qat(ids).logits, ptq(ids).logits)
        True
    """
    if learn not in _LEARN:
        raise ValueError(f"learn must be one of {_LEARN}, got {learn!r}")
    if not _has_quantizers(qmodel):
        raise ValueError(f"from_ptq: {type(qmodel).__name__} has no lowbit quantizer (a float model); "
                         "quantize it first (lowbit.quantize) or start QAT from float with lowbit.prepare_qat")
    out = qmodel if inplace else copy.deepcopy(qmodel)
    made: Counter[str] = Counter()
    shared = _shared_tensors(out)
    for module, role, q in quantizers_by_role(out):
        if learn is None or q.mode != "static" or not q.is_frozen or q.learn is not None:
            continue
        kind = _kind(module, role, q, learn, shared)
        q.make_learnable(offset=kind == "lsq+", rescale=kind == "rescale")  # starting at the PTQ range
        made[kind] += 1
    tie_learned(shared_input_groups(out))
    out.train()
    log.info("from_ptq: quantizers learn their range from the PTQ model's: %s", dict(made) or "none")
    return out
