"""What ONNX Runtime's ``MatMulNBits`` does to the activations at ``accuracy_level`` 4, in PyTorch.

``export_llm`` writes each weight-quantized Linear as ``com.microsoft.MatMulNBits``.  At
``accuracy_level`` 4 (its default: the fast int8 path, "CompInt8" in ORT's MLAS library) ONNX
Runtime also rounds the *input* to int8 before the product: every row of ``A`` (one token's
features), in blocks of the weight's ``block_size`` along K, gets its own symmetric scale

    amax = max |a| over the block,   q = round_half_even(a * (127 / amax)),   a' = q * (amax / 127)

(a block of zeros stays zero), and the int8 codes meet the weight's codes in exact integer dot
products, scaled by ``amax / 127`` times the weight's scale.  So the file computes
``a' @ W_q.T`` where the plain simulation computes ``a @ W_q.T``: on SmolLM2 at 4 bits that costs
about 2% perplexity (BENCHMARKS.md), and the simulation would not say so.

``matmulnbits_inputs(qmodel)`` makes the simulation say so: inside it, every Linear that
``export_llm`` writes as MatMulNBits rounds its input exactly like that (``int8_blocks``; the
multiply by ``127 / amax``, not a divide by ``amax / 127``, as MLAS computes it, so that values on
a rounding tie go the same way), and the model's outputs are the exported file's up to float32
summation order.  Training through it (QAT) passes gradients straight through the rounding.

    with matmulnbits_inputs(qmodel):                    # accuracy_level 4, as export_llm's default
        ppl = lowbit.report.perplexity(qmodel, windows)  # what ONNX Runtime will measure

Checked against ONNX Runtime 1.32's CPU kernels on inputs full of rounding ties: on AVX-512 VNNI
(``tests/runtime/test_matmulnbits.py``: 4- and 8-bit weights, blocks 16 to 128, a ragged last
block, zero-points, prefill and one-token decode) and on AVX2 without VNNI, under ``qemu -cpu
EPYC-Milan`` (``benchmarks/check_non_vnni.py``).  One node's outputs agree up to float32
summation order.  A whole model agrees in distribution, not value by value: ORT's attention and
norms sum in another order than PyTorch's, a last-bit difference now and then moves an input across
a rounding tie, that code differs by one, and the difference grows through the next layers'
roundings (on SmolLM2 the logits of a token part within a few layers of the first such flip).  So
the simulation of the file predicts the file's perplexity (``benchmarks/bench_llm_parity.py``),
while the plain simulation misses it by the rounding's systematic cost.  Levels 0 and 1 compute in float32 and need no emulation
(``accuracy_level`` 0 or 1 makes this a no-op); levels 2 and 3 (fp16 / bf16) are not emulated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..export.llm._linear import _weight_quantized, block_of

EMULATED_LEVELS = (0, 1, 4)


def int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (``(..., K)``, float32) rounded as MLAS's CompInt8 path rounds a MatMulNBits input:
    symmetric int8 per row and per ``block`` consecutive features (the last block may be shorter),
    scale ``amax / 127``; returned dequantized, in ``x``'s dtype.  Gradients pass straight through."""
    if block < 1:
        raise ValueError(f"int8_blocks: block must be positive, got {block}")
    k = x.shape[-1]
    pad = -k % block
    xf = x.detach().float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.reshape(*xf.shape[:-1], -1, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    limit = torch.full_like(amax, 127.0)
    # 127 / amax as one IEEE division: torch computes ``scalar / tensor`` as a reciprocal times the
    # scalar, one ulp off now and then, which flips a code that lies on a rounding tie
    inverse = torch.where(amax > 0, limit / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse)  # half to even, as _mm512_roundscale_ps(_MM_ROUND_NEAREST)
    out = (codes * (amax / limit)).reshape(*xf.shape)[..., :k].to(x.dtype)
    return x + (out - x).detach() if x.requires_grad else out


def _hook(block: int):
    def round_input(_module, args):
        return (int8_blocks(args[0], block), *args[1:])
    return round_input


def emulated_layers(qmodel: nn.Module, block_size: int | None = None) -> dict[str, int]:
    """``{name: block}`` for every Linear ``export_llm(qmodel, block_size=block_size)`` writes as
    MatMulNBits, with the block its input is rounded in."""
    return {name: block_of(m, name, block_size) for name, m in qmodel.named_modules()
            if isinstance(m, nn.Linear) and _weight_quantized(m, name)}


@contextlib.contextmanager
def matmulnbits_inputs(qmodel: nn.Module, accuracy_level: int = 4, block_size: int | None = None) -> Iterator[dict]:
    """Inside, ``qmodel`` computes what ``export_llm(qmodel, accuracy_level=..., block_size=...)``
    computes in ONNX Runtime: at level 4 each MatMulNBits layer rounds its input with
    ``int8_blocks`` (see the module docstring); at levels 0 and 1 nothing changes.

    Yields:
        ``{layer name: block}`` of the layers whose input is rounded (empty at levels 0 and 1).

    Raises:
        ValueError: levels 2 and 3 (fp16 / bf16 compute), which are not emulated; a weight
            MatMulNBits cannot hold (as ``export_llm`` would say).
    """
    if accuracy_level not in EMULATED_LEVELS:
        raise ValueError(f"matmulnbits_inputs: accuracy_level {accuracy_level!r} is not emulated (levels "
                         f"{EMULATED_LEVELS}: 0/1 float32, 4 int8 activations)")
    layers = emulated_layers(qmodel, block_size) if accuracy_level == 4 else {}
    handles = [qmodel.get_submodule(name).register_forward_pre_hook(_hook(block)) for name, block in layers.items()]
    try:
        yield layers
    finally:
        for h in handles:
            h.remove()


__all__ = ["EMULATED_LEVELS", "emulated_layers", "int8_blocks", "matmulnbits_inputs"]
