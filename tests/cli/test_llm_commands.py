"""``lowbit quantize`` on a causal LM, ``lowbit perplexity`` and ``lowbit export`` of its recipe, run as a
user runs them: a tiny random Llama (``lowbit.zoo.tiny_llama``) saved as a Hugging Face folder with a real HF
tokenizer (a byte-level BPE trained here on a few sentences), and calibration / evaluation text written to
files (disjoint halves of ``lowbit.zoo.english_sentences``), so nothing is downloaded.

References: the report's PyTorch perplexities are recomputed here window by window (cross-entropy of each
next token, the plain definition) on the float model and on the model quantized in this process with
``lowbit.quantize``; its greedy tokens are regenerated with Hugging Face ``generate`` and with
``lowbit.export.llm.generate`` on the written files.  The error cases run in process (``lowbit.cli.main``,
what the console script calls): a subprocess would spend seconds importing torch for each.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from tests.cli.test_entry_point import run

import lowbit
from lowbit import cli
from lowbit.export.llm import count_ops, generate, load_session
from lowbit.runtime import matmulnbits_inputs
from lowbit.zoo import calibration_batches, english_sentences, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300  # 256 bytes, one special token, the rest BPE merges
SEQ, WINDOWS, CALIB, NEW = 64, 4, 4, 8
QUANTIZE = ["--algorithms", "gptq", "--calib-samples", str(CALIB), "--seq-len", str(SEQ), "--calib-text",
            "calib.txt", "--eval-text", "eval.txt", "--eval-windows", str(WINDOWS), "--new-tokens", str(NEW),
            "--latency-runs", "1", "--quiet"]
TEXT = ["--eval-text", "eval.txt", "--windows", str(WINDOWS), "--seq-len", str(SEQ), "--quiet"]


def _tokenizer(sentences: list[str]):
    """A byte-level BPE tokenizer trained on ``sentences``, as transformers loads one from a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder holding lm/ (the model and its tokenizer), calib.txt and eval.txt."""
    root = tmp_path_factory.mktemp("llm")
    sentences = english_sentences(400, seed=0)
    (root / "calib.txt").write_text("\n".join(sentences[:200]))
    (root / "eval.txt").write_text("\n".join(sentences[200:]))
    tiny_llama(seed=0, vocab_size=VOCAB).save_pretrained(root / "lm")
    _tokenizer(sentences[:200]).save_pretrained(root / "lm")
    return root


@pytest.fixture(scope="module")
def quantized(work):
    """``lowbit quantize lm --algorithms gptq ...`` through the installed command: (folder, report.json)."""
    done = run("quantize", "lm", *QUANTIZE, "--out", "run", cwd=work)
    assert done.returncode == 0, done.stderr
    assert "| quantized | ONNX Runtime |" in done.stdout  # the report, printed
    return work / "run", json.loads((work / "run" / "report.json").read_text())


def _loaded(work):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(work / "lm", local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(work / "lm", local_files_only=True)


def _eval_windows(work, seq: int, count: int) -> torch.Tensor:
    _, tokenizer = _loaded(work)
    ids = tokenizer((work / "eval.txt").read_text(), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:seq * count]).view(count, seq)


def _naive_perplexity(model, tokenizer, text: str) -> float:
    """exp of the mean next-token cross-entropy over the first WINDOWS windows of SEQ tokens, one by one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[:WINDOWS * SEQ]).view(WINDOWS, SEQ)
    total = 0.0
    with torch.no_grad():
        for w in ids:
            total += float(F.cross_entropy(model(w[None]).logits[0, :-1].double(), w[1:], reduction="sum"))
    return math.exp(total / (WINDOWS * (SEQ - 1)))


