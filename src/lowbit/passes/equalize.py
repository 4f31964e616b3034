"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", section 4.1).

For two consecutive layers ``W1 -> f -> W2`` where ``f`` is positively homogeneous
per channel (``f(x / s) = f(x) / s`` for ``s > 0``: ReLU, identity, max/avg pool)
and W1's output feeds only W2, dividing output channel ``i`` of W1 (and its bias)
by ``s_i`` and multiplying input channel ``i`` of W2 by ``s_i`` leaves the float
function unchanged.  Choosing ``s_i = sqrt(r1_i / r2_i)``, with ``r1_i`` the range
(max |w|) of W1's output channel ``i`` and ``r2_i`` that of W2's input channel ``i``,
gives both the same range ``sqrt(r1_i * r2_i)``.  Channel ranges within each
weight tensor become far more uniform, so one scale per tensor quantizes it better.
Chains of pairs (``W1 -> W2 -> W3``) are iterated until the scales settle.

Measured on MobileNetV2 (torchvision ImageNet weights, 128 real photos, top-1
agreement with FP32) with per-tensor int8 weights, float activations: 0.79 without,
0.85 with equalization; 0.97 with equalization and ``correct_bias``.  (This checkpoint
does not collapse without it as the paper's TF model did.)  With uint8 per-tensor
activations too it does not help (0.70 -> 0.68): removing the ReLU6 clip widens the
activation ranges that a min-max observer then has to cover.

Run it after ``fold_batchnorm`` (a BatchNorm between the two layers blocks the pair).

ReLU6 is not positively homogeneous (its clip at 6 does not scale), so a pair
through ReLU6 is only equalized with ``relu6_to_relu=True``, which first replaces
those ReLU6 modules by ReLU, as AIMET and the paper do.  That changes the float
model: on MobileNetV2 (128 real photos) top-1 stays the same on 126/128 and the
logits move by 7 % (relative L2); see tests/passes/test_equalize.py.

Example::

    model, _ = fold_batchnorm(copy.deepcopy(model).eval())
    model, pairs = cross_layer_equalize(model, relu6_to_relu=True)
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.registry import GEMM, registered
from ..nn.walk import set_submodule
from ._graph import Chain, find_chains

log = logging.getLogger(__name__)

# Elementwise and positively homogeneous: fine between any two layers.
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)
_ELEMENTWISE_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
# Per-channel pools: fine between two convolutions (on a Linear output they would mix features).
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def _is_layer(module: object) -> bool:
    # Exact types (the registry's): a subclass may change forward.
    kind = registered().get(type(module))
    return kind is not None and kind.equalize


def _is_gemm(layer: nn.Module) -> bool:
    return registered()[type(layer)].kernel == GEMM


def _link_predicate(allow_relu6: bool):
    links = _ELEMENTWISE + _POOLS + ((nn.ReLU6,) if allow_relu6 else ())

    def is_link(obj: object) -> bool:
        if isinstance(obj, nn.Module):
            return type(obj) in links
        return obj in _ELEMENTWISE_FUNCTIONS

    return is_link


def _groups(layer: nn.Module) -> int:
    return 1 if _is_gemm(layer) else getattr(layer, "groups", 1)


def _incompatible(model: nn.Module, chain: Chain) -> str:
    """Why the two ends of ``chain`` cannot be equalized ("" when they can)."""
    w1, w2 = model.get_submodule(chain.first), model.get_submodule(chain.second)
    if type(w1) is not type(w2):
        return f"{type(w1).__name__} -> {type(w2).__name__} (channel axes may differ)"
    if w1.weight.shape[0] != w2.weight.shape[1] * _groups(w2):
        return f"{w1.weight.shape[0]} outputs feed {w2.weight.shape[1] * _groups(w2)} inputs"
    if _is_gemm(w1) and any(type(model.get_submodule(n)) in _POOLS for n in chain.links):
        return "a pool between Linear layers acts across features"
    return ""


def _out_ranges(w: torch.Tensor) -> torch.Tensor:
    """max |w| per output channel: (C_out,)."""
    return w.abs().flatten(1).amax(1)


def _in_ranges(w: torch.Tensor, groups: int) -> torch.Tensor:
    """max |w| per input channel: (C_in,).  A (C_out, C_in / groups, *k) weight seen as
    (groups, C_out / groups, C_in / groups, k): input channel ``g * (C_in / groups) + j`` is
    column ``j`` of group ``g`` (for depthwise, input channel i is group i)."""
    grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)
    return grouped.abs().amax(dim=(1, 3)).reshape(-1)


def _pair_scales(w1: torch.Tensor, w2: torch.Tensor, groups2: int) -> torch.Tensor:
    """``s = sqrt(r1 / r2)`` per channel; 1 where a channel is all zeros on either side."""
    r1, r2 = _out_ranges(w1), _in_ranges(w2, groups2)
    live = (r1 > 0) & (r2 > 0)
    return torch.where(live, torch.sqrt(r1 / torch.where(live, r2, 1.0)), torch.ones_like(r1))


