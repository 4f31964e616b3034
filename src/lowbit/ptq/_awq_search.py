"""AWQ's two searches on tensors (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration"); ``lowbit.ptq.awq`` runs them block by block.

Every weight is rounded as the config will round it (``weight_rounder``): the range its observer
takes from the weight (min-max for the LLM presets), then ``lowbit.numerics.fake_quantize``.

Scale search (``search_scale``): consumers that read one tensor ``x`` get ``s = s_x^alpha``
(``s_x`` the mean ``|x|`` per input channel, normalised by ``sqrt(max s * min s)``, alpha on the
grid ``i / grid``); for each alpha their weights are set to ``Q(W * s) / s`` (what the model computes
once ``1 / s`` is folded into ``x``'s producer and ``s`` into ``W``) and the output error of the
group's inspected module (mean square against its float output) is measured; the best alpha wins.
alpha = 0 is ``s = 1`` exactly: round to nearest, so its error is reported as the RTN error and
AWQ's is never larger.  A Linear that is alone in its group is judged without running it:
``tr(D G D^T)`` with ``D = Q(W s) / s - W`` and ``G = X^T X`` its inputs' Gram matrix, the same sum
of squared output errors, for ``N x K^2`` products per alpha instead of ``tokens x N x K``.

Clip search (``search_clip``): per output row and input group of a weight (the groups of its
quantizer: a group-wise spec's groups, else the whole row), the range ``[lo, hi]`` shrunk by
``r = 1 - i / grid`` for ``i < max_shrink * grid`` (``r = 1`` included, so the objective never
grows); the ``r`` minimising the group's mean square partial output error
``(x_g . (Q(clip_r(w))_g - w_g))^2`` over sampled tokens (again through the group's Gram matrix)
is kept.  Applied by clamping the float weight (``clip_weight``): the config's min-max observer
then takes the clipped range itself, so no quantizer or saved format has to carry a clip ratio.
With another observer (MSE, percentile) the clamp only bounds the range that observer searches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.modules import TensorQuant
from ..numerics import QuantSpec, compute_qparams, fake_quantize, tensor_minmax
from ..observers import make_observer
from .gptq import objective

Rounder = Callable[[torch.Tensor], torch.Tensor]
"""A weight (rows, columns) -> the weight fake-quantized as the config's quantizer would."""

MIN_SCALE = 1e-4  # s_x^alpha is floored here before normalising: a dead channel is not divided by 0


def weight_rounder(tq: TensorQuant, name: str) -> Rounder:
    """Round a weight as ``tq`` (a config's weight TensorQuant) will at calibration: its observer
    (or, dynamic, the tensor's min-max) takes the range from the weight given, then
    ``fake_quantize``.  ``name``: the weight's, for messages."""
    spec = tq.spec

    def rounder(w: torch.Tensor) -> torch.Tensor:
        if tq.dynamic:
            scale, zero_point = compute_qparams(*tensor_minmax(w, spec, name), spec, name)
        else:
            observer = make_observer(tq.observer, spec, name=name, **dict(tq.observer_options)).to(w.device)
            observer(w)
            scale, zero_point = observer.qparams()
        return fake_quantize(w, scale, zero_point, spec, name=name)

    return rounder