def test_quantize_reports_what_a_reference_measures(work, quantized):
    folder, report = quantized
    llm = report["llm"]
    written = sorted(p.name for p in folder.iterdir())
    assert written == ["fp32.onnx", "model.onnx", "recipe.json", "report.json", "report.md"]
    assert "MatMulNBits" in count_ops(onnx.load(folder / "model.onnx"))
    assert "MatMulNBits" not in count_ops(onnx.load(folder / "fp32.onnx"))
    assert llm["size_bytes"] == {"fp32": (folder / "fp32.onnx").stat().st_size,
                                 "quantized": (folder / "model.onnx").stat().st_size}
    assert llm["size_bytes"]["quantized"] < 0.5 * llm["size_bytes"]["fp32"]
    assert llm["evaluation"] == {"source": "eval.txt", "windows": WINDOWS, "seq_len": SEQ,
                                 "tokens": WINDOWS * (SEQ - 1)}
    assert llm["calibration"] == {"source": "calib.txt", "samples": CALIB, "seq_len": SEQ}

    model, tokenizer = _loaded(work)
    text = (work / "eval.txt").read_text()
    calib = calibration_batches(tokenizer, n=CALIB, seq=SEQ, text=(work / "calib.txt").read_text())
    qmodel = lowbit.quantize(model, calib, "w4a16-g128", algorithms="gptq", progress=False)
    ppl = {name: {where: v["perplexity"] for where, v in by_where.items()}
           for name, by_where in llm["perplexity"].items()}
    assert ppl["fp32"]["pytorch"] == pytest.approx(_naive_perplexity(model, tokenizer, text), rel=1e-6)
    with matmulnbits_inputs(qmodel, 4):  # the simulation of the file: MatMulNBits' int8 inputs at level 4
        assert ppl["quantized"]["pytorch"] == pytest.approx(_naive_perplexity(qmodel, tokenizer, text), rel=1e-6)
    assert ppl["fp32"]["onnxruntime"] == pytest.approx(ppl["fp32"]["pytorch"], rel=1e-5)
    # the bound is 1%; what is left is float32 summation order and an odd code on a rounding tie
    assert ppl["quantized"]["onnxruntime"] == pytest.approx(ppl["quantized"]["pytorch"], rel=1e-3)
    assert [r["metrics"]["perplexity"] for r in report["rows"]] == [
        ppl["fp32"]["pytorch"], ppl["quantized"]["pytorch"], ppl["fp32"]["onnxruntime"],
        ppl["quantized"]["onnxruntime"]]
    md = (folder / "report.md").read_text()
    assert f"| quantized | ONNX Runtime | {ppl['quantized']['onnxruntime']:.3f} |" in md
    assert [row["threads"] for row in llm["latency_ms"]] == [2]
    assert all(row[m][phase] > 0 for row in llm["latency_ms"] for m in ("fp32", "quantized")
               for phase in ("prefill", "decode"))


def test_greedy_tokens_in_the_report_are_those_both_runtimes_generate(work, quantized):
    folder, report = quantized
    model, tokenizer = _loaded(work)
    for name, path in (("fp32", "fp32.onnx"), ("quantized", "model.onnx")):
        session = load_session(folder / path, threads=1)
        for entry in report["llm"]["greedy"][name]:
            ids = tokenizer(entry["prompt"], return_tensors="pt")["input_ids"]
            assert generate(session, ids, NEW)[0, ids.shape[1]:].tolist() == entry["onnxruntime"]
            same = np.asarray(entry["pytorch"]) == np.asarray(entry["onnxruntime"])
            assert entry["agree"] == (NEW if same.all() else int(np.argmin(same)))
            if name == "fp32":  # the float file computes what the float model does, to ~1e-6
                with torch.no_grad():
                    expected = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
                assert entry["pytorch"] == expected[0, ids.shape[1]:].tolist() == entry["onnxruntime"]


