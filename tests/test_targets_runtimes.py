"""Runtime targets (openvino, tflite, qnn, tensorrt): what each means, the activation grid the
simulation takes for it, and that quantize / prepare_qat / recipes / save-load keep it."""

import dataclasses

import pytest
import torch
from torch import nn

import lowbit
from lowbit import targets
from lowbit.config import W4A4, W8, W8A8, W8A8_DYNAMIC
from lowbit.nn.walk import quantizers_by_role
from lowbit.numerics import INT8_ACTIVATION
from lowbit.targets import CpuInfo, resolve_target, running_mismatch

pytestmark = pytest.mark.usefixtures("one_thread")

ZEN3 = CpuInfo(arch="x86_64", model="AMD EPYC 7B13", flags=frozenset({"avx2", "fma"}))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()


def _activations(qmodel):
    return [q for _, role, q in quantizers_by_role(qmodel) if role != "weight"]


@pytest.mark.parametrize(("name", "runtime", "grid"), [("openvino", "openvino", "u8-affine"),
                                                       ("tflite", "tflite", "s8-affine"),
                                                       ("qnn", "qnn", "u8-affine"),
                                                       ("tensorrt", "tensorrt", "s8-symmetric")])
def test_runtime_targets_follow_the_shared_contract(name, runtime, grid):
    t = resolve_target(name)
    assert (t.runtime, t.activation_grid, t.weight_layout, t.max_weight_bits) == (runtime, grid, "s8", 8)
    assert not t.is_cpu and name in targets.TARGET_NAMES


def test_cpu_targets_mean_onnxruntime_and_keep_the_configs_grid():
    for t in (targets.X86_VNNI, targets.X86_AVX2_U8U8, targets.X86_AVX2_W7, targets.ARM64):
        assert t.runtime == "onnxruntime" and t.activation_grid is None and t.is_cpu


def test_ort_means_this_machines_cpu(monkeypatch):
    monkeypatch.delenv("LOWBIT_TARGET", raising=False)
    assert resolve_target("ort") is resolve_target("auto")
    monkeypatch.setenv("LOWBIT_TARGET", "x86-avx2-w7")
    assert resolve_target("ort").name == "x86-avx2-w7"
    monkeypatch.setenv("LOWBIT_TARGET", "tensorrt")  # "auto" follows the environment; "ort" stays on the CPU
    assert resolve_target("auto").name == "tensorrt" and resolve_target("ort").is_cpu


def test_bad_runtime_or_grid_is_refused():
    with pytest.raises(ValueError, match="runtime"):
        targets.Target(name="x", exact_u8s8=True, runtime="coreml")
    with pytest.raises(ValueError, match="activation_grid"):
        targets.Target(name="x", exact_u8s8=True, activation_grid="u4")
    with pytest.raises(ValueError, match="unknown activation grid"):
        W8A8.activations_on_grid("s4")


def test_for_target_puts_every_activation_on_the_runtime_grid():
    trt = W8A8.for_target(targets.TENSORRT)
    spec = trt.default.input.spec
    assert (spec.signed, spec.symmetric, spec.narrow_range, spec.bits, spec.granularity) == (True, True, False, 8,
                                                                                             "tensor")
    assert trt.default.input.observer == W8A8.default.input.observer == "mse"  # range estimator kept
    assert trt.default.weight == W8A8.default.weight  # weights: int8 per channel everywhere
    assert trt.for_target(targets.TENSORRT) is trt  # idempotent
    dyn = W8A8_DYNAMIC.for_target(targets.TENSORRT).default.input
    assert dyn.dynamic and dyn.spec.symmetric  # dynamic kept (export_tensorrt refuses it, with the fix)
    w4a4 = W4A4.for_target(targets.TENSORRT)
    assert {r.layer.input.spec.bits for r in w4a4.rules if r.layer and r.layer.input} == {8}  # @first / @last
    assert w4a4.default.input.spec.bits == 4 and w4a4.default.input.spec.symmetric  # width kept
    # the u8 affine grid already is OpenVINO's / QNN's, and TFLite's (shifted by 128): unchanged
    for t in (targets.OPENVINO, targets.QNN):
        assert W8A8.for_target(t) is W8A8 and W8.for_target(t) is W8
    tfl = W8A8.for_target(targets.TFLITE)  # the same grid; TFLite's kernels also write quantized outputs
    assert tfl.quantized_outputs and not W8A8.quantized_outputs and tfl.default == W8A8.default
    assert tfl.for_target(targets.TFLITE) is tfl and lowbit.QuantConfig.from_dict(tfl.to_dict()) == tfl
    s8 = W8A8.with_rules(lowbit.Rule(pattern="0", layer=lowbit.LayerQuant(input=lowbit.TensorQuant(
        spec=INT8_ACTIVATION)))).for_target(targets.OPENVINO)
    assert not s8.rules[0].layer.input.spec.signed and not s8.rules[0].layer.input.spec.symmetric
    assert lowbit.QuantConfig.from_dict(trt.to_dict()) == trt  # recipes keep the grid