# -- the scale search --------------------------------------------------------------------------
def mean_abs(inputs: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """``s_x``: the mean ``|x|`` per channel (last dimension) over every row of ``inputs``, float32
    (summed in float64).  ValueError naming ``name`` on NaN / Inf."""
    total, rows = None, 0
    for x in inputs:
        flat = x.detach().reshape(-1, x.shape[-1])
        part = flat.abs().sum(0, dtype=torch.float64)
        total = part if total is None else total + part
        rows += flat.shape[0]
    if total is None or rows == 0:
        raise ValueError(f"awq: {name} saw no inputs (the calibration data never reached it)")
    if not bool(torch.isfinite(total).all()):
        raise ValueError(f"awq: the inputs of {name} hold NaN or Inf; check the calibration data or the "
                         "layers before it")
    return (total / rows).float()


def scales_for(s_x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = s_x^alpha`` floored at ``MIN_SCALE``, over ``sqrt(max s * min s)`` (centred around 1 on a
    log scale); exactly ones for alpha = 0."""
    s = s_x.pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def gram(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``X^T X`` (float64, float32 products) over the rows of ``inputs``, and the number of rows."""
    g, rows = None, 0
    for x in inputs:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        part = (flat.T @ flat).double()
        g = part if g is None else g + part
        rows += flat.shape[0]
    return g, rows


def module_loss(inspect: nn.Module, runs: Sequence[tuple[tuple, dict]], refs: Sequence[torch.Tensor],
                first: Callable[[object], torch.Tensor]) -> Callable[[], float]:
    """Mean square error of ``inspect``'s output (``first`` picks the tensor) over the recorded
    calls ``runs`` (args, kwargs) against their float outputs ``refs``."""

    @torch.no_grad()
    def loss() -> float:
        total, count = 0.0, 0
        for (args, kwargs), ref in zip(runs, refs, strict=True):
            out = first(inspect(*args, **kwargs))
            total += float((out.float() - ref.float()).pow(2).sum(dtype=torch.float64))
            count += ref.numel()
        return total / count

    return loss


def linear_loss(layer: nn.Linear, original: torch.Tensor, g: torch.Tensor, rows: int) -> Callable[[], float]:
    """Mean square output error of ``layer`` (weight now) against its float weight ``original`` on
    the inputs whose Gram matrix is ``g`` (``rows`` rows): ``tr(D g D^T) / (rows * out_features)``."""

    def loss() -> float:
        return objective(original, layer.weight.detach(), g) / (rows * original.shape[0])

    return loss


@dataclass
class ScaleChoice:
    """What ``search_scale`` found: the scales of the best alpha and every alpha's error."""

    alpha: float
    scales: torch.Tensor  # (K,) float32
    error_rtn: float  # alpha = 0: round to nearest
    error_awq: float  # the best alpha's (<= error_rtn)
    errors: list[float]


@torch.no_grad()
def search_scale(consumers: Sequence[nn.Module], rounders: Sequence[Rounder | None], s_x: torch.Tensor,
                 loss: Callable[[], float], grid: int) -> ScaleChoice:
    """Try ``alpha = i / grid`` for ``i < grid``: each consumer's weight set to ``Q(W s) / s`` (its
    rounder ``Q``; None: a float layer, ``W`` kept), ``loss()`` measured; the weights are restored
    bit for bit afterwards.  Ties keep the smaller alpha."""
    originals = [c.weight.detach().clone() for c in consumers]
    errors: list[float] = []
    best = 0
    try:
        for i in range(grid):
            s = scales_for(s_x, i / grid)
            for layer, w, rounder in zip(consumers, originals, rounders, strict=True):
                if rounder is not None:
                    layer.weight.copy_(rounder(w * s) / s)
            errors.append(loss())
            if not math.isfinite(errors[-1]):
                raise ValueError(f"awq: the output error is {errors[-1]} at alpha {i / grid}; check the "
                                 "calibration data")
            if errors[-1] < errors[best]:
                best = i
    finally:
        for layer, w in zip(consumers, originals, strict=True):
            layer.weight.copy_(w)
    return ScaleChoice(alpha=best / grid, scales=scales_for(s_x, best / grid), error_rtn=errors[0],
                       error_awq=errors[best], errors=errors)


@torch.no_grad()
def fold_scales(producer: nn.Module, consumers: Sequence[nn.Module], s: torch.Tensor) -> None:
    """``1 / s`` into ``producer``'s outputs (a norm's weight and bias; a Linear's last ``len(s)``
    rows and bias) and ``s`` into the consumers' weight columns, in place; exact in real arithmetic."""
    s = s.to(producer.weight)
    if producer.weight.dim() == 1:
        producer.weight.div_(s)
    else:
        producer.weight[-s.numel():].div_(s.view(-1, 1))
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias[-s.numel():].div_(s)
    for layer in consumers:
        layer.weight.mul_(s.to(layer.weight).view(1, -1))


# -- the clip search ---------------------------------------------------------------------------
def clip_group_size(spec: QuantSpec, weight: torch.Tensor) -> int | None:
    """Columns per range of a 2-D ``weight`` under ``spec``: the group size of a group-wise spec along
    the input axis, the row length of a per-row spec; None for layouts the clip search does not
    take (per tensor, per input column)."""
    if weight.dim() != 2:
        return None
    if spec.granularity == "group" and spec.resolved_axis(2) == 1:
        return spec.group_size
    if spec.granularity == "channel" and spec.resolved_axis(2) == 0:
        return weight.shape[1]
    return None


def _grouped(t: torch.Tensor, size: int, fill: str) -> torch.Tensor:
    """(n, columns) -> (n, groups, size): the ragged last group padded with zeros or (``"last"``)
    copies of each row's last column (they leave a group's min and max as they are)."""
    pad = -t.shape[1] % size
    if pad:
        extra = t[:, -1:].expand(-1, pad) if fill == "last" else t.new_zeros(t.shape[0], pad)
        t = torch.cat([t, extra], 1)
    return t.reshape(t.shape[0], -1, size)


def clip_bounds(weight: torch.Tensor, ratios: torch.Tensor, size: int, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element of ``weight`` (rows, columns), the bounds of its group shrunk by its ``ratios``
    (rows, groups): ``+-r * max|w|`` (symmetric), ``r * [min(lo, 0), max(hi, 0)]`` (affine)."""
    g = _grouped(weight, size, "last")
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    cols = weight.shape[1]
    return ((lo * ratios).repeat_interleave(size, 1)[:, :cols],
            (hi * ratios).repeat_interleave(size, 1)[:, :cols])


def clip_weight(weight: torch.Tensor, ratios: torch.Tensor, size: int, symmetric: bool) -> torch.Tensor:
    """``weight`` clamped to its groups' bounds shrunk by ``ratios`` (``clip_bounds``)."""
    lo, hi = clip_bounds(weight, ratios, size, symmetric)
    return torch.maximum(torch.minimum(weight, hi), lo)


@dataclass
class ClipChoice:
    """What ``search_clip`` found: a ratio per (row, group) and the objective with and without."""

    ratios: torch.Tensor  # (rows, groups) float32, in (0, 1]
    objective_before: float  # summed over groups, mean over rows and tokens: ratio 1 everywhere
    objective_after: float


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, rounder: Rounder, size: int, *, symmetric: bool,
                grid: int = 20, max_shrink: float = 0.5) -> ClipChoice:
    """The per (row, group) shrink ratio of ``weight``'s ranges (module docstring) on the input rows
    ``x`` (tokens, columns); ``rounder`` rounds a whole weight, ``size`` columns per group."""
    xg = _grouped(x.float(), size, "zeros").transpose(0, 1)  # (groups, tokens, size)
    grams = (xg.transpose(1, 2) @ xg) / x.shape[0]  # (groups, size, size): mean x_g^T x_g
    shape = (weight.shape[0], xg.shape[0])
    best = torch.full(shape, math.inf, dtype=torch.float64)
    ratios = torch.ones(shape)
    before = None
    for i in range(max(1, math.ceil(max_shrink * grid - 1e-9))):
        r = 1.0 - i / grid
        candidate = torch.full(shape, r)
        d = rounder(clip_weight(weight, candidate, size, symmetric)) - weight
        dg = _grouped(d.float(), size, "zeros").transpose(0, 1)  # (groups, rows, size)
        err = ((dg @ grams) * dg).sum(-1).T.double()  # (rows, groups): mean squared partial output error
        if before is None:
            before = err
        better = err < best
        best = torch.where(better, err, best)
        ratios = torch.where(better, candidate, ratios)
    rows = weight.shape[0]
    return ClipChoice(ratios=ratios, objective_before=float(before.sum()) / rows,
                      objective_after=float(best.sum()) / rows)
