"""fidelity: agreement of a candidate's outputs with the reference's, on known cases."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.report import fidelity


def test_identical_logits_agree_perfectly():
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    out = fidelity(x, x.clone())
    assert set(out) == {"cosine", "max_abs_diff", "top1_agreement", "kl"}
    assert out["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert out["max_abs_diff"] == 0.0 and out["top1_agreement"] == 1.0 and out["kl"] == 0.0
    assert all(isinstance(v, float) for v in out.values())


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"output shapes differ: reference \(4, 3\) vs candidate \(4, 2\)"):
        fidelity(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity(torch.zeros(4, 3), torch.zeros(3, 4))


def test_hand_built_case():
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    cand = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    out = fidelity(ref, cand)
    assert out["top1_agreement"] == 0.5  # samples 0 and 3 agree
    assert out["cosine"] == pytest.approx((1 + 0 + 0 + 1) / 4, abs=1e-6)
    assert out["max_abs_diff"] == 2.0

    # KL(softmax(ref) || softmax(cand)), averaged over samples, in nats.
    def kl(p_logits, q_logits):
        p, q = torch.softmax(p_logits, 0), torch.softmax(q_logits, 0)
        return float((p * (p / q).log()).sum())

    expected = sum(kl(r, c) for r, c in zip(ref, cand)) / 4
    assert out["kl"] == pytest.approx(expected, rel=1e-5)
    assert out["kl"] > 0
    # Direction matters: it is KL(ref || cand), not the reverse.
    reverse = sum(kl(c, r) for r, c in zip(ref, cand)) / 4
    assert not math.isclose(expected, reverse, rel_tol=1e-3)


def test_cosine_is_per_sample_then_averaged():
    ref = torch.tensor([[1.0, 1.0], [1.0, 0.0], [3.0, 4.0]])
    cand = torch.tensor([[2.0, 2.0], [-1.0, 0.0], [4.0, 3.0]])
    out = fidelity(ref, cand)
    assert out["cosine"] == pytest.approx((1.0 - 1.0 + 24 / 25) / 3, abs=1e-6)  # scale-free per sample


def test_non_logit_outputs_report_only_cosine_and_max_diff():
    g = torch.Generator().manual_seed(1)
    feature_maps = torch.randn(2, 3, 4, 4, generator=g)
    out = fidelity(feature_maps, feature_maps * 2)
    assert set(out) == {"cosine", "max_abs_diff"}
    assert out["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert out["max_abs_diff"] == pytest.approx(feature_maps.abs().max().item())
    assert set(fidelity(torch.randn(6, 1), torch.randn(6, 1))) == {
        "cosine",
        "max_abs_diff",
    }  # one logit: no argmax
    assert set(fidelity(torch.randn(6), torch.randn(6))) == {"cosine", "max_abs_diff"}


def test_dtypes_are_compared_in_float32():
    x = torch.randn(4, 3, dtype=torch.float64)
    out = fidelity(x, x.half())
    assert out["top1_agreement"] == 1.0 and out["max_abs_diff"] < 1e-2


def test_gradients_are_not_needed():
    x = torch.randn(3, 4, requires_grad=True)
    out = fidelity(x * 2, x * 2)  # outputs of a model run with autograd on
    assert out["max_abs_diff"] == 0.0


def test_identical_outputs_with_an_all_zero_sample_have_cosine_one():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    assert fidelity(x, x.clone())["cosine"] == pytest.approx(1.0)
