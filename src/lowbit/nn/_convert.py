"""convert: a QAT model -> the equivalent PTQ-style model that export understands.

Folding conv-BN pairs, fixing every range and dropping training state are operations on
lowbit's modules, not a training algorithm, so they live here: export and the runtime call
them without depending on ``lowbit.qat``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..numerics import compute_qparams, tensor_minmax
from .conv_bn import QuantConvBn2d
from .quantizer import Quantizer
from .walk import quantizers_by_role, set_submodule


def is_qat_model(model: nn.Module) -> bool:
    """True when ``model`` holds QAT state that ``convert`` resolves (conv-BN layers, learned or
    observing ranges)."""
    return any(isinstance(m, QuantConvBn2d) or (isinstance(m, Quantizer) and m.mode in ("observing", "learned"))
               for m in model.modules())


@torch.no_grad()
def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The QAT model as PTQ would have produced it, in eval mode: BatchNorms folded into their
    convs (running statistics), every range fixed (weights from their current values, learned
    and observed ranges as they are; a ``learn="rescale"`` weight is written as its learned
    scale times its anchored codes, the values its quantizer put out).  Its forward is what ``export_onnx`` writes.

    Raises:
        RuntimeError: an activation quantizer has no range yet (it never saw a training
            batch nor calibration data).
    """
    out = model if inplace else copy.deepcopy(model)
    if out is not model and hasattr(model, "lowbit_summary"):  # (deepcopy of an fx GraphModule drops it)
        out.lowbit_summary = copy.deepcopy(model.lowbit_summary)
    out.eval()
    for name, module in list(out.named_modules()):
        if isinstance(module, QuantConvBn2d):
            set_submodule(out, name, module.to_quant_conv())
    for module, role, q in quantizers_by_role(out):
        if q.mode in ("disabled", "calibrating"):
            continue
        if role == "weight" and q.mode == "dynamic":
            w = module.weight.detach()
            q.set_qparams(*compute_qparams(*tensor_minmax(w, q.spec, q.name), q.spec, q.name))
        elif q.mode in ("observing", "learned", "static"):
            if q.learn == "rescale" and role == "weight":  # the learned scale times the anchored codes
                module.weight.copy_(q(module.weight))       # lies on the learned grid
            scale, zero_point = q.qparams_for(torch.empty(0))
            q.to_static(scale, zero_point)
    return out
