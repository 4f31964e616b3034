"""Integer targets: CPU detection, names, the config each target gets, the mismatch warning."""

import dataclasses

import pytest
import torch
from torch import nn

import lowbit
from lowbit import targets
from lowbit.config import W4A8, W8, W8A8, W8A8_DYNAMIC
from lowbit.targets import CpuInfo, detect_target, resolve_target, running_mismatch

ZEN3 = CpuInfo(arch="x86_64", model="AMD EPYC 7B13", flags=frozenset({"avx2", "fma", "f16c"}))
SKYLAKE = CpuInfo(arch="x86_64", model="Intel Xeon Gold 6148", flags=frozenset({"avx2", "avx512f"}))
XEON_VNNI = CpuInfo(arch="x86_64", model="Intel Xeon", flags=frozenset({"avx2", "avx512f", "avx512_vnni"}))
ALDER = CpuInfo(arch="x86_64", model="Intel Core i7-12700", flags=frozenset({"avx2", "avx_vnni"}))
GRAVITON = CpuInfo(arch="aarch64", model="", flags=frozenset({"asimd", "asimddp"}))


@pytest.mark.parametrize(("cpu", "name"), [(ZEN3, "x86-avx2-u8u8"), (SKYLAKE, "x86-avx2-u8u8"),
                                           (XEON_VNNI, "x86-vnni"), (ALDER, "x86-vnni"), (GRAVITON, "arm64")])
def test_detect_target_from_cpu_features(cpu, name):
    assert detect_target(cpu).name == name


def test_unreadable_x86_features_get_the_target_exact_everywhere():
    assert detect_target(CpuInfo(arch="x86_64", model="", flags=frozenset())).safe_without_vnni


def test_resolve_names_aliases_and_errors(monkeypatch):
    assert resolve_target("x86-avx2") is targets.DEFAULT_AVX2
    assert resolve_target(targets.X86_AVX2_W7) is targets.X86_AVX2_W7
    monkeypatch.setenv("LOWBIT_TARGET", "x86-avx2-w7")
    assert resolve_target("auto").name == "x86-avx2-w7"
    assert resolve_target(None).name == "x86-avx2-w7"
    with pytest.raises(ValueError, match="unknown target 'x86'.*x86-vnni"):
        resolve_target("x86")


def test_auto_reads_this_machine(monkeypatch):
    monkeypatch.delenv("LOWBIT_TARGET", raising=False)
    assert resolve_target("auto") is detect_target(targets.cpu_info())


def test_a_target_that_would_saturate_is_refused():
    with pytest.raises(ValueError, match="saturate"):
        targets.Target(name="bad", exact_u8s8=False)


def _bits(config, module):
    layer, _ = config.resolve("layer", module)
    return None if layer is None or layer.weight is None else layer.weight.spec.bits


def test_for_target_limits_integer_kernel_weights_only():
    w7 = W8A8.for_target(targets.X86_AVX2_W7)
    assert w7.max_weight_bits == 7 and w7.for_target(targets.X86_AVX2_W7) is w7  # idempotent
    assert _bits(w7, nn.Linear(4, 4)) == 7
    assert _bits(w7, nn.Conv2d(8, 16, 3)) == 7
    assert _bits(w7, nn.Conv2d(8, 16, 3, groups=8)) == 7  # channel multiplier 2: a GEMM per group
    assert _bits(w7, nn.Conv2d(8, 8, 3, groups=8)) == 8  # depthwise: exact on every x86 CPU
    assert _bits(w7, nn.Embedding(10, 4)) == 8  # a Gather: no integer matmul
    assert _bits(W8.for_target(targets.X86_AVX2_W7), nn.Linear(4, 4)) == 8  # weight-only: float kernels
    assert _bits(W8A8_DYNAMIC.for_target(targets.X86_AVX2_W7), nn.Linear(4, 4)) == 7
    assert _bits(W4A8.for_target(targets.X86_AVX2_W7), nn.Linear(4, 4)) == 4
    for t in (targets.X86_VNNI, targets.X86_AVX2_U8U8, targets.ARM64):
        assert W8A8.for_target(t) is W8A8
    assert lowbit.QuantConfig.from_dict(w7.to_dict()) == w7  # recipes keep the limit
    with pytest.raises(ValueError, match="max_weight_bits"):
        dataclasses.replace(W8A8, max_weight_bits=9)


def test_quantize_records_the_target_and_quantizes_for_it():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(8, 16)
    qmodel = lowbit.quantize(model, [x], "w8a8", target="x86-avx2-w7", progress=False)
    assert qmodel.lowbit_summary.target == "x86-avx2-w7"
    w = qmodel[0].weight_quantizer
    assert w.spec.bits == 7 and w.spec.qmax == 63 and w.spec.qmin >= -64
    assert lowbit.quantize(model, [x], "w8a8", target="x86-avx2", progress=False).lowbit_summary.target \
        == "x86-avx2-u8u8"
    qat = lowbit.prepare_qat(model, "w8a8", [x], target="x86-avx2-w7", progress=False)
    assert qat.lowbit_summary.target == "x86-avx2-w7"
    assert qat[0].weight_quantizer.spec.bits == 7


def test_mismatch_only_for_8bit_int8_weights_on_x86_without_vnni():
    assert "x86-avx2" in running_mismatch("x86-vnni", ZEN3)
    assert running_mismatch("arm64", SKYLAKE) is not None
    assert running_mismatch("x86-vnni", XEON_VNNI) is None
    assert running_mismatch("x86-avx2-u8u8", ZEN3) is None
    assert running_mismatch("x86-avx2-w7", ZEN3) is None
    assert running_mismatch("x86-vnni", GRAVITON) is None
    assert running_mismatch(None, ZEN3) is None  # a file lowbit did not make: nothing to say
