"""scikit-learn's handwritten digits, upscaled and distorted into a task worth quantizing.

The 1797 8x8 digit images that ship with scikit-learn are easy as they are (a small CNN
reaches ~98 %, and 4-bit PTQ costs it nothing).  Here they are upscaled (bilinear) to
``size`` x ``size`` and distorted by seeded random affine transforms (rotation, scale,
shear, translation) plus Gaussian pixel noise, the same distribution for training
(fresh draws every batch) and test (a fixed draw of the held-out digits, ``test_views``
views of each).  A compact network then sits around 90-97 %, with small margins, which
is where low-bit quantization shows.

Example::

    from lowbit.zoo.digits import DigitsTask
    task = DigitsTask(size=16, seed=0)
    x, y = task.train_batch(torch.arange(64), generator)     # fresh distortions
    task.test_x.shape                                        # (1080, 1, 16, 16)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._optional import import_optional

INSTALL_HINT = "pip install scikit-learn  (or the lowbit[zoo] extra)"


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` float32 in [0, 1] and their labels ``(N,)`` int64."""
    datasets = import_optional("sklearn.datasets", "lowbit.zoo.digits", INSTALL_HINT)
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)


def distort(x: torch.Tensor, size: int, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Upscale ``(N, 1, 8, 8)`` digits to ``size`` and apply one random distortion per image.

    Rotation up to +-20 degrees, scale 0.8-1.2, shear up to 0.2, translation up to 15 % of the
    side, then Gaussian noise of standard deviation 0.1 (all times ``strength``).

    Returns:
        ``(N, 1, size, size)`` float32 (not clipped: the noise can leave [0, 1]).
    """
    n = len(x)
    u = torch.rand(n, 5, generator=generator) * 2 - 1  # one row of uniforms in [-1, 1] per image
    angle = u[:, 0] * math.radians(20) * strength
    scale = 1 + u[:, 1] * 0.2 * strength
    shear = u[:, 2] * 0.2 * strength
    tx, ty = u[:, 3] * 0.15 * strength, u[:, 4] * 0.15 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, shear - sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    big = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    out = F.grid_sample(big, grid, align_corners=False, padding_mode="zeros")
    return out + (0.1 * strength) * torch.randn(out.shape, generator=generator)


@dataclass
class DigitsTask:
    """A seeded split of the digits and its fixed, distorted test set.

    Args:
        size: side of the images the model sees.
        seed: seed of the train/test split and of the test distortions.
        test_fraction: share of the 1797 digits held out.
        test_views: distorted views of each held-out digit in the test set.
        strength: distortion strength (1.0: the ranges in ``distort``).
    """

    size: int = 16
    seed: int = 0
    test_fraction: float = 0.3
    test_views: int = 2
    strength: float = 1.0

    def __post_init__(self) -> None:
        x, y = load_digits()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_test = round(self.test_fraction * len(x))
        test, train = perm[:n_test], perm[n_test:]
        self.train_images, self.train_labels = x[train], y[train]
        gen = torch.Generator().manual_seed(10_000 + self.seed)
        views = [distort(x[test], self.size, gen, self.strength) for _ in range(self.test_views)]
        self.test_x = torch.cat(views)
        self.test_y = y[test].repeat(self.test_views)

    @property
    def n_train(self) -> int:
        return len(self.train_images)

    def train_batch(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Freshly distorted training images ``index`` and their labels."""
        return distort(self.train_images[index], self.size, generator, self.strength), self.train_labels[index]

    def train_views(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` distorted training images (cycling through the training digits), seeded:
        calibration or selection data that never touches the test digits."""
        gen = torch.Generator().manual_seed(seed)
        index = torch.randperm(self.n_train, generator=gen).repeat(math.ceil(n / self.n_train))[:n]
        return self.train_batch(index, gen)
