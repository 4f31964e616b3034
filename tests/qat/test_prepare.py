"""prepare_qat / convert: the QAT model, its training behaviour and its export."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn.conv_bn import QuantConvBn2d
from lowbit.nn.modules import QuantConv2d
from lowbit.nn.quantizer import Quantizer
from lowbit.qat import convert, freeze_observers, prepare_qat

from .conftest import small_cnn


def _train(model, x, y, steps=3, lr=1e-2):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def _quantizers(model):
    return {m.name: m for m in model.modules() if isinstance(m, Quantizer)}


def test_prepare_fuses_conv_bn_learns_scales_and_leaves_the_original(cnn, data):
    x, y = data
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    qa = prepare_qat(cnn, "w4a8", [x[:16]], progress=False)
    assert qa.training
    assert sorted(qa.lowbit_summary.conv_bn) == ["body.0", "stem.0"]
    assert isinstance(qa.get_submodule("stem.0"), QuantConvBn2d)
    assert isinstance(qa.get_submodule("stem.1"), nn.Identity)
    qs = _quantizers(qa)
    assert all(q.mode == "learned" for q in qs.values())
    assert qs["stem.0.weight"].scale.shape == (8,)  # per output channel
    names = {n for n, _ in qa.named_parameters()}
    assert {"stem.0.weight_quantizer.scale", "stem.0.input_quantizer.scale", "add_0.b_quantizer.scale"} <= names
    # the block input feeds both the add and body.0: one tensor, one learned scale
    assert qa.get_submodule("add_0").a_quantizer.scale is qa.get_submodule("body.0").input_quantizer.scale
    for key, value in cnn.state_dict().items():
        assert torch.equal(value, before[key])
    scale0 = qs["stem.0.weight"].scale.detach().clone()
    _train(qa, x, y)
    assert not torch.equal(qs["stem.0.weight"].scale.detach(), scale0)


@pytest.mark.parametrize("config,learn", [("w8a8", "lsq"), ("w4a8", "lsq+"), ("w8a8", None)])
def test_trained_qat_model_exports_to_integer_kernels_matching_the_simulation(cnn, data, tmp_path, config, learn):
    x, y = data
    qa = prepare_qat(cnn, config, [x[:16]], learn=learn, progress=False)
    _train(qa, x, y)
    path = tmp_path / "qat.onnx"
    lowbit.export_onnx(qa, path, x[:1])
    assert qa.training and isinstance(qa.get_submodule("stem.0"), QuantConvBn2d)  # export worked on a copy
    report = lowbit.inspect_onnx(path)
    assert report.integer_fraction == 1.0, report.float_compute_nodes
    sim = convert(qa)
    assert isinstance(sim.get_submodule("stem.0"), QuantConv2d) and not sim.training
    with torch.no_grad():
        expected = sim(x).numpy()
        qa.eval()
        # Learned / fixed ranges: the QAT model in eval mode is the converted one.  Weights
        # re-ranged every step (learn=None) keep a float bias until convert fixes them.
        tol = 1e-5 if learn else 2e-3
        torch.testing.assert_close(qa(x), torch.from_numpy(expected), rtol=tol, atol=tol)
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    # Integer accumulation (ORT) vs float32 (simulation): equal but for the rare activation
    # that lands on the other side of a rounding tie, moving the logits by about one step.
    close = np.abs(got - expected) <= 1e-5
    assert close.mean() > 0.9 and np.abs(got - expected).max() < 5e-3
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95


def test_observer_ranges_without_calibration(cnn, data):
    x, y = data
    qa = prepare_qat(cnn, "w8a8", learn=None)
    qs = _quantizers(qa)
    act = qs["stem.0.input"]
    assert act.mode == "observing" and act.observer_kind == "moving_average"
    assert qs["stem.0.weight"].mode == "dynamic"
    _train(qa, x, y, steps=2)
    assert act.is_frozen and act.observer.num_batches == 2
    n_observing = len([q for q in qs.values() if q.mode == "observing"])
    assert freeze_observers(qa) == n_observing > 0
    assert act.mode == "static"


def test_learned_ranges_without_calibration_start_from_the_first_batch(cnn, data):
    x, y = data
    qa = prepare_qat(cnn, "w4a4", learn="lsq")
    act = _quantizers(qa)["stem.0.input"]
    assert act.mode == "observing"
    opt = torch.optim.Adam(qa.parameters(), lr=1e-3)  # built before the first batch: still trains the scale
    F.cross_entropy(qa(x), y).backward()
    opt.step()
    assert act.mode == "learned"
    assert act.scale.grad is not None
    assert any(p is act.scale for group in opt.param_groups for p in group["params"])


def test_state_dict_round_trip_and_mismatched_learn(cnn, data):
    x, y = data
    qa = prepare_qat(cnn, "w4a8", [x[:16]], progress=False)
    _train(qa, x, y)
    again = prepare_qat(small_cnn(), "w4a8", [x[16:]], progress=False)
    again.load_state_dict(qa.state_dict())
    qa.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(qa(x), again(x))
    other = prepare_qat(small_cnn(), "w4a8", [x[:16]], learn=None, progress=False)
    with pytest.raises((ValueError, RuntimeError), match="learnable|scale"):
        other.load_state_dict(qa.state_dict())


def test_bad_input():
    with pytest.raises(ValueError, match="no layer to quantize"):
        prepare_qat(nn.Sequential(nn.ReLU(), nn.Tanh()), "w8a8")
    with pytest.raises(ValueError, match="learn must be"):
        prepare_qat(small_cnn(), "w8a8", learn="adaround")
    with pytest.raises(ValueError, match="unknown config"):
        prepare_qat(small_cnn(), "w3a3")


def test_meta_model_is_refused_and_a_single_calibration_tensor_is_one_batch(data):
    with torch.device("meta"):
        meta = small_cnn()
    with pytest.raises(ValueError, match=r"prepare_qat: the model has no data \(.* is on the meta device"):
        prepare_qat(meta, "w4a8", progress=False)
    x, _ = data
    one = prepare_qat(small_cnn(), "w4a8", x[:16], progress=False)
    listed = prepare_qat(small_cnn(), "w4a8", [x[:16]], progress=False)
    assert one.lowbit_summary.calibration_batches == 1
    assert one.lowbit_summary.options == {"fold_bn": True, "quantize_adds": True}
    one.eval(), listed.eval()
    with torch.no_grad():
        assert torch.equal(one(x), listed(x))
