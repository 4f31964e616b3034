"""emulate_ort: bit-exact agreement with ONNX Runtime's integer kernels, kernel by kernel.

Each model is quantized with calibrated (min-max, so arbitrary, not power-of-two) scales,
exported, run in ORT, and compared with ``torch.equal``; MobileNetV2 (MSE scales) is in
``tests/e2e/test_mobilenet_v2_ptq.py``.  Single-kernel models end in a QuantStub,
so their output is ``DequantizeLinear`` of the kernel's codes; the refusal tests also
check, with ``inspect_onnx``, that ORT does run the refused node in float.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn.modules import QuantStub, TensorQuant
from lowbit.numerics import INT8_ACTIVATION, UINT8_ACTIVATION, QuantSpec
from lowbit.runtime import EmulationError, OrtEmulation, OrtModel, emulate_ort
from lowbit.runtime import _ort_kernels as K


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# w8a8 with min-max ranges: arbitrary (not power-of-two) scales, and ten times faster to calibrate than MSE
W8A8_MINMAX = lowbit.config.get_config("w8a8").with_observer("minmax")


def _with_activations(spec):
    default = W8A8_MINMAX.default
    return dataclasses.replace(W8A8_MINMAX, default=dataclasses.replace(default, input=dataclasses.replace(
        default.input, spec=spec)))


def _stub(name="out", spec=UINT8_ACTIVATION):
    return QuantStub(TensorQuant(spec=spec), name=name)


def _quantize(model, shape, config=W8A8_MINMAX, n=2):
    torch.manual_seed(0)
    return lowbit.quantize(model.eval(), [_x(*shape, seed=s) for s in range(n)], config, progress=False)


def _ort_kernels(path) -> Counter:
    return Counter(lowbit.inspect_onnx(path).op_counts)


def _assert_bit_exact(qmodel, x, tmp_path, *, kernels: dict[str, int]):
    """ORT's outputs bit for bit, and the kernels the emulation names are the ones ORT runs."""
    path = tmp_path / "model.onnx"
    lowbit.export_onnx(qmodel, path, x[:1])
    emulated = emulate_ort(qmodel)
    expected = OrtModel(path)(x)
    got = emulated(x)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected), f"{int((got != expected).sum())} of {got.numel()} values differ"
    counts = emulated.kernel_counts()
    assert {k: counts[k] for k in kernels} == kernels
    fused = {k: v for k, v in kernels.items() if k.startswith("Q") and k != "QuantizeLinear"}
    ort = _ort_kernels(path)
    assert {k: ort[k] for k in fused} == fused and ort["Conv"] == ort["Gemm"] == ort["Add"] == 0
    return emulated, got


# -- one kernel at a time --------------------------------------------------------------------------
@pytest.mark.parametrize("act", [nn.Identity, nn.ReLU, nn.ReLU6])
def test_conv(act, tmp_path):
    model = nn.Sequential(nn.Conv2d(5, 12, 3, stride=2, padding=1), act(), _stub())
    qmodel = _quantize(model, (4, 5, 15, 13))
    _assert_bit_exact(qmodel, _x(6, 5, 15, 13, seed=9) * 1.5, tmp_path,
                      kernels={"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1})


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv(multiplier, tmp_path):
    model = nn.Sequential(nn.Conv2d(16, 16 * multiplier, 3, padding=1, groups=16), nn.ReLU6(), _stub())
    qmodel = _quantize(model, (4, 16, 9, 9))
    _assert_bit_exact(qmodel, _x(6, 16, 9, 9, seed=9), tmp_path, kernels={"QLinearConv": 1})


def test_conv1d_dilated(tmp_path):
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=2, dilation=2), _stub())
    qmodel = _quantize(model, (4, 4, 20))
    _assert_bit_exact(qmodel, _x(5, 4, 20, seed=9), tmp_path, kernels={"QLinearConv": 1})


def test_linear_float_output(tmp_path):
    model = nn.Sequential(nn.Linear(40, 24))  # QGemm with a float output: the classifier case
    qmodel = _quantize(model, (16, 40))
    emulated, _ = _assert_bit_exact(qmodel, _x(32, 40, seed=9), tmp_path, kernels={"QGemm": 1})
    assert ("0", "QGemm (float output)") in emulated.kernels


