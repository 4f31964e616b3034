"""all-MiniLM-L6-v2 (real weights) through PTQ and export, on real English sentences."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.zoo import english_sentences, minilm
from lowbit.zoo.minilm import mean_pool


class SentenceEncoder(nn.Module):
    """BERT + mean pooling + L2 norm: the sentence-transformers recipe, as one traceable module."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)


@pytest.fixture(scope="module")
def setup():
    bert, tok = minilm()
    encoder = SentenceEncoder(bert).eval()
    sentences = english_sentences(224)

    def batch(items):
        b = tok(items, padding="longest", truncation=True, max_length=64, return_tensors="pt")
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    calib = [batch(sentences[i:i + 32]) for i in range(0, 96, 32)]
    held_out = batch(sentences[96:224])
    with torch.no_grad():
        ref = encoder(**held_out)
    return encoder, calib, held_out, ref


@pytest.mark.parametrize("config, floor", [("w8a8", 0.99), ("w8a8-dynamic", 0.99)])
def test_embeddings_stay_close(setup, config, floor):
    encoder, calib, held_out, ref = setup
    qmodel = lowbit.quantize(encoder, calib, config, progress=False)
    with torch.no_grad():
        out = qmodel(**held_out)
    cosine = (ref * out).sum(-1)
    # Measured: w8a8 (MSE calibration) 0.993 mean, w8a8-dynamic 0.993 mean.
    assert cosine.mean() > floor and cosine.min() > 0.97
    layers = qmodel.lowbit_summary.layers
    assert len(layers.quantized) == 6 * 6 + 1 + 3  # 36 encoder Linear + pooler + 3 Embedding
    assert all(kind == "LayerNorm" for kind in layers.unsupported.values())


def test_smoothquant_static_w8a8_reaches_0995_in_simulation_and_ort(setup, tmp_path):
    encoder, calib, held_out, ref = setup
    qmodel = lowbit.quantize(encoder, calib, "w8a8", smoothquant=0.8, progress=False)
    report = qmodel.lowbit_summary.smoothing
    # Post-LN BERT: only value -> attention.output.dense folds; q/k/v, intermediate (LayerNorm
    # outputs that are also residual inputs), output.dense (GELU) and the pooler get a scale.
    assert len(report.folded) == 6 and len(report.inserted) == 6 * 3 + 1 and not report.left
    with torch.no_grad():
        cosine = (ref * qmodel(**held_out)).sum(-1)
    # Measured: 0.9977 mean, 0.9947 min (0.9933 / 0.9843 without smoothing).
    assert cosine.mean() >= 0.995 and cosine.min() > 0.99
    # ... and the exported file, run by ONNX Runtime, keeps it.
    import onnxruntime as ort

    path = tmp_path / "minilm.w8a8.onnx"
    names = ["input_ids", "attention_mask"]
    lowbit.export_onnx(qmodel, path, (held_out["input_ids"][:2], held_out["attention_mask"][:2]), input_names=names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {k: held_out[k].numpy() for k in names})[0]
    ort_cosine = (ref * torch.from_numpy(out)).sum(-1)
    assert ort_cosine.mean() >= 0.995
    assert lowbit.inspect_onnx(path).op_counts.get("MatMulIntegerToFloat", 0) >= 36


def test_dynamic_export_runs_integer_matmuls(setup, tmp_path):
    encoder, _, held_out, _ = setup
    qmodel = lowbit.quantize(encoder, None, "w8a8-dynamic", progress=False)
    example = (held_out["input_ids"][:2], held_out["attention_mask"][:2])
    lowbit.export_onnx(qmodel, tmp_path / "minilm.onnx", example, input_names=["input_ids", "attention_mask"])
    report = lowbit.inspect_onnx(tmp_path / "minilm.onnx")
    integer_matmuls = sum(report.op_counts.get(op, 0) for op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat"))
    assert integer_matmuls >= 36  # every Linear of the 6 layers
