"""MatMulNBits packing (lowbit.export.llm._linear) against a brute-force reading of ORT's spec, and
single MatMulNBits nodes in ONNX Runtime against lowbit's simulation of the same Linear.

The reference unpacks ``B`` as the contrib-op documentation describes it (uint8 ``(N, k_blocks,
blob)``, the first 4-bit code of a byte in its low nibble; ``scales`` ``(N, k_blocks)``; zero-points
packed the same way along the blocks, default ``2 ** (bits - 1)``), dequantizes ``(code - zp) *
scale`` and drops the padding of a ragged last block: it must equal the fake-quantized weight the
simulation multiplies by, bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import LayerQuant, QuantConfig
from lowbit.export.llm._linear import NBits, fusable, prepare, write_linear
from lowbit.export.llm._writer import GraphWriter
from lowbit.nn.modules import TensorQuant
from lowbit.numerics import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _group(bits, size, signed=True, symmetric=True):
    return QuantSpec(bits=bits, signed=signed, symmetric=symmetric, granularity="group", axis=1, group_size=size)


# name -> (spec, in_features): ragged last blocks, an odd block count with zero-points, K below the block.
CASES = {
    "int4-g32": (_group(4, 32), 96),
    "int4-g128-ragged": (_group(4, 128), 160),
    "uint4-g32-affine-odd-blocks": (_group(4, 32, signed=False, symmetric=False), 96),
    "int4-g64-affine-ragged": (_group(4, 64, symmetric=False), 80),
    "int3-g128": (_group(3, 128), 160),
    "int4-g128-narrow-k": (_group(4, 128), 48),
    "int8-channel": (QuantSpec(bits=8, narrow_range=True, granularity="channel", axis=0), 576),
    "uint8-channel-affine": (QuantSpec(bits=8, signed=False, symmetric=False, granularity="channel", axis=0), 72),
    "int8-g16": (_group(8, 16), 40),
    "int6-tensor": (QuantSpec(bits=6), 64),
}


def _quant_linear(spec: QuantSpec, k: int, n: int = 24, *, bias: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = QuantConfig(name="t", default=LayerQuant(weight=TensorQuant(spec=spec)))
    model = lowbit.quantize(nn.Sequential(nn.Linear(k, n, bias=bias)), None, config, progress=False)
    return model[0]


def _unpack(nb: NBits) -> np.ndarray:
    """Brute force from the spec: W (N, K) float32, element by element."""
    n = nb.packed.shape[0]
    w = np.zeros((n, nb.k), np.float32)
    for row in range(n):
        for k in range(nb.k):
            b, j = divmod(k, nb.block_size)
            if nb.bits == 8:
                code = int(nb.packed[row, b, j])
                zp = 128 if nb.zero_points is None else int(nb.zero_points[row, b])
            else:
                code = (int(nb.packed[row, b, j // 2]) >> (4 * (j % 2))) & 0xF
                zp = 8 if nb.zero_points is None else (int(nb.zero_points[row, b // 2]) >> (4 * (b % 2))) & 0xF
            w[row, k] = np.float32(code - zp) * nb.scales[row, b]
    return w


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", [None, 16])
def test_packed_weight_dequantizes_to_the_simulated_weight(case, block):
    """``block`` 16: blocks smaller than the groups, each group's scale and zero-point repeated."""
    spec, k = CASES[case]
    layer = _quant_linear(spec, k)
    nb = prepare(layer, "fc", block)
    assert nb.block_size == (block or spec.group_size or nb.block_size)
    blocks = -(-k // nb.block_size)
    assert nb.bits == (4 if spec.bits <= 4 else 8)
    assert nb.packed.shape == (24, blocks, nb.block_size * nb.bits // 8) and nb.packed.dtype == np.uint8
    assert nb.scales.shape == (24, blocks) and nb.scales.dtype == np.float32
    assert (nb.zero_points is None) == spec.symmetric  # symmetric grids use the default zero-point
    with torch.no_grad():
        simulated = layer.weight_quantizer(layer.weight).numpy()
    np.testing.assert_array_equal(_unpack(nb), simulated)


def test_ragged_padding_dequantizes_to_zero():
    """The codes padding the last block equal its zero-point: ORT reads zeros there."""
    nb = prepare(_quant_linear(_group(4, 64, symmetric=False), 80), "fc")
    codes = np.stack([nb.packed & 0xF, nb.packed >> 4], axis=-1).reshape(24, 2, 64)
    zp_last = (nb.zero_points[:, 0] >> 4) & 0xF  # block 1 sits in the high nibble of byte 0
    np.testing.assert_array_equal(codes[:, 1, 16:], np.repeat(zp_last[:, None], 48, axis=1))


def _run_nbits(parts, k: int, x: np.ndarray, accuracy_level: int) -> np.ndarray:
    w = GraphWriter()
    a = w.input("x", onnx.TensorProto.FLOAT, ["b", "s", k])
    n = sum(m.out_features for _, m, _ in parts)
    write_linear(w, parts, a, "fc", accuracy_level=accuracy_level, output="y")
    w.output("y", onnx.TensorProto.FLOAT, ["b", "s", n])
    model = w.model(opset=21, graph_name="t", producer="test", metadata={})
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("case", CASES)
def test_matmulnbits_in_ort_matches_the_simulation(case):
    """accuracy_level 0: float arithmetic on the same dequantized weight, only the summation order
    differs (float32 rounding, ~1e-7 relative to the output's scale).  accuracy_level 4: ORT rounds
    the input to int8 per block (step = block max / 127), a relative error of at most 1/254 per
    element; summed over K it stays within 1% of the output's scale."""
    spec, k = CASES[case]
    layer = _quant_linear(spec, k, bias=True)
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = layer(x).numpy()
    parts = [("fc", layer, prepare(layer, "fc"))]
    scale = np.abs(ref).max()
    np.testing.assert_allclose(_run_nbits(parts, k, x.numpy(), 0), ref, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(_run_nbits(parts, k, x.numpy(), 4), ref, rtol=0, atol=1e-2 * scale)


def test_fused_parts_equal_their_separate_outputs():
    """A symmetric and an affine weight (one with zero-points, one without) in one MatMulNBits."""
    sym, aff = _quant_linear(_group(4, 32), 96, n=16, seed=1), _quant_linear(_group(4, 32, symmetric=False), 96, seed=2)
    parts = [("a", sym, prepare(sym, "a")), ("b", aff, prepare(aff, "b"))]
    assert fusable([nb for _, _, nb in parts])
    x = torch.randn(1, 3, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch.cat([sym(x), aff(x)], dim=-1).numpy()
    np.testing.assert_allclose(_run_nbits(parts, 96, x.numpy(), 0), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_fusable_needs_equal_layouts():
    g32, g64 = prepare(_quant_linear(_group(4, 32), 64), "a"), prepare(_quant_linear(_group(4, 64), 64), "b")
    int8 = prepare(_quant_linear(QuantSpec(bits=8, granularity="channel", axis=0), 64), "c")
    assert fusable([g32, g32]) and fusable([None, None])
    assert not fusable([g32, g64]) and not fusable([g32, int8]) and not fusable([g32, None])


@pytest.mark.parametrize("spec, match", [
    (_group(4, 48), "power of two"),
    (QuantSpec(bits=4, granularity="group", axis=0, group_size=16), "axis=1"),
    (QuantSpec(bits=8, granularity="channel", axis=1), "axis 0"),
])
def test_weights_matmulnbits_cannot_hold_are_refused_by_name(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        prepare(_quant_linear(spec, 96), "model.layers.3.mlp.up_proj")
    assert "model.layers.3.mlp.up_proj" in str(info.value)


def test_a_block_must_divide_the_group():
    with pytest.raises(ValueError, match="does not divide the weight's group size 32"):
        prepare(_quant_linear(_group(4, 32), 96), "fc", 64)
    with pytest.raises(ValueError, match="power of two"):
        prepare(_quant_linear(QuantSpec(bits=8, granularity="channel", axis=0), 96), "fc", 24)


def test_quantized_activations_are_refused():
    config = lowbit.CONFIGS["w8a8-dynamic"]
    layer = lowbit.quantize(nn.Sequential(nn.Linear(32, 8)), None, config, progress=False)[0]
    with pytest.raises(ValueError, match="weight-only"):
        prepare(layer, "fc")


def test_non_linear_is_refused():
    with pytest.raises(TypeError, match="nn.Linear"):
        prepare(nn.Conv1d(4, 4, 1), "conv")
