"""Optimizer parameter groups for QAT: what to decay, and learning rates for learned ranges.

Three kinds of parameters train in a QAT model and want different treatment:

* weight matrices and kernels: weight decay as usual;
* biases, norms and learned quantizer scales: no weight decay (decay would pull every
  learned step size towards zero, i.e. towards clipping everything);
* learned zero-points (LSQ+): no decay, and a learning rate in the grid's own units.
  A zero-point counts integer steps and is rounded in the forward pass, so an update
  changes nothing until it has added up to half a step.  LSQ+ (Bhalgat et al. 2020)
  learns the offset in float units, ``beta = -scale * zero_point``; Adam moves a
  parameter by about its learning rate per step whatever the gradient's size, so the
  same movement of ``beta`` at learning rate ``lr`` is a movement of ``lr / scale`` in
  integer units.  Each quantizer's zero-point therefore gets ``scale_lr / mean(scale)``
  (taken when the groups are built), unless ``zero_point_lr`` fixes one value.

    opt = torch.optim.AdamW(lowbit.qat.param_groups(qmodel, lr=1e-4, scale_lr=1e-4))
"""

from __future__ import annotations

from torch import nn

from ..nn.quantizer import Quantizer


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.01,
    scale_lr: float | None = None,
    zero_point_lr: float | None = None,
) -> list[dict]:
    """Parameter groups for ``torch.optim`` optimizers (each group sets ``lr`` and ``weight_decay``).

    Args:
        model: a model from ``prepare_qat`` (any module works; without learned quantizers the
            groups are just "decayed" and "not decayed").
        lr: learning rate of the weights, biases and norms.
        weight_decay: decay of weight matrices / kernels (parameters with 2 or more dimensions);
            never applied to biases, norms or quantizer parameters.
        scale_lr: learning rate of learned quantizer scales (default ``lr``).
        zero_point_lr: learning rate of learned (LSQ+) zero-points; default ``scale_lr /
            mean(scale)`` per quantizer, the integer-unit equivalent of learning the float offset.

    Returns:
        A list of dicts, empty groups left out; every trainable parameter appears exactly once.
        Frozen parameters (``requires_grad=False``, e.g. by a staged schedule) are included, so
        they train once unfrozen.
    """
    if lr <= 0 or (scale_lr is not None and scale_lr <= 0) or (zero_point_lr is not None and zero_point_lr <= 0):
        raise ValueError(f"learning rates must be positive: lr={lr}, scale_lr={scale_lr}, zero_point_lr={zero_point_lr}")
    scale_lr = lr if scale_lr is None else scale_lr
    scales: list[nn.Parameter] = []
    zero_points: list[dict] = []
    quantizer_params: set[int] = set()
    for module in model.modules():
        if not isinstance(module, Quantizer):
            continue
        for name, p in module.named_parameters(recurse=False):
            if id(p) in quantizer_params:  # tied quantizers share Parameters
                continue
            quantizer_params.add(id(p))
            if name == "zero_point":
                own_lr = zero_point_lr or scale_lr / float(module.scale.detach().abs().mean().clamp_min(1e-12))
                zero_points.append({"params": [p], "weight_decay": 0.0, "lr": own_lr})
            else:
                scales.append(p)
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) not in quantizer_params:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr},
              {"params": scales, "weight_decay": 0.0, "lr": scale_lr},
              *zero_points]
    return [g for g in groups if g["params"]]
