"""quantize_pool_inputs: a QuantStub in front of each average pool."""

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.modules import QuantStub
from lowbit.numerics import UINT8_ACTIVATION
from lowbit.passes import quantize_pool_inputs


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.conv(x)
        a = self.pool(y).flatten(1)
        b = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(torch.cat([a, b], 1))


def test_stubs_go_before_module_and_functional_pools():
    model = Head().eval()
    gm, names = quantize_pool_inputs(model, UINT8_ACTIVATION)
    assert names == ["pool_input", "pool_input_1"]  # module `pool` -> `pool_input`; functional -> next free
    assert all(isinstance(gm.get_submodule(n), QuantStub) for n in names)
    assert gm.get_submodule("conv") is model.conv  # layers are shared, names kept
    x = torch.randn(2, 3, 8, 8)
    for n in names:  # calibrating stubs pass values through unchanged
        gm.get_submodule(n).input_quantizer.mode = "calibrating"
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    for n in names:
        gm.get_submodule(n).input_quantizer.freeze()
    assert not torch.equal(gm(x), model(x))  # now the pool inputs are fake-quantized


def test_models_without_pools_or_untraceable_are_returned_unchanged():
    plain = nn.Sequential(nn.Linear(4, 4))
    assert quantize_pool_inputs(plain, UINT8_ACTIVATION) == (plain, [])

    class Branchy(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2) if x.sum() > 0 else x  # data-dependent: fx cannot trace

    model = Branchy()
    assert quantize_pool_inputs(model, UINT8_ACTIVATION) == (model, [])