def test_linear_relu_linear(tmp_path):
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    qmodel = _quantize(model, (16, 40))
    _assert_bit_exact(qmodel, _x(32, 40, seed=9), tmp_path, kernels={"QGemm": 2})


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(6, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.out = _stub()

    def forward(self, x):
        h = self.a(x)
        return self.out(h + self.b(h))


def test_add(tmp_path):
    qmodel = _quantize(Residual(), (4, 6, 10, 10))
    assert isinstance(qmodel, torch.fx.GraphModule)  # the residual pass traced it
    _assert_bit_exact(qmodel, _x(6, 6, 10, 10, seed=9) * 2, tmp_path, kernels={"QLinearConv": 2, "QLinearAdd": 1})


def test_float_input_clip_before_quantizer(tmp_path):
    """A Clip on the float input right before a QuantizeLinear: ORT drops it when the grid lies inside."""
    model = nn.Sequential(nn.Hardtanh(-1.0, 1.0), nn.Conv2d(3, 4, 3), _stub())
    qmodel = _quantize(model, (4, 3, 8, 8))
    _assert_bit_exact(qmodel, _x(4, 3, 8, 8, seed=9) * 2, tmp_path, kernels={"QuantizeLinear": 1, "QLinearConv": 1})


def test_add_kernel_against_float_fixed_part():
    """MLAS folds the zero points into one float constant with an FMA; this case tells it apart
    from the plain float32 sum (the rounding of ``zc - (ra * za + rb * zb)``)."""
    a, b = torch.arange(256.0).repeat_interleave(256), torch.arange(256.0).repeat(256)
    sa, sb, sc = torch.tensor(0.3311576), torch.tensor(0.1873222), torch.tensor(0.5432117)
    out = K.qlinear_add(a, sa, 131, b, sb, 77, sc, 140, 0, 255)
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())
    # against the float definition it differs from only by rounding (at most one code)
    ref = torch.round(((a - 131) * sa + (b - 77) * sb) / sc + 140).clamp(0, 255)
    assert (out - ref).abs().max() <= 1


def test_fma32_rounds_once():
    """float32 FMA from float64: right even where float64 rounding lands on a float32 midpoint."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3000,), generator=g).float()
    b = torch.exp(torch.empty(3000).uniform_(-20, 8, generator=g))
    c = torch.randn(3000, generator=g) * torch.exp(torch.empty(3000).uniform_(-30, 12, generator=g))
    c[::3] *= 1e-25  # products that are float32 midpoints, nudged by far less than a float64 ulp
    got = K._fma32(a, b, c)
    for ai, bi, ci, r in zip(a.tolist(), b.tolist(), c.tolist(), got.tolist()):
        exact = Fraction(ai) * Fraction(bi) + Fraction(ci)
        lo = torch.tensor(float(exact), dtype=torch.float64).float()
        near = [lo, torch.nextafter(lo, torch.tensor(-float("inf"))), torch.nextafter(lo, torch.tensor(float("inf")))]
        best = min(near, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(torch.int32)) & 1))
        assert r == float(best)


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 7)

    def forward(self, x):
        x = F.relu6(self.conv(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_global_average_pool(tmp_path):
    qmodel = _quantize(Pooled(), (4, 3, 11, 9))
    _assert_bit_exact(qmodel, _x(6, 3, 11, 9, seed=9), tmp_path,
                      kernels={"QLinearConv": 1, "QLinearGlobalAveragePool": 1, "QGemm": 1})


class SmallCNN(nn.Module):
    """Stem, an inverted residual block with a depthwise conv, max pool, pool and classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1), nn.BatchNorm2d(48), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.BatchNorm2d(48), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = F.relu(self.head(self.pool(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


def test_small_cnn_end_to_end(tmp_path):
    model = SmallCNN().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, folded before quantizing
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    qmodel = _quantize(model, (8, 3, 24, 24), n=3)
    x = _x(12, 3, 24, 24, seed=9)
    _, got = _assert_bit_exact(qmodel, x, tmp_path, kernels={
        "QuantizeLinear": 1, "QLinearConv": 5, "QLinearAdd": 1, "QLinearGlobalAveragePool": 1, "QGemm": 1})
    with torch.no_grad():
        sim = qmodel(x)
    assert not torch.equal(sim, got)  # the float simulation rounds differently ...
    assert torch.allclose(sim, got, atol=0.5)  # ... by a little


# -- what it refuses, and that ORT indeed runs it in float -------------------------------------------
def _refuses(qmodel, match: str):
    with pytest.raises(EmulationError, match=match):
        emulate_ort(qmodel)


def _float_nodes(qmodel, x, tmp_path) -> list[str]:
    lowbit.export_onnx(qmodel, tmp_path / "m.onnx", x[:1])
    return lowbit.inspect_onnx(tmp_path / "m.onnx").float_compute_nodes


def test_refuses_conv_returning_float(tmp_path):
    qmodel = _quantize(nn.Sequential(nn.Conv2d(3, 4, 3)), (2, 3, 8, 8))
    _refuses(qmodel, r"^0: its output is not quantized .* ORT runs this Conv in float")
    assert _float_nodes(qmodel, _x(2, 3, 8, 8), tmp_path)


def test_refuses_relu_that_ort_keeps(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), _stub())
    qmodel = _quantize(model, (2, 3, 8, 8))
    q = qmodel[2].input_quantizer
    q.set_qparams(q.scale, torch.tensor(3, dtype=torch.int32))  # zero point above the grid's bottom
    _refuses(qmodel, r"^1: ORT keeps this Relu .* so 0 runs in float")
    assert any("Conv" in n for n in _float_nodes(qmodel, _x(2, 3, 8, 8), tmp_path))


@pytest.mark.parametrize("spec", [INT8_ACTIVATION, QuantSpec(bits=8, signed=True, symmetric=False)])
def test_refuses_int8_activations(spec, tmp_path):
    model = Residual()
    model.out = _stub(spec=spec)
    qmodel = _quantize(model, (4, 6, 10, 10), _with_activations(spec))
    _refuses(qmodel, r"int8 .* x86-64 CPU provider runs QDQ groups with int8 activations in float")
    assert len(_float_nodes(qmodel, _x(2, 6, 10, 10), tmp_path)) == 3  # both convs and the add


def test_refuses_clip_that_ort_keeps(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), _stub())
    qmodel = _quantize(model, (2, 3, 8, 8))
    q = qmodel[2].input_quantizer
    q.set_qparams(torch.tensor(8.0 / 255), q.zero_point)  # grid reaches 8 > 6: the Clip still clips
    _refuses(qmodel, r"^1: ORT keeps this Clip\(0.0, 6.0\)")
    assert _float_nodes(qmodel, _x(2, 3, 8, 8), tmp_path)


class TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.out = _stub()

    def forward(self, x):
        h = self.conv(x)
        return self.out(self.a(h) + self.b(h))


def test_refuses_two_grids_on_one_tensor(tmp_path):
    qmodel = _quantize(TwoReaders(), (2, 3, 6, 6))
    q = qmodel.b.input_quantizer
    q.set_qparams(q.scale * 1.5, q.zero_point)
    _refuses(qmodel, r"^conv: its output is quantized with different grids")
    assert _float_nodes(qmodel, _x(2, 3, 6, 6), tmp_path)


@pytest.mark.parametrize("config, match", [
    ("w8", r"this input is not quantized, so ONNX Runtime runs the op in float"),
    ("w8a8-dynamic", r"mode 'dynamic'"),
])
def test_refuses_float_layers(config, match):
    _refuses(_quantize(nn.Sequential(nn.Linear(8, 4)), (4, 8), config), match)


class Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.sigmoid(self.a(x)))


