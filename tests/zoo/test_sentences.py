"""Sentences from standard-library docstrings: count, shape of each, determinism."""

from __future__ import annotations

import pytest

from lowbit.zoo.sentences import MAX_WORDS, MIN_WORDS, _is_prose, english_sentences, sentence_pool


def test_default_count_and_each_sentence_is_prose():
    sentences = english_sentences()
    assert len(sentences) == 300 == len(set(sentences))
    for s in sentences:
        assert MIN_WORDS <= len(s.split()) <= MAX_WORDS, s
        assert s[0].isupper() and s.endswith("."), s
        assert ">>>" not in s and "=" not in s, s


def test_pool_is_large_and_sorted():
    pool = sentence_pool()
    assert len(pool) >= 1000
    assert list(pool) == sorted(set(pool))


def test_seed_determines_the_list():
    assert english_sentences(50, seed=7) == english_sentences(50, seed=7)
    assert english_sentences(50, seed=7) != english_sentences(50, seed=8)
    assert english_sentences(10, seed=7) == english_sentences(300, seed=7)[:10]  # a prefix, not a redraw


def test_out_of_range_n_raises():
    assert english_sentences(0) == []
    with pytest.raises(ValueError, match="sentences available"):
        english_sentences(len(sentence_pool()) + 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Return the number of items in the queue.", True),
        ("Return x = y + 1 for the given value.", False),  # code
        ("Call foo() to start the loop again now.", False),  # code
        ("Too short sentence.", False),
        ("lowercase start is not a sentence start here.", False),
        ("This one has no final full stop at all", False),
    ],
)
def test_is_prose(text, expected):
    assert _is_prose(text) is expected
