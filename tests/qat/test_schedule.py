"""QATSchedule and distillation_loss."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.nn.conv_bn import QuantConvBn2d
from lowbit.nn.quantizer import Quantizer
from lowbit.qat import QATSchedule, distillation_loss, prepare_qat


def _step(model, sched, x, y, opt):
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_observers_and_batchnorm_freeze_on_schedule(cnn, data):
    x, y = data
    qa = prepare_qat(cnn, "w8a8", learn=None)
    sched = QATSchedule(qa, freeze_observers_after=2, freeze_bn_after=3)
    opt = torch.optim.SGD(qa.parameters(), lr=1e-2)
    observing = [q for q in qa.modules() if isinstance(q, Quantizer) and q.mode == "observing"]
    convbn = [m for m in qa.modules() if isinstance(m, QuantConvBn2d)]
    _step(qa, sched, x, y, opt)
    assert all(q.mode == "observing" for q in observing) and not any(m.bn_frozen for m in convbn)
    _step(qa, sched, x, y, opt)
    assert all(q.mode == "static" for q in observing)
    _step(qa, sched, x, y, opt)
    assert all(m.bn_frozen for m in convbn)
    stats = convbn[0].bn.running_mean.clone()
    _step(qa, sched, x, y, opt)
    assert torch.equal(convbn[0].bn.running_mean, stats)


def test_stages_unfreeze_groups_in_order_and_resume(cnn, data):
    x, y = data
    qa = prepare_qat(cnn, "w8a8", [x], progress=False)
    sched = QATSchedule(qa, stages=[["fc"], ["body.*"], ["stem.*"]], steps_per_stage=2)
    stem_w = qa.get_submodule("stem.0").weight
    fc_w = qa.get_submodule("fc").weight
    assert fc_w.requires_grad and not stem_w.requires_grad
    opt = torch.optim.SGD(qa.parameters(), lr=1e-2)
    before = stem_w.detach().clone()
    _step(qa, sched, x, y, opt)
    assert torch.equal(stem_w.detach(), before)  # frozen stage: not trained
    for _ in range(3):
        _step(qa, sched, x, y, opt)
    assert sched.stage == 2 and stem_w.requires_grad
    resumed = QATSchedule(qa, stages=[["fc"], ["body.*"], ["stem.*"]], steps_per_stage=2)
    assert not stem_w.requires_grad
    resumed.load_state_dict(sched.state_dict())
    assert resumed.steps == 4 and stem_w.requires_grad


def test_schedule_bad_input(cnn):
    qa = prepare_qat(cnn, "w8a8", learn=None)
    with pytest.raises(ValueError, match="matches no module"):
        QATSchedule(qa, stages=[["nope.*"]], steps_per_stage=1)
    with pytest.raises(ValueError, match="steps_per_stage"):
        QATSchedule(qa, stages=[["fc"]])
    with pytest.raises(ValueError, match="freeze_bn_after"):
        QATSchedule(qa, freeze_bn_after=-1)


def test_distillation_loss_is_temperature_scaled_kl():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    temp = 3.0
    p_t = F.softmax(t / temp, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    torch.testing.assert_close(distillation_loss(s, t, temperature=temp), expected)
    assert distillation_loss(t, t).abs() < 1e-6
    s.requires_grad_(True)
    distillation_loss(s, t).backward()
    assert s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, temperature=0)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(s, t[:, :3])
