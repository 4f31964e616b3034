"""A 17-way image task without a download: which bundled photo a small patch was cut from.

The photos are those of ``lowbit.zoo.photos`` (scikit-image and scikit-learn samples).  Each
photo is split by columns: patches for training come from its left ``1 - test_fraction``, test
patches from the rest, so no test pixel was ever seen in training and the model has to
recognise a photo from its colours and textures, not from memorised pixels.  A patch is a
random square (``min_side``..``max_side`` pixels, resized to ``size`` with antialiasing).
Training draws from a fixed, seeded bank of ``train_patches`` patches (cutting patches is the
slow part), each flipped at random every time it is drawn.  Labels are photo indices
(``PHOTO_NAMES`` order), balanced.

Example::

    from lowbit.zoo.photo_patches import PhotoPatchTask
    task = PhotoPatchTask(size=32, seed=0)
    x, y = task.train_batch(torch.arange(64), generator)   # (64, 3, 32, 32), labels 0..16
    task.test_x.shape                                      # (17 * test_per_photo, 3, 32, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .photos import PHOTO_NAMES, _photos_chw

MEAN, STD = 0.45, 0.25  # one value for every channel: several photos are grey


@dataclass
class PhotoPatchTask:
    """Seeded patch sampler and fixed test set.

    Args:
        size: side of the patches the model sees.
        test_fraction: share of each photo's width (its right side) reserved for test patches.
        min_side, max_side: side of the square cut from the photo before resizing, in pixels.
        test_per_photo: test patches per photo.
        train_patches: size of the training bank.
        seed: seed of the training bank and of the test patches.
    """

    size: int = 32
    test_fraction: float = 0.3
    min_side: int = 32
    max_side: int = 96
    test_per_photo: int = 40
    train_patches: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        photos = _photos_chw()
        self.train_regions, self.test_regions = [], []
        for p in photos:
            cut = round(p.shape[2] * (1 - self.test_fraction))
            self.train_regions.append(p[:, :, :cut])
            self.test_regions.append(p[:, :, cut:])
        gen = torch.Generator().manual_seed(50_000 + self.seed)
        labels = torch.arange(len(photos)).repeat_interleave(self.test_per_photo)
        self.test_x = self._patches(self.test_regions, labels, gen, flip=False)
        self.test_y = labels
        gen = torch.Generator().manual_seed(60_000 + self.seed)
        labels = torch.arange(self.train_patches) % len(photos)
        self.train_bank = self._patches(self.train_regions, labels, gen, flip=False).half()
        self.train_labels = labels

    @property
    def num_classes(self) -> int:
        return len(PHOTO_NAMES)

    def _patches(self, regions, labels: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
        out = []
        for label in labels.tolist():
            region = regions[label]
            h, w = region.shape[1], region.shape[2]
            hi = min(self.max_side, h, w)
            side = int(torch.randint(min(self.min_side, hi), hi + 1, (1,), generator=gen))
            top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
            crop = region[None, :, top:top + side, left:left + side].float().div_(255.0)
            patch = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
            if flip and float(torch.rand(1, generator=gen)) < 0.5:
                patch = patch.flip(-1)
            out.append(patch)
        return (torch.stack(out) - MEAN) / STD

    @property
    def n_train(self) -> int:
        return len(self.train_labels)

    def train_batch(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training patches ``index`` of the bank, each flipped with probability 1/2, and their labels."""
        x = self.train_bank[index].float()
        flip = torch.rand(len(index), generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
        return x, self.train_labels[index]

    def train_views(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` new seeded patches from the training regions (calibration or selection data;
        never test pixels, not in the bank)."""
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, self.num_classes, (n,), generator=gen)
        return self._patches(self.train_regions, labels, gen, flip=True), labels
