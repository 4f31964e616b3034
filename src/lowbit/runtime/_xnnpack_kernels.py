"""XNNPACK's int8 kernels as LiteRT's default delegate runs a fully-integer .tflite, re-done in torch.

What differs from ONNX Runtime (``_ort_kernels``), read from XNNPACK's source (``src/microparams-init.c``,
``src/operators/reduce-nd.c``, ``src/reference/unary-elementwise.cc``; checked bit for bit against
``ai-edge-litert`` in ``tests/runtime/test_tflite.py``):

    CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED (qs8-qc8w, "fp32" requantization)
                    acc = sum (x - zx) w + bias                         (int32, exact)
                    m = fl32(fl32(sx * sw[c]) / sy)                     (create_convolution2d_nhwc)
                    q = sat(rne(fl32(fl32(acc) * m)) + zy)              -- ORT's QLinearConv exactly
    ADD (qs8-vadd)  ra = fl32(sa / sy), rb = fl32(sb / sy); shift = 20 - exponent(max(|ra|, |rb|))
                    ma = rne(|ra| * 2**shift) with ra's sign, mb likewise   (integer multipliers)
                    q = sat(((2**(shift-1) - ma za - mb zb + ma a + mb b) >> shift) + zy)
                    (fixed point: rounds half up, where ORT's QLinearAdd computes in float)
    MEAN (qs8 rsum + reference int32 -> int8 convert)
                    m = fl32(fl32(sx / sy) * fl32(1 / N)), z = fl32(zy - fl32(fl32(N zx) * m))
                    q = sat(rne(fl32(fl32(sum x) * m) + z))             (sum of raw int8 codes)

The fixed-point ADD and the MEAN's zero-point folding are computed on TFLite's int8 codes (lowbit's
uint8 codes minus 128): the integer arithmetic does not depend on that shift, but MEAN's float steps do.
Codes enter and leave these functions on lowbit's uint8 container, as float32 tensors of integers.
"""

from __future__ import annotations

import math

import torch

_SHIFT = 128  # TFLite int8 code = lowbit uint8 code - 128


def _multiplier(ratio: float, shift: int) -> int:
    """``lrintf(|ratio| * 2**shift)`` with ``ratio``'s sign (XNNPACK adds ``shift`` to the exponent bits: exact;
    ``round`` rounds half to even, as ``lrintf``)."""
    rounded = round(abs(ratio) * 2.0**shift)  # the product is exact in float64: a float32 times a power of two
    return -rounded if math.copysign(1.0, ratio) < 0 else rounded


def add(a: torch.Tensor, a_scale: torch.Tensor, a_zp: int, b: torch.Tensor, b_scale: torch.Tensor, b_zp: int,
        out_scale: torch.Tensor, out_zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """XNNPACK's qs8 ADD of two code tensors of one shape (uint8 container) -> output codes (float32)."""
    ra = float(a_scale.float() / out_scale.float())  # float32 division, as XNNPACK's C
    rb = float(b_scale.float() / out_scale.float())
    largest = max(abs(ra), abs(rb))
    exponent = math.frexp(largest)[1] - 1  # the float32 exponent of a normal number: 2**e <= largest < 2**(e+1)
    shift = 20 - exponent
    if not 12 <= shift <= 30:
        raise ValueError(f"ADD: scale ratios {ra:.4g}, {rb:.4g} are outside XNNPACK's supported range")
    ma, mb = _multiplier(ra, shift), _multiplier(rb, shift)
    za, zb, zy = a_zp - _SHIFT, b_zp - _SHIFT, out_zp - _SHIFT
    bias = (1 << (shift - 1)) - ma * za - mb * zb
    acc = (a.to(torch.int64) - _SHIFT) * ma + (b.to(torch.int64) - _SHIFT) * mb + bias  # |acc| < 2**30
    out = torch.bitwise_right_shift(acc, shift) + zy  # arithmetic shift: floor
    return out.clamp_(qmin - _SHIFT, qmax - _SHIFT).add_(_SHIFT).to(torch.float32)


def mean(codes: torch.Tensor, in_scale: torch.Tensor, in_zp: int, out_scale: torch.Tensor, out_zp: int,
         qmin: int, qmax: int) -> torch.Tensor:
    """XNNPACK's qs8 MEAN over all dims after the first two: (N, C, *spatial) -> (N, C, 1, ...)."""
    n = codes.shape[2:].numel()
    spatial = tuple(range(2, codes.dim()))
    acc = (codes.double() - _SHIFT).sum(spatial, keepdim=True)  # int32 sum of int8 codes, exact
    f32 = torch.float32
    m = (in_scale.to(f32) / out_scale.to(f32)) * torch.tensor(1.0, dtype=f32).div(n)
    z = torch.tensor(float(out_zp - _SHIFT), dtype=f32) - torch.tensor(float(n * (in_zp - _SHIFT)), dtype=f32) * m
    y = (acc.to(f32) * m + z).round_()  # nearbyint: half to even
    return y.clamp_(qmin - _SHIFT, qmax - _SHIFT).add_(_SHIFT)