def _apply_scales(w1, b1, w2, groups2: int, s: torch.Tensor) -> None:
    """W1 output channel i (and b1_i) divided by s_i; W2 input channel i multiplied by s_i. In place."""
    w1.div_(s.view(-1, *([1] * (w1.dim() - 1))))
    if b1 is not None:
        b1.div_(s)
    out2, per_group = w2.shape[0], w2.shape[1]
    # Element [o, j, ...] of W2 reads input channel (o // (out2 / groups2)) * per_group + j.
    s2 = s.view(groups2, 1, per_group).expand(groups2, out2 // groups2, per_group).reshape(out2, per_group)
    w2.mul_(s2.view(out2, per_group, *([1] * (w2.dim() - 2))))


def _equalize_pairs(model: nn.Module, pairs: list[tuple[str, str]], iterations: int, tol: float) -> int:
    """Iterate the per-pair equalization in float64 copies; write back once. Returns iterations run."""
    names = {n for pair in pairs for n in pair}
    layers = {n: model.get_submodule(n) for n in names}
    weights = {n: m.weight.detach().double().clone() for n, m in layers.items()}
    biases = {n: None if m.bias is None else m.bias.detach().double().clone() for n, m in layers.items()}
    sweeps, worst = 0, math.inf  # worst: largest |log s| of a sweep, 0 once every pair is balanced
    while sweeps < iterations and worst >= tol:
        sweeps, worst = sweeps + 1, 0.0
        for first, second in pairs:
            groups2 = _groups(layers[second])
            s = _pair_scales(weights[first], weights[second], groups2)
            _apply_scales(weights[first], biases[first], weights[second], groups2, s)
            worst = max(worst, float(s.log().abs().max()))
    if worst >= tol:
        log.info("cross_layer_equalize: not converged after %d sweeps (max |log s| = %.2g)", sweeps, worst)
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.copy_(weights[n].to(m.weight.dtype))
            if biases[n] is not None:
                m.bias.copy_(biases[n].to(m.bias.dtype))
    return sweeps


def _replace_relu6(model: nn.Module, chains: list[Chain]) -> int:
    count = 0
    for chain in chains:
        for name in chain.links:
            module = model.get_submodule(name)
            if type(module) is nn.ReLU6:
                set_submodule(model, name, nn.ReLU(inplace=module.inplace))
                count += 1
    return count


def _valid_chains(model: nn.Module, allow_relu6: bool) -> list[Chain]:
    chains, untraced = find_chains(model, _is_layer, _link_predicate(allow_relu6), _is_layer)
    for note in untraced:
        log.info("cross_layer_equalize: fx could not trace %s; searched its Sequentials instead", note)
    valid = []
    for chain in chains:
        why = _incompatible(model, chain)
        if why:
            log.debug("cross_layer_equalize: %s -> %s skipped: %s", chain.first, chain.second, why)
        else:
            valid.append(chain)
    return valid


def cross_layer_equalize(
    model: nn.Module,
    *,
    relu6_to_relu: bool = False,
    iterations: int = 50,
    tol: float = 1e-3,
) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Cross-layer equalization of every ``W1 -> (ReLU | Identity | pool)* -> W2`` pair, in place.

    Pairs are Conv1d->Conv1d, Conv2d->Conv2d (grouped and depthwise included),
    Linear->Linear, or two layers of one registered kind with ``equalize`` (``lowbit.nn.registry``),
    where W1's output feeds only the chain; found with torch.fx, or in
    ``nn.Sequential`` chains (nested ones flattened) where tracing fails.  The float
    function is unchanged up to float32 rounding, unless ``relu6_to_relu`` is set.

    Args:
        model: float model, BatchNorms already folded (``fold_batchnorm``). Changed in place.
        relu6_to_relu: also equalize pairs joined by ``nn.ReLU6``, replacing each such
            ReLU6 by ``nn.ReLU``.  WARNING: this changes the float model wherever an
            activation exceeded 6 (MobileNetV2: logits move by 7 %, top-1 the same on
            98 % of photos; measure it on your data), and it widens activation ranges.
        iterations: most sweeps over all pairs (a layer in two pairs needs several;
            MobileNetV2 settles to ``tol`` in about 20).
        tol: stop once every scale of a sweep is within ``exp(±tol)`` of 1.

    Returns:
        ``(model, pairs)``: the same model and the ``(first, second)`` layer names equalized.

    Example:
        >>> model, _ = fold_batchnorm(copy.deepcopy(mobilenet_v2()))
        >>> model, pairs = cross_layer_equalize(model, relu6_to_relu=True)
        >>> len(pairs)
        36
    """
    if iterations < 1 or not tol > 0:
        raise ValueError(f"cross_layer_equalize: iterations must be >= 1 and tol > 0, "
                         f"got {iterations} and {tol}")
    chains = _valid_chains(model, relu6_to_relu)
    if not relu6_to_relu:
        blocked = len(_valid_chains(model, True)) - len(chains)
        if blocked:
            log.info("cross_layer_equalize: %d pair(s) joined by ReLU6 left alone; relu6_to_relu=True "
                     "equalizes them (replacing ReLU6 by ReLU, which changes the float model)", blocked)
    if not chains:
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            log.warning("cross_layer_equalize: no pair found; the model has BatchNorms, "
                        "run fold_batchnorm first")
        return model, []
    replaced = _replace_relu6(model, chains) if relu6_to_relu else 0
    pairs = [(c.first, c.second) for c in chains]
    sweeps = _equalize_pairs(model, pairs, iterations, tol)
    log.info("cross_layer_equalize: %d pair(s) in %d sweep(s); %d ReLU6 replaced by ReLU",
             len(pairs), sweeps, replaced)
    return model, pairs

