"""``w4a16-g128`` on a tiny random Llama (``lowbit.zoo.tiny_llama``) whose hidden size 160 and MLP
width 352 are not multiples of 128, so every Linear has a shorter last group: the logits equal a
manual round-to-nearest model, and the exported file runs in ONNX Runtime with the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.test_llm_presets import rtn
from torch import nn

import lowbit
from lowbit.export import inspect_onnx
from lowbit.runtime.ort import OrtModel
from lowbit.zoo import tiny_llama

pytest.importorskip("transformers")  # tiny_llama builds a transformers LlamaForCausalLM


def manual_rtn(model: nn.Module) -> nn.Module:
    """Every Linear (``lm_head`` too) on int4 groups of 128 (signed scales), the embedding on int8 rows; the tied table
    becomes two tables, as each layer rounds it its own way."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(rtn(module.weight.detach(), -8, 7, 128, True))
        embed = ref.model.embed_tokens
        embed.weight = nn.Parameter(rtn(model.model.embed_tokens.weight.detach(), -127, 127, None, False))
    return ref


def test_w4a16_g128_equals_manual_rtn_and_runs_in_onnxruntime(tmp_path):
    model = tiny_llama(seed=0, hidden_size=160, intermediate_size=352, use_cache=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    qmodel = lowbit.quantize(model, None, "w4a16-g128", progress=False)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 15 and set(linears) <= set(qmodel.lowbit_summary.layers.quantized)  # lm_head too
    q_proj = dict(qmodel.named_modules())["model.layers.0.self_attn.q_proj"]
    assert tuple(q_proj.weight_quantizer.scale.shape) == (160, 2)  # 128 + 32

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = qmodel(ids).logits
        reference = manual_rtn(model)(ids).logits
        assert not torch.equal(logits, model(ids).logits)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)

    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # a mask: no packed-sequence probe
    lowbit.export_onnx(qmodel, tmp_path / "llama.onnx", inputs)
    exact = OrtModel(tmp_path / "llama.onnx", optimization="basic")(inputs)
    torch.testing.assert_close(exact, logits, rtol=1e-4, atol=1e-4)
    assert inspect_onnx(tmp_path / "llama.onnx").op_counts.get("MatMulNBits") == 15
    default = OrtModel(tmp_path / "llama.onnx")(inputs)  # MatMulNBits, int8 activations
    assert float((default - logits).abs().max()) < 0.02 * float(logits.abs().max())
