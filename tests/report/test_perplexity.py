"""perplexity: against a direct computation with F.cross_entropy, a uniform model (= vocabulary
size), windows scored independently, quantized HF models, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers", reason="needs transformers: pip install -c constraints.txt transformers")

import lowbit
from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import QuantSpec
from lowbit.report import Perplexity, perplexity
from lowbit.report.perplexity import window_nll
from lowbit.zoo.tiny_llama import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0, initializer_range=0.2)  # larger weights: logits far from uniform


def windows(n: int = 3, length: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def reference(model: nn.Module, ids: torch.Tensor) -> float:
    """exp(mean NLL): every window on its own, F.cross_entropy of logits[t-1] against token t."""
    losses = []
    with torch.no_grad():
        for row in ids:
            logits = model(row[None]).logits[0]  # (T, V)
            losses.append(F.cross_entropy(logits[:-1], row[1:], reduction="none"))
    return math.exp(torch.cat(losses).mean().item())


def test_matches_a_direct_computation(model):
    ids = windows()
    result = perplexity(model, ids, progress=False)
    assert isinstance(result, Perplexity)
    assert result.perplexity == pytest.approx(reference(model, ids), rel=1e-6)
    assert result.tokens == 3 * 16 and result.windows == 3 and result.seconds > 0
    assert result.nll == pytest.approx(math.log(result.perplexity), rel=1e-12)
    assert 256 * 1.05 < result.perplexity  # random tokens, non-uniform logits: worse than uniform


def test_batch_size_does_not_change_the_result(model):
    ids = windows(5)
    one = perplexity(model, ids, progress=False)
    for batch_size in (2, 5, 8):
        assert perplexity(model, ids, batch_size=batch_size, progress=False).nll == pytest.approx(one.nll, rel=1e-5)


def test_windows_are_scored_without_carried_context(model):
    a, b = windows(1, seed=1), windows(1, seed=2)
    both = perplexity(model, torch.cat([a, b]), progress=False)
    alone = [perplexity(model, w, progress=False).nll for w in (a, b)]
    assert both.nll == pytest.approx(sum(alone) / 2, rel=1e-6)


class Uniform(nn.Module):
    """Equal logits for every token: perplexity = vocabulary size, whatever the text.  Returns the
    logits tensor itself (no .logits), which perplexity accepts too."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids):
        return self.scale * torch.full((*input_ids.shape, self.vocab), 3.0)


def test_uniform_logits_give_the_vocabulary_size():
    result = perplexity(Uniform(37), torch.randint(0, 37, (4, 9)), batch_size=3, progress=False)
    assert result.perplexity == pytest.approx(37, rel=1e-6)  # float32 log-softmax


def test_window_nll_is_summed_per_window():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = torch.stack([-logits[b, :-1].log_softmax(-1)[torch.arange(4), ids[b, 1:]].sum() for b in range(2)])
    torch.testing.assert_close(window_nll(logits, ids), expected.double(), rtol=1e-6, atol=1e-6)


def test_a_quantized_copy_is_measured_too(model):
    ids = windows(2)
    config = QuantConfig(default=LayerQuant(weight=TensorQuant(spec=QuantSpec(bits=8, granularity="channel",
                                                                               axis=0))))
    qmodel = lowbit.quantize(model, None, config, progress=False)
    assert type(qmodel.model.layers[0].mlp.up_proj) is not nn.Linear  # its linears were swapped
    float_ppl, q_ppl = perplexity(model, ids, progress=False), perplexity(qmodel, ids, progress=False)
    assert q_ppl.perplexity == pytest.approx(reference(qmodel, ids), rel=1e-6)
    assert q_ppl.perplexity != float_ppl.perplexity
    assert q_ppl.perplexity == pytest.approx(float_ppl.perplexity, rel=0.05)  # 8 bits: close to float


class NoLogits(nn.Module):
    def forward(self, input_ids):
        return {"hidden": input_ids.float()}


class NaNAfterFirst(Uniform):
    def forward(self, input_ids):
        out = super().forward(input_ids).clone()
        out[1:, 3] = float("nan")
        return out


def test_bad_inputs_and_models_get_clear_errors(model):
    with pytest.raises(ValueError, match="LongTensor"):
        perplexity(model, windows().float(), progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        perplexity(model, windows()[0], progress=False)
    with pytest.raises(ValueError, match="2\\+ tokens"):
        perplexity(model, windows(3, 1), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, windows(), batch_size=0, progress=False)
    with pytest.raises(TypeError, match="no .logits"):
        perplexity(NoLogits(), windows(), progress=False)
    with pytest.raises(ValueError, match="window 1 has a non-finite loss"):
        perplexity(NaNAfterFirst(256), windows(), batch_size=2, progress=False)
