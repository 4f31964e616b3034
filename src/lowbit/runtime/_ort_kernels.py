"""ONNX Runtime's integer CPU kernels, re-done in torch so that every output bit matches.

Each function computes what one ORT 1.32 CPU kernel (MLAS, x86-64 with AVX2 or newer)
computes, in the order it computes it.  Integer codes travel as float32 tensors
holding exact integers (so data-movement ops and max pooling work on them);
integer sums are taken in float64, exact while they stay below 2**53 (an int32
accumulator never comes near), or in float32 where a bound on the layer keeps every
partial sum below 2**24 (depthwise convs, computed tap by tap).  The float steps use
float32, as MLAS does:

    QuantizeLinear            q = sat(rne(x / s) + zp)                     (MlasQuantizeLinear)
    QLinearConv / QGemm       acc = sum (x - zx)(w - zw) + bias            (int32, exact)
                              m = fl32(fl32(sx * sw[c]) / sy)              (ComputeOutputScale)
                              q = sat(rne(fl32(fl32(acc) * m)) + zy)       (MlasRequantizeOutput)
    QGemm, float output       y = fl32(fl32(acc) * fl32(sa * sb[c]))       (scale-bias processor)
    QLinearAdd                ra = fl32(sa / sc), rb = fl32(sb / sc)
                              k = fl32(zc - fl32(ra * za + rb * zb))       (one FMA: ra*za + fl32(rb*zb))
                              q = sat(rne(fma(qa, ra, fma(qb, rb, k))))    (MlasQLinearAddKernelAvx2)
    QLinearGlobalAveragePool  acc = sum q - zx * HW                        (int32, exact)
                              m = fl32(sx / fl32(sy * HW)); requantize as above

``rne`` rounds half to even (``_mm_cvtps_epi32``; ``torch.round`` does the same),
``sat`` clamps to the 8-bit container, ``fma`` is a float32 fused multiply-add (one
rounding; see ``_fma32`` for how float64 gives it exactly).

Assumed: exact int32 accumulation.  ORT has it with AVX-VNNI / AVX512-VNNI (checked
here); on older x86 its u8s8 kernels use ``vpmaddubsw``, whose int16 pair sums can
saturate (ORT documents this and converts int8 weights to uint8 on such CPUs, which
is exact, but not in every configuration).  Not modelled: ARM, whose fixed-point
QLinearAdd / average-pool paths round differently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_INT32_MAX = 2**31 - 1


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear of a float tensor: codes (float32) ``sat(rne(x / scale) + zero_point)``."""
    v = torch.div(x.float(), scale).clamp_(qmin - zero_point, qmax - zero_point)
    return v.round_().add_(zero_point)


def dequantize_linear(codes: torch.Tensor, scale: torch.Tensor, zero_point: int) -> torch.Tensor:
    """DequantizeLinear: ``(q - zero_point) * scale`` in float32 (the int subtraction is exact)."""
    return (codes - zero_point) * scale


def accumulator_bound(x_range: int, weight: torch.Tensor, weight_zp: torch.Tensor, bias: torch.Tensor | None) -> float:
    """The largest ``|acc|`` a layer can reach: ``max_c x_range * sum |w_c - zw_c| + |bias_c|``.

    ``x_range`` is the largest ``|x - zx|`` on the input grid; ``weight`` (C_out, ...)."""
    w = (weight.double() - weight_zp.double()).abs().reshape(weight.shape[0], -1).sum(1) * x_range
    if bias is not None:
        w = w + bias.double().abs()
    return float(w.max()) if w.numel() else 0.0


def _check_int32(acc: torch.Tensor, bound: float, name: str) -> None:
    if bound <= _INT32_MAX:
        return  # cannot overflow
    peak = float(acc.abs().max()) if acc.numel() else 0.0
    if peak > _INT32_MAX:
        raise OverflowError(f"{name}: the int32 accumulator overflows ({peak:.0f} > 2**31 - 1); ONNX Runtime "
                            "would wrap around. Reduce the layer's range (smaller input or weight scales)")


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """MlasRequantizeOutput: int32 accumulator (exact, any float dtype) -> output codes (float32).

    ``multiplier`` is float32, broadcastable against ``acc`` (per output channel or scalar)."""
    v = acc.to(torch.float32).mul_(multiplier) if acc.dtype != torch.float32 else acc * multiplier
    # cvtepi32_ps (round to nearest even), mulps, clamp, cvtps_epi32 (half to even), + zero point
    return v.clamp_(qmin - zero_point, qmax - zero_point).round_().add_(zero_point)


