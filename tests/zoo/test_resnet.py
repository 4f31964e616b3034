"""ResNet-18: torchvision's parameter names and count, seeded init, one call per module."""

from __future__ import annotations

import torch

from lowbit.zoo.resnet import resnet18


def test_param_count_and_state_dict_match_torchvision():
    model = resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's resnet18
    state = model.state_dict()
    assert len(state) == 122  # 62 parameters + 60 BatchNorm buffers, as in torchvision
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.1.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer3.0.downsample.1.num_batches_tracked": (),
        "layer4.1.bn2.bias": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert "layer1.0.downsample.0.weight" not in state  # identity shortcut in the first stage


def test_forward_shape_and_num_classes():
    model = resnet18(num_classes=10)
    assert not model.training
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512 - 990 * 513


def test_seed_fixes_the_weights_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    a, b, c = resnet18(seed=0), resnet18(seed=0), resnet18(seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_every_module_runs_once_per_forward():
    # Per-module observers need one tensor per module: no ReLU is shared between call sites.
    model = resnet18()
    calls: dict[str, int] = {}

    def count(name):
        return lambda module, inputs, output: calls.update({name: calls.get(name, 0) + 1})

    for name, module in model.named_modules():
        if not list(module.children()):
            module.register_forward_hook(count(name))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert set(calls.values()) == {1}
    assert len(calls) == len([m for m in model.modules() if not list(m.children())])
