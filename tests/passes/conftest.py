"""Shared fixtures for the graph-pass tests."""

import pytest

from lowbit.passes import fold_batchnorm


@pytest.fixture(scope="module")
def folded():
    """MobileNetV2 with its ImageNet weights, BatchNorm folded (one per test module)."""
    from lowbit.zoo import mobilenet_v2

    try:
        model = mobilenet_v2(pretrained=True)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))
    return fold_batchnorm(model)[0]
