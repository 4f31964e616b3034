"""x86 without VNNI, on any machine: ``emulate_ort(cpu="x86-avx2")`` against brute-force references
of ``vpmaddubsw`` (pairs of u8 x s8 products saturated to int16), and the targets that avoid it.

The emulation itself was checked bit for bit against ONNX Runtime running on such a CPU
(``benchmarks/check_non_vnni.py`` runs ORT under ``qemu -cpu EPYC-Milan``; results in
BENCHMARKS.md).  The last test compares with ORT on *this* machine, whatever its CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import OrtModel, emulate_ort
from lowbit.runtime import _ort_kernels as K
from lowbit.targets import cpu_info

INT16 = (-(2**15), 2**15 - 1)


def _pairs_reference(x: list[int], w: list[int]) -> int:
    """sum over k-pairs of sat16(x[2j] w[2j] + x[2j+1] w[2j+1]), an odd tail paired with 0."""
    if len(x) % 2:
        x, w = [*x, 0], [*w, 0]
    return sum(min(max(x[i] * w[i] + x[i + 1] * w[i + 1], INT16[0]), INT16[1]) for i in range(0, len(x), 2))


@pytest.mark.parametrize("k", [1, 2, 7, 32])
def test_gemm_saturation_matches_pairwise_reference(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 256, (5, k), generator=g).float()
    w = torch.randint(-128, 128, (6, k), generator=g).float()
    w[:, 0] = 127  # make saturation likely in every row
    exact = x.double() @ w.double().T
    lost = K.gemm_saturation(x, w, 0, 255)
    got = exact + (0 if lost is None else lost)
    want = torch.tensor([[_pairs_reference(x[n].int().tolist(), w[m].int().tolist()) for m in range(6)]
                         for n in range(5)], dtype=torch.float64)
    assert torch.equal(got, want)
    if k > 1:
        assert not torch.equal(exact, want)  # the test data did saturate


def test_no_correction_when_no_pair_can_saturate():
    x = torch.full((3, 8), 255.0)
    assert K.gemm_saturation(x, torch.full((4, 8), 64.0), 0, 255) is None  # 2 * 255 * 64 = 32640
    assert K.gemm_saturation(x, torch.full((4, 8), -64.0), 0, 255) is None
    assert K.gemm_saturation(x, torch.full((4, 8), 127.0), 0, 15) is None  # 4-bit activation codes
    assert K.gemm_saturation(x, torch.full((4, 8), 65.0), 0, 255) is not None


def _conv_reference(codes, zp, weight, stride, padding, groups):
    """QLinearConv's u8 x s8 sum per output, K in ORT's NHWC order (tap, channel), pairs saturated."""
    n, _, h, w = codes.shape
    m, cg, kh, kw = weight.shape
    padded = torch.nn.functional.pad(codes, (padding, padding, padding, padding), value=zp)
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    out = torch.zeros(n, m, ho, wo, dtype=torch.float64)
    per_group = m // groups
    for b in range(n):
        for o in range(m):
            g = o // per_group
            wk = [int(weight[o, ci, i, j]) for i in range(kh) for j in range(kw) for ci in range(cg)]
            for y in range(ho):
                for x in range(wo):
                    xk = [int(padded[b, g * cg + ci, y * stride + i, x * stride + j])
                          for i in range(kh) for j in range(kw) for ci in range(cg)]
                    out[b, o, y, x] = _pairs_reference(xk, wk)
    return out


@pytest.mark.parametrize(("c", "m", "k", "stride", "padding", "groups"),
                         [(3, 4, 3, 1, 1, 1), (5, 6, 1, 1, 0, 1), (4, 6, 3, 2, 1, 2), (2, 4, 3, 1, 1, 2)])
def test_conv_saturation_matches_nhwc_reference(c, m, k, stride, padding, groups):
    g = torch.Generator().manual_seed(c * 10 + m)
    codes = torch.randint(150, 256, (2, c, 5, 5), generator=g).float()
    weight = torch.randint(-128, 128, (m, c // groups, k, k), generator=g).float()
    zp = 3
    conv = {"stride": (stride, stride), "padding": (padding, padding), "dilation": (1, 1), "groups": groups}
    exact = torch.nn.functional.conv2d(torch.nn.functional.pad(codes.double(), (padding,) * 4, value=zp),
                                       weight.double(), stride=stride, groups=groups)
    lost = K.conv_saturation(codes, zp, weight, conv, 0, 255)
    got = exact + (0 if lost is None else lost)
    want = _conv_reference(codes, zp, weight, stride, padding, groups)
    assert torch.equal(got, want)
    assert not torch.equal(exact, want)


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3)  # wide layers: every dense layer can saturate
    return model.eval(), torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_vnni_model_saturates_without_vnni_and_the_avx2_targets_do_not():
    model, x = _cnn()
    vnni = lowbit.quantize(model, [x], "w8a8", target="x86-vnni", progress=False)
    assert not torch.equal(emulate_ort(vnni, cpu="x86-avx2")(x), emulate_ort(vnni, cpu="x86-vnni")(x))
    for target in ("x86-avx2-u8u8", "x86-avx2-w7"):
        qmodel = lowbit.quantize(model, [x], "w8a8", target=target, progress=False)
        exact = emulate_ort(qmodel, cpu="x86-vnni")(x)
        assert torch.equal(emulate_ort(qmodel, cpu="x86-avx2")(x), exact), target
        assert float((qmodel(x) - exact).abs().max()) < 0.1 * float(exact.abs().max())


def test_u8u8_is_the_vnni_model_number_for_number():
    model, x = _cnn()
    vnni = lowbit.quantize(model, [x], "w8a8", target="x86-vnni", progress=False)
    u8u8 = lowbit.quantize(model, [x], "w8a8", target="x86-avx2-u8u8", progress=False)
    assert torch.equal(vnni(x), u8u8(x))
    assert torch.equal(emulate_ort(vnni, cpu="x86-vnni")(x), emulate_ort(u8u8, cpu="x86-avx2")(x))


@pytest.mark.parametrize("target", ["x86-vnni", "x86-avx2-u8u8", "x86-avx2-w7"])
def test_emulation_of_this_cpu_is_what_ort_computes_here(target, tmp_path, recwarn):
    """On a VNNI CPU every target is exact; without VNNI the x86-vnni file saturates, and the
    emulation of this CPU (cpu="auto") must say exactly how."""
    model, x = _cnn()
    qmodel = lowbit.quantize(model, [x], "w8a8", target=target, progress=False)
    path = tmp_path / "model.onnx"
    lowbit.export_onnx(qmodel, path, x[:1])
    assert torch.equal(emulate_ort(qmodel)(x), OrtModel(path)(x)), cpu_info().describe()
