"""TieEmbedding (lowbit.ptq.tie): the token embedding reads the head's quantized table, on a tiny random
Llama whose lm_head is tied to its embedding (as SmolLM2's).  The simulation looks up exactly the head's
fake-quantized rows; export_llm writes the table once (GatherBlockQuantized on the head's MatMulNBits
initializers) and ONNX Runtime computes the simulation's logits; lowbit.save stores it once, packed or
not, and lowbit.load ties it again (bit-identical outputs)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import lowbit
from lowbit.export import export_llm
from lowbit.export.llm import count_ops, load_session, run_step
from lowbit.ptq import GPTQ, TieEmbedding, parse_steps
from lowbit.zoo import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 256, (1, 64), generator=g)} for _ in range(8)]


@pytest.fixture(scope="module")
def tied(calib):
    return lowbit.quantize(tiny_llama(seed=0), calib, "w4a16-g32", algorithms=[GPTQ(), TieEmbedding()],
                           progress=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_the_embedding_looks_up_the_heads_quantized_rows_after_gptq(tied, calib, ids):
    embed, head = tied.model.embed_tokens, tied.lm_head
    assert embed.weight is head.weight and embed.weight_quantizer is head.weight_quantizer
    with torch.no_grad():
        table = head.weight_quantizer(head.weight)
        assert torch.equal(embed(ids), F.embedding(ids, table))
    report = tied.lowbit_summary.reports[-1]
    assert report == {"embedding": "model.embed_tokens", "head": "lm_head"}
    # GPTQ wrote the head's weight; the untied model keeps the float table for its int8 embedding
    untied = lowbit.quantize(tiny_llama(seed=0), calib, "w4a16-g32", algorithms=["gptq"], progress=False)
    assert untied.model.embed_tokens.weight is not untied.lm_head.weight
    assert torch.equal(untied.lm_head.weight, head.weight)  # the same GPTQ result either way


def test_export_writes_the_table_once_and_ort_computes_the_simulation(tied, calib, ids, tmp_path):
    proto = export_llm(tied, tmp_path / "tied.onnx", max_length=64, accuracy_level=0)
    onnx.checker.check_model(proto)
    ops = count_ops(proto)
    assert ops["GatherBlockQuantized"] == 1 and ops["MatMulNBits"] == 15
    names = [t.name for t in proto.graph.initializer]
    assert not any(n.startswith("model.embed_tokens") for n in names)
    gbq = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("lm_head"))
    assert gbq.input[0] == head.input[1] == "lm_head.weight.packed"  # one initializer, two readers
    logits, _ = run_step(load_session(tmp_path / "tied.onnx", threads=1), ids.numpy())
    with torch.no_grad():
        ref = tied(ids).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()

    untied = lowbit.quantize(tiny_llama(seed=0), calib, "w4a16-g32", algorithms=["gptq"], progress=False)
    export_llm(untied, tmp_path / "untied.onnx", max_length=64)
    saved = 256 * 64 - 256 * 64 // 2  # the int8 table less nothing: the tied file has no second table
    assert (tmp_path / "untied.onnx").stat().st_size - (tmp_path / "tied.onnx").stat().st_size >= saved


@pytest.mark.parametrize("packed", [False, True])
def test_save_and_load_keep_one_table_and_the_same_outputs(tied, ids, tmp_path, packed):
    folder = lowbit.save(tied, tmp_path / "ck", packed=packed)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    table = "model.embed_tokens.weight" + (".packed" if packed else "")
    assert table in keys and not any(k.startswith("lm_head.weight") for k in keys)
    loaded = lowbit.load(tiny_llama(seed=1), folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight_quantizer is loaded.model.embed_tokens.weight_quantizer
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tied(ids).logits)


def test_a_short_recipe_and_clear_errors():
    assert list(parse_steps("gptq,tie_embedding")) == [GPTQ(), TieEmbedding()]
    from lowbit.config import Rule, get_config

    config = get_config("w4a16-g32")
    float_table = config.with_rules(Rule(pattern="type:Embedding", layer=None))
    with pytest.raises(ValueError, match="not a quantized embedding"):
        lowbit.quantize(tiny_llama(seed=0), None, float_table, algorithms=["tie_embedding"], progress=False)
    float_head = config.with_rules(Rule(pattern="lm_head", layer=None))
    with pytest.raises(ValueError, match="lm_head has no quantized weight"):
        lowbit.quantize(tiny_llama(seed=0), None, float_head, algorithms=["tie_embedding"], progress=False)
    with pytest.raises(ValueError, match="has no get_input_embeddings"):
        lowbit.quantize(torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8)), None, config,
                        algorithms=["tie_embedding"], progress=False)


def test_with_the_float_target_a_head_that_will_be_tied_keeps_the_plain_target(calib, monkeypatch):
    """GPTQ(asymmetric=True) fits every layer to the float model's outputs, but a head followed by
    TieEmbedding keeps its table (the plain target: no shift), the decoder layers still get theirs."""
    from lowbit.ptq import _gptq_layers

    shifts = {}
    original = _gptq_layers.gptq_layer

    def record(layer, h, *, name, shift=None, **options):
        shifts[name] = shift
        return original(layer, h, name=name, shift=shift, **options)

    monkeypatch.setattr(_gptq_layers, "gptq_layer", record)
    gptq = GPTQ(asymmetric=True, true_sequential=True)
    lowbit.quantize(tiny_llama(seed=0), calib, "w4a16-g32", algorithms=[gptq], progress=False)
    assert shifts["lm_head"] is not None
    shifts.clear()
    lowbit.quantize(tiny_llama(seed=0), calib, "w4a16-g32", algorithms=[gptq, TieEmbedding()], progress=False)
    assert shifts["lm_head"] is None and shifts["model.layers.1.mlp.down_proj"].abs().max() > 0
