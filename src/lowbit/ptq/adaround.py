"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Rounding each weight to its nearest grid point minimises the weight error, not the layer's
output error.  AdaRound chooses, per weight, floor or ceil so that the layer's OUTPUT stays
close to the float output on calibration data, layer by layer, in execution order::

    W~ = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)      zeta = 1.1, gamma = -0.1
    loss = mean_rows ||W x - W~ x^||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

``V`` starts where ``h(V)`` is the fractional part of ``W / s`` (nearest rounding's soft twin);
the regulariser is off for the first ``warmup`` of the iterations, then pulls every ``h`` to 0
or 1 while ``beta`` decays from 20 to 2 (cosine, as AIMET does).  At the end ``h`` is made hard
(``h >= 0.5``) and the chosen grid value is written INTO the weight: the layer's frozen weight
quantizer rounds that value back to exactly the chosen integer, so the fake-quant simulation,
``integer_params``, export, ``save`` / ``load`` and the ONNX Runtime emulation need no change.

Inputs and targets (``sequential``):

* ``sequential=True`` (default): ``x^`` is the input the layer receives in the QUANTIZED model,
  the layers before it already rounded, and the target is the float layer on the float model's
  input (the paper's "asymmetric reconstruction", which beat the symmetric one in its Table 4):
  each layer learns to cancel part of the error that arrives from upstream.
* ``sequential=False``: ``x^`` is the float model's input of the layer; layers are independent.

Either way the layer's own input quantizer is applied to ``x^``, so the layer is tuned on what
it sees deployed, and the bias is the int32-rounded one it adds deployed.  The float model is
``qmodel`` run with every quantizer disabled and the original weights of the layers already
rounded put back for the pass, so BatchNorm folding and the float steps are accounted for.

What is cached: the first ``batches`` calibration items; of each layer's output positions (conv:
batch x spatial positions; gemm: rows / tokens) at most ``MAX_ROWS`` drawn at random (seeded),
with the input patch each one contracts (the exact receptive field, padding included) and its
float output.  The losses, optimised and reported, are over exactly those rows.

Cost: two forward passes per layer, each stopped at the layer (quantized-model inputs, float
targets; ``sequential=False`` needs only the float one), over the ``batches`` items, plus
``iterations`` steps of a ``batch_size``-row matmul.  Measured on MobileNetV2 (ImageNet weights,
preset w4a8, 64 calibration and 256 held-out photos, ``benchmarks/bench_adaround.py``): top-1
agreement with FP32 0.09 -> 0.80 (ONNX Runtime 0.08 -> 0.79), KL 4.36 -> 0.13 nats; 635 s for
``quantize`` with the defaults (about 500 s of it AdaRound, most of that the input caching) on a
2-core Intel Xeon shared with other jobs, one torch thread.

Example::

    qmodel = lowbit.quantize(model, calib, "w4a8", algorithms=["adaround(iterations=200)"])
    qmodel.lowbit_summary.reports[-1]["features.0.0"]    # {"loss_nearest": ..., "loss_adaround": ...}
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.modules import is_quantized
from ..nn.quantizer import Quantizer
from ..nn.registry import CONV, GEMM, kind_of
from ..nn.walk import quantizers_by_role, run_model
from ..numerics import quantize
from ..numerics.qparams import expand_param

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Louizos et al. 2018)
BETA_START, BETA_END = 20.0, 2.0
MAX_ROWS = 16384  # output positions (rows) cached per layer, over all items
_EVAL_CHUNK = 4096  # rows per matmul when measuring the losses


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been seen."""


# -- the weight's grid --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Grid:
    """A frozen weight quantizer's grid laid over the weight: every tensor has the weight's shape."""

    scale: torch.Tensor
    zero_point: torch.Tensor  # float
    floor: torch.Tensor  # floor(W / s)
    rest: torch.Tensor  # W / s - floor, in [0, 1): the fractional part
    qmin: int
    qmax: int

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) of the rounding ``h`` (0 = floor, 1 = ceil), clamped to the grid."""
        return torch.clamp(self.floor + h + self.zero_point, self.qmin, self.qmax)

    def weight(self, h: torch.Tensor) -> torch.Tensor:
        """The dequantized weight, computed as ``lowbit.numerics.dequantize`` does."""
        return (self.codes(h) - self.zero_point) * self.scale


def _grid(q: Quantizer, w: torch.Tensor) -> _Grid:
    scale, zero_point = q.qparams_for(w)

    def spread(p: torch.Tensor) -> torch.Tensor:  # one value per weight element
        return expand_param(p.float(), w.shape, q.spec, q.name)

    s = spread(scale)
    ratio = torch.div(w, s)  # the same float32 division quantize() rounds
    floor = torch.floor(ratio)
    return _Grid(scale=s, zero_point=spread(zero_point), floor=floor, rest=(ratio - floor).clamp(0, 1),
                 qmin=q.spec.qmin, qmax=q.spec.qmax)


