"""Quantizer and a quantized Linear with group-wise weights whose last group is shorter
(in_features 576 in groups of 128: SmolLM2's hidden size), in every mode, against a loop over
the groups (each group fake-quantized as a tensor of its own)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.nn.quantizer import Quantizer
from lowbit.numerics import QuantSpec, compute_qparams, fake_quantize, tensor_minmax

INT4_G128 = QuantSpec(bits=4, granularity="group", axis=1, group_size=128)
UINT4_G128 = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", axis=1, group_size=128)


def _rtn_per_group(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest with each group's own min-max range, one group at a time (the naive loop)."""
    parts = []
    for start in range(0, w.shape[1], spec.group_size):
        chunk = w[:, start:start + spec.group_size]
        lo, hi = chunk.amin(1), chunk.amax(1)
        per_row = spec.replace(granularity="channel", axis=0, group_size=None)
        parts.append(fake_quantize(chunk, *compute_qparams(lo, hi, per_row), per_row))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("spec", [INT4_G128, UINT4_G128], ids=["int4-sym", "uint4-affine"])
def test_static_and_dynamic_modes_match_the_loop(spec):
    w = torch.randn(16, 576)
    w[3] = w[3].abs() + 0.1  # an all-positive row: the affine range of its short group starts above 0
    q = Quantizer(spec, name="fc.weight")
    q.mode = "calibrating"
    q(w)
    q.freeze()
    assert q.scale.shape == q.zero_point.shape == (16, 5)
    expected = _rtn_per_group(w, spec)
    assert torch.equal(q(w), expected)
    dynamic = Quantizer(spec, dynamic=True, name="fc.weight")
    assert torch.equal(dynamic(w), expected)


def test_learned_scales_train_every_group_including_the_short_one():
    w = torch.randn(8, 576)
    q = Quantizer(INT4_G128, name="fc.weight")
    q.mode = "calibrating"
    q(w)
    q.freeze()
    q.make_learnable()
    x = w.clone().requires_grad_()
    out = q(x)
    assert torch.equal(out.detach(), _rtn_per_group(w, INT4_G128))
    (out * torch.randn_like(out)).sum().backward()
    assert q.scale.grad.shape == (8, 5) and bool((q.scale.grad != 0).all())
    assert x.grad.shape == w.shape
    # A learnable quantizer with no range yet, sized by make_learnable(shape=...), takes its first batch's.
    fresh = Quantizer(INT4_G128, name="fc.weight")
    fresh.make_learnable(shape=INT4_G128.param_shape(w.shape))
    fresh.train()
    assert torch.equal(fresh(w), _rtn_per_group(w, INT4_G128)) and fresh.mode == "learned"


def test_state_dict_round_trip_and_integer_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 24), nn.ReLU(), nn.Linear(24, 5))
    config = QuantConfig(name="g128", default=LayerQuant(weight=TensorQuant(spec=INT4_G128)))
    qmodel = lowbit.quantize(model, None, config, progress=False)
    layer = qmodel[0]
    ints = layer.integer_params().weight
    assert ints.values.shape == (24, 576) and ints.scale.shape == (24, 5)
    scale = compute_qparams(*tensor_minmax(model[0].weight.detach(), INT4_G128), INT4_G128)[0]
    assert torch.equal(ints.scale, scale)
    # The integers times their group's scale are the simulated weight (the last 64 columns: group 4).
    dequantized = ints.values.float() * scale.repeat_interleave(128, dim=1)[:, :576]
    assert torch.equal(dequantized, _rtn_per_group(model[0].weight.detach(), INT4_G128))
    state = qmodel.state_dict()
    again = lowbit.quantize(model, None, config, progress=False)
    again.load_state_dict(state)
    x = torch.randn(3, 576)
    with torch.no_grad():
        assert torch.equal(again(x), qmodel(x))
