"""``lowbit.runtime.matmulnbits``: the simulation of MatMulNBits at accuracy_level 4 against ONNX Runtime.

Single nodes are compared on inputs built to be hard: half of every block's values sit on (or one
float32 step from) a rounding tie of the int8 grid, where any other way of computing the code
(dividing by the step, a reciprocal, half away from zero) gives a different answer.  With the
emulation, ORT's output and the simulation's differ only by float32 summation order; without it
they differ by the activation rounding itself.  ``benchmarks/check_non_vnni.py`` runs the same
check with ORT under ``qemu -cpu EPYC-Milan`` (AVX2, no AVX-512): MLAS's AVX2 quantizer rounds alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.export.llm.test_linear import CASES, _quant_linear, _run_nbits

import lowbit
from lowbit.export import export_llm
from lowbit.export.llm import load_session, run_step
from lowbit.export.llm._linear import prepare
from lowbit.runtime.matmulnbits import emulated_layers, int8_blocks, matmulnbits_inputs
from lowbit.zoo import tiny_llama

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from check_non_vnni import tie_inputs  # the inputs check_non_vnni gives ORT without VNNI under qemu

pytestmark = pytest.mark.usefixtures("one_thread")

SUM_ORDER = 1e-5  # float32 summation order, relative to the output's largest value


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(2, 5), (1, 1)], ids=["prefill", "decode"])
def test_ort_at_level_4_equals_the_emulation_on_rounding_ties(case, shape):
    spec, k = CASES[case]
    layer = _quant_linear(spec, k, bias=True)
    nb = prepare(layer, "fc")
    x = tie_inputs(torch.randn(*shape, k, generator=torch.Generator().manual_seed(1)), nb.block_size)
    ort_y = _run_nbits([("fc", layer, nb)], k, x.numpy(), 4)
    with torch.no_grad():
        plain = layer(x).numpy()
        emulated = layer(int8_blocks(x, nb.block_size)).numpy()
    scale = np.abs(ort_y).max()
    np.testing.assert_allclose(emulated, ort_y, rtol=0, atol=SUM_ORDER * scale)
    assert np.abs(plain - ort_y).max() > 10 * SUM_ORDER * scale  # the rounding is real, and visible


def test_int8_blocks_rounds_per_row_and_block():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -0.5, 0.25, 2.54],
                      [127.0, 63.5, -0.5, 1.5, 3.0, 1.0, 0.0, 0.0]])
    out = int8_blocks(x, 4)
    assert torch.equal(out[0, :4], torch.zeros(4))  # a block of zeros stays zero (no 0/0)
    step = 2.54 / 127  # block [1, -0.5, 0.25, 2.54]: amax 2.54
    assert torch.allclose(out[0, 4:], torch.round(x[0, 4:] / step) * step, atol=1e-6)
    # block [127, 63.5, -0.5, 1.5]: step 1, ties to even: 63.5 -> 64, -0.5 -> -0, 1.5 -> 2
    assert out[1, :4].tolist() == [127.0, 64.0, 0.0, 2.0]
    ragged = int8_blocks(x[:, :6], 4)  # the last block holds 2 values; its max is its own
    assert torch.equal(ragged[:, 4:], int8_blocks(x[:, 4:6], 4))
    assert out.dtype == x.dtype and out.shape == x.shape


def test_int8_blocks_passes_gradients_straight_through():
    x = torch.randn(3, 40, requires_grad=True)
    y = int8_blocks(x, 16)
    assert not torch.equal(y.detach(), x.detach())
    (y * torch.arange(40.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(40.0).expand(3, 40))
    with pytest.raises(ValueError, match="block must be positive"):
        int8_blocks(x, 0)


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(seed=0)
    return model, lowbit.quantize(model, None, "w4a16-g128", progress=False)


def test_the_context_rounds_exactly_the_matmulnbits_layers(llama):
    float_model, qmodel = llama
    layers = emulated_layers(qmodel)
    assert len(layers) == 2 * 7 + 1 and set(layers.values()) == {128} and "lm_head" in layers
    assert emulated_layers(float_model) == {}
    assert emulated_layers(lowbit.quantize(float_model, None, "w8a16", progress=False))["lm_head"] == 64  # K = 64
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = qmodel(ids).logits
        with matmulnbits_inputs(qmodel, accuracy_level=0) as none:
            assert none == {} and torch.equal(qmodel(ids).logits, plain)
        with matmulnbits_inputs(qmodel) as rounded:
            assert rounded == layers and not torch.equal(qmodel(ids).logits, plain)
        assert torch.equal(qmodel(ids).logits, plain)  # the hooks are gone
    with pytest.raises(ValueError, match="accuracy_level 2 is not emulated"), matmulnbits_inputs(qmodel, 2):
        pass


@pytest.mark.parametrize("block_size", [None, 32])
def test_a_model_at_level_4_matches_ort_where_the_plain_simulation_does_not(llama, tmp_path, block_size):
    """Exact up to float32 summation order, except where a value lands within a float32 step of a
    rounding tie: then one code differs and the difference follows that token through attention.
    So: most positions exact, and on average far closer than the plain simulation."""
    _, qmodel = llama
    path = tmp_path / "m.onnx"
    export_llm(qmodel, path, max_length=64, accuracy_level=4, block_size=block_size)
    session = load_session(path, threads=1)
    exact, plain_err, emulated_err = [], [], []
    for seed in range(3):
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))
        ort_logits, _ = run_step(session, ids.numpy())
        with torch.no_grad():
            plain = qmodel(ids).logits.numpy()
            with matmulnbits_inputs(qmodel, 4, block_size):
                emulated = qmodel(ids).logits.numpy()
        scale = np.abs(ort_logits).max()
        exact.append(np.abs(emulated - ort_logits).max(-1) <= SUM_ORDER * scale)
        plain_err.append(np.abs(plain - ort_logits).mean() / scale)
        emulated_err.append(np.abs(emulated - ort_logits).mean() / scale)
    assert np.concatenate(exact).mean() >= 0.5
    assert np.mean(emulated_err) < 0.2 * np.mean(plain_err)
