"""fold_batchnorm: exact on MobileNetV2 and on hand-built models, with and without fx."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.passes import fold_batchnorm
from lowbit.passes.fold_bn import fold_into


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=gen))
                m.bias.data.copy_(torch.randn(c, generator=gen))
    return model.eval()


class Branchy(nn.Module):
    """Not a Sequential: conv->bn in forward, a depthwise conv, a conv whose output also feeds
    a skip (its BN must stay), Linear->BN1d, Conv1d->BN1d, and a conv called twice (shared)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.skip_conv = nn.Conv2d(8, 8, 1)
        self.skip_bn = nn.BatchNorm2d(8)  # its input is also used by the add: not foldable
        self.shared = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)  # follows a conv called twice: not foldable
        self.seq_conv = nn.Conv1d(8, 6, 1)
        self.seq_bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 5)
        self.fc_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.dw_bn(self.dw(x)))
        s = self.skip_conv(x)
        x = self.skip_bn(s) + s
        x = self.shared_bn(self.shared(x)) + self.shared(x)
        x = self.seq_bn(self.seq_conv(x.flatten(2)))  # (N, 6, H*W)
        return self.fc_bn(self.fc(x.mean(-1)))


class Untraceable(nn.Module):
    """Data-dependent control flow defeats fx; the Sequential inside still folds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)  # called from forward: only fx would see this pair

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:
            x = x * 2
        return self.bn(self.conv(x))


@pytest.fixture(scope="module")
def mobilenet():
    from lowbit.zoo import mobilenet_v2

    try:
        return mobilenet_v2(pretrained=True)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage")
    from lowbit.zoo import imagenet_photos

    return imagenet_photos(n=4, seed=3)


def test_mobilenet_v2_folds_every_batchnorm_and_keeps_its_outputs(mobilenet, photos):
    model, folded = fold_batchnorm(copy.deepcopy(mobilenet))
    assert len(folded) == 52  # 17 blocks x 3 (2 in the first) + stem + last conv
    assert "features.0.1" in folded and "features.1.conv.0.1" in folded and "features.18.1" in folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.features[0][1], nn.Identity)
    assert model.features[1].conv[0][0].groups == 32  # a depthwise conv, folded like the others
    with torch.no_grad():
        assert _rel(model(photos), mobilenet(photos)) < 1e-5


def test_custom_model_folds_the_safe_pairs_only():
    model = _randomize_bn(Branchy())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    folded_model, folded = fold_batchnorm(copy.deepcopy(model))
    assert folded == ["bn", "dw_bn", "seq_bn", "fc_bn"]
    assert isinstance(folded_model.skip_bn, nn.BatchNorm2d)
    assert isinstance(folded_model.shared_bn, nn.BatchNorm2d)
    assert folded_model.dw.bias is not None  # created by the fold
    with torch.no_grad():
        assert _rel(folded_model(x), expected) < 1e-5


def test_untraceable_model_falls_back_to_sequentials_and_logs_what_stayed(caplog):
    model = _randomize_bn(Untraceable())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with caplog.at_level(logging.INFO, logger="lowbit.passes"):
        _, folded = fold_batchnorm(model)
    assert folded == ["body.1", "body.3.1"]
    assert "could not trace" in caplog.text
    # The BN left in place is named.
    assert re.search(r"1 BatchNorm\(s\) stay unfolded.*: bn$", caplog.text, re.MULTILINE)
    assert isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert _rel(model(x), expected) < 1e-5


def test_batchnorm_in_training_mode_is_an_error_naming_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match=r"1: .*training mode.*model\.eval\(\)"):
        fold_batchnorm(model)


def test_batchnorm_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    _, folded = fold_batchnorm(model)
    assert folded == [] and isinstance(model[1], nn.BatchNorm2d)


def test_fold_into_matches_bn_of_layer_for_each_layer_kind():
    torch.manual_seed(0)
    cases = [
        (nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5, affine=False), torch.randn(4, 7)),
        (nn.Conv1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), torch.randn(2, 4, 9)),
        (nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6), torch.randn(2, 6, 5, 5)),
    ]
    for layer, bn, x in cases:
        _randomize_bn(bn)
        with torch.no_grad():
            expected = bn(layer(x))
            fold_into(layer, bn)
            assert _rel(layer(x), expected) < 1e-5, type(layer).__name__
