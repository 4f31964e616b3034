"""``QuantSpec(signed_scale=True)``: each range's largest-magnitude value lands exactly on ``qmin``
(scale = extreme / qmin, negative when the extreme is positive), checked on known values, against
ONNX Runtime's own symmetric 4-bit block quantizer (``quantize_matmul_4bits``, the rule of its
``MatMulNBitsQuantizer``), and through a learned (LSQ) quantizer, which keeps the sign."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.nn.quantizer import Quantizer
from lowbit.numerics import QuantSpec, compute_qparams, fake_quantize, tensor_minmax

INT4_G = QuantSpec(bits=4, signed_scale=True, granularity="group", axis=1, group_size=128)


@pytest.mark.parametrize(("lo", "hi", "scale"), [
    (-1.0, 2.0, -0.25),  # positive extreme -> on -8 with a negative scale
    (-2.0, 1.0, 0.25),  # negative extreme -> on -8 with a positive scale
    (-1.0, 1.0, 0.125),  # a tie: the negative end wins
    (0.0, 0.0, 1.0),  # all zero: a valid scale
    (0.5, 3.0, -0.375),  # an all-positive range (widened to include 0)
])
def test_known_values(lo, hi, scale):
    spec = QuantSpec(bits=4, signed_scale=True)
    s, z = compute_qparams(torch.tensor(lo), torch.tensor(hi), spec)
    assert float(s) == scale and int(z) == 0
    extreme = lo if -lo >= hi else hi
    assert float(fake_quantize(torch.tensor(extreme), s, z, spec)) == extreme  # exactly on the grid


def test_the_extreme_is_exact_where_the_half_span_rule_rounds_it_off():
    w = torch.tensor([[0.3, -0.1, 1.0, 0.2]])
    plain, signed = QuantSpec(bits=4), QuantSpec(bits=4, signed_scale=True)
    out = {spec: fake_quantize(w, *compute_qparams(*tensor_minmax(w, spec), spec), spec) for spec in (plain, signed)}
    assert float(out[signed][0, 2]) == 1.0
    assert float(out[plain][0, 2]) == pytest.approx(7 / 7.5)  # 1.0 / (1 / 7.5) = 7.5 -> 8 -> clamped to 7


def test_spec_rules():
    with pytest.raises(ValueError, match="signed_scale"):
        QuantSpec(bits=4, signed=False, symmetric=False, signed_scale=True)
    with pytest.raises(ValueError, match="signed_scale"):
        QuantSpec(bits=8, narrow_range=True, signed_scale=True)
    assert QuantSpec.from_dict(INT4_G.to_dict()) == INT4_G
    assert "signed-scale" in INT4_G.describe()


@pytest.mark.parametrize("k", [256, 320])  # whole blocks, and a ragged last block
def test_equals_onnxruntime_symmetric_block_quantizer(k):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, block = 24, 128
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k)) * torch.rand(n, 1) * 3
    blocks = -(-k // block)
    packed = np.zeros((n, blocks, block // 2), dtype=np.uint8)
    scales = np.zeros(n * blocks, dtype=np.float32)
    zero_points = np.zeros(n * ((blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.T.numpy()), scales, zero_points, block, n, k, True)
    spec = INT4_G.replace(group_size=block)
    s, z = compute_qparams(*tensor_minmax(w, spec), spec)
    assert torch.equal(s, torch.from_numpy(scales.reshape(n, blocks)))
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks * block)[:, :k].astype(np.float32)
    ort = (codes - 8) * np.repeat(scales.reshape(n, blocks), block, axis=1)[:, :k]
    assert torch.equal(fake_quantize(w, s, z, spec), torch.from_numpy(ort))


def test_a_learned_quantizer_keeps_each_scale_sign():
    w = torch.tensor([[2.0, -1.0, 0.5, 0.1], [-3.0, 1.0, 0.2, 0.0]])
    spec = INT4_G.replace(group_size=4)
    q = Quantizer(spec, name="w")
    q.set_qparams(*compute_qparams(*tensor_minmax(w, spec), spec))
    q.make_learnable()
    s, _ = q._learned_qparams()
    assert s.flatten().tolist() == [-0.25, 0.375]
    out = q(w)
    assert float(out[0, 0].detach()) == 2.0 and float(out[1, 0].detach()) == -3.0
    out.sum().backward()
    assert q.scale.grad is not None and bool(torch.isfinite(q.scale.grad).all())