def test_recipe_replays_to_the_same_bytes_and_perplexity_agrees_with_the_report(work, quantized, capsys,
                                                                                 monkeypatch):
    folder, report = quantized
    ppl = report["llm"]["perplexity"]
    replay = run("export", "run/recipe.json", "--out", "again.onnx", cwd=work)
    assert replay.returncode == 0, replay.stderr
    assert (work / "again.onnx").read_bytes() == (folder / "model.onnx").read_bytes()
    cases = {"float": (["lm"], ppl["fp32"]["pytorch"]),
             "onnx": (["run/model.onnx", "--tokenizer", "lm", "--threads", "2"],
                      ppl["quantized"]["onnxruntime"]),
             "recipe": (["--recipe", "run/recipe.json"], ppl["quantized"]["pytorch"])}
    for name, (args, expected) in cases.items():
        if name == "onnx":  # through the installed command
            done = run("perplexity", *args, *TEXT, "--json", f"{name}.json", cwd=work)
            assert done.returncode == 0, (name, done.stderr)
            stdout = done.stdout
        else:  # in process, as the command's main (a subprocess spends seconds importing torch)
            monkeypatch.chdir(work)
            assert cli.main(["perplexity", *args, *TEXT, "--json", f"{name}.json"]) == 0
            stdout = capsys.readouterr().out
        got = json.loads((work / f"{name}.json").read_text())
        assert got["tokens"] == expected["tokens"] and got["windows"] == WINDOWS
        assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6), name
        assert f"perplexity {got['perplexity']:.4f}" in stdout


def test_cli_files_fuse_projections_and_an_older_recipe_replays_unfused(work, quantized):
    """New recipes export q/k/v and gate/up as one MatMulNBits each (``llm.fuse``); a recipe written
    before the field existed still replays, unfused, as it was exported then."""
    folder, _ = quantized
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["llm"]["fuse"] is True
    fused = count_ops(onnx.load(folder / "model.onnx"))["MatMulNBits"]
    del recipe["llm"]["fuse"]
    (work / "old_recipe.json").write_text(json.dumps(recipe))
    replay = run("export", "old_recipe.json", "--out", "unfused.onnx", cwd=work)
    assert replay.returncode == 0, replay.stderr
    unfused = count_ops(onnx.load(work / "unfused.onnx"))["MatMulNBits"]
    blocks = json.loads((work / "lm" / "config.json").read_text())["num_hidden_layers"]
    assert unfused - fused == 3 * blocks  # per block: q/k/v 3 -> 1 and gate/up 2 -> 1


def test_lowbit_report_renders_the_llm_report(quantized, capsys):
    folder, report = quantized
    assert cli.main(["report", str(folder)]) == 0
    page = (folder / "report.html").read_text()
    assert "quantized onnx" in page and report["notes"][0] in page


def _error(args, capsys) -> str:
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_folders_that_are_not_causal_lms_are_one_line_errors(work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(work)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                                "model_type": "bert"}))
    (tmp_path / "untokenized").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "untokenized" / name).write_bytes((work / "lm" / name).read_bytes())
    assert "has no config.json" in _error(["perplexity", str(tmp_path / "empty")], capsys)
    assert "is not a causal language model (config.json: BertModel)" in _error(
        ["perplexity", str(tmp_path / "bert")], capsys)
    assert "has no tokenizer lowbit can load" in _error(["quantize", str(tmp_path / "untokenized"), "--out",
                                                         str(tmp_path / "o")], capsys)
    assert "needs --tokenizer FOLDER" in _error(["perplexity", "run/model.onnx"], capsys)
    assert "not GGUF files" in _error(["quantize", "SmolLM2.Q4_1.gguf"], capsys)
    assert "--seq-len: for causal LMs only" in _error(["quantize", str(tmp_path / "bert"), "--seq-len", "8"],
                                                      capsys)
    assert "quantized activations" in _error(["quantize", "lm", "--config", "w8a8", "--eval-text",
                                              "eval.txt", "--seq-len", "16", "--quiet", "--out",
                                              str(tmp_path / "o")], capsys)


