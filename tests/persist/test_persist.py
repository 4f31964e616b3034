"""lowbit.save -> lowbit.load: the rebuilt model equals the saved one bit for bit (PTQ CNNs,
QAT CNNs mid-training and converted, MiniLM with SmoothQuant), exports the same ONNX bytes,
and trains on identically."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn.conv_bn import QuantConvBn2d
from lowbit.nn.quantizer import Quantizer
from lowbit.qat import convert, freeze_bn

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Conv-BN-ReLU6-Conv-BN-ReLU, a bias-free Conv-BN-ReLU, a residual add, an average pool, a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                                  nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.body(h)
        return self.fc(torch.flatten(self.pool(h), 1))


def net(seed: int) -> nn.Module:
    """Seed 0 is the model quantized; other seeds are 'fresh' float models with other weights."""
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding matters
        for bn in (model.stem[1], model.stem[4], model.body[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    assert a.training == b.training
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_ptq_resnet_round_trip_is_bit_identical_and_exports_the_same_bytes(tmp_path):
    from lowbit.zoo import resnet18

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qmodel = lowbit.quantize(resnet18(seed=0), [x, x * 0.5], "w8a8", progress=False)
    assert isinstance(qmodel, torch.fx.GraphModule)  # the residual adds went through fx
    folder = lowbit.save(qmodel, tmp_path / "runs" / "resnet")  # a folder that does not exist yet
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.safetensors"]

    loaded = lowbit.load(resnet18(seed=1), folder)
    _same_state(loaded, qmodel)
    _same_outputs(loaded, qmodel, x)
    saved, mine = qmodel.lowbit_summary, loaded.lowbit_summary
    assert (mine.config, mine.options, mine.target, mine.calibration_batches, mine.uncalibrated) == (
        saved.config, saved.options, saved.target, saved.calibration_batches, saved.uncalibrated)
    assert (mine.algorithms, mine.reports) == (saved.algorithms, saved.reports)
    assert mine.layers == saved.layers

    lowbit.export_onnx(qmodel, tmp_path / "before.onnx", x)
    lowbit.export_onnx(loaded, tmp_path / "after.onnx", x)
    assert (tmp_path / "before.onnx").read_bytes() == (tmp_path / "after.onnx").read_bytes()


@pytest.mark.parametrize("config, options", [
    ("w8a8", {"bias_correction": True, "fold_bn": False}),  # a bias created where the conv had none
    ("w8a8", {"equalize_relu6": True}),  # ReLU6 -> ReLU
    ("w8a8", {"fold_bn": False, "quantize_adds": False}),
    ("w8a8-dynamic", {}),
    ("w4a8", {}),
])
def test_ptq_options_round_trip(tmp_path, data, config, options):
    x, _ = data
    qmodel = lowbit.quantize(net(0), [x[:16], x[16:]], config, progress=False, **options)
    loaded = lowbit.load(net(1), lowbit.save(qmodel, tmp_path / "m"))
    _same_state(loaded, qmodel)
    _same_outputs(loaded, qmodel, x)
    if options.get("bias_correction"):
        assert loaded.get_submodule("body.0").bias is not None
    if options.get("equalize_relu6"):
        assert isinstance(loaded.get_submodule("stem.2"), nn.ReLU)


def _train(model: nn.Module, x, y, steps: int, seed: int = 0) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(seed)
    for i in range(steps):
        F.cross_entropy(model(x[i * 8:i * 8 + 8]), y[i * 8:i * 8 + 8]).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("learn, calib", [("lsq", True), ("lsq+", False), (None, False)])
def test_qat_round_trip_mid_training_then_trains_on_identically(tmp_path, data, learn, calib):
    x, y = data
    qmodel = lowbit.prepare_qat(net(0), "w4a8", x[:16] if calib else None, learn=learn, progress=False)
    _train(qmodel, x, y, 3)
    freeze_bn(qmodel.get_submodule("stem.0"))
    folder = lowbit.save(qmodel, tmp_path / "qat")

    loaded = lowbit.load(net(1), folder)
    assert loaded.training and qmodel.training
    _same_state(loaded, qmodel)
    assert [m.bn_frozen for m in loaded.modules() if isinstance(m, QuantConvBn2d)] == [True, False, False]
    quantizers = [(m.mode, m.learn, m.observer_kind) for m in loaded.modules() if isinstance(m, Quantizer)]
    assert quantizers == [(m.mode, m.learn, m.observer_kind) for m in qmodel.modules() if isinstance(m, Quantizer)]
    if learn is not None:  # the residual add's input quantizer shares the body conv's learned scale
        assert json.loads((folder / "manifest.json").read_text())["aliases"]
        assert loaded.add_0.a_quantizer.scale is loaded.get_submodule("body.0").input_quantizer.scale

    loaded.train(), qmodel.train()
    _train(qmodel, x[24:], y[24:], 1, seed=5)  # one more step each, from an optimizer built after load
    _train(loaded, x[24:], y[24:], 1, seed=5)
    _same_state(loaded, qmodel)
    _same_outputs(loaded, qmodel, x)

    lowbit.export_onnx(qmodel, tmp_path / "before.onnx", x[:2])
    lowbit.export_onnx(loaded, tmp_path / "after.onnx", x[:2])
    assert (tmp_path / "before.onnx").read_bytes() == (tmp_path / "after.onnx").read_bytes()


def test_qat_model_saved_before_its_first_step_learns_the_same_first_range(tmp_path, data):
    x, y = data
    qmodel = lowbit.prepare_qat(net(0), "w4a8", learn="lsq", progress=False)  # ranges from the first batch
    assert any(m._needs_init for m in qmodel.modules() if isinstance(m, Quantizer))
    loaded = lowbit.load(net(1), lowbit.save(qmodel, tmp_path / "fresh"))
    _train(qmodel, x, y, 2)
    _train(loaded, x, y, 2)
    _same_state(loaded, qmodel)


def test_converted_qat_model_round_trips(tmp_path, data):
    x, y = data
    qmodel = lowbit.prepare_qat(net(0), "w4a8", x[:16], progress=False)
    _train(qmodel, x, y, 2)
    converted = convert(qmodel)
    loaded = lowbit.load(net(1), lowbit.save(converted, tmp_path / "c"))
    assert not any(isinstance(m, QuantConvBn2d) for m in loaded.modules())
    _same_state(loaded, converted)
    _same_outputs(loaded, converted, x)


def test_minilm_smoothquant_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from lowbit.zoo import english_sentences, minilm

    def two_layers():  # MiniLM's first two encoder layers: the same code paths, a third of the time
        bert, tok = minilm()
        bert.encoder.layer = bert.encoder.layer[:2]
        return bert, tok

    bert, tok = two_layers()
    sentences = english_sentences(16)
    calib = [dict(tok(sentences[i:i + 8], padding="longest", truncation=True, max_length=32, return_tensors="pt"))
             for i in (0, 8)]
    qmodel = lowbit.quantize(bert, calib, "w8a8", smoothquant=0.8, progress=False)
    assert qmodel.lowbit_summary.smoothing.inserted  # SmoothedInput wrappers, q/k/v sharing one inv_scale
    folder = lowbit.save(qmodel, tmp_path / "minilm")

    loaded = lowbit.load(two_layers()[0], folder)
    _same_state(loaded, qmodel)
    query = loaded.encoder.layer[0].attention.self.query
    assert loaded.encoder.layer[0].attention.self.key.inv_scale is query.inv_scale
    with torch.no_grad():
        assert torch.equal(loaded(**calib[1]).last_hidden_state, qmodel(**calib[1]).last_hidden_state)
    assert loaded.lowbit_summary.smoothing == qmodel.lowbit_summary.smoothing


def test_load_never_unpickles(tmp_path, data, monkeypatch):
    x, _ = data
    qmodel = lowbit.quantize(net(0), [x], "w8a8", progress=False)
    folder = lowbit.save(qmodel, tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("lowbit.load must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    _same_outputs(lowbit.load(net(1), folder), qmodel, x)
