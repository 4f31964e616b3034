"""param_groups: decay only on weight matrices, learned ranges at their own learning rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import prepare_qat
from lowbit.nn.quantizer import Quantizer
from lowbit.numerics import UINT8_ACTIVATION
from lowbit.qat import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _lr_of(groups: list[dict]) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_every_parameter_once_with_decay_only_on_kernels():
    qmodel = prepare_qat(_model(), "w8a8", [torch.rand(8, 1, 8, 8)], learn="lsq+", progress=False)
    groups = param_groups(qmodel, 1e-3, weight_decay=0.05, scale_lr=1e-4)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(qmodel.parameters()))
    lr = _lr_of(groups)
    for name, p in qmodel.named_parameters():
        got_lr, decay = lr[id(p)]
        if name.endswith("quantizer.scale"):
            assert (got_lr, decay) == (1e-4, 0.0), name
        elif name.endswith("quantizer.zero_point"):
            assert decay == 0.0, name
        else:
            assert got_lr == 1e-3 and decay == (0.05 if p.ndim >= 2 else 0.0), name


def test_zero_point_lr_is_scale_lr_over_scale():
    """LSQ+ learns the float offset beta = -s * z; the same Adam movement in integer units is lr / s."""
    qmodel = prepare_qat(_model(), "w8a8", [torch.rand(8, 1, 8, 8)], learn="lsq+", progress=False)
    affine = [m for m in qmodel.modules() if isinstance(m, Quantizer) and m.learn == "lsq+"]
    assert affine, "uint8 activations are affine: LSQ+ learns their zero-points"
    lr = _lr_of(param_groups(qmodel, 1e-3, scale_lr=2e-4))
    for q in affine:
        expected = 2e-4 / float(q.scale.detach().abs().mean())
        assert lr[id(q.zero_point)][0] == pytest.approx(expected)
        assert expected > 1e-2  # activation scales are small: zero-points move on the integer grid
    fixed = _lr_of(param_groups(qmodel, 1e-3, zero_point_lr=0.5))
    assert all(fixed[id(q.zero_point)][0] == 0.5 for q in affine)


def test_learned_zero_points_move_under_adam():
    """With the default groups, a few Adam steps move an LSQ+ zero-point by whole grid steps
    (at the scale's learning rate they would stay put after rounding)."""
    torch.manual_seed(0)
    q = Quantizer(UINT8_ACTIVATION, name="x")
    q.mode = "calibrating"
    q(torch.rand(64, 16) * 2 - 0.2)
    q.freeze()
    q.make_learnable(offset=True)
    holder = nn.Module()
    holder.q = q
    z0 = q.zero_point.detach().clone()
    opt = torch.optim.Adam(param_groups(holder, 1e-3))
    for _ in range(20):
        x = torch.rand(64, 16) * 3 - 1.5  # wider, more negative than calibrated: clipping below pulls z
        loss = (q(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float((q.zero_point.detach() - z0).abs().max()) >= 1.0


def test_plain_model_and_bad_lr():
    model = nn.Linear(3, 2)
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 1]
    with pytest.raises(ValueError, match="learning rates must be positive"):
        param_groups(model, 0.0)
