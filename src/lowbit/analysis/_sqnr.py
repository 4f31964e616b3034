"""Sensitivity by SQNR: how much noise each layer's quantization puts on the model output.

Also home of ``EvalSet``, the fixed batches every sensitivity method measures on, with the FP32
outputs computed once; ``_ablation`` and ``_hessian`` read it too.

Per decision layer (``quantized_only`` / ``float_only`` switch the quantizers of one quantized
model; nothing is recalibrated):

* ``output_sqnr_db_only``: SQNR of the model output with only this layer quantized;
* ``output_sqnr_db_without``: with everything quantized except this layer (what keeping it
  float buys: compare with the baseline ``output_sqnr_db``);
* ``weight_sqnr_db``: SQNR of ``Q(W)`` against ``W`` (the weight the quantizer rounds; inf for a
  float weight or one already on its grid);
* ``input_sqnr_db``: SQNR of the layer's quantized input against its float input, measured in
  the "only" pass, so upstream is float and the figure is this layer's own input quantizer's
  noise, not the error accumulated upstream (inf when the input stays float).

SQNR = 10 log10(sum signal^2 / sum noise^2) over every element of the evaluation batches.
``cost`` = noise / signal power of the output with only this layer quantized (1 / linear SQNR):
noises from independent sources add, so the solver may sum it over layers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..nn.modules import has_quantizers
from ..nn.walk import first_tensor, fixed_weights, run_model
from ..numerics import fake_quantize
from ._switch import switched_outputs

COST_UNIT = "noise-to-signal power ratio of the model output with only this layer quantized (1 / linear SQNR)"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside, its own mode back afterwards."""
    was = {m: m.training for m in model.modules()}
    try:
        yield model.eval()
    finally:
        for m, training in was.items():
            m.training = training


def first_batches(data, batches: int, what: str) -> list:
    """The first ``batches`` items of ``data`` (a single tensor is one batch)."""
    if data is None:
        raise ValueError(f"sensitivity: no {what}; pass an iterable of model inputs")
    items = [data] if isinstance(data, torch.Tensor) else list(itertools.islice(iter(data), batches))
    if not items:
        raise ValueError(f"sensitivity: {what} is empty; give at least one batch of model inputs")
    return items


class EvalSet:
    """Fixed batches and the float model's outputs on them (float64 on CPU), computed once."""

    def __init__(self, model: nn.Module, batches: Sequence) -> None:
        self.batches = list(batches)
        self.fp32 = self.outputs(model)
        self.signal = sum(float((y * y).sum()) for y in self.fp32)  # output power, summed

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        with eval_mode(model), fixed_weights(model):
            return [first_tensor(run_model(model, b)).detach().double().cpu() for b in self.batches]

    def noise(self, model: nn.Module) -> float:
        """Sum of squared differences between ``model``'s outputs and FP32's."""
        return sum(float(((y - r) ** 2).sum()) for y, r in zip(self.outputs(model), self.fp32, strict=True))


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise); inf for no noise."""
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def noise_ratio(signal: float, noise: float) -> float:
    """noise / signal (0 for no noise; inf for noise on a zero signal)."""
    if noise == 0:
        return 0.0
    return noise / signal if signal > 0 else math.inf


@torch.no_grad()
def weight_sqnr_db(layer: nn.Module) -> float:
    """SQNR of the layer's fake-quantized weight against the weight its quantizer sees."""
    q = getattr(layer, "weight_quantizer", None)
    if q is None or q.mode == "disabled":
        return math.inf
    w = layer.quantized_weight_source().detach()
    delta = weight_delta(layer)
    return sqnr_db(float((w.double() ** 2).sum()), float((delta.double() ** 2).sum()))


@torch.no_grad()
def weight_delta(layer: nn.Module) -> torch.Tensor:
    """``Q(W) - W`` with the layer's weight quantizer (its calibrated scale); zeros when the
    weight stays float."""
    w = layer.quantized_weight_source().detach()
    q = getattr(layer, "weight_quantizer", None)
    if q is None or q.mode == "disabled":
        return torch.zeros_like(w)
    scale, zero_point = q.qparams_for(w)
    return fake_quantize(w, scale, zero_point, q.spec, name=q.name) - w


@contextlib.contextmanager
def _input_noise(layer: nn.Module) -> Iterator[list[float]]:
    """[signal, noise] power of the layer's input quantizer, summed over the calls inside."""
    power = [0.0, 0.0]
    q = getattr(layer, "input_quantizer", None)
    if q is None or q.mode == "disabled":
        yield power
        return

    def hook(_module, args, out):
        x = args[0].detach().double()
        power[0] += float((x * x).sum())
        power[1] += float(((out.detach().double() - x) ** 2).sum())

    handle = q.register_forward_hook(hook)
    try:
        yield power
    finally:
        handle.remove()


def measure(qmodel: nn.Module, evalset: EvalSet, names: Sequence[str],
            bar: Callable[[Iterable], Iterable] = iter) -> tuple[dict[str, tuple[float, dict]], dict]:
    """``{layer: (cost, values)}`` and the baseline (``output_sqnr_db`` fully quantized)."""
    inputs = {name: [0.0, 0.0] for name in names}

    @contextlib.contextmanager
    def input_noise(name: str) -> Iterator[None]:
        with _input_noise(qmodel.get_submodule(name)) as power:
            yield
        inputs[name] = [inputs[name][0] + power[0], inputs[name][1] + power[1]]

    with eval_mode(qmodel), fixed_weights(qmodel):
        outs = switched_outputs(qmodel, evalset.batches, names, bar, around_only=input_noise)
    signal = evalset.signal
    rows = {}
    for name in names:
        only, without = _noise(outs.only[name], evalset.fp32), _noise(outs.without[name], evalset.fp32)
        rows[name] = (noise_ratio(signal, only), _values(qmodel.get_submodule(name), signal, only, without,
                                                         inputs[name]))
    full = _noise(outs.full, evalset.fp32)
    return rows, {"output_sqnr_db": sqnr_db(signal, full), "noise_ratio": noise_ratio(signal, full)}


def _noise(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    return sum(float(((y - r) ** 2).sum()) for y, r in zip(outputs, references, strict=True))


def _values(layer: nn.Module, signal: float, only: float, without: float, power: list[float]) -> dict:
    return {
        "output_sqnr_db_only": sqnr_db(signal, only),
        "output_sqnr_db_without": sqnr_db(signal, without),
        "weight_sqnr_db": weight_sqnr_db(layer) if has_quantizers(layer) else math.inf,
        "input_sqnr_db": sqnr_db(*power) if power[0] or power[1] else math.inf,
    }
