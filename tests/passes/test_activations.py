"""quantize_activation_inputs: an output quantizer on each Conv that feeds a float activation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.config import W8A8, LayerQuant, Rule
from lowbit.nn.conv_bn import QuantConvBn2d
from lowbit.passes.activations import ACTIVATION_MODULES, quantize_activation_inputs
from lowbit.ptq import swap_layers

ACTIVATIONS = [nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU]


def block(act: type[nn.Module]) -> nn.Module:
    """conv -> act -> conv -> act -> flatten -> linear: both convs feed the activation."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act(), nn.Conv2d(8, 8, 3, padding=1), act(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.__name__)
def test_convs_before_an_activation_get_a_calibrated_output_quantizer(act):
    torch.manual_seed(0)
    qmodel = lowbit.quantize(block(act), [_x()], "w8a8", progress=False)
    layers = qmodel.lowbit_summary.layers
    for name in ("0", "2"):
        conv, oq = qmodel.get_submodule(name), qmodel.get_submodule(name).output_quantizer
        assert oq is not None and oq.mode == "static" and oq.is_frozen, name
        assert oq.spec == conv.input_quantizer.spec and oq.observer_kind == W8A8.default.input.observer
        assert oq.name == f"{name}.output"
        assert f"output {oq.spec.describe()} before" in layers.quantized[name]
    assert qmodel.get_submodule("5").output_quantizer is None  # a Linear: QGemm with a float output
    assert layers.float_kernels == {}


def test_the_simulation_rounds_the_conv_output():
    torch.manual_seed(0)
    qmodel = lowbit.quantize(block(nn.SiLU), [_x()], "w8a8", progress=False)
    x = _x(2)
    with torch.no_grad():
        rounded = qmodel(x)
        oq = qmodel.get_submodule("0").output_quantizer
        oq.mode = "disabled"
        unrounded = qmodel(x)
    assert not torch.equal(rounded, unrounded)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 1) for _ in range(4))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = F.silu(self.a(x))
        x = torch.sigmoid(self.drop(self.b(x)))  # a free link (Dropout) in between
        x = self.c(x).tanh()
        return F.relu(self.d(x)).flatten(1)


def test_functional_activations_and_free_links_are_found():
    qmodel, report = swap_layers(Functional().eval(), W8A8)
    assert [n for n in ("a", "b", "c", "d") if qmodel.get_submodule(n).output_quantizer is not None] == ["a", "b", "c"]
    assert "before drop" not in report.quantized["b"] and "sigmoid" in report.quantized["b"]
    # d ends in relu -> flatten -> the model output: ORT runs it in float, and the summary says so
    assert set(report.float_kernels) == {"d"} and "model output" in report.float_kernels["d"]
    assert "float kernel in ONNX Runtime" in next(line for line in report.lines() if line.startswith("quantized d"))


class Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # data-dependent: torch.fx cannot trace it


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Identity(), nn.Hardswish(), nn.Conv2d(4, 4, 1), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GELU(), Branchy(), nn.Conv2d(4, 4, 1), nn.SiLU())

    def forward(self, x):
        return self.tail(Branchy()(self.body(x)))


def test_untraceable_models_fall_back_to_their_sequentials():
    qmodel, report = swap_layers(Untraceable().eval(), W8A8)
    # body traces on its own; tail does not (Branchy) and is scanned as the list of layers it is
    quantized = {n for n, m in qmodel.named_modules() if getattr(m, "output_quantizer", None) is not None}
    assert quantized == {"body.0", "tail.0", "tail.3"}
    assert report.float_kernels == {}  # body.3's consumer (outside body) is unknown: nothing claimed


def test_relu_networks_mixed_readers_and_other_configs_are_left_alone():
    relu6 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    qmodel, report = swap_layers(relu6.eval(), W8A8)
    assert all(getattr(m, "output_quantizer", None) is None for m in qmodel.modules())
    assert report.float_kernels == {}

    class Mixed(nn.Module):  # the conv output goes to SiLU and to a concat: not only an activation
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return F.relu(self.head(torch.cat([F.silu(y), y], 1)))

    qmodel, report = swap_layers(Mixed().eval(), W8A8)
    assert qmodel.conv.output_quantizer is None and "cat" in report.float_kernels["conv"]  # (head: model output)

    for config in ("w8a8-dynamic", "w8"):  # no static activation grid to give the output
        qmodel, report = swap_layers(block(nn.SiLU), lowbit.config.get_config(config))
        assert qmodel.get_submodule("0").output_quantizer is None and report.float_kernels == {}

    skip = W8A8.with_rules(Rule(pattern="2", layer=None))  # a conv kept float gets nothing
    qmodel, _ = swap_layers(block(nn.SiLU), skip)
    assert isinstance(qmodel.get_submodule("2"), nn.Conv2d) and qmodel.get_submodule("0").output_quantizer is not None


def test_a_config_output_spec_is_kept_and_the_pass_is_idempotent():
    own = LayerQuant(weight=W8A8.default.weight, input=W8A8.default.input,
                     output=lowbit.nn.modules.TensorQuant(spec=W8A8.default.input.spec, observer="minmax"))
    qmodel, _ = swap_layers(block(nn.GELU), W8A8.with_rules(Rule(pattern="0", layer=own)))
    assert qmodel.get_submodule("0").output_quantizer.observer_kind == "minmax"
    assert qmodel.get_submodule("2").output_quantizer.observer_kind == "mse"
    _, names = quantize_activation_inputs(qmodel, W8A8)
    assert names == []


def test_prepare_qat_quantizes_conv_bn_outputs_and_export_fuses(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    qat = lowbit.prepare_qat(model, "w8a8", [_x()], progress=False)
    conv = qat.get_submodule("0")
    assert isinstance(conv, QuantConvBn2d) and conv.output_quantizer is not None
    assert conv.output_quantizer.mode == "learned"
    qat(_x()).sum().backward()  # the output scale trains like the others
    assert conv.output_quantizer.scale.grad is not None
    lowbit.export_onnx(qat, tmp_path / "qat.onnx", _x(1))
    report = lowbit.inspect_onnx(tmp_path / "qat.onnx")
    assert report.op_counts.get("QLinearConv") == 2 and report.float_compute_nodes == [], report


def test_activation_list_covers_the_issue_activations():
    assert all(issubclass(a, ACTIVATION_MODULES) for a in ACTIVATIONS)


def test_four_bit_activations_get_no_output_rounding():
    # ORT has no 4-bit activation kernels (export clips in float), so the conv would stay float anyway
    qmodel, _ = swap_layers(block(nn.SiLU), lowbit.config.get_config("w4a4"))
    assert qmodel.get_submodule("2").input_quantizer.spec.bits == 4
    assert qmodel.get_submodule("2").output_quantizer is None
    assert qmodel.get_submodule("0").output_quantizer is not None  # "@first": W8A8
