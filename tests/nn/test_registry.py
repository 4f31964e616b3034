"""lowbit.nn.register: a user's own layer kind is quantized, exported, emulated, saved and handled by
every pass its traits allow, with nothing but one ``register`` call.

The user's layers are built here: ``Dense`` (an ``nn.Module`` holding ``weight`` and ``bias``,
``forward = F.linear``: exactly a gemm, so ORT runs it as QGemm and the emulation is bit-exact),
``ScaledLinear`` (the same times a fixed float gain: ORT runs QGemm then a float Mul, so the
emulation must refuse it) and ``TaggedConv2d`` (an ``nn.Conv2d`` subclass, which exact-type
matching leaves in float until it is registered itself).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
import lowbit.nn
from lowbit import targets
from lowbit.config import W4A8, W8, W8A8
from lowbit.nn import QuantLayer, QuantStub, TensorQuant, register, registered, unregister
from lowbit.nn.modules import QUANTIZED, _QuantMixin
from lowbit.nn.swap import unswap_modules
from lowbit.numerics import UINT8_ACTIVATION
from lowbit.passes import correct_bias, cross_layer_equalize, fold_batchnorm
from lowbit.runtime import EmulationError, OrtModel, emulate_ort

pytestmark = pytest.mark.usefixtures("one_thread")


# -- a user's layers and their quantized classes, written on the public base ----------------
class Dense(nn.Module):
    """A linear layer of the user's own (not an nn.Linear)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantDense(QuantLayer, Dense):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_output(F.linear(self._quant_input(x), self._quant_weight(), self._quant_bias()))


