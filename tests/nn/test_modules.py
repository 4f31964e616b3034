"""Quantized layers: the float layer applied to fake-quantized tensors, sharing its parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lowbit.nn.modules import (
    QUANTIZED,
    QuantAdd,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    TensorQuant,
    has_quantizers,
    is_quantized,
)
from lowbit.nn.quantizer import Quantizer
from lowbit.numerics import INT8_ACTIVATION, INT8_WEIGHT, UINT8_ACTIVATION, fake_quantize

W8 = TensorQuant(spec=INT8_WEIGHT)
A8 = TensorQuant(spec=UINT8_ACTIVATION)
A8_DYNAMIC = TensorQuant(spec=UINT8_ACTIVATION, dynamic=True)


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _calibrate(qmod: nn.Module, *batches) -> None:
    """What PTQ does: weights observed once, activations over the batches, then frozen."""
    acts = []
    for role, q in qmod.quantizers():
        if q.mode == "dynamic":
            continue
        if role == "weight":
            q.observer(qmod.weight)
            q.freeze()
        else:
            q.mode = "calibrating"
            acts.append(q)
    with torch.no_grad():
        for b in batches:
            qmod(b)
    for q in acts:
        q.freeze()


def _fq(x: torch.Tensor, q: Quantizer) -> torch.Tensor:
    scale, zero_point = q.qparams_for(x)
    return fake_quantize(x, scale, zero_point, q.spec)


# (float layer, input shape); no bias, so the comparison is exact (bias handling is tested elsewhere).
LAYERS = {
    "linear": (lambda: nn.Linear(8, 6, bias=False), (4, 8)),
    "linear-3d": (lambda: nn.Linear(8, 6, bias=False), (2, 5, 8)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1, bias=False), (2, 4, 10)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (2, 4, 9, 9)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 7, 7)),
    "conv2d-grouped-dilated": (
        lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, bias=False),
        (1, 4, 8, 8),
    ),
}


def _make(kind, seed=0):
    torch.manual_seed(seed)
    build, shape = LAYERS[kind]
    return build().eval(), shape


@pytest.mark.parametrize("kind", list(LAYERS))
def test_output_is_float_layer_on_fake_quantized_input_and_weight(kind):
    fmod, shape = _make(kind)
    qmod = QUANTIZED[type(fmod)].from_float(fmod, name=kind, weight=W8, input=A8)
    _calibrate(qmod, _rand(*shape, seed=1), _rand(*shape, seed=2))
    x = _rand(*shape, seed=3, scale=1.5)
    with torch.no_grad():
        y = qmod(x)
        xq, wq = _fq(x, qmod.input_quantizer), _fq(fmod.weight, qmod.weight_quantizer)
        expected = functional_call(fmod, {"weight": wq}, (xq,))
        plain = fmod(x)
    assert torch.equal(y, expected)
    assert not torch.equal(y, plain)  # the quantizers are in the path
    # The weight quantizer is per output channel: one scale per row of the weight.
    assert tuple(qmod.weight_quantizer.scale.shape) == (fmod.weight.shape[0],)


@pytest.mark.parametrize("kind", ["linear", "conv2d-depthwise"])
def test_dynamic_input_quantization(kind):
    fmod, shape = _make(kind)
    qmod = QUANTIZED[type(fmod)].from_float(fmod, name=kind, weight=W8, input=A8_DYNAMIC)
    _calibrate(qmod)  # only the weight; the input needs no data
    for seed, scale in ((4, 0.1), (5, 10.0)):
        x = _rand(*shape, seed=seed, scale=scale)
        with torch.no_grad():
            expected = functional_call(
                fmod, {"weight": _fq(fmod.weight, qmod.weight_quantizer)}, (_fq(x, qmod.input_quantizer),)
            )
            assert torch.equal(qmod(x), expected)
    assert not qmod.input_quantizer.is_frozen


def test_weight_only_leaves_input_float():
    fmod, shape = _make("linear")
    qmod = QuantLinear.from_float(fmod, name="fc", weight=W8)
    assert qmod.input_quantizer is None and qmod.output_quantizer is None
    assert [role for role, _ in qmod.quantizers()] == ["weight"]
    _calibrate(qmod)
    x = _rand(*shape, seed=1)
    with torch.no_grad():
        assert torch.equal(qmod(x), x @ _fq(fmod.weight, qmod.weight_quantizer).T)


def test_output_quantizer_quantizes_the_result():
    fmod, shape = _make("linear")
    qmod = QuantLinear.from_float(
        fmod, name="fc", weight=W8, input=A8, output=TensorQuant(spec=INT8_ACTIVATION)
    )
    assert [role for role, _ in qmod.quantizers()] == ["input", "weight", "output"]
    assert qmod.output_quantizer.name == "fc.output"
    _calibrate(qmod, _rand(*shape, seed=1))
    x = _rand(*shape, seed=2)
    with torch.no_grad():
        inner = functional_call(
            fmod, {"weight": _fq(fmod.weight, qmod.weight_quantizer)}, (_fq(x, qmod.input_quantizer),)
        )
        assert torch.equal(qmod(x), _fq(inner, qmod.output_quantizer))


def test_linear_with_bias_stays_close_to_the_exact_formula():
    torch.manual_seed(0)
    fmod = nn.Linear(8, 6).eval()
    qmod = QuantLinear.from_float(fmod, name="fc", weight=W8, input=A8)
    _calibrate(qmod, _rand(4, 8, seed=1))
    x = _rand(4, 8, seed=2)
    with torch.no_grad():
        expected = nn.functional.linear(
            _fq(x, qmod.input_quantizer), _fq(fmod.weight, qmod.weight_quantizer), fmod.bias
        )
        # Whatever the bias grid is, it moves each output by at most half a step of s_in * s_w.
        step = (qmod.input_quantizer.scale * qmod.weight_quantizer.scale).max()
        torch.testing.assert_close(qmod(x), expected, atol=float(step) / 2 + 1e-6, rtol=0)


def test_quantizer_names_follow_the_layer_name():
    fmod, _ = _make("conv2d")
    qmod = QuantConv2d.from_float(fmod, name="features.3.conv", weight=W8, input=A8)
    names = {role: q.name for role, q in qmod.quantizers()}
    assert names == {"input": "features.3.conv.input", "weight": "features.3.conv.weight"}


# -- parameters are shared; to_float is the inverse ----------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_from_float_shares_parameters(kind):
    fmod, _ = _make(kind)
    qmod = QUANTIZED[type(fmod)].from_float(fmod, name=kind, weight=W8, input=A8)
    assert qmod.weight is fmod.weight
    with torch.no_grad():
        qmod.weight.add_(1.0)
    assert torch.equal(fmod.weight, qmod.weight)  # the same storage, not a copy
    assert isinstance(qmod, type(fmod)) and isinstance(qmod, nn.Module)


def test_from_float_shares_bias_and_embedding_table():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    qlin = QuantLinear.from_float(lin, name="fc", weight=W8)
    assert qlin.bias is lin.bias
    emb = nn.Embedding(10, 4)
    qemb = QuantEmbedding.from_float(emb, name="emb", weight=W8)
    assert qemb.weight is emb.weight


@pytest.mark.parametrize(
    "fmod",
    [nn.Linear(8, 6), nn.Conv1d(4, 6, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Embedding(10, 4, padding_idx=0)],
    ids=["linear", "conv1d", "conv2d-depthwise", "embedding"],
)
def test_to_float_is_the_exact_float_layer_with_the_same_parameters(fmod):
    original_keys = list(fmod.state_dict())
    qmod = QUANTIZED[type(fmod)].from_float(
        fmod, name="layer", weight=W8, input=None if isinstance(fmod, nn.Embedding) else A8
    )
    assert set(qmod.state_dict()) > set(original_keys)  # quantizer state was added
    back = qmod.to_float()
    assert type(back) is type(fmod)
    assert not is_quantized(back) and not has_quantizers(back)
    assert list(back.state_dict()) == original_keys
    for name, p in fmod.named_parameters():
        assert back.get_parameter(name) is p
    assert not any(isinstance(m, Quantizer) for m in back.modules())
    assert not hasattr(back, "input_quantizer") and not hasattr(back, "weight_quantizer")
    x = (
        torch.randint(0, 10, (3, 5))
        if isinstance(fmod, nn.Embedding)
        else torch.randn(
            (2, 8)
            if isinstance(fmod, nn.Linear)
            else (2, 4, 9)
            if isinstance(fmod, nn.Conv1d)
            else (2, 4, 9, 9)
        )
    )
    with torch.no_grad():
        assert torch.equal(back(x), fmod(x))
    assert repr(back) == repr(fmod)


# -- embedding --------------------------------------------------------------------------------
def test_embedding_quantizes_each_row_and_leaves_indices_alone():
    torch.manual_seed(0)
    emb = nn.Embedding(6, 8)
    with torch.no_grad():  # rows of very different magnitude: one scale each keeps every row's precision
        emb.weight.mul_(torch.logspace(-3, 3, 6).unsqueeze(1))
    qemb = QuantEmbedding.from_float(emb, name="emb", weight=W8)
    _calibrate(qemb)
    wq = qemb.weight_quantizer
    assert tuple(wq.scale.shape) == (6,)
    table = fake_quantize(emb.weight, wq.scale, wq.zero_point, INT8_WEIGHT)
    idx = torch.tensor([[0, 5, 2], [3, 3, 1]])
    before = idx.clone()
    with torch.no_grad():
        out = qemb(idx)
    assert torch.equal(idx, before) and idx.dtype == torch.int64
    assert torch.equal(out, table[idx])
    # Per-row scales: even the 1e-3 row is represented to 1/127 of its own range.
    rel = (table - emb.weight).abs().amax(1) / emb.weight.abs().amax(1)
    assert bool((rel <= 0.5 / 127 + 1e-6).all())


def test_embedding_respects_padding_idx():
    emb = nn.Embedding(5, 4, padding_idx=0)
    qemb = QuantEmbedding.from_float(emb, name="emb", weight=W8)
    _calibrate(qemb)
    with torch.no_grad():
        assert torch.equal(qemb(torch.tensor([0, 0])), torch.zeros(2, 4))


# -- types ---------------------------------------------------------------------------------------
def test_quantized_types_subclass_their_float_types():
    assert QUANTIZED == {
        nn.Linear: QuantLinear,
        nn.Conv1d: QuantConv1d,
        nn.Conv2d: QuantConv2d,
        nn.Embedding: QuantEmbedding,
    }
    for float_type, quant_type in QUANTIZED.items():
        assert issubclass(quant_type, float_type)
    qlin = QuantLinear.from_float(nn.Linear(3, 2), name="fc", weight=W8)
    assert isinstance(qlin, nn.Linear) and is_quantized(qlin) and has_quantizers(qlin)
    assert not is_quantized(nn.Linear(3, 2)) and not has_quantizers(nn.Linear(3, 2))
    add = QuantAdd(A8, A8, name="add")
    assert has_quantizers(add) and not is_quantized(add)  # an add has no float layer to go back to


def test_quantized_layer_built_directly_is_usable_or_refused():
    try:
        qlin = QuantLinear(4, 3)
    except TypeError:
        return  # refusing up front, pointing at from_float, would be fine too
    assert isinstance(qlin, nn.Linear)
    x = torch.randn(2, 4)
    assert torch.equal(qlin(x), nn.functional.linear(x, qlin.weight, qlin.bias))
    assert list(qlin.quantizers()) == []


def test_hooks_registered_after_the_swap_do_not_leak_between_layers():
    lin = nn.Linear(4, 3)
    qlin = QuantLinear.from_float(lin, name="fc", weight=W8)
    calls = []
    qlin.register_forward_hook(lambda *args: calls.append("quantized"))
    lin(torch.randn(2, 4))
    assert calls == []


# -- QuantAdd ---------------------------------------------------------------------------------------
def test_quant_add_quantizes_both_operands():
    add = QuantAdd(A8, TensorQuant(spec=INT8_ACTIVATION), name="block.add")
    assert [role for role, _ in add.quantizers()] == ["a", "b"]
    assert (add.a_quantizer.name, add.b_quantizer.name) == ("block.add.a", "block.add.b")
    a_cal, b_cal = _rand(4, 8, seed=1).relu() * 6, _rand(4, 8, seed=2) * 0.01
    add.a_quantizer.mode = add.b_quantizer.mode = "calibrating"
    add(a_cal, b_cal)
    add.a_quantizer.freeze()
    add.b_quantizer.freeze()
    a, b = _rand(4, 8, seed=3).relu() * 6, _rand(4, 8, seed=4) * 0.01
    expected = _fq(a, add.a_quantizer) + _fq(b, add.b_quantizer)
    assert torch.equal(add(a, b), expected)
    # Each operand keeps its own scale: the small operand is not drowned by the big one's grid.
    assert add.a_quantizer.scale > 100 * add.b_quantizer.scale
    assert not torch.equal(_fq(a, add.a_quantizer), a) and not torch.equal(_fq(b, add.b_quantizer), b)


def test_quant_add_in_calibrating_mode_is_a_plain_add():
    add = QuantAdd(A8, A8, name="add")
    add.a_quantizer.mode = add.b_quantizer.mode = "calibrating"
    a, b = _rand(3, 3, seed=1), _rand(3, 3, seed=2)
    assert torch.equal(add(a, b), a + b)
    assert add.a_quantizer.observer.has_data and add.b_quantizer.observer.has_data
