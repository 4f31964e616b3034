"""from_ptq: continue a PTQ model (``lowbit.quantize``: round to nearest, GPTQ, AWQ ...) with QAT.

``prepare_qat`` starts from a float model and sets every range itself.  A model that PTQ already
quantized holds what PTQ chose: each weight quantizer's frozen scale (MSE-searched, clipped by
AWQ) and, after GPTQ, weights written onto that grid with GPTQ's rounding choices.  ``from_ptq``
keeps all of it and only makes the frozen ranges learnable (LSQ), so that

* the first QAT forward pass equals the PTQ model's output bit for bit (same scales, same
  weights, hence the same rounding; LSQ's forward is the plain fake-quantization), and
* training moves on from the PTQ solution instead of from round to nearest.

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

from torch import nn

from ..nn.walk import quantizers_by_role
from .prepare import Learn, shared_input_groups, tie_learned

log = logging.getLogger(__name__)

_LEARN = ("lsq", "lsq+", None)


def _has_quantizers(model: nn.Module) -> bool:
    return any(True for _ in quantizers_by_role(model))


def from_ptq(qmodel: nn.Module, *, learn: Learn = "lsq", inplace: bool = False) -> nn.Module:
    """A QAT model, in training mode, that starts exactly where the PTQ model ``qmodel`` is.

    Every static (frozen) quantizer, weights and activations alike, becomes learnable from
    its PTQ scale / zero-point; dynamic and disabled quantizers stay as they are.  Weights
    are not touched (a GPTQ weight stays on its grid until the first optimizer step).

    Args:
        qmodel: a model from ``lowbit.quantize`` (a copy is made unless ``inplace``).
        learn: ``"lsq"`` learns each scale, ``"lsq+"`` also the zero-points of affine grids;
            None keeps the PTQ ranges fixed (the weights train through the straight-through
            estimator on the PTQ grid).
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
    made = 0
    for _, _, q in quantizers_by_role(out):
        if learn is None or q.mode != "static" or not q.is_frozen or q.learn is not None:
            continue
        q.make_learnable(offset=learn == "lsq+")  # Parameters initialised at the frozen PTQ range
        made += 1
    tie_learned(shared_input_groups(out))
    out.train()
    log.info("from_ptq: %d quantizers learn their range (%s), starting from the PTQ model's", made, learn)
    return out