def output_multiplier(in_scale: torch.Tensor, weight_scale: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """QLinearConv / QGemm's ``X_scale * W_scale[c] / Y_scale``, in float32 and in that order."""
    return (in_scale.float() * weight_scale.float()) / out_scale.float()


def _pads(padding, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    """(before, after) per spatial dim for an int / tuple / "valid" / "same" padding (torch's rules)."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in padding]


def _depthwise(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """A conv with one input channel per group as shift-and-add: one elementwise multiply-add per
    kernel tap, in a fixed order (torch's float64 grouped conv loops over groups, 10-100x slower)."""
    kernel = tuple(w.shape[2:])
    pads = _pads(padding, kernel, dilation)
    x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    if w.shape[0] != x.shape[1]:  # channel multiplier: each input channel feeds w.shape[0] / C outputs
        x = x.repeat_interleave(w.shape[0] // x.shape[1], dim=1)
    out_sizes = [(x.shape[2 + i] - dilation[i] * (k - 1) - 1) // stride[i] + 1 for i, k in enumerate(kernel)]
    acc = None
    for tap in torch.cartesian_prod(*[torch.arange(k) for k in kernel]).reshape(-1, len(kernel)).tolist():
        window = (slice(None), slice(None)) + tuple(
            slice(t * d, t * d + s * (n - 1) + 1, s) for t, d, s, n in zip(tap, dilation, stride, out_sizes))
        w_tap = w[(slice(None), 0, *tap)].view(-1, *([1] * len(kernel)))
        acc = x[window] * w_tap if acc is None else acc.addcmul_(x[window], w_tap)  # exact: integers < 2**24
    return acc


def conv_accumulate(codes: torch.Tensor, in_zp: int, weight: torch.Tensor, weight_zp: torch.Tensor,
                    bias: torch.Tensor | None, conv: dict, bound: float, name: str) -> torch.Tensor:
    """QLinearConv's int32 accumulator, exact: ``conv(x - zx, w - zw) + bias``.

    Args:
        codes: input codes (N, C, *spatial); padding contributes ``x == zx``, as ORT pads with zx.
        weight: integer weight (C_out, C_in / groups, *kernel); ``weight_zp`` broadcastable to it.
        bias: int32 values (C_out,) or None.
        conv: the layer's ``stride``, ``padding``, ``dilation`` (tuples, or a padding string) and ``groups``.
        bound: ``accumulator_bound`` of the layer.

    Returns:
        float64 (float32 for a depthwise conv whose every partial sum stays below 2**24).
    """
    depthwise = weight.shape[1] == 1 and conv["groups"] == codes.shape[1]
    dtype = torch.float32 if depthwise and bound < 2**24 else torch.float64
    x = codes.to(dtype, copy=True).sub_(in_zp)
    w = weight.to(dtype) - weight_zp.to(dtype)
    if depthwise:
        acc = _depthwise(x, w, conv["stride"], conv["padding"], conv["dilation"])
        if bias is not None:
            acc = acc.add_(bias.to(dtype).view(1, -1, *([1] * (acc.dim() - 2))))
    else:
        fn = F.conv1d if w.dim() == 3 else F.conv2d
        acc = fn(x, w, None if bias is None else bias.to(dtype), conv["stride"], conv["padding"], conv["dilation"],
                 conv["groups"])
        if acc.is_cuda:
            # Any summation order gives the exact integer in float64 (CPU: im2col + GEMM); round() absorbs
            # the last ulps a transform-based cuDNN algorithm (FFT, Winograd) might leave.
            acc = acc.round_()
    _check_int32(acc, bound, name)
    return acc


def gemm_accumulate(codes: torch.Tensor, in_zp: int, weight: torch.Tensor, weight_zp: torch.Tensor,
                    bias: torch.Tensor | None, bound: float, name: str) -> torch.Tensor:
    """QGemm's int32 accumulator (exact float64): ``(x - zx) @ (w - zw).T + bias``, x (N, K), w (M, K)."""
    acc = F.linear(codes.to(torch.float64, copy=True).sub_(in_zp), weight.double() - weight_zp.double().view(-1, 1),
                   None if bias is None else bias.double())  # exact in any summation order
    _check_int32(acc, bound, name)
    return acc


def gemm_float_output(acc: torch.Tensor, in_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """QGemm without an output scale: ``fl32(acc) * fl32(alpha * a_scale * b_scale[c])`` (alpha 1)."""
    return acc.to(torch.float32) * (in_scale.float() * weight_scale.float())


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, sum_exact: bool = False) -> torch.Tensor:
    """float32 ``a * b + c`` rounded once, as ``_mm256_fmadd_ps``; ``a * b`` must be exact in float64
    (an 8-bit integer times a float32 is: 32 significant bits).

    With ``sum_exact`` (the caller proved the float64 sum exact) one rounding to float32 is all.
    Otherwise the sum is rounded to float64 *to odd* (TwoSum gives its exact error; an inexact result
    gets its last bit set), and a round-to-odd value with 29 bits to spare rounds to float32 exactly
    as the exact sum would: no double-rounding error, whatever the magnitudes."""
    p, c = a.double() * b.double(), c.double()
    s = p + c
    if sum_exact:
        return s.to(torch.float32)
    bp = s - p
    err = (p - (s - bp)) + (c - bp)  # p + c == s + err exactly (Knuth's TwoSum)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, float("inf"), float("-inf")).to(s.dtype)
    odd = torch.where((err != 0) & even, torch.nextafter(s, toward), s)
    return odd.to(torch.float32)


def _ulp32(x: float) -> float:
    """The last-bit weight of a normal float32 ``x`` (a lower bound on its lowest set bit)."""
    return math.inf if x == 0 else 2.0 ** (math.frexp(abs(x))[1] - 24)


def qlinear_add(a: torch.Tensor, a_scale: torch.Tensor, a_zp: int, b: torch.Tensor, b_scale: torch.Tensor,
                b_zp: int, out_scale: torch.Tensor, out_zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """QLinearAdd (MLAS AVX2 kernel) of two code tensors of one shape -> output codes (float32)."""
    ra = (a_scale.float() / out_scale.float()).reshape(())
    rb = (b_scale.float() / out_scale.float()).reshape(())
    za, zb = torch.tensor(float(a_zp)), torch.tensor(float(b_zp))
    # (float)ZeroPointC - (ScaleRatio_AC * ZeroPointA + ScaleRatio_BC * ZeroPointB): GCC contracts
    # the inner sum into one FMA (checked against ORT on x86-64).
    fixed = torch.tensor(float(out_zp)) - _fma32(ra, za, rb * zb)
    # Both FMAs add multiples of the smallest last bit among ra, rb, fixed (a code is an integer
    # below 256); when their sums stay within 2**52 of it, float64 holds them exactly.
    step = min(_ulp32(float(ra)), _ulp32(float(rb)), _ulp32(float(fixed)))
    exact = (256 * (abs(float(ra)) + abs(float(rb))) + abs(float(fixed))) / step < 2.0**52
    acc = _fma32(a, ra, _fma32(b, rb, fixed, sum_exact=exact), sum_exact=exact)
    # cvtps_epi32 rounds half to even; packs / packus saturate to int16, then to the container.
    return acc.round_().clamp_(qmin, qmax)


def qlinear_global_average_pool(codes: torch.Tensor, in_scale: torch.Tensor, in_zp: int, out_scale: torch.Tensor,
                                out_zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """QLinearGlobalAveragePool over all dims after the first two: (N, C, *spatial) -> (N, C, 1, ...)."""
    image = codes.shape[2:].numel()
    spatial = tuple(range(2, codes.dim()))
    acc = codes.double().sum(spatial, keepdim=True) - float(in_zp * image)
    multiplier = in_scale.float() / (out_scale.float() * torch.tensor(float(image)))
    return requantize(acc, multiplier, out_zp, qmin, qmax)


# -- x86 without VNNI: vpmaddubsw -------------------------------------------------------------
# ORT's u8 x s8 kernels on AVX2 (and AVX-512 without VNNI) multiply the raw uint8 activation
# codes by the raw int8 weight codes and add adjacent products along K in pairs, saturating
# each pair to int16 (vpmaddubsw), before the int32 sums (vpmaddwd with ones) and the
# zero-point corrections.  The pairs are (0, 1), (2, 3) ... of the K order the kernel packs
# (``conv_k_order``); an odd K is padded with a zero weight.  Everything else is exact, so
# the accumulator is the exact one plus, for each pair that saturates, clamp(s) - s.
_INT16_MIN, _INT16_MAX = -(2**15), 2**15 - 1


def saturating_pairs(weight: torch.Tensor, a_min: int, a_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, pair) indices of the weight pairs whose int16 sum can saturate for activation codes in
    ``[a_min, a_max]`` (``a_min >= 0``); ``weight`` (M, K) raw int8 codes in the kernel's K order."""
    w = weight.double()
    if w.shape[1] % 2:
        w = F.pad(w, (0, 1))
    pos, neg = w.clamp(min=0), w.clamp(max=0)
    top = (pos * a_max + neg * a_min).reshape(w.shape[0], -1, 2).sum(-1)  # the largest pair sum
    bottom = (neg * a_max + pos * a_min).reshape(w.shape[0], -1, 2).sum(-1)  # the smallest
    rows, pairs = torch.nonzero((top > _INT16_MAX) | (bottom < _INT16_MIN), as_tuple=True)
    return rows, pairs


def pair_saturation(xa: torch.Tensor, xb: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``sat16(xa * wa + xb * wb) - (xa * wa + xb * wb)``: what saturation removes from the int32 sum
    (float64; all terms are exact integers)."""
    s = xa.double() * wa.double() + xb.double() * wb.double()
    return s.clamp(_INT16_MIN, _INT16_MAX) - s


def gemm_saturation(codes: torch.Tensor, weight: torch.Tensor, a_min: int, a_max: int) -> torch.Tensor | None:
    """The correction to QGemm's exact accumulator (N, M) under vpmaddubsw, or None when no pair of
    ``weight`` (M, K) can saturate.  ``codes`` (N, K) raw activation codes."""
    rows, pairs = saturating_pairs(weight, a_min, a_max)
    if rows.numel() == 0:
        return None
    x = F.pad(codes, (0, codes.shape[1] % 2)).double()
    w = F.pad(weight, (0, weight.shape[1] % 2)).double()
    corr = pair_saturation(x[:, 2 * pairs], x[:, 2 * pairs + 1], w[rows, 2 * pairs], w[rows, 2 * pairs + 1])
    return torch.zeros(codes.shape[0], weight.shape[0], dtype=torch.float64).index_add_(1, rows, corr)


def conv_k_order(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight of a conv as the GEMM ORT's NHWC QLinearConv runs per group: (M, K) with K in
    (kernel tap, input channel of the group) order, and for each K position the row of torch's
    unfolded input (``F.unfold`` order: channel, then tap) it multiplies."""
    m, cg = weight.shape[:2]
    taps = weight[0, 0].numel()
    w = weight.reshape(m, cg, taps).transpose(1, 2).reshape(m, taps * cg)  # (M, taps * Cg): tap-major
    channel = torch.arange(cg).repeat(taps)  # K position -> channel within the group
    tap = torch.arange(taps).repeat_interleave(cg)
    group = torch.arange(m) // (m // groups)  # output channel -> group
    unfold_row = (group[:, None] * cg + channel[None, :]) * taps + tap[None, :]  # (M, K)
    return w, unfold_row


def conv_saturation(codes: torch.Tensor, in_zp: int, weight: torch.Tensor, conv: dict, a_min: int, a_max: int,
                    chunk: int = 8) -> torch.Tensor | None:
    """The correction to QLinearConv's exact accumulator (N, M, *out) under vpmaddubsw, or None when
    no pair can saturate.  2-D convs; padding holds the input zero point, as ORT pads."""
    if codes.dim() == 3:  # Conv1d as a conv over (1, L)
        conv = {**conv, "stride": (1, *conv["stride"]), "dilation": (1, *conv["dilation"]),
                "padding": conv["padding"] if isinstance(conv["padding"], str) else (0, *conv["padding"])}
        out = conv_saturation(codes.unsqueeze(2), in_zp, weight.unsqueeze(2), conv, a_min, a_max, chunk)
        return None if out is None else out.squeeze(2)
    w, unfold_row = conv_k_order(weight, conv["groups"])
    rows, pairs = saturating_pairs(w, a_min, a_max)
    if rows.numel() == 0:
        return None
    if w.shape[1] % 2:
        w = F.pad(w, (0, 1))
        unfold_row = F.pad(unfold_row, (0, 1), value=-1)  # the zero-weight pad: any row will do
    wa, wb = w[rows, 2 * pairs].double(), w[rows, 2 * pairs + 1].double()
    ra, rb = unfold_row[rows, 2 * pairs].clamp(min=0), unfold_row[rows, 2 * pairs + 1].clamp(min=0)
    kernel = tuple(weight.shape[2:])
    pads = _pads(conv["padding"], kernel, conv["dilation"])
    x = F.pad(codes.double(), [p for pair in reversed(pads) for p in pair], value=float(in_zp))
    parts = []
    for start in range(0, x.shape[0], chunk):  # unfolded inputs are taps x larger than the input
        cols = F.unfold(x[start:start + chunk], kernel, dilation=conv["dilation"], stride=conv["stride"])
        corr = pair_saturation(cols[:, ra], cols[:, rb], wa[:, None], wb[:, None])  # (n, P, L)
        parts.append(torch.zeros(cols.shape[0], w.shape[0], cols.shape[2], dtype=torch.float64)
                     .index_add_(1, rows, corr))
    out = torch.cat(parts)
    sizes = [(x.shape[2 + i] - conv["dilation"][i] * (k - 1) - 1) // conv["stride"][i] + 1
             for i, k in enumerate(kernel)]
    return out.reshape(out.shape[0], out.shape[1], *sizes)