class ScaledLinear(nn.Module):
    """``F.linear(x, weight, bias) * gain`` with a fixed float gain."""

    def __init__(self, n_in: int, n_out: int, gain: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.gain


class QuantScaledLinear(QuantLayer, ScaledLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self._quant_input(x), self._quant_weight(), self._quant_bias()) * self.gain
        return self._quant_output(y)


class TaggedConv2d(nn.Conv2d):
    """An nn.Conv2d subclass (a tag only): not swapped unless registered itself."""

    tag = "mine"


class QuantTaggedConv2d(QuantLayer, TaggedConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_output(self._conv_forward(self._quant_input(x), self._quant_weight(), self._quant_bias()))


def _depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


@pytest.fixture
def kinds():
    """Register the user's kinds (the one call a user makes); unregister them afterwards."""
    made = {
        Dense: register(Dense, QuantDense, kernel="gemm", kernel_only=True),
        ScaledLinear: register(ScaledLinear, QuantScaledLinear, kernel="gemm"),
        TaggedConv2d: register(TaggedConv2d, QuantTaggedConv2d, kernel="conv", kernel_only=True,
                               depthwise=_depthwise),
    }
    yield made
    for cls in made:
        if cls in registered():
            unregister(cls)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mlp(first: type[nn.Module] = Dense, *args, seed: int = 0) -> nn.Sequential:
    """``first(12, 16, *args) -> ReLU -> Dense(16, 8)``, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(first(12, 16, *args), nn.ReLU(), Dense(16, 8)).eval()


def _calib():
    return [_x(32, 12, seed=s) for s in range(4)]


# -- the table --------------------------------------------------------------------------------------
def test_builtin_kinds_are_registered_through_the_same_table():
    table = registered()
    for float_cls, quant_cls in QUANTIZED.items():
        assert table[float_cls].quant_cls is quant_cls
    assert (table[nn.Linear].kernel, table[nn.Linear].channel_axis) == ("gemm", -1)
    assert (table[nn.Conv2d].kernel, table[nn.Conv2d].channel_axis) == ("conv", 1)
    assert table[nn.Conv2d].is_depthwise(nn.Conv2d(4, 4, 3, groups=4))
    assert not table[nn.Conv2d].is_depthwise(nn.Conv2d(4, 8, 3))
    assert all(table[c].kernel_only and table[c].fold_bn and table[c].equalize and table[c].correct_bias
               for c in (nn.Linear, nn.Conv1d, nn.Conv2d))
    emb = table[nn.Embedding]
    assert emb.kernel == "lookup" and not (emb.kernel_only or emb.fold_bn or emb.equalize or emb.correct_bias)
    convbn = table[lowbit.nn.ConvBn2d]
    assert convbn.quant_cls is lowbit.nn.QuantConvBn2d and not (convbn.kernel_only or convbn.fold_bn)
    assert _QuantMixin is QuantLayer
    with pytest.raises(TypeError):
        table[Dense] = table[nn.Linear]  # read-only


def test_the_view_is_live_and_traits_round_trip(kinds):
    kind = kinds[Dense]
    assert registered()[Dense] is kind and lowbit.nn.kind_of(Dense(2, 2)) is kind
    assert (kind.kernel, kind.channel_axis, kind.fold_bn, kind.equalize, kind.correct_bias) == ("gemm", -1, True,
                                                                                             True, True)
    scaled = kinds[ScaledLinear]  # kernel_only=False: no pass may assume the algebra of a plain gemm
    assert not (scaled.kernel_only or scaled.fold_bn or scaled.equalize or scaled.correct_bias)
    assert unregister(Dense) is kind and Dense not in registered()
    assert register(Dense, QuantDense, **kind.traits) == kind


# -- PTQ, export, ORT, emulation --------------------------------------------------------------------
def test_quantize_swaps_and_calibrates_a_registered_kind(kinds):
    qmodel = lowbit.quantize(_mlp(), _calib(), "w8a8", progress=False)
    assert type(qmodel[0]) is QuantDense and type(qmodel[2]) is QuantDense
    quantized = qmodel.lowbit_summary.layers.quantized
    assert set(quantized) == {"0", "2"} and quantized["0"].startswith("Dense: input uint8")
    assert all(q.mode == "static" and q.is_frozen for _, q in qmodel[0].quantizers())
    # the same model made of nn.Linear quantizes to the same numbers
    reference = _mlp()
    linear = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    linear.load_state_dict(reference.state_dict())
    qlinear = lowbit.quantize(linear, _calib(), "w8a8", progress=False)
    x = _x(64, 12, seed=7)
    with torch.no_grad():
        assert torch.equal(qmodel(x), qlinear(x))
    assert type(unswap_modules(qmodel)[0]) is Dense  # the inverse swap


def test_a_kernel_only_kind_runs_in_integers_in_ort_and_emulates_bit_exactly(kinds, tmp_path):
    qmodel = lowbit.quantize(_mlp(), _calib(), "w8a8", progress=False)
    path = tmp_path / "dense.onnx"
    lowbit.export_onnx(qmodel, path, _x(1, 12))
    report = lowbit.inspect_onnx(path)
    assert report.op_counts.get("QGemm") == 2 and report.float_compute_nodes == []
    x = _x(64, 12, seed=7)
    ort = OrtModel(path)(x)
    with torch.no_grad():
        simulated = qmodel(x)
    assert torch.allclose(ort, simulated, atol=1e-3 * float(simulated.abs().max()))
    emulated = emulate_ort(qmodel)
    assert emulated.kernel_counts()["QGemm"] == 2
    assert torch.equal(emulated(x), ort)


def test_a_kind_that_is_more_than_its_kernel_exports_but_is_not_emulated(kinds, tmp_path):
    qmodel = lowbit.quantize(_mlp(ScaledLinear, 0.37), _calib(), "w8a8", progress=False)
    assert type(qmodel[0]) is QuantScaledLinear
    path = tmp_path / "scaled.onnx"
    lowbit.export_onnx(qmodel, path, _x(1, 12))
    report = lowbit.inspect_onnx(path)
    assert report.op_counts.get("QGemm") == 2 and report.op_counts.get("Mul") == 1  # the gain, in float
    x = _x(64, 12, seed=7)
    with torch.no_grad():
        simulated = qmodel(x)
    assert torch.allclose(OrtModel(path)(x), simulated, atol=1e-3 * float(simulated.abs().max()))
    with pytest.raises(EmulationError, match=r"^0: QuantScaledLinear is registered with kernel_only=False"):
        emulate_ort(qmodel)


def test_a_registered_conv_kind_runs_as_qlinearconv_bit_exactly(kinds, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(TaggedConv2d(3, 6, 3, padding=1), nn.ReLU(), TaggedConv2d(6, 6, 3, padding=1, groups=6),
                          QuantStub(TensorQuant(spec=UINT8_ACTIVATION), name="out")).eval()
    calib = [_x(4, 3, 9, 9, seed=s) for s in range(3)]
    qmodel = lowbit.quantize(model, calib, W8A8.with_observer("minmax"), progress=False)
    assert type(qmodel[0]) is QuantTaggedConv2d and type(qmodel[2]) is QuantTaggedConv2d
    path = tmp_path / "conv.onnx"
    lowbit.export_onnx(qmodel, path, calib[0][:1])
    assert lowbit.inspect_onnx(path).op_counts.get("QLinearConv") == 2
    x = _x(5, 3, 9, 9, seed=8)
    emulated = emulate_ort(qmodel)
    assert emulated.kernel_counts()["QLinearConv"] == 2
    assert torch.equal(emulated(x), OrtModel(path)(x))


# -- registration rules -----------------------------------------------------------------------------
class NotOnTheBase(Dense):
    pass


class NotTheFloatLayer(QuantLayer, nn.Module):
    pass


class QuantDenseAgain(QuantLayer, Dense):
    pass


def test_registration_errors_are_clear_and_change_nothing(kinds):
    before = dict(registered())
    with pytest.raises(ValueError, match="Dense is registered already.*replace=True"):
        register(Dense, QuantDenseAgain, kernel="gemm")
    with pytest.raises(ValueError, match="Linear is registered already"):
        register(nn.Linear, QuantDense, kernel="gemm")
    with pytest.raises(TypeError, match="NotOnTheBase.*not built on lowbit.nn.QuantLayer"):
        register(Dense, NotOnTheBase, kernel="gemm", replace=True)
    with pytest.raises(TypeError, match="NotTheFloatLayer must subclass Dense"):
        register(Dense, NotTheFloatLayer, kernel="gemm", replace=True)
    with pytest.raises(TypeError, match="float nn.Module class"):
        register(QuantDense, QuantDense, kernel="gemm")
    with pytest.raises(ValueError, match="kernel must be one of"):
        register(Dense, QuantDenseAgain, kernel="matmul", replace=True)
    with pytest.raises(ValueError, match="lookup kernel has no contraction for fold_bn"):
        register(Dense, QuantDenseAgain, kernel="lookup", fold_bn=True, replace=True)
    with pytest.raises(ValueError, match="QuantDense is the quantized class of Dense already"):
        register(nn.Module, QuantDense, kernel="gemm")
    with pytest.raises(KeyError, match="not registered"):
        unregister(NotOnTheBase)
    assert dict(registered()) == before
    # replace=True swaps the quantized class
    register(Dense, QuantDenseAgain, kernel="gemm", kernel_only=True, replace=True)
    assert registered()[Dense].quant_cls is QuantDenseAgain
    assert QuantDense not in {kind.quant_cls for kind in registered().values()}


def test_unregister_restores_float_behaviour(kinds):
    qmodel = lowbit.quantize(_mlp(), _calib(), "w8a8", progress=False)
    unregister(Dense)
    again = lowbit.quantize(_mlp(), _calib(), "w8a8", progress=False)
    assert type(again[0]) is Dense and again.lowbit_summary.layers.unsupported == {"0": "Dense", "2": "Dense"}
    assert type(unswap_modules(qmodel)[2]) is Dense  # layers swapped before still undo
    # a built-in kind too, and its traits give it back
    linear = unregister(nn.Linear)
    try:
        assert type(lowbit.quantize(nn.Sequential(nn.Linear(4, 4)), [_x(2, 4)], "w8", progress=False)[0]) is nn.Linear
    finally:
        register(nn.Linear, linear.quant_cls, **linear.traits)
    assert registered()[nn.Linear] == linear


def test_subclasses_of_a_registered_kind_are_not_swapped(kinds):
    class LoudDense(Dense):
        def forward(self, x):
            return super().forward(x) * 2

    qmodel = lowbit.quantize(_mlp(LoudDense), _calib(), "w8", progress=False)
    assert type(qmodel[0]) is LoudDense and type(qmodel[2]) is QuantDense
    # an nn.Conv2d subclass is swapped only because it is registered itself
    unregister(TaggedConv2d)
    model = nn.Sequential(TaggedConv2d(2, 2, 1))
    assert type(lowbit.quantize(model, [_x(1, 2, 3, 3)], "w8", progress=False)[0]) is TaggedConv2d


# -- the passes and the config read the traits ------------------------------------------------------
# torch.fx keeps torch.nn's layers and registered kinds opaque (lowbit.nn.trace), so the graph
# passes see a user's layer as a module, and the fx rewrite for residual adds keeps it whole.
def test_a_registered_kind_survives_the_fx_rewrite_for_residual_adds(kinds):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Dense(8, 8), Dense(8, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)

    torch.manual_seed(0)
    qmodel = lowbit.quantize(Residual().eval(), [_x(16, 8, seed=s) for s in range(2)], "w8a8", progress=False)
    assert type(qmodel.a) is QuantDense and type(qmodel.b) is QuantDense


def _bn_after(layer: nn.Module, n: int) -> nn.Sequential:
    bn = nn.BatchNorm1d(n)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    return nn.Sequential(layer, bn).eval()


@pytest.mark.parametrize("fold", [True, False])
def test_fold_bn_follows_the_trait(kinds, fold):
    register(Dense, QuantDense, kernel="gemm", kernel_only=True, fold_bn=fold, replace=True)
    torch.manual_seed(0)
    model = _bn_after(Dense(6, 5), 5)
    x = _x(8, 6)
    with torch.no_grad():
        expected = model(x)
    model, folded = fold_batchnorm(model)
    assert folded == (["1"] if fold else [])
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
    _, folded = fold_batchnorm(_bn_after(ScaledLinear(6, 5, gain=2.0), 5))  # its gain breaks the algebra
    assert folded == []


def _spread(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # output channels of very different ranges: equalization has work to do
        model[0].weight.mul_(torch.logspace(-1, 1, model[0].weight.shape[0]).unsqueeze(1))
    return model


def _range_ratio(layer: nn.Module) -> float:
    ranges = layer.weight.detach().abs().amax(1)
    return float(ranges.max() / ranges.min())


@pytest.mark.parametrize("equalize", [True, False])
def test_equalization_follows_the_trait(kinds, equalize):
    register(Dense, QuantDense, kernel="gemm", kernel_only=True, equalize=equalize, replace=True)
    model = _spread(_mlp())
    x = _x(8, 12)
    with torch.no_grad():
        expected = model(x)
    before = _range_ratio(model[0])
    model, pairs = cross_layer_equalize(model)
    assert pairs == ([("0", "2")] if equalize else [])
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert (_range_ratio(model[0]) < before / 5) == equalize


@pytest.mark.parametrize("correct", [True, False])
def test_bias_correction_follows_the_trait(kinds, correct):
    register(Dense, QuantDense, kernel="gemm", kernel_only=True, correct_bias=correct, replace=True)
    torch.manual_seed(0)
    model = nn.Sequential(TaggedConv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), Dense(36, 5)).eval()
    calib = [_x(8, 3, 5, 5, seed=s) for s in range(2)]
    qmodel = lowbit.quantize(model, calib, W4A8, progress=False)
    biases = [m.bias.detach().clone() for m in (qmodel[0], qmodel[3])]
    qmodel, corrected = correct_bias(None, qmodel, calib)
    assert corrected == (["0", "3"] if correct else ["0"])  # the conv kind: channel axis 1
    assert not torch.equal(qmodel[0].bias, biases[0])
    assert torch.equal(qmodel[3].bias, biases[1]) != correct


def test_config_positions_and_depthwise_read_the_registry(kinds):
    model = nn.Sequential(nn.Embedding(10, 12), Dense(12, 16), nn.ReLU(), Dense(16, 16), Dense(16, 8))
    bound = W4A8.bind(model)
    bits = {n: bound.resolve(n, model.get_submodule(n))[0].weight.spec.bits for n in ("1", "3", "4")}
    assert bits == {"1": 8, "3": 4, "4": 8}  # "@first" / "@last": the user's gemm kind counts
    w7 = W8.for_target(targets.X86_AVX2_W7)
    dw, full = TaggedConv2d(4, 4, 3, groups=4), TaggedConv2d(4, 8, 3)
    assert w7.resolve("dw", dw)[0].weight.spec.bits == 8  # depthwise: ORT sums it exactly on any x86
    assert w7.resolve("full", full)[0].weight.spec.bits == 8  # weight-only (no input): no cap either
    w7a8 = W8A8.for_target(targets.X86_AVX2_W7)
    assert (w7a8.resolve("dw", dw)[0].weight.spec.bits, w7a8.resolve("full", full)[0].weight.spec.bits) == (8, 7)


# -- save / load --------------------------------------------------------------------------------------
def test_save_and_load_a_model_with_a_registered_kind(kinds, tmp_path):
    qmodel = lowbit.quantize(_mlp(), _calib(), "w8a8", progress=False)
    lowbit.save(qmodel, tmp_path / "dense")
    loaded = lowbit.load(_mlp(seed=1), tmp_path / "dense")
    assert type(loaded[0]) is QuantDense and type(loaded[2]) is QuantDense
    x = _x(16, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
