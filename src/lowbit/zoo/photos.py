"""Real photos for calibrating and evaluating ImageNet models, without any download.

The sources are the sample images that ship inside scikit-image (``skimage.data``,
only those stored in the wheel: the rest need ``pooch`` and a network) and
scikit-learn (``load_sample_images``: china.jpg, flower.jpg).  Grayscale photos are
repeated to RGB.  From these 17 photos, ``imagenet_photos`` draws any number of
inputs by seeded random resized crops (scale 25-100 % of the area, aspect 3:4-4:3)
and horizontal flips, the augmentation ImageNet models were trained with, so the
activation ranges seen in calibration resemble real ones.

Photo ``i % 17`` feeds sample ``i``, so every photo is used equally often and any
batch of 17 or more covers all of them.

Example::

    from lowbit.zoo import imagenet_photos, photo_batches
    x = imagenet_photos(n=64, seed=0)                      # (64, 3, 224, 224) float32, normalized
    for batch in photo_batches(n=256, batch_size=32):      # re-iterable: a calibration loader
        model(batch)
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ._optional import import_optional
from .mobilenet_v2 import normalize

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install scikit-image scikit-learn  (or the lowbit[zoo] extra)"

# scikit-image photos stored in its wheel (checked for 0.26): natural scenes and objects,
# three texture close-ups, a microscope slide, a retina and a deep-sky image.
# Left out: drawings and synthetic images (logo, colorwheel, text, page, horse, cell).
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket",
)
SKLEARN_PHOTOS = ("china", "flower")
PHOTO_NAMES = SKIMAGE_PHOTOS + SKLEARN_PHOTOS

_SCALE = (0.25, 1.0)  # fraction of the photo's area a crop covers
_RATIO = (3 / 4, 4 / 3)  # crop width / height


def _import(name: str):
    return import_optional(name, "lowbit.zoo.photos", INSTALL_HINT)

def _to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> contiguous (H, W, 3) uint8."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def _photos_chw() -> tuple[torch.Tensor, ...]:
    """All photos as (3, H, W) uint8 tensors, in ``PHOTO_NAMES`` order (about 14 MB)."""
    data = _import("skimage.data")
    datasets = _import("sklearn.datasets")
    images = []
    for name in SKIMAGE_PHOTOS:
        # `motorcycle` is the left view of the stereo pair (the only motorcycle image bundled).
        image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        images.append(image)
    sample = datasets.load_sample_images()
    files = zip(sample.filenames, sample.images, strict=True)
    by_stem = {path.rsplit("/", 1)[-1].split(".")[0]: image for path, image in files}
    images += [by_stem[name] for name in SKLEARN_PHOTOS]
    log.info("loaded %d photos from scikit-image and scikit-learn", len(images))
    return tuple(torch.tensor(_to_rgb(im)).permute(2, 0, 1).contiguous() for im in images)


def load_photos() -> dict[str, np.ndarray]:
    """The source photos by name, as (H, W, 3) uint8 RGB arrays (copies).

    Example::

        cat = load_photos()["chelsea"]    # (300, 451, 3)
    """
    photos = zip(PHOTO_NAMES, _photos_chw(), strict=True)
    return {name: t.permute(1, 2, 0).numpy().copy() for name, t in photos}


def _crop_box(h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width) in pixels, seeded."""
    area = h * w
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(10):
        u = torch.rand(2, generator=gen).tolist()
        target = area * (_SCALE[0] + u[0] * (_SCALE[1] - _SCALE[0]))
        ratio = math.exp(log_lo + u[1] * (log_hi - log_lo))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
    side = min(h, w)  # fallback: the central square
    return (h - side) // 2, (w - side) // 2, side, side


def _sample(photo: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random crop of a (3, H, W) uint8 photo -> (3, size, size) float32 in [0, 1]."""
    top, left, ch, cw = _crop_box(photo.shape[1], photo.shape[2], gen)
    crop = photo[None, :, top : top + ch, left : left + cw].float().div_(255.0)
    # Antialiased bilinear has a non-negative kernel, so the result stays within [0, 1].
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if float(torch.rand(1, generator=gen)) < 0.5:
        out = out.flip(-1)
    return out


def _check(n: int, size: int, batch_size: int) -> None:
    if n < 1 or size < 1 or batch_size < 1:
        raise ValueError(
            f"n, size and batch_size must be positive, got n={n}, size={size}, batch_size={batch_size}"
        )


class PhotoBatches:
    """A re-iterable sequence of photo batches: every pass yields the same tensors.

    Build it with ``photo_batches``.  ``len()`` is the number of batches; the last one
    may be smaller.  Each batch is (B, 3, size, size): float32 ImageNet-normalized,
    or uint8 in [0, 255] with ``raw=True``.
    """

    def __init__(self, n: int, seed: int, size: int, batch_size: int, raw: bool):
        _check(n, size, batch_size)
        self.n, self.seed, self.size, self.batch_size, self.raw = n, seed, size, batch_size, raw

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        photos = _photos_chw()
        gen = torch.Generator().manual_seed(self.seed)  # one stream: sample i depends on seed and i only
        for start in range(0, self.n, self.batch_size):
            stop = min(start + self.batch_size, self.n)
            samples = [_sample(photos[i % len(photos)], self.size, gen) for i in range(start, stop)]
            batch = torch.stack(samples)
            if self.raw:
                yield batch.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
            else:
                yield normalize(batch)

    def __repr__(self) -> str:
        return (f"PhotoBatches(n={self.n}, seed={self.seed}, size={self.size}, "
                f"batch_size={self.batch_size}, raw={self.raw})")


def photo_batches(n: int = 256, seed: int = 0, size: int = 224, batch_size: int = 32,
                  raw: bool = False) -> PhotoBatches:
    """Batches of ``imagenet_photos`` without holding all ``n`` in memory at once.

    Args:
        n: total number of samples.
        seed: seed of the crops and flips; a seed gives the same samples on every pass.
        size: side of the square samples, in pixels.
        batch_size: samples per batch (the last batch may be smaller).
        raw: uint8 crops in [0, 255] instead of normalized float32.

    Returns:
        A re-iterable ``PhotoBatches``; concatenated, its batches equal
        ``imagenet_photos(n, seed, size, raw)``.

    Example::

        for x in photo_batches(n=128, batch_size=16):
            model(x)
    """
    return PhotoBatches(n, seed, size, batch_size, raw)


def imagenet_photos(n: int = 256, seed: int = 0, size: int = 224, raw: bool = False) -> torch.Tensor:
    """``n`` seeded random crops of real photos, preprocessed for ImageNet models.

    Args:
        n: number of samples (256 at 224 px take 154 MB as float32; use ``photo_batches``
            to stream instead).
        seed: seed of the crops and flips.
        size: side of the square samples, in pixels.
        raw: return the uint8 crops (N, 3, size, size) in [0, 255], not normalized.

    Returns:
        float32 tensor (n, 3, size, size), normalized with the ImageNet mean/std
        (roughly in [-2.2, 2.7]); or uint8 with ``raw=True``.

    Example::

        x = imagenet_photos(n=32, seed=1)
        model(x).argmax(1)
    """
    return torch.cat(list(photo_batches(n, seed, size, batch_size=64, raw=raw)))
