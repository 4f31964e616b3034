"""Fold BatchNorm into the Conv / Linear layer before it.

In eval mode a BatchNorm is a per-channel affine map, ``y = x * a + c`` with
``a = gamma / sqrt(running_var + eps)`` and ``c = beta - running_mean * a``.  When
it directly follows a Conv or Linear layer (any registered kind with ``fold_bn``:
``lowbit.nn.registry``) whose output feeds nothing else, the two collapse into one layer::

    w' = w * a          (a broadcast over output channels, axis 0)
    b' = (b - mean) * a + beta        (b = 0 when the layer had no bias)

and the BatchNorm becomes ``nn.Identity``.  Quantizing the folded weight is what
integer runtimes execute, so folding must come before calibration.

Example::

    model = copy.deepcopy(float_model).eval()
    model, folded = fold_batchnorm(model)     # folded: ["features.0.1", ...]
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..nn.registry import registered
from ..nn.walk import set_submodule
from ._graph import find_chains

log = logging.getLogger(__name__)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _is_layer(module: object) -> bool:
    # Exact types (the registry's): a subclass may override forward, and then the algebra need not hold.
    kind = registered().get(type(module))
    return kind is not None and kind.fold_bn


def _is_batchnorm(module: object) -> bool:
    return type(module) in _BATCHNORMS


def _never(_: object) -> bool:
    return False


def _out_channels(layer: nn.Module) -> int:
    return layer.weight.shape[0]  # output channels on weight axis 0 (the registry's contract for fold_bn)


def _check_foldable(layer_name: str, layer: nn.Module, bn_name: str, bn: nn.Module) -> str:
    """Why ``bn`` cannot be folded into ``layer`` ("" when it can)."""
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False)"
    if bn.num_features != _out_channels(layer):
        return f"{bn_name} has {bn.num_features} features but {layer_name} has {_out_channels(layer)} outputs"
    return ""


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode ``bn`` into ``layer`` (Conv1d/Conv2d/Linear, or a registered kind with ``fold_bn``)
    in place; a bias is created if absent.

    Computed in float64 and written back in the layer's dtype, so the folded layer
    matches ``bn(layer(x))`` to float32 rounding.
    """
    w = layer.weight
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    a = gamma / torch.sqrt(var + bn.eps)  # (C_out,)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    new_w = w.double() * a.view(-1, *([1] * (w.dim() - 1)))  # output channel is axis 0 for every such kind
    new_b = (bias - mean) * a + beta
    w.copy_(new_w.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_b.to(layer.bias.dtype))


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Fold every BatchNorm1d/2d that directly follows a Conv1d/Conv2d/Linear (or a registered kind
    with ``fold_bn``) into that layer.

    Pairs are found with ``torch.fx`` (a BatchNorm whose only input is the output of a
    layer called once, used nowhere else); where tracing fails, in each
    ``nn.Sequential`` (a layer immediately followed by a BatchNorm, as in torchvision's
    ``Conv2dNormActivation``).  Depthwise and grouped convolutions fold like any other.
    Each folded BatchNorm is replaced by ``nn.Identity`` so module names stay stable.

    Works IN PLACE: pass a copy if you need the original.

    Args:
        model: a float model whose BatchNorms are in eval mode (folding uses the
            running statistics, which is what eval mode computes).

    Returns:
        ``(model, folded)``: the same model object, and the qualified names of the
        BatchNorms that were folded (in graph order).  BatchNorms left in place are
        logged with the reason.

    Raises:
        ValueError: a BatchNorm to fold is in training mode (the fix: ``model.eval()``).

    Example:
        >>> model, folded = fold_batchnorm(copy.deepcopy(model).eval())
        >>> len(folded)   # MobileNetV2: 52
    """
    chains, untraced = find_chains(model, _is_layer, _never, _is_batchnorm)
    for note in untraced:
        log.info("fold_batchnorm: fx could not trace %s; searched its Sequentials instead", note)
    folded = []
    for chain in chains:
        layer, bn = model.get_submodule(chain.first), model.get_submodule(chain.second)
        if bn.training:
            raise ValueError(
                f"{chain.second}: BatchNorm is in training mode, so folding its running statistics into "
                f"{chain.first} would change the model; call model.eval() before fold_batchnorm"
            )
        why = _check_foldable(chain.first, layer, chain.second, bn)
        if why:
            log.warning("fold_batchnorm: %s not folded into %s: %s", chain.second, chain.first, why)
            continue
        fold_into(layer, bn)
        set_submodule(model, chain.second, nn.Identity())
        folded.append(chain.second)
        log.debug("fold_batchnorm: folded %s into %s", chain.second, chain.first)
    left = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        log.warning("fold_batchnorm: %d BatchNorm(s) stay unfolded (no Conv/Linear directly before them, "
                    "or their input is used elsewhere): %s", len(left), ", ".join(left))
    log.info("fold_batchnorm: folded %d BatchNorm(s)", len(folded))
    return model, folded