def test_gptq_without_calibration_text_is_a_clear_error_and_rtn_reads_none(work, tmp_path, capsys,
                                                                           monkeypatch):
    """No cached english_text and no apt-get / dpkg-deb to fetch it: round to nearest still runs (it reads no
    calibration data); gptq says which text is missing and how to give one."""
    monkeypatch.chdir(work)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    small = ["--seq-len", "16", "--eval-text", "eval.txt", "--eval-windows", "1", "--new-tokens", "2",
             "--latency-runs", "1", "--quiet"]
    assert cli.main(["quantize", "lm", *small, "--out", str(tmp_path / "rtn")]) == 0
    assert json.loads((tmp_path / "rtn" / "report.json").read_text())["llm"]["calibration"] is None
    capsys.readouterr()
    message = _error(["quantize", "lm", "--algorithms", "gptq", *small, "--out", str(tmp_path / "g")], capsys)
    assert "the calib text (lowbit.zoo.english_text('calib')" in message
    assert "pass --calib-text FILE" in message
    missing = _error(["quantize", "lm", "--algorithms", "gptq", "--calib-text", "nosuch.txt", *small, "--out",
                      str(tmp_path / "g")], capsys)
    assert "--calib-text nosuch.txt does not exist" in missing
    short = _error(["quantize", "lm", "--algorithms", "gptq", "--calib-text", "calib.txt", "--calib-samples",
                    "9999", *small, "--out", str(tmp_path / "g")], capsys)
    assert "fewer than count=9999" in short and "--calib-text FILE" in short


DATA = "tests.cli.test_llm_commands:random_tokens"


def random_tokens():
    """--data for the causal LM: two batches of token ids (what a user's own calibration factory returns)."""
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=gen)} for _ in range(2)]


def test_data_factory_calibrates_instead_of_the_text_and_is_recorded(work, tmp_path):
    out = tmp_path / "run"
    args = ["quantize", str(work / "lm"), "--data", DATA, "--algorithms", "gptq", "--seq-len", "16",
            "--eval-text", str(work / "eval.txt"), "--eval-windows", "1", "--new-tokens", "2",
            "--latency-runs", "1", "--quiet", "--out", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())["llm"]
    assert report["calibration"] == {"source": f"--data {DATA}", "batches": 2}
    assert json.loads((out / "recipe.json").read_text())["data"] == DATA
    model, _ = _loaded(work)
    qmodel = lowbit.quantize(model, random_tokens(), "w4a16-g128", algorithms="gptq", progress=False)
    with matmulnbits_inputs(qmodel, 4):
        expected = lowbit.report.perplexity(qmodel, _eval_windows(work, 16, 1)).perplexity
    assert report["perplexity"]["quantized"]["pytorch"]["perplexity"] == pytest.approx(expected, rel=1e-6)


def test_the_float_target_and_a_tied_table_through_the_command_line(work, tmp_path, monkeypatch):
    """``--algorithms "gptq(true_sequential=true,asymmetric=true),tie_embedding"``: the file holds one table
    (GatherBlockQuantized on lm_head's MatMulNBits weight), and the recipe replays to the same bytes."""
    monkeypatch.chdir(work)
    quantize = ["--algorithms", "gptq(true_sequential=true,asymmetric=true),tie_embedding",
                *QUANTIZE[2:]]
    assert cli.main(["quantize", "lm", *quantize, "--out", str(tmp_path / "tied")]) == 0
    model = onnx.load(str(tmp_path / "tied" / "model.onnx"))
    assert count_ops(model)["GatherBlockQuantized"] == 1
    assert not any(t.name.startswith("model.embed_tokens") for t in model.graph.initializer)
    steps = json.loads((tmp_path / "tied" / "recipe.json").read_text())["options"]["algorithms"]
    assert [s["name"] for s in steps][-2:] == ["gptq", "tie_embedding"] and steps[-2]["asymmetric"] is True
    assert cli.main(["export", str(tmp_path / "tied" / "recipe.json"), "--out", str(tmp_path / "again.onnx")]) == 0
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "tied" / "model.onnx").read_bytes()
