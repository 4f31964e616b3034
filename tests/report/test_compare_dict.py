"""compare with a dict of keyword tensors (a tokenizer's output): fidelity, sizes, a latency grid fed by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.report import compare

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


class TinyEncoder(nn.Module):
    """Token ids and a mask in, a ModelOutput-like mapping out (what a Hugging Face encoder returns)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        self.ff = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.ff(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).float()
        return {"logits": self.head((h * mask).sum(1) / mask.sum(1).clamp(min=1)), "hidden": h}


def _tokens(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"attention_mask": torch.ones(batch, seq, dtype=torch.int64),
            "input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = TinyEncoder().eval()
    qmodel = lowbit.quantize(model, [_tokens(8, 10, s) for s in range(3)], "w8a8", progress=False)
    path = tmp_path_factory.mktemp("compare_dict") / "int8.onnx"
    lowbit.export_onnx(qmodel, path, _tokens(2, 10, 0))
    return model, qmodel, path


def test_dict_inputs_give_ort_rows_and_a_latency_grid(setup):
    model, qmodel, path = setup
    # a sequence length the export never saw: the files' sequence axis is dynamic
    result = compare(model, qmodel, inputs=_tokens(6, 13, 9), onnx=path, batch_sizes=(1, 4), latency_runs=2)
    rows = {r["model"]: r for r in result.rows}
    assert set(rows) == {"fp32", "quantized", "fp32 onnx", "quantized onnx"}
    assert rows["fp32 onnx"]["metrics"]["max_abs_diff"] < 1e-4  # fp32.onnx exported from the same dict
    assert rows["quantized onnx"]["metrics"]["cosine"] > 0.99 and "top1_agreement" in rows["quantized"]["metrics"]
    assert 0 < rows["quantized onnx"]["size_mb"] < rows["fp32 onnx"]["size_mb"]
    cells = sorted((x["model"], x["batch"]) for x in result.latency)
    assert cells == [("fp32", 1), ("fp32", 4), ("quantized", 1), ("quantized", 4)]
    assert result.parity["simulation"]["cosine"] > 0.999


def test_eval_fn_predicts_on_dicts(setup):
    model, qmodel, path = setup
    held_out = _tokens(16, 7, 11)

    def agreement(predict):
        with torch.no_grad():
            return float((predict(held_out).argmax(1) == model(**held_out)["logits"].argmax(1)).float().mean())

    result = compare(model, qmodel, agreement, inputs=_tokens(4, 7, 5), onnx=path, latency_runs=1, emulate=False)
    metrics = {r["model"]: r["metrics"]["metric"] for r in result.rows}
    assert metrics["fp32"] == 1.0 and metrics["fp32 onnx"] == 1.0 and metrics["quantized onnx"] >= 0.75


def test_batch_sizes_larger_than_the_inputs_are_an_error(setup):
    model, qmodel, path = setup
    with pytest.raises(ValueError, match=r"batch_sizes \[8\] exceed the 4 rows"):
        compare(model, qmodel, inputs=_tokens(4, 5, 0), onnx=path, batch_sizes=(1, 8))
