"""quantize_residual_adds: which adds become QuantAdd, their names, and PTQ through them."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.nn.modules import QuantAdd
from lowbit.numerics import INT8_ACTIVATION, UINT8_ACTIVATION
from lowbit.passes import fold_batchnorm, quantize_residual_adds
from lowbit.ptq import quantize

MOBILENET_ADDS = [f"features.{i}.add" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]


class Block(nn.Module):
    """A ResNet basic block plus adds that must NOT be replaced (constants, shapes, parameters)."""

    def __init__(self, ch: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.offset = nn.Parameter(torch.zeros(ch, 1, 1))

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        out = out + x  # the residual add: replaced
        out = out + 1.0  # constant
        out = out + self.offset  # parameter
        n = x.size(0) + x.shape[1]  # Python ints
        return F.relu(out) * n


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.block(x)
        z = torch.add(self.head(y), y)  # top level: named add_0
        z += x  # in place, and z is not used again: replaced too (add_1)
        return z.add(y)  # method form (add_2)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent branch: fx cannot trace it
            return self.conv(x) + x
        return x


def _disable_quantizers(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantAdd):
            m.a_quantizer.mode = "disabled"
            m.b_quantizer.mode = "disabled"


@pytest.fixture(scope="module")
def mobilenet(folded):
    return folded


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage")
    from lowbit.zoo import imagenet_photos

    return imagenet_photos(n=8, seed=4)


def test_toy_block_replaces_only_tensor_plus_tensor_adds():
    model = TwoBlocks()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = model(x)
    gm, names = quantize_residual_adds(model, UINT8_ACTIVATION)
    assert names == ["block.add", "add_0", "add_1", "add_2"]
    assert isinstance(gm, fx.GraphModule) and isinstance(gm.get_submodule("block.add"), QuantAdd)
    assert gm.get_submodule("block.add").a_quantizer.name == "block.add.a"
    remaining = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(remaining) == 3  # + 1.0, + self.offset, size + shape
    _disable_quantizers(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected)


def test_shape_propagation_gives_the_same_answer():
    _, names = quantize_residual_adds(TwoBlocks(), UINT8_ACTIVATION, example_inputs=torch.randn(1, 4, 5, 5))
    assert names == ["block.add", "add_0", "add_1", "add_2"]


def test_skip_globs_and_operand_specs():
    gm, names = quantize_residual_adds(TwoBlocks(), UINT8_ACTIVATION, INT8_ACTIVATION, skip=["add_*"])
    assert names == ["block.add"]
    add = gm.get_submodule("block.add")
    assert add.a_quantizer.spec == UINT8_ACTIVATION and add.b_quantizer.spec == INT8_ACTIVATION


def test_untraceable_model_is_returned_unchanged_with_a_warning(caplog):
    model = Untraceable()
    with caplog.at_level(logging.WARNING, logger="lowbit.passes"):
        out, names = quantize_residual_adds(model, UINT8_ACTIVATION)
    assert out is model and names == []
    assert "cannot be traced" in caplog.text and "Untraceable" in caplog.text


def test_mobilenet_v2_has_ten_residual_adds_and_keeps_layer_names(mobilenet, photos):
    gm, names = quantize_residual_adds(mobilenet, UINT8_ACTIVATION)
    assert names == MOBILENET_ADDS
    layers = {n for n, m in mobilenet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert layers == {n for n, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert len(layers) == 53
    gm_float = copy.deepcopy(gm)
    _disable_quantizers(gm_float)
    with torch.no_grad():
        torch.testing.assert_close(gm_float(photos), mobilenet(photos))


def test_ptq_calibrates_the_adds_and_stays_close_to_float(mobilenet, photos):
    gm, names = quantize_residual_adds(mobilenet, UINT8_ACTIVATION)
    qmodel = quantize(gm, [photos[:2]], "w8a8", progress=False)
    adds = [qmodel.get_submodule(n) for n in names]
    assert all(a.a_quantizer.is_frozen and a.b_quantizer.is_frozen for a in adds)
    assert adds[0].a_quantizer.mode == "static"
    held_out = photos[4:]  # 4 photos the calibration did not see
    with torch.no_grad():
        y, yq = mobilenet(held_out), qmodel(held_out)
    assert float((yq - y).norm() / y.norm()) < 0.4  # measured 0.13 (w8a8, 2 calibration photos)
    assert float((yq.argmax(1) == y.argmax(1)).float().mean()) >= 0.5  # measured 4/4


def test_zoo_resnet18_has_eight_block_adds():
    from lowbit.zoo import resnet18

    _, names = quantize_residual_adds(resnet18(seed=0), UINT8_ACTIVATION)
    assert names == [f"layer{s}.{b}.add" for s in range(1, 5) for b in range(2)]


def test_passes_run_in_any_order_and_twice():
    from lowbit.passes import cross_layer_equalize

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

        def forward(self, x):
            return x + self.body(x)

    gm, names = quantize_residual_adds(Residual().eval(), UINT8_ACTIVATION)
    assert names == ["add_0"]
    gm, folded = fold_batchnorm(gm)  # the GraphModule traces again; QuantAdd stays one opaque call
    assert folded == ["body.1"]
    gm, pairs = cross_layer_equalize(gm)
    assert pairs == [("body.0", "body.3")]
    assert quantize_residual_adds(gm, UINT8_ACTIVATION) == (gm, [])  # nothing new the second time
    qmodel = quantize(gm, [torch.randn(2, 4, 3, 3)], "w8a8", progress=False)
    assert quantize_residual_adds(qmodel, UINT8_ACTIVATION)[1] == []  # quantized layers are opaque too
    assert fold_batchnorm(qmodel)[1] == []
