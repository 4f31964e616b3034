"""QAT checkpoints: a killed run resumes to the same bits; files are safe, atomic and checked."""

import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lowbit.qat.checkpoint as ckpt_mod
from lowbit.nn.conv_bn import QuantConvBn2d
from lowbit.nn.quantizer import Quantizer
from lowbit.qat import QATSchedule, fit, freeze_bn, load_checkpoint, prepare_qat, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Conv-BN-ReLU x2 + Dropout + Linear: dropout makes every step draw from the RNG."""

    def __init__(self, width=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.drop(self.features(x).mean((2, 3))))


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    return x, y


def _prepared(config="w4a8", learn="lsq", width=8, calib=True):
    torch.manual_seed(0)
    model = Net(width).eval()
    x, _ = _data()
    return prepare_qat(model, config, [x[:16]] if calib else None, learn=learn, progress=False)


def _state(model):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


class _Killed(Exception):
    pass


def _counting_loss(counter, kill_at=None):
    def loss_fn(out, y):
        counter.append(1)
        if kill_at is not None and len(counter) == kill_at:
            raise _Killed
        return F.cross_entropy(out, y)
    return loss_fn


# Both ways a run sees its data: a list of batches fit permutes itself (learned scales), and a
# DataLoader with its own shuffling (observed ranges, frozen by the schedule mid-run).
SETUPS = {
    "list-lsq": {"learn": "lsq", "calib": True, "loader": False},
    "dataloader-observers": {"learn": None, "calib": False, "loader": True},
}


def _run(setup, tmp, *, kill_at=None, counter=None):
    model = _prepared(learn=setup["learn"], calib=setup["calib"])
    x, y = _data()
    if setup["loader"]:
        data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    else:
        data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]
    sched = QATSchedule(model, freeze_observers_after=7, freeze_bn_after=9)
    counter = [] if counter is None else counter
    result = fit(model, data, _counting_loss(counter, kill_at), epochs=3, lr=1e-2, schedule=sched,
                 eval_fn=lambda m: float(m(x).argmax(1).eq(y).float().mean()),
                 checkpoint_dir=tmp, checkpoint_every=3, seed=7, progress=False)
    return model, result


@pytest.mark.parametrize("name", list(SETUPS))
def test_a_killed_run_resumes_to_the_same_weights_bit_for_bit(tmp_path, name):
    setup = SETUPS[name]
    whole, whole_result = _run(setup, tmp_path / "whole")  # 5 batches an epoch, 15 steps

    with pytest.raises(_Killed):  # dies in step 8; the last checkpoint is step 6 (epoch 2, batch 1)
        _run(setup, tmp_path / "killed", kill_at=8)
    torch.manual_seed(1234)  # a new process would start with other RNG states
    random.seed(1234)
    np.random.seed(1234)
    calls = []
    resumed, result = _run(setup, tmp_path / "killed", counter=calls)

    assert result.resumed_from == 6 and len(calls) == 15 - 6  # exactly the unconsumed batches
    _assert_same_state(_state(resumed), _state(whole))
    assert result.steps == whole_result.steps == 15
    assert result.final_loss == whole_result.final_loss and result.metrics == whole_result.metrics
    assert [m.bn_frozen for m in resumed.modules() if isinstance(m, QuantConvBn2d)] == [True, True]

    calls = []
    _, again = _run(setup, tmp_path / "killed", counter=calls)  # finished: nothing left to do
    assert calls == [] and again.steps == 15 and again.resumed_from == 15
    assert again.metrics == whole_result.metrics and again.final_loss == whole_result.final_loss


def test_checkpoint_loads_with_weights_only_and_restores_everything_a_user_loop_needs(tmp_path):
    model = _prepared()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = QATSchedule(model, freeze_bn_after=100)
    x, y = _data()
    for _ in range(2):
        F.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    freeze_bn(model)
    path = save_checkpoint(tmp_path / "ck.pt", model, opt, sched, step=2, epoch=0, batch=2,
                           extra={"note": "mine", "history": [1.0, 0.5]})
    raw = torch.load(path, weights_only=True)  # tensors and plain values only
    assert raw["format"] == "lowbit.qat_checkpoint" and raw["position"] == {"step": 2, "epoch": 0, "batch": 2}
    draws = (torch.rand(3), random.random(), np.random.rand())

    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    fresh = _prepared()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_sched = QATSchedule(fresh, freeze_bn_after=100)
    ck = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (draws[0].tolist(), *draws[1:])
    assert (ck.step, ck.batch, ck.extra) == (2, 2, {"note": "mine", "history": [1.0, 0.5]})
    _assert_same_state(_state(fresh), _state(model))
    assert fresh_sched.steps == 2
    assert all(m.bn_frozen for m in fresh.modules() if isinstance(m, QuantConvBn2d))
    assert fresh_opt.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert {m.mode for m in fresh.modules() if isinstance(m, Quantizer)} == {"learned"}


@pytest.mark.parametrize(("other", "message"), [
    ({"config": "w8a8"}, "quantization config differ"),
    ({"learn": "lsq+"}, "learn= option differ"),
    ({"width": 4}, "modules differ|parameters differ"),
])
def test_resuming_into_another_model_or_config_is_a_clear_error(tmp_path, other, message):
    path = save_checkpoint(tmp_path / "ck.pt", _prepared())
    with pytest.raises(ValueError, match=f"different model or QAT config \\(({message})"):
        load_checkpoint(path, _prepared(**other))


def test_other_optimizer_is_a_clear_error(tmp_path):
    model = _prepared()
    path = save_checkpoint(tmp_path / "ck.pt", model, torch.optim.SGD(model.parameters(), lr=0.1))
    fresh = _prepared()
    with pytest.raises(ValueError, match="holds a SGD state but the optimizer is a AdamW"):
        load_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters()))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_file_that_runs_code_on_load_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "lowbit.qat_checkpoint", "version": 1, "model": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(evil, _prepared())
    assert not marker.exists()
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lowbit QAT checkpoint"):
        load_checkpoint(tmp_path / "other.pt", _prepared())


def test_writes_are_atomic_and_never_store_nan_weights(tmp_path, monkeypatch):
    model = _prepared()
    path = save_checkpoint(tmp_path / "ck.pt", model, step=1)
    good = path.read_bytes()

    def crash(obj, f):  # a process dying halfway through the write
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]

    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="model fc.weight holds NaN/Inf.*previous checkpoint"):
        save_checkpoint(path, model, step=3)
    assert path.read_bytes() == good
    with pytest.raises(TypeError, match="extra\\['fn'\\] is a builtin_function"):
        save_checkpoint(tmp_path / "x.pt", _prepared(), extra={"fn": print})


@pytest.mark.parametrize("damage, message", [
    (lambda p, flip: p.write_bytes(b""), r"ck.pt is empty \(0 bytes\)"),
    (lambda p, flip: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), r"ck.pt is truncated or corrupted"),
    (lambda p, flip: flip(p, p.stat().st_size // 2), r"ck.pt is corrupted: its content does not match the sha256"),
    (lambda p, flip: flip(p, p.stat().st_size - 40, n=4), r"ck.pt is corrupted: its checksum trailer is missing"),
    (lambda p, flip: flip(p, p.stat().st_size - 8, n=8), r"ck.pt is corrupted: its content does not match"),
])
def test_an_empty_truncated_or_corrupted_checkpoint_is_refused_with_its_name(tmp_path, damage, message, flip_bytes):
    path = save_checkpoint(tmp_path / "ck.pt", _prepared(), step=1)
    damage(path, flip_bytes)
    with pytest.raises(ValueError, match=message + ".*(resume=False|--no-resume)"):
        load_checkpoint(path, _prepared())


def test_fit_does_not_resume_silently_from_a_corrupted_checkpoint(tmp_path, flip_bytes):
    setup = SETUPS["list-lsq"]
    _run(setup, tmp_path)
    flip_bytes(tmp_path / "checkpoint.pt", 2000)  # 64 flipped bytes in the middle
    with pytest.raises(ValueError, match="checkpoint.pt is corrupted"):
        _run(setup, tmp_path)


def test_version_1_checkpoints_without_a_checksum_still_load(tmp_path, caplog):
    model = _prepared()
    payload = torch.load(save_checkpoint(tmp_path / "new.pt", model, step=4), weights_only=True)
    torch.save({**payload, "version": 1}, tmp_path / "old.pt")
    with caplog.at_level("WARNING"):
        assert load_checkpoint(tmp_path / "old.pt", _prepared()).step == 4
    assert "without a checksum" in caplog.text
    torch.save({**payload, "version": 2}, tmp_path / "stripped.pt")  # version 2 needs its trailer
    with pytest.raises(ValueError, match="stripped.pt is corrupted: its checksum trailer is missing"):
        load_checkpoint(tmp_path / "stripped.pt", _prepared())


def test_checkpoints_get_the_umask_permissions_and_their_folder_is_created(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "runs" / "a" / "ck.pt", _prepared())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
