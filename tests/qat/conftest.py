import pytest
import torch
from torch import nn


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU x2, a residual add, global pool, Linear: the layer kinds QAT must handle."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            h = self.stem(x)
            h = h + self.body(h)
            return self.fc(torch.flatten(self.pool(h), 1))

    torch.manual_seed(seed)
    return Net().eval()


@pytest.fixture
def cnn():
    return small_cnn()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    return x, y
