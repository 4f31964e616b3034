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


def test_a_token_mask_leaves_padding_out_of_every_figure():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 8)
    cand = ref.clone()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    cand[mask == 0] = 100 * torch.randn(3, 8)  # padding positions: far off
    masked = fidelity(ref, cand, mask)
    assert masked["cosine"] == pytest.approx(1.0) and masked["max_abs_diff"] == 0.0
    unmasked = fidelity(ref, cand)
    assert unmasked["cosine"] < 0.5 and unmasked["max_abs_diff"] > 10
    with pytest.raises(ValueError, match="does not cover outputs"):
        fidelity(ref, cand, mask[:, :4])


def test_compare_counts_real_tokens_of_per_token_outputs():
    """A per-token output and a tokenizer-style attention_mask: the FP32 rows agree on real
    tokens, whatever the padding positions hold, and the report says so."""
    from torch import nn

    import lowbit

    class PerToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.ff = nn.Embedding(16, 8), nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask):
            return self.ff(self.embed(input_ids))

    torch.manual_seed(0)
    model = PerToken().eval()
    batch = {"input_ids": torch.randint(0, 16, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.int64)}
    batch["attention_mask"][:, 4:] = 0
    qmodel = lowbit.quantize(model, [batch], "w8a8", progress=False)
    report = lowbit.compare(model, qmodel, inputs=batch)
    assert any("real tokens only" in note for note in report.notes)
    rows = {r["model"]: r["metrics"] for r in report.rows}
    with torch.no_grad():
        expected = fidelity(model(**batch), qmodel(**batch), batch["attention_mask"])
    assert rows["quantized"] == pytest.approx(expected)
