"""ResNet-18 (torchvision's layout and parameter names), randomly initialised from a seed.

No pretrained weights exist offline, so this model is for latency and size benchmarks
and for exercising the quantization passes on a standard residual topology, not for
accuracy.  Parameter and buffer names match torchvision's ``resnet18`` state dict
(``conv1.weight``, ``layer1.0.bn1.running_mean``, ``layer2.0.downsample.0.weight``,
``fc.bias``, ...), and the parameter count is the same (11,689,512 for 1000 classes).

One deliberate difference: torchvision's BasicBlock calls one ``relu`` module twice;
here each block has ``relu1`` (after bn1) and ``relu2`` (after the residual add), so a
per-module observer or quantizer sees exactly one tensor.  ReLUs hold no parameters,
so the state dict is unaffected.

Example::

    from lowbit.zoo import resnet18
    model = resnet18(seed=0).eval()
    logits = model(torch.randn(1, 3, 224, 224))   # (1, 1000)
"""

from __future__ import annotations

import torch
from torch import nn

# Blocks per stage and output channels per stage for ResNet-18.
_LAYERS = (2, 2, 2, 2)
_WIDTHS = (64, 128, 256, 512)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a shortcut; the shortcut is a 1x1 conv + BN
    (``downsample``) when the block changes resolution or width, else the identity."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)  # plain add: no in-place update of a hooked tensor


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) -> four stages of BasicBlocks
    (stride 1, 2, 2, 2) -> global average pool -> ``fc``.  Input (N, 3, H, W);
    output logits (N, num_classes)."""

    def __init__(self, layers: tuple[int, ...] = _LAYERS, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, _WIDTHS[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(_WIDTHS[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = _WIDTHS[0]
        for i, (n_blocks, width) in enumerate(zip(layers, _WIDTHS, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_ch, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)
        # torchvision's init for convs and norms; fc keeps nn.Linear's default, as there.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 512, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, seed: int = 0) -> ResNet:
    """ResNet-18 with random weights drawn from ``seed``.

    The global RNG is forked, so building the model neither depends on nor changes
    the caller's ``torch`` random state.

    Args:
        num_classes: width of the final ``fc`` layer.
        seed: seed for the weight initialisation; the same seed gives the same weights.

    Returns:
        The model in eval mode (its BatchNorm running stats are the identity: mean 0, var 1).

    Example::

        model = resnet18(seed=1)
        sum(p.numel() for p in model.parameters())   # 11689512
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet(num_classes=num_classes)
    return model.eval()
