"""Labelled tasks built from bundled data: digits, photo patches, docstring topics.

They feed the QAT benchmark, so what matters is that they are seeded, balanced, keep test
data apart from training data, and have the shapes and labels the docstrings promise.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn", reason="needs scikit-learn: pip install -c constraints.txt scikit-learn")

from lowbit.zoo.digits import DigitsTask, distort, load_digits
from lowbit.zoo.docstring_topics import TOPICS, topic_pool, topic_sentences


# -- digits -----------------------------------------------------------------------------------
def test_load_digits_shapes_and_range():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))


def test_distort_is_seeded_and_changes_the_image():
    x, _ = load_digits()
    a = distort(x[:8], 16, torch.Generator().manual_seed(3))
    b = distort(x[:8], 16, torch.Generator().manual_seed(3))
    c = distort(x[:8], 16, torch.Generator().manual_seed(4))
    assert a.shape == (8, 1, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # strength 0 is a plain bilinear upscale: no rotation, no noise
    plain = distort(x[:8], 16, torch.Generator().manual_seed(3), strength=0.0)
    upscaled = torch.nn.functional.interpolate(x[:8], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(plain, upscaled, atol=1e-5, rtol=0)


def test_digits_task_split_is_disjoint_and_seeded():
    task = DigitsTask(size=12, seed=1, test_views=2)
    n_test = round(0.3 * 1797)
    assert task.n_train == 1797 - n_test
    assert task.test_x.shape == (2 * n_test, 1, 12, 12) and task.test_y.shape == (2 * n_test,)
    again = DigitsTask(size=12, seed=1, test_views=2)
    assert torch.equal(task.test_x, again.test_x) and torch.equal(task.train_images, again.train_images)
    # no training digit is also a test digit (the raw 8x8 images are compared)
    x, _ = load_digits()
    train = {tuple(img.flatten().tolist()) for img in task.train_images}
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(1))
    test_ids = perm[:n_test]
    overlap = sum(tuple(x[i].flatten().tolist()) in train for i in test_ids.tolist())
    duplicates_in_sklearn = sum(  # a handful of identical images exist in the data set itself
        tuple(x[i].flatten().tolist()) in {tuple(x[j].flatten().tolist()) for j in perm[n_test:].tolist()}
        for i in test_ids.tolist()
    )
    assert overlap == duplicates_in_sklearn
    xb, yb = task.train_batch(torch.arange(5), torch.Generator().manual_seed(0))
    assert xb.shape == (5, 1, 12, 12) and torch.equal(yb, task.train_labels[:5])
    views, labels = task.train_views(4, seed=9)
    views2, _ = task.train_views(4, seed=9)
    assert torch.equal(views, views2) and labels.shape == (4,)


# -- photo patches ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patches():
    pytest.importorskip("skimage", reason="needs scikit-image: pip install -c constraints.txt scikit-image")
    from lowbit.zoo.photo_patches import PhotoPatchTask

    return PhotoPatchTask(size=16, test_per_photo=3, train_patches=68, seed=0)


def test_photo_patches_shapes_balance_and_regions(patches):
    from lowbit.zoo.photos import PHOTO_NAMES

    k = len(PHOTO_NAMES)
    assert patches.num_classes == k
    assert patches.test_x.shape == (3 * k, 3, 16, 16)
    assert torch.bincount(patches.test_y, minlength=k).tolist() == [3] * k
    assert torch.bincount(patches.train_labels, minlength=k).tolist() == [68 // k] * k
    assert patches.train_bank.dtype == torch.float16  # the bank is stored at half precision
    for train, test in zip(patches.train_regions, patches.test_regions, strict=True):
        # train is the left 70 % of the photo, test the rest: together the whole width, no overlap
        assert train.shape[1] == test.shape[1]
        assert abs(test.shape[2] / (train.shape[2] + test.shape[2]) - 0.3) < 0.01


def test_photo_patches_train_batch_flips_only(patches):
    x, y = patches.train_batch(torch.arange(10), torch.Generator().manual_seed(0))
    bank = patches.train_bank[:10].float()
    assert torch.equal(y, patches.train_labels[:10])
    for got, ref in zip(x, bank, strict=True):
        assert torch.equal(got, ref) or torch.equal(got, ref.flip(-1))


def test_photo_patches_are_seeded():
    pytest.importorskip("skimage", reason="needs scikit-image")
    from lowbit.zoo.photo_patches import PhotoPatchTask

    a = PhotoPatchTask(size=8, test_per_photo=1, train_patches=17, seed=5)
    b = PhotoPatchTask(size=8, test_per_photo=1, train_patches=17, seed=5)
    c = PhotoPatchTask(size=8, test_per_photo=1, train_patches=17, seed=6)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_bank, b.train_bank)
    assert not torch.equal(a.test_x, c.test_x)
    views, labels = a.train_views(6, seed=1)
    assert views.shape == (6, 3, 8, 8) and int(labels.max()) < a.num_classes


# -- docstring topics -------------------------------------------------------------------------
def test_topic_pool_has_no_sentence_under_two_topics():
    pools = topic_pool()
    assert len(pools) == len(TOPICS)
    seen: set[str] = set()
    for pool in pools:
        assert len(pool) >= 50, "every topic has enough sentences for the benchmark"
        assert not seen & set(pool)
        seen |= set(pool)


def test_topic_sentences_balanced_seeded_and_prefix_stable():
    texts, labels = topic_sentences(per_topic=10, seed=2)
    assert len(texts) == len(labels) == 60
    assert sorted(labels) == sorted(list(range(6)) * 10)
    pools = topic_pool()
    assert all(t in pools[label] for t, label in zip(texts, labels, strict=True))
    assert topic_sentences(per_topic=10, seed=2) == (texts, labels)
    more, more_labels = topic_sentences(per_topic=20, seed=2)
    assert set(zip(texts, labels, strict=True)) <= set(zip(more, more_labels, strict=True))


def test_topic_sentences_rejects_too_many():
    smallest = min(len(p) for p in topic_pool())
    with pytest.raises(ValueError, match="per_topic must be in"):
        topic_sentences(per_topic=smallest + 1)
