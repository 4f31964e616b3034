"""lowbit.qat.fit: the reference QAT loop trains, distils, steps the schedule and stops on NaN."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.conv_bn import QuantConvBn2d
from lowbit.nn.quantizer import Quantizer
from lowbit.qat import QATSchedule, distillation_loss, fit, load_checkpoint, prepare_qat
from lowbit.qat.fit import _default_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2 + Linear on 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(self.features(x), 2), 1))


def _digits(n=320, batch=32):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target[:n])
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _model(seed=0):
    torch.manual_seed(seed)
    return DigitsCNN().eval()


def _accuracy(model, batches):
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def test_fit_trains_a_qat_model_and_reports_steps_loss_and_metrics():
    batches = _digits()
    qmodel = prepare_qat(_model(), "w4a8", [x for x, _ in batches[:2]], progress=False)
    before = _accuracy(qmodel.eval(), batches)
    result = fit(qmodel, batches, F.cross_entropy, epochs=3, lr=3e-3, progress=False,
                 eval_fn=lambda m: _accuracy(m, batches))
    assert result.steps == 3 * len(batches) and result.epochs == 3 and result.resumed_from is None
    assert len(result.metrics) == 3 and result.metrics[-1] > max(0.5, before + 0.3)
    assert result.final_loss < 1.5
    assert qmodel.training  # eval_fn ran in eval mode, training mode is back


def test_default_optimizer_is_adamw_at_1e_4_without_decay_on_quantizer_scales():
    qmodel = prepare_qat(_model(), "w4a8", [torch.rand(4, 1, 8, 8)], learn="lsq+", progress=False)
    opt = _default_optimizer(qmodel, 1e-4, 0.01)
    assert isinstance(opt, torch.optim.AdamW)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    quant = [p for m in qmodel.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)]
    assert len(quant) > 6  # scales, and LSQ+ zero-points of the affine activations
    assert not decayed & {id(p) for p in quant}
    assert id(qmodel.fc.weight) in decayed and id(qmodel.fc.bias) not in decayed
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(qmodel.parameters()))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(qmodel.fc.weight)] == lrs[id(qmodel.fc.weight_quantizer.scale)] == 1e-4
    import inspect

    assert inspect.signature(fit).parameters["lr"].default == 1e-4


def test_distillation_pulls_the_student_towards_the_teacher():
    batches = _digits(n=128)
    teacher = _model(seed=1)
    qmodel = prepare_qat(_model(seed=2), "w8a8", [batches[0][0]], progress=False)

    def kl():
        qmodel.eval()
        with torch.no_grad():
            return sum(float(distillation_loss(qmodel(x), teacher(x))) for x, _ in batches)

    before = kl()
    # distill_weight=1: only the teacher's logits matter; a task loss that would diverge is ignored
    fit(qmodel, batches, lambda out, y: out.sum() * 0, epochs=4, lr=3e-3, teacher=teacher, distill_weight=1.0,
        progress=False)
    assert kl() < 0.5 * before
    assert not teacher.training  # the teacher stays in eval mode


def test_schedule_steps_once_per_optimizer_step():
    batches = _digits(n=96)
    qmodel = prepare_qat(_model(), "w4a8", [batches[0][0]], progress=False)
    sched = QATSchedule(qmodel, freeze_bn_after=4)
    result = fit(qmodel, batches, F.cross_entropy, epochs=2, schedule=sched, progress=False)
    assert sched.steps == result.steps == 6
    assert all(m.bn_frozen for m in qmodel.modules() if isinstance(m, QuantConvBn2d))


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, features, scale=1.0):
        return self.fc(features) * scale


@pytest.mark.parametrize("wrap", [lambda x: {"features": x, "scale": 2.0}, lambda x: (x, 2.0), lambda x: x])
def test_inputs_may_be_a_tensor_a_tuple_or_a_dict(wrap):
    g = torch.Generator().manual_seed(0)
    batches = [(wrap(torch.randn(8, 6, generator=g)), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    torch.manual_seed(0)
    qmodel = prepare_qat(DictModel(), "w8a8", [b[0] for b in batches], progress=False)
    w0 = qmodel.fc.weight.detach().clone()
    result = fit(qmodel, batches, F.cross_entropy, epochs=1, lr=1e-2, progress=False)
    assert result.steps == 3 and not torch.equal(qmodel.fc.weight, w0)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    batches = _digits(n=96)  # 3 batches an epoch
    qmodel = prepare_qat(_model(), "w4a8", [batches[0][0]], progress=False)
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if len(calls) == 5 else loss

    with pytest.raises(FloatingPointError, match=r"QAT step 5 \(epoch 2, batch 2\): loss is nan") as err:
        fit(qmodel, batches, loss_fn, epochs=3, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    assert "last good checkpoint (step 4)" in str(err.value) and "checkpoint.pt" in str(err.value)
    fresh = prepare_qat(_model(), "w4a8", [batches[0][0]], progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt", fresh, restore_rng=False)
    assert (ck.step, ck.epoch, ck.batch) == (4, 1, 1)
    assert all(torch.isfinite(v).all() for v in fresh.state_dict().values() if isinstance(v, torch.Tensor))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


def test_nan_gradient_stops_before_the_optimizer_step():
    batches = _digits(n=64)
    qmodel = prepare_qat(_model(), "w8a8", [batches[0][0]], progress=False)
    qmodel.fc.weight.register_hook(lambda g: g * float("inf"))
    w0 = qmodel.fc.weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"QAT step 1 .*gradient norm is (nan|inf).*checkpoint_dir"):
        fit(qmodel, batches, F.cross_entropy, epochs=1, progress=False)
    assert torch.equal(qmodel.fc.weight, w0)


def test_bad_arguments_are_clear_errors():
    qmodel = prepare_qat(_model(), "w8a8", [torch.rand(2, 1, 8, 8)], progress=False)
    one_shot = iter([(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="re-iterable"):
        fit(qmodel, one_shot, F.cross_entropy, epochs=1)
    with pytest.raises(ValueError, match="distill_weight"):
        fit(qmodel, [], F.cross_entropy, epochs=1, distill_weight=2.0)


def test_an_error_inside_the_forward_pass_says_which_step(tmp_path):
    batches = _digits(n=96)
    batches[2][0][0, 0, 0, 0] = float("nan")  # the third batch of the first epoch
    qmodel = prepare_qat(_model(), "w8a8", None, learn=None, progress=False)  # observing activations
    with pytest.raises(ValueError, match="NaN") as err:
        fit(qmodel, batches, F.cross_entropy, epochs=1, shuffle=False, checkpoint_dir=tmp_path,
            checkpoint_every=1, progress=False)
    assert any("in QAT step 3 (epoch 1, batch 3); the last good checkpoint (step 2)" in n for n in err.value.__notes__)