def _soft(v: torch.Tensor) -> torch.Tensor:
    """h(V): the rectified sigmoid, exactly 0 or 1 beyond its ends."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _init_v(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = rest (rest in [0, 1) maps inside the sigmoid's open range)."""
    return torch.logit((rest - GAMMA) / (ZETA - GAMMA))


def _beta(t: int, warm: int, total: int) -> float:
    """Cosine decay from BETA_START to BETA_END over the iterations after the warm-up."""
    progress = (t - warm) / max(1, total - warm)
    return BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(progress * math.pi))


# -- the rows a layer contracts -----------------------------------------------------------------
@dataclass
class _Rows:
    """One layer's cached rows: ``x`` (R, groups, K) the inputs each output position contracts
    (the layer's input quantizer applied), ``y`` (R, C_out) its float output there."""

    x: torch.Tensor
    y: torch.Tensor


def _conv_patches(layer: nn.Module, x: torch.Tensor, idx: torch.Tensor,
                  out_hw: tuple[int, int]) -> torch.Tensor:
    """The receptive fields of output positions ``idx`` (flat over N x H_out x W_out) of a 1-d or
    2-d convolution on ``x``: (R, groups, C_in / groups * k), in the weight's (C, *k) order."""
    mode = layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode="constant" if mode == "zeros" else mode)
    pair = (lambda t: (1, t[0])) if x.dim() == 3 else tuple  # a 1-d conv is a 2-d one of height 1
    if x.dim() == 3:
        x = x.unsqueeze(2)
    (kh, kw), (sh, sw), (dh, dw) = pair(layer.kernel_size), pair(layer.stride), pair(layer.dilation)
    h_out, w_out = out_hw
    n, pos = idx // (h_out * w_out), idx % (h_out * w_out)
    rows = (pos // w_out)[:, None] * sh + torch.arange(kh)[None, :] * dh  # (R, kh)
    cols = (pos % w_out)[:, None] * sw + torch.arange(kw)[None, :] * dw  # (R, kw)
    patches = x[n[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (R, kh, kw, C)
    return patches.permute(0, 3, 1, 2).reshape(len(idx), layer.groups, -1)


def _positions(layer: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``y`` (the layer's output) as (positions, C_out) rows, and the conv's output (H, W)."""
    if kind_of(layer).kernel == GEMM:
        return y.reshape(-1, y.shape[-1]), (1, 1)
    spatial = y.shape[2:] if y.dim() == 4 else (1, y.shape[2])
    return y.movedim(1, -1).reshape(-1, y.shape[1]), tuple(spatial)


def _gather(layer: nn.Module, x: torch.Tensor, idx: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    if kind_of(layer).kernel == GEMM:
        return x.reshape(-1, 1, x.shape[-1])[idx]
    return _conv_patches(layer, x, idx, out_hw)


def _apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's kernel on rows: (R, g, K) x weight (C_out, ...) -> (R, C_out)."""
    groups = x.shape[1]
    w = weight.reshape(groups, weight.shape[0] // groups, -1)
    y = torch.einsum("rgk,gok->rgo", x, w).reshape(x.shape[0], -1)
    return y if bias is None else y + bias


# -- running the model --------------------------------------------------------------------------
def _feed(model: nn.Module, items: list, hook_layer: nn.Module, hook, *, pre: bool) -> None:
    """Run ``model`` on each item with ``hook(i, x, y)`` on ``hook_layer``; the hook ends the pass."""
    i = 0

    def call(module, args, kwargs, output=None):
        x = args[0] if args else next(iter(kwargs.values()))  # the one input, however it was passed
        hook(i, x, output)
        raise _Stop

    handle = (hook_layer.register_forward_pre_hook(call, with_kwargs=True) if pre
              else hook_layer.register_forward_hook(call, with_kwargs=True))
    try:
        with torch.no_grad():
            for i, item in enumerate(items):  # (i is read by the hook)
                with contextlib.suppress(_Stop):
                    run_model(model, item)
    finally:
        handle.remove()


@contextlib.contextmanager
def _float_model(qmodel: nn.Module, originals: dict[nn.Module, torch.Tensor]):
    """``qmodel`` as the float model: every quantizer disabled, the original float weights of the
    layers AdaRound changed already put back; the modes of the quantizers yielded."""
    modes = {id(q): q.mode for _, _, q in quantizers_by_role(qmodel)}
    changed = {layer: layer.weight.detach().clone() for layer in originals}
    try:
        for _, _, q in quantizers_by_role(qmodel):
            q.mode = "disabled"
        with torch.no_grad():
            for layer, weight in originals.items():
                layer.weight.copy_(weight)
        yield modes
    finally:
        with torch.no_grad():
            for layer, weight in changed.items():
                layer.weight.copy_(weight)
        for _, _, q in quantizers_by_role(qmodel):
            q.mode = modes[id(q)]


def _deployed_input(layer: nn.Module, x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """``x`` through the layer's input quantizer in its deployed ``mode`` (inside ``_float_model``)."""
    q = layer.input_quantizer
    if q is None:
        return x
    saved, q.mode = q.mode, mode
    try:
        return q(x)
    finally:
        q.mode = saved


def _cache_rows(qmodel, layer, items, originals, *, sequential: bool, gen: torch.Generator) -> _Rows:
    """The rows AdaRound fits ``layer`` on (see the module docstring)."""
    quota = max(1, math.ceil(MAX_ROWS / len(items)))
    picks: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
    xs: dict[int, torch.Tensor] = {}
    ys: dict[int, torch.Tensor] = {}

    def on_float(i, x, y):
        rows, out_hw = _positions(layer, y)
        idx = torch.randperm(len(rows), generator=gen)[:quota].sort().values
        picks[i], ys[i] = (idx, out_hw), rows[idx].float()
        if not sequential:
            xs[i] = _gather(layer, _deployed_input(layer, x.float(), in_mode), idx, out_hw)

    def on_quantized(i, x, _):
        xs[i] = _gather(layer, layer._quant_input(x.float()), *picks[i])

    with _float_model(qmodel, originals) as modes:
        in_mode = None if layer.input_quantizer is None else modes[id(layer.input_quantizer)]
        _feed(qmodel, items, layer, on_float, pre=False)
    if sequential:
        _feed(qmodel, items, layer, on_quantized, pre=True)
    order = sorted(ys)
    return _Rows(x=torch.cat([xs[i] for i in order]), y=torch.cat([ys[i] for i in order]))


# -- optimising one layer -----------------------------------------------------------------------
def _mse(rows: _Rows, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """Mean squared output error per element over all cached rows."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows.y), _EVAL_CHUNK):
            chunk = slice(start, start + _EVAL_CHUNK)
            total += float((_apply(rows.x[chunk], weight, bias) - rows.y[chunk]).double().pow(2).sum())
    return total / rows.y.numel()


def _optimize(rows: _Rows, grid: _Grid, bias, *, iterations: int, reg_weight: float, batch_size: int,
              lr: float, warmup: float, gen: torch.Generator) -> torch.Tensor:
    """The hard rounding (0 = floor, 1 = ceil, weight-shaped) after ``iterations`` Adam steps."""
    v = nn.Parameter(_init_v(grid.rest))
    opt = torch.optim.Adam([v], lr=lr)
    warm = int(warmup * iterations)
    n = len(rows.y)
    for t in range(iterations):
        pick = torch.randint(n, (min(batch_size, n),), generator=gen)
        h = _soft(v)
        error = _apply(rows.x[pick], grid.weight(h), bias) - rows.y[pick]
        loss = error.pow(2).sum(1).mean()  # per row: summed over output channels
        if t >= warm:
            loss = loss + reg_weight * (1 - (2 * h - 1).abs().pow(_beta(t, warm, iterations))).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (_soft(v) >= 0.5).float()


# -- which layers -------------------------------------------------------------------------------
def _candidates(qmodel: nn.Module) -> dict[str, nn.Module]:
    """Quantized gemm / conv layers whose weight quantizer is frozen (static), by name."""
    found, seen = {}, {}
    for name, m in qmodel.named_modules():
        kind = kind_of(m) if is_quantized(m) else None
        q = getattr(m, "weight_quantizer", None)
        if kind is None or kind.kernel not in (GEMM, CONV) or q is None:
            continue
        why = None
        if q.mode != "static" or not q.is_frozen:
            why = f"its weight quantizer is {q.mode!r}, not frozen (static)"
        elif m.quantized_weight_source() is not m.weight:
            why = "its quantized weight is not its plain weight (a QAT conv-BN pair folds it)"
        elif m.weight.dtype != torch.float32:
            why = f"its weight is {m.weight.dtype}, not float32"
        elif kind.kernel == CONV and m.weight.dim() not in (3, 4):
            why = "only 1-d and 2-d convolutions are supported"
        elif m.weight.data_ptr() in seen:
            why = f"it shares its weight with {seen[m.weight.data_ptr()]}"
            found.pop(seen[m.weight.data_ptr()], None)
        if why:
            log.info("adaround: %s skipped: %s", name, why)
            continue
        seen[m.weight.data_ptr()] = name
        found[name] = m
    return found


def _execution_order(qmodel: nn.Module, layers: dict[str, nn.Module], item) -> list[str]:
    """Names of ``layers`` in the order one item calls them; layers called twice are dropped."""
    calls: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: calls.append(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            run_model(qmodel, item)
    finally:
        for h in handles:
            h.remove()
    shared = sorted({n for n in calls if calls.count(n) > 1})
    for n in shared:
        log.info("adaround: %s skipped: it runs more than once per forward", n)
    for n in sorted(set(layers) - set(calls)):
        log.info("adaround: %s skipped: the calibration data never reaches it", n)
    return [n for n in dict.fromkeys(calls) if n not in shared]


# -- the algorithm ------------------------------------------------------------------------------
def _round_layer(name: str, layer: nn.Module, rows: _Rows, gen: torch.Generator, options: dict) -> dict:
    """Fit the rounding of ``layer`` on ``rows`` and write it into the weight; its report."""
    q = layer.weight_quantizer
    weight = layer.weight.detach().clone()
    grid = _grid(q, weight)
    bias = layer._quant_bias()
    bias = None if bias is None else bias.detach().float()
    nearest = q(weight).detach()
    h = _optimize(rows, grid, bias, gen=gen, **options)
    rounded = grid.weight(h)
    report = {"loss_nearest": _mse(rows, nearest, bias), "loss_adaround": _mse(rows, rounded, bias),
              "changed": float((rounded != nearest).float().mean())}
    with torch.no_grad():
        layer.weight.copy_(rounded)
    codes = quantize(layer.weight.detach(), *q.qparams_for(weight), q.spec, name=q.name)
    if not torch.equal(codes.float(), grid.codes(h)):
        raise RuntimeError(f"adaround: {name}'s weight does not round back to the chosen integers "
                           "(a lowbit bug)")
    log.info("adaround: %s output MSE %.4g -> %.4g (%.1f%% of weights rounded the other way)", name,
             report["loss_nearest"], report["loss_adaround"], 100 * report["changed"])
    return report


def adaround(qmodel: nn.Module, calib_data: Iterable | None, *, iterations: int = 200,
             reg_weight: float = 0.01, batch_size: int = 256, batches: int = 4, sequential: bool = True,
             lr: float = 1e-2, warmup: float = 0.2, seed: int = 0) -> dict[str, dict[str, float]]:
    """Choose each weight's rounding (floor or ceil) by AdaRound, layer by layer, in place.

    Args:
        qmodel: a calibrated model from ``lowbit.quantize`` (its weight quantizers frozen).
        calib_data: re-iterable model inputs (tensors, tuples of args, dicts of kwargs); the
            first ``batches`` items are used.
        iterations: Adam steps per layer.
        reg_weight: lambda, the weight of the rounding regulariser.
        batch_size: cached rows (output positions) drawn per step.
        batches: calibration items read.
        sequential: inputs from the quantized model (True) or the float model (False).
        lr: Adam's learning rate on V.
        warmup: fraction of the iterations without the regulariser.
        seed: seeds the row sampling (the result is reproducible).

    Returns:
        ``{layer: {"loss_nearest", "loss_adaround", "changed"}}`` in execution order: the mean
        squared output error per element on the cached rows with nearest rounding and with
        AdaRound's, and the fraction of weights rounded the other way.

    Raises:
        ValueError: no or empty calibration data.

    Example:
        >>> report = adaround(lowbit.quantize(model, calib, "w4a8"), calib, iterations=200)
    """
    if calib_data is None:
        raise ValueError("adaround needs calibration data (an iterable of model inputs); pass calib_data")
    items = list(itertools.islice(iter(calib_data), batches))
    if not items:
        raise ValueError("adaround needs calibration data: got an empty iterable of model inputs")
    layers = _candidates(qmodel)
    if not layers:
        log.warning("adaround: %s has no gemm / conv layer with a frozen weight quantizer; nothing to round",
                    type(qmodel).__name__)
        return {}
    was_training = qmodel.training
    qmodel.eval()
    gen = torch.Generator().manual_seed(seed)
    options = {"iterations": iterations, "reg_weight": reg_weight, "batch_size": batch_size, "lr": lr,
               "warmup": warmup}
    report, originals = {}, {}
    try:
        for name in _execution_order(qmodel, layers, items[0]):
            layer = layers[name]
            rows = _cache_rows(qmodel, layer, items, originals, sequential=sequential, gen=gen)
            original = layer.weight.detach().clone()
            report[name] = _round_layer(name, layer, rows, gen, options)
            originals[layer] = original
    finally:
        qmodel.train(was_training)
    log.info("adaround: %d layer(s) rounded", len(report))
    return report