def test_quantize_for_tensorrt_gives_zero_point_zero_int8_activations():
    model, x = _model(), torch.randn(8, 3, 8, 8)
    qmodel = lowbit.quantize(model, [x], "w8a8", target="tensorrt", progress=False)
    assert qmodel.lowbit_summary.target == "tensorrt"
    acts = _activations(qmodel)
    assert len(acts) == 3
    for q in acts:
        assert q.spec.signed and q.spec.symmetric and (q.spec.qmin, q.spec.qmax) == (-128, 127)
        assert q.mode == "static" and not q.zero_point.any()
    # the simulation really is on that grid: the first layer's quantized input is k * scale, -128 <= k <= 127
    q0 = qmodel[0].input_quantizer
    k = (q0(x) / q0.scale).round()
    assert torch.equal(k * q0.scale, q0(x)) and k.min() >= -128 and k.max() <= 127 and (k < 0).any()


def test_prepare_qat_for_tensorrt_trains_on_the_same_grid():
    model, x = _model(), torch.randn(8, 3, 8, 8)
    qat = lowbit.prepare_qat(model, "w8a8", [x], target="tensorrt", progress=False)
    assert qat.lowbit_summary.target == "tensorrt"
    assert all(q.spec.symmetric and q.spec.signed for q in _activations(qat))
    qat(x).sum().backward()  # trains


@pytest.mark.parametrize("name", ["openvino", "qnn", "tflite"])
def test_u8_grid_runtimes_simulate_the_same_numbers_as_ort(name):
    model, x = _model(), torch.randn(8, 3, 8, 8)
    ort = lowbit.quantize(model, [x], "w8a8", target="x86-vnni", progress=False)
    other = lowbit.quantize(model, [x], "w8a8", target=name, progress=False)
    assert other.lowbit_summary.target == name
    if name != "tflite":
        assert torch.equal(ort(x), other(x))
        return
    # TFLite's last kernel writes int8 too: the same numbers, rounded onto the head's own output grid
    (head,) = other.lowbit_summary.options["quantized_outputs"]
    with torch.no_grad():
        assert torch.equal(other.get_submodule(head).output_quantizer(ort(x)), other(x))


def test_save_load_replays_a_tensorrt_model(tmp_path):
    model, x = _model(), torch.randn(8, 3, 8, 8)
    qmodel = lowbit.quantize(model, [x], "w8a8", target="tensorrt", progress=False)
    lowbit.save(qmodel, tmp_path / "trt")
    again = lowbit.load(_model(), tmp_path / "trt")
    assert again.lowbit_summary.target == "tensorrt"
    assert torch.equal(again(x), qmodel(x))


def test_running_a_runtime_file_in_ort_without_vnni_says_which_runtime_it_is_for():
    message = running_mismatch("tensorrt", ZEN3)
    assert "tensorrt" in message and "target='x86-avx2'" in message and "AMD EPYC 7B13" in message
    assert running_mismatch("openvino", ZEN3) is not None  # int8 weights in ORT's u8 x s8 kernels
    assert running_mismatch("tensorrt", dataclasses.replace(ZEN3, flags=frozenset({"avx512_vnni"}))) is None
