"""Fold an eval-mode BatchNormalization into the quantized Conv before it.

ONNX Runtime folds ``Conv -> BatchNormalization`` only when the Conv weight is a
float initializer; with ``DQ(int8 W) -> Conv`` the BN stays, the Conv's output
is not followed by a QuantizeLinear, and the Conv runs in float.  BN in eval
mode is a per-output-channel affine map, ``y = k * conv + (beta - k * mean)``
with ``k = gamma / sqrt(var + eps)``, and ``k * (q * s) == q * (s * k)``, so it
folds into the *scale* of the weight: the int8 weights do not change, the
per-channel scale becomes ``s * |k|`` (a channel with ``k < 0`` negates its
integers, which fits a symmetric grid), and the bias becomes
``k * (b - mean) + beta``.  Up to float re-association the result is the same
number; a later lowbit pass folds BN before quantization anyway, this keeps
models that skipped it fusible.

A bias stored as ``DQ(int32)`` (the simulation's bias, on the grid ``s_in * s_w``)
is read as the float it dequantizes to; the folded bias ``k * b + shift`` lies on
no integer grid (the simulation applies BN in float), so it is written as a float
and ONNX Runtime rounds it to its int32 grid ``s_in * s_w * |k|`` when it fuses.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ._graph import Graph, attr, set_attr
from ._passes import const_dq

log = logging.getLogger(__name__)


def _bn_params(g: Graph, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """(k, shift) of an inference-mode BatchNormalization with constant statistics."""
    if len(bn.output) != 1 or attr(bn, "training_mode", 0):
        return None
    gamma, beta, mean, var = (g.const(name) for name in bn.input[1:5])
    if any(p is None for p in (gamma, beta, mean, var)):
        return None
    eps = np.float32(attr(bn, "epsilon", 1e-5))
    # float32 like torch's eval kernel: invstd = 1 / sqrt(var + eps); alpha = gamma * invstd
    k = gamma.astype(np.float32) * (np.float32(1) / np.sqrt(var.astype(np.float32) + eps))
    return k, beta.astype(np.float32) - mean.astype(np.float32) * k


def _conv_with_dq_weight(g: Graph, bn: onnx.NodeProto):
    conv = g.producer(bn.input[0])
    if conv is None or conv.op_type != "Conv" or g.sole_consumer(conv.output[0]) is not bn:
        return None, None
    dq = g.producer(conv.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or g.sole_consumer(dq.output[0]) is not conv:
        return None, None
    if not all(g.is_const(name) for name in dq.input if name):
        return None, None
    return conv, dq


def _conv_bias(g: Graph, conv: onnx.NodeProto, channels: int) -> np.ndarray | None:
    """The Conv's bias as float32 ``(channels,)``: a float initializer or ``DQ(int32)`` of one;
    zeros without a bias; None if it is computed at run time."""
    if len(conv.input) < 3 or not conv.input[2]:
        return np.zeros(channels, np.float32)
    if g.is_const(conv.input[2]):
        return g.const(conv.input[2]).astype(np.float32)
    dq = const_dq(g, conv.input[2])
    if dq is None or g.const(dq.input[0]).ndim != 1:
        return None
    q, scale = g.const(dq.input[0]), g.const(dq.input[1])
    zp = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), q.dtype)
    # DequantizeLinear's arithmetic (bias scales are () or (C_out,), along axis 0).
    return ((q.astype(np.float32) - zp.astype(np.float32)) * scale).astype(np.float32)


def _foldable(g: Graph, conv, dq, k: np.ndarray) -> str | None:
    """Why this Conv/BN pair cannot fold, or None if it can."""
    q, scale = g.const(dq.input[0]), g.const(dq.input[1])
    if _conv_bias(g, conv, q.shape[0]) is None:
        return "the Conv's bias is not a constant"
    zp = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), q.dtype)
    if scale.ndim == 1 and attr(dq, "axis", 1) % q.ndim != 0:
        return "the weight scale is per-channel along an axis other than the output channels"
    if np.any(zp != 0):
        return "the weight has non-zero zero-points (affine weights)"
    negate = np.broadcast_to(k < 0, (q.shape[0],))
    if np.any(q[negate] == np.iinfo(q.dtype).min):
        return "a channel with a negative BN scale holds the most negative code, whose negation does not fit"
    if np.any(k == 0):
        return "a BN scale is zero"
    return None


def fold_batchnorm(g: Graph) -> int:
    """Fold every eligible ``Conv(DQ(W)) -> BatchNormalization``; returns the count."""
    folded = 0
    for bn in g.nodes("BatchNormalization"):
        params = _bn_params(g, bn)
        conv, dq = _conv_with_dq_weight(g, bn)
        if params is None or conv is None:
            continue
        k, shift = params
        why_not = _foldable(g, conv, dq, k)
        if why_not:
            log.warning("%s: BatchNormalization after quantized Conv %s not folded (%s); that Conv will run "
                        "in float in ONNX Runtime. Fold BN into the Conv before quantizing", bn.name, conv.name,
                        why_not)
            continue
        _fold_one(g, conv, dq, bn, k, shift)
        folded += 1
    return folded


def _fold_one(g: Graph, conv, dq, bn, k: np.ndarray, shift: np.ndarray) -> None:
    q, scale = g.const(dq.input[0]), g.const(dq.input[1])
    channels = q.shape[0]
    sign = np.where(k < 0, -1, 1).astype(q.dtype).reshape((channels,) + (1,) * (q.ndim - 1))
    g.own_const(dq, 0, q * sign)
    base = dq.input[0].removesuffix("_quantized")
    new_scale = (np.broadcast_to(scale, (channels,)) * np.abs(k)).astype(np.float32)
    dq.input[1] = g.add_const(f"{base}_scale_bn", new_scale)
    zp_dtype = g.const(dq.input[2]).dtype if len(dq.input) > 2 and dq.input[2] else q.dtype
    zero_name = g.add_const(f"{base}_zero_point_bn", np.zeros(channels, dtype=zp_dtype))
    if len(dq.input) > 2:
        dq.input[2] = zero_name
    else:
        dq.input.append(zero_name)
    set_attr(dq, "axis", 0)
    new_bias = (_conv_bias(g, conv, channels) * k + shift).astype(np.float32)
    bias_name = g.add_const(f"{conv.name or 'conv'}_bias_bn", new_bias)
    if len(conv.input) > 2:
        conv.input[2] = bias_name
    else:
        conv.input.append(bias_name)
    conv.output[0] = bn.output[0]
    g.remove_nodes([bn])
