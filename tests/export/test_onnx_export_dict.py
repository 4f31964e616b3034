"""export_onnx with a dict of keyword tensors (a tokenizer's output): names, order, dynamic axes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit
from lowbit.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50


class TinyTokenModel(nn.Module):
    """A BERT-shaped toy: embeddings, a masked mean, a head; returns a mapping like a ModelOutput."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(VOCAB, 16)
        self.types = nn.Embedding(2, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, use_cache=None, **kwargs):
        h = self.words(input_ids) + (0 if token_type_ids is None else self.types(token_type_ids))
        h = torch.relu(self.mix(h))  # (B, T, 16)
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        return {"last_hidden_state": h, "logits": self.head(pooled)}


def _tokens(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, seq // 2:] = 0  # one padded row
    # dict order differs from forward's on purpose: export must follow the signature
    return {"token_type_ids": torch.zeros(batch, seq, dtype=torch.int64), "attention_mask": mask,
            "input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = TinyTokenModel().eval()
    qmodel = lowbit.quantize(model, [_tokens(4, 6, seed) for seed in range(3)], "w8a8", progress=False)
    path = tmp_path_factory.mktemp("dict") / "tiny.int8.onnx"
    export_onnx(qmodel, path, _tokens(2, 6))
    return qmodel, path


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_inputs_are_named_after_the_keys_in_forward_order_with_batch_and_sequence_dynamic(exported):
    _, path = exported
    graph = lowbit.export.onnx_export.onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(_dims(i) == ["batch", "sequence"] for i in graph.input)
    assert [o.name for o in graph.output] == ["last_hidden_state", "logits"]  # the mapping's keys
    hidden, logits = (_dims(o) for o in graph.output)
    assert hidden[0] == "batch" and isinstance(hidden[1], str) and hidden[2] == 16
    assert logits == ["batch", 3]


@pytest.mark.parametrize("batch, seq", [(1, 3), (5, 11)])
def test_ort_runs_other_batch_sizes_and_sequence_lengths(exported, batch, seq):
    qmodel, path = exported
    x = _tokens(batch, seq, seed=7)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hidden, logits = session.run(None, {k: v.numpy() for k, v in x.items()})
    with torch.no_grad():
        ref = qmodel(**x)
    assert hidden.shape == (batch, seq, 16) and logits.shape == (batch, 3)
    np.testing.assert_allclose(logits, ref["logits"].numpy(), atol=1e-4)


def test_ort_model_takes_the_dict(exported):
    from lowbit.runtime.ort import OrtModel

    qmodel, path = exported
    x = _tokens(3, 9, seed=3)
    _, logits = OrtModel(path)(x)
    with torch.no_grad():
        torch.testing.assert_close(logits, qmodel(**x)["logits"], atol=1e-4, rtol=0)


def test_dynamic_axes_override_the_defaults(tmp_path):
    model = TinyTokenModel().eval()
    x = _tokens(2, 6)
    export_onnx(model, tmp_path / "m.onnx", x, dynamic_axes={"input_ids": {0: "b"}, "logits": {0: "b"}})
    graph = lowbit.export.onnx_export.onnx.load(str(tmp_path / "m.onnx")).graph
    dims = {v.name: _dims(v) for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == ["b", 6] and dims["attention_mask"] == ["batch", "sequence"]
    assert dims["logits"] == ["b", 3]


def test_positional_token_inputs_get_a_dynamic_sequence_too(tmp_path):
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinyTokenModel()

        def forward(self, ids, mask):
            return self.inner(ids, mask)["logits"]

    x = _tokens(2, 6)
    export_onnx(Positional().eval(), tmp_path / "p.onnx", (x["input_ids"], x["attention_mask"]))
    graph = lowbit.export.onnx_export.onnx.load(str(tmp_path / "p.onnx")).graph
    assert [_dims(i) for i in graph.input] == [["batch", "sequence"]] * 2


@pytest.mark.parametrize("kwargs, match", [
    ({"example_inputs": {"input_ids": torch.zeros(1, 2, dtype=torch.int64), "pixels": torch.zeros(1, 2)}},
     r"Linear\.forward takes no argument\(s\) \['input_ids', 'pixels'\]"),
    ({"example_inputs": {"input_ids": [1, 2]}}, "must map argument names to tensors"),
    ({"example_inputs": _tokens(1, 2), "input_names": ["a", "b", "c"]}, "named after its keys"),
    ({"example_inputs": _tokens(1, 2), "dynamic_axes": {"nope": {0: "b"}}}, r"dynamic_axes names \['nope'\]"),
])
def test_bad_dict_inputs_are_clear_errors(tmp_path, kwargs, match):
    model = nn.Linear(2, 2) if "pixels" in kwargs["example_inputs"] else TinyTokenModel().eval()
    with pytest.raises(ValueError, match=match):
        export_onnx(model, tmp_path / "bad.onnx", **kwargs)
    assert not (tmp_path / "bad.onnx").exists()