def test_refuses_float_op_between_layers():
    _refuses(_quantize(Sigmoid(), (4, 8)), r"^a: its output feeds sigmoid, which does not quantize it")


def test_refuses_linear_on_3d_input():
    emulated = emulate_ort(_quantize(nn.Sequential(nn.Linear(8, 4)), (4, 3, 8)))
    with pytest.raises(EmulationError, match=r"^0: Linear on a 3-D input exports as MatMul"):
        emulated(_x(2, 3, 8))


# -- the emulation leaves the simulation alone ---------------------------------------------------------
def test_simulation_untouched_and_device_move():
    qmodel = _quantize(Pooled(), (4, 3, 11, 9))
    x = _x(3, 3, 11, 9, seed=4)
    with torch.no_grad():
        before = qmodel(x)
    emulated = emulate_ort(qmodel)
    assert isinstance(emulated, OrtEmulation) and "QLinearConv x1" in repr(emulated)
    assert not any(p is q for p in emulated.buffers() for q in qmodel.buffers())  # own copies
    out = emulated(x)
    emulated.to(torch.float64)  # the integer constants cast exactly; float32 steps stay float32
    assert torch.equal(emulated(x), out) and out.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)
    assert not any(n.startswith("_source") for n, _ in emulated.named_modules())


class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(4, 4, 3, padding=1), _stub()

    def forward(self, x):
        return self.out(x + self.conv(x))


def test_float_input_read_by_two_quantizers(tmp_path):
    """The model input is quantized by the add and by the conv: one QuantizeLinear (equal grids)."""
    qmodel = _quantize(InputResidual(), (4, 4, 8, 8))
    _assert_bit_exact(qmodel, _x(4, 4, 8, 8, seed=9), tmp_path,
                      kernels={"QuantizeLinear": 1, "QLinearConv": 1, "QLinearAdd": 1})
