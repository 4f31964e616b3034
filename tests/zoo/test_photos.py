"""Photos: bundled real images, seeded crops, shapes, ranges, batching."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("skimage", reason="needs scikit-image: pip install scikit-image (or lowbit[zoo])")
pytest.importorskip("sklearn", reason="needs scikit-learn: pip install scikit-learn (or lowbit[zoo])")

from lowbit.zoo.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD
from lowbit.zoo.photos import PHOTO_NAMES, imagenet_photos, load_photos, photo_batches

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_load_photos_are_rgb_uint8():
    photos = load_photos()
    assert tuple(photos) == PHOTO_NAMES and len(photos) == 17
    for name, image in photos.items():
        assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 190, name
        assert image.std() > 5, name  # a real photo, not a blank
    assert photos["chelsea"].shape == (300, 451, 3)


def test_shape_dtype_and_normalized_range():
    x = imagenet_photos(n=20, seed=0, size=64)
    assert x.shape == (20, 3, 64, 64) and x.dtype == torch.float32
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert bool((x >= lo - 1e-5).all()) and bool((x <= hi + 1e-5).all())
    assert x.std() > 0.5  # varied content: ImageNet-normalized photos have std near 1


def test_same_seed_same_samples_other_seed_different():
    a = imagenet_photos(n=18, seed=3, size=48)
    assert torch.equal(a, imagenet_photos(n=18, seed=3, size=48))
    b = imagenet_photos(n=18, seed=4, size=48)
    assert not torch.equal(a, b)
    # Each sample is a different crop: no two samples are the same.
    assert len({tuple(s.flatten()[:64].tolist()) for s in a}) == 18


def test_raw_crops_are_the_unnormalized_samples():
    raw = imagenet_photos(n=8, seed=1, size=32, raw=True)
    x = imagenet_photos(n=8, seed=1, size=32)
    assert raw.dtype == torch.uint8 and raw.shape == (8, 3, 32, 32)
    # rounding to uint8 moves a value by at most half a level: 0.5 / 255 / std
    torch.testing.assert_close((raw.float() / 255 - MEAN) / STD, x, atol=0.5 / 255 / 0.224 + 1e-6, rtol=0)


def test_batches_equal_the_whole_and_repeat():
    batches = photo_batches(n=21, seed=2, size=32, batch_size=8)
    assert len(batches) == 3
    first = list(batches)
    assert [b.shape[0] for b in first] == [8, 8, 5]
    assert torch.equal(torch.cat(first), imagenet_photos(n=21, seed=2, size=32))
    assert all(torch.equal(p, q) for p, q in zip(first, batches, strict=True))  # re-iterable, same tensors


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="positive"):
        photo_batches(n=0)
    with pytest.raises(ValueError, match="positive"):
        imagenet_photos(n=4, size=0)
