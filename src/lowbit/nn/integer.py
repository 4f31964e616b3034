"""The integer view of a quantized layer: what an integer runtime stores for it.

``layer.integer_params()`` (every quantized layer has it) returns an ``IntegerParams``: the
weight as integers in their container dtype with its scale and zero-point (per tensor, per
channel or per group), the bias on the int32 accumulator grid ``s_input * s_weight`` where the
simulation rounds it there, and the input / output quantization parameters.  Export writes
these constants, the ONNX Runtime emulation computes with them and reports read them: one
public method, so no package reaches into another's private attributes, and the file follows
the simulation by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics import QuantSpec, compute_qparams, quantize, tensor_minmax
from .quantizer import Quantizer


@dataclass(frozen=True)
class IntegerTensor:
    """One quantized tensor as integers.

    Attributes:
        name: the quantizer's name, e.g. ``"fc.weight"``.
        spec: its grid and scale layout.
        scale: float32, shape ``spec.param_shape(...)``: ``()``, ``(C,)`` or ``(C, groups)``.
        zero_point: int8 / uint8 (the spec's container), same shape as ``scale``.
        values: the integer tensor (container dtype) for a weight; None for an activation,
            whose values arrive at run time.
    """

    name: str
    spec: QuantSpec
    scale: torch.Tensor
    zero_point: torch.Tensor
    values: torch.Tensor | None = None


@dataclass(frozen=True)
class IntegerBias:
    """A bias on the int32 grid ``scale = s_input * s_weight`` (``values * scale`` is the bias
    the simulation adds).  ``values``: int32 ``(C_out,)``; ``scale``: float32 ``()`` or ``(C_out,)``."""

    name: str
    values: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class IntegerParams:
    """Everything an integer kernel needs from one layer; None where that tensor stays float
    (or, for input and output, is quantized dynamically at run time)."""

    weight: IntegerTensor | None
    bias: IntegerBias | None
    input: IntegerTensor | None
    output: IntegerTensor | None


def container(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``t`` (integer values) in the spec's 8-bit container dtype."""
    return t.to(torch.int8 if spec.signed else torch.uint8)


def weight_integers(q: Quantizer, weight: torch.Tensor) -> IntegerTensor:
    """``weight`` as ``q`` quantizes it.  A dynamic weight quantizer gets its qparams from the
    weight now: a weight is constant, so this is what the dynamic simulation computes each call."""
    if q.mode == "calibrating":
        raise ValueError(f"{q.name}: quantizer is still calibrating; freeze it first (lowbit.quantize does)")
    w = weight.detach().float()
    if q.mode == "dynamic":
        scale, zero_point = compute_qparams(*tensor_minmax(w, q.spec, q.name), q.spec, q.name)
    else:
        scale, zero_point = q.qparams_for(w)
    ints = quantize(w, scale, zero_point, q.spec, name=q.name)  # validates shapes, values in [qmin, qmax]
    return IntegerTensor(name=q.name, spec=q.spec, scale=scale.detach().float().clone(),
                         zero_point=container(zero_point, q.spec), values=container(ints, q.spec))


def static_integers(q: Quantizer | None) -> IntegerTensor | None:
    """The fixed scale / zero-point of an activation quantizer; None when the tensor stays
    float or its range is computed at run time (dynamic)."""
    if q is None or q.mode in ("disabled", "dynamic"):
        return None
    if q.mode == "calibrating" or not q.is_frozen:
        raise ValueError(f"{q.name}: quantizer has no fixed range yet (mode {q.mode!r}); calibrate and "
                         "freeze it (lowbit.quantize does), or train a QAT model one step and convert it")
    scale, zero_point = q.qparams_for(torch.empty(0))
    return IntegerTensor(name=q.name, spec=q.spec, scale=scale.detach().float().clone(),
                         zero_point=container(zero_point, q.spec))


def bias_step(input_q: Quantizer | None, weight_q: Quantizer | None, bias: torch.Tensor | None,
              weight_dim: int) -> torch.Tensor | None:
    """The int32 grid step ``s_input * s_weight`` a layer's bias is rounded to, as integer runtimes
    store it (ONNX Runtime's QLinearConv / QGemm); None where the bias stays float: no bias, a
    scale not fixed before the tensor arrives, or no single accumulator scale per output."""
    if bias is None or input_q is None or weight_q is None:
        return None
    fixed = ("static", "learned", "observing")  # a range known before the tensor arrives
    if input_q.mode not in fixed or weight_q.mode not in fixed or not input_q.has_range or not weight_q.has_range:
        return None
    if input_q.spec.granularity != "tensor" or weight_q.spec.granularity == "group":
        return None
    if weight_q.spec.granularity == "channel" and weight_q.spec.resolved_axis(weight_dim, weight_q.name) != 0:
        return None  # scales along the summed axis: the accumulator has no single scale per output
    return (input_q.qparams_for(bias)[0] * weight_q.qparams_for(bias)[0]).to(bias.dtype)  # () * (C_out,) or ()


def bias_integers(name: str, bias: torch.Tensor, step: torch.Tensor) -> IntegerBias:
    """``bias`` as int32 on the grid ``step`` (clamped to the int32 range)."""
    b = bias.detach()
    # float64 clamp: float32 cannot hold 2**31 - 1 (it rounds up to 2**31, which overflows int32).
    values = torch.round(b / step.detach()).double().clamp(-(2**31), 2**31 - 1).to(torch.int32)
    return IntegerBias(name=name, values=values, scale=step.detach().float().clone())
