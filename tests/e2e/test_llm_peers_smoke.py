"""Smoke test of ``benchmarks/bench_llm_peers.py``'s pieces on the tiny random Llama: the FP32 file
scores as the PyTorch model does; ONNX Runtime's default quantizer rewrites the decoder MatMuls (not
the tied lm_head) and its file scores as a PyTorch model holding its dequantized weights; lowbit's
"decoder" coverage leaves lm_head and the embedding float; ORT's GPTQ reads the calibration
windows; NNCF compresses (skipped without nncf); the table's verdicts compute the issue's ratios."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import lowbit
from lowbit.export import export_llm
from lowbit.report import perplexity
from lowbit.zoo import tiny_llama

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import _llm_peers as peers
import bench_llm_peers as bench

LAYERS, WINDOW = 2, 64
DECODER_LINEARS = 7 * LAYERS  # q k v o gate up down


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its FP32 export, evaluation and calibration windows (random byte ids)."""
    torch.manual_seed(0)
    model = tiny_llama(seed=0, hidden_size=128, intermediate_size=256, use_cache=False).eval()
    g = torch.Generator().manual_seed(0)
    windows, calib = (torch.randint(0, 256, (n, WINDOW), generator=g) for n in (3, 2))
    path = tmp_path_factory.mktemp("peers") / "fp32.onnx"
    export_llm(model, path, accuracy_level=0, max_length=WINDOW)
    return model, windows, calib, path


def _torch_ppl(model, windows) -> float:
    return perplexity(model, windows, progress=False).perplexity


def _dequantized(model, quantized: onnx.ModelProto):
    """A copy of ``model`` holding the weights of ``quantized``'s MatMulNBits (symmetric, 4-bit)."""
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    ref, modules = copy.deepcopy(model), dict(model.named_modules())
    refs, done = dict(ref.named_modules()), 0
    for node in quantized.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        packed, scales = inits[node.input[1]], inits[node.input[2]]  # (N, blocks, 64) uint8, (N * blocks,)
        codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(attrs["N"], -1).astype(np.float32) - 8
        weight = codes * np.repeat(scales.reshape(attrs["N"], -1), attrs["block_size"], axis=1)
        name = node.name.split("/")[0]  # export_llm names a Linear's node "<module>/MatMul"
        assert name in modules, node.name
        with torch.no_grad():
            refs[name].weight = torch.nn.Parameter(torch.from_numpy(weight[:, : attrs["K"]].copy()))
        done += 1
    return ref, done


def test_fp32_file_scores_as_the_pytorch_model(tiny):
    model, windows, _, path = tiny
    assert peers.ort_perplexity(path, windows, threads=1) == pytest.approx(_torch_ppl(model, windows), rel=1e-4)


def test_ort_default_quantizer_covers_decoder_matmuls_and_scores(tiny, tmp_path):
    model, windows, _, path = tiny
    out = tmp_path / "ort.onnx"
    quantized = peers.ort_quantize(path, out, "default", accuracy_level=0)
    nbits = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == DECODER_LINEARS
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 0 for n in nbits)
    assert peers.onnx_coverage(quantized).startswith(f"{DECODER_LINEARS} MatMulNBits (4-bit x{DECODER_LINEARS}, "
                                                      "symmetric); float MatMul: lm_head")
    assert peers.file_mb(out) < peers.file_mb(path)
    ref, replaced = _dequantized(model, quantized)
    assert replaced == DECODER_LINEARS
    ppl = peers.ort_perplexity(out, windows, threads=1)
    assert ppl == pytest.approx(_torch_ppl(ref, windows), rel=1e-4)  # scored as its own weights say
    assert ppl != pytest.approx(_torch_ppl(model, windows), rel=1e-6)


def test_lowbit_decoder_coverage_leaves_head_and_embedding_float(tiny, tmp_path):
    model, windows, _, _ = tiny
    qmodel = lowbit.quantize(model, None, peers.lowbit_config(4, "decoder"), progress=False)
    quantized = set(qmodel.lowbit_summary.layers.quantized)
    assert "lm_head" not in quantized and "model.embed_tokens" not in quantized
    assert len([n for n in quantized if ".layers." in n]) == DECODER_LINEARS
    export_llm(qmodel, tmp_path / "lb.onnx", accuracy_level=0, max_length=WINDOW)
    assert peers.ort_perplexity(tmp_path / "lb.onnx", windows, threads=1) == pytest.approx(
        _torch_ppl(qmodel, windows), rel=1e-4)


def test_ort_gptq_reads_the_calibration_windows(tiny, tmp_path):
    _, windows, calib, path = tiny
    reader = peers.WindowReader(calib, path)
    feeds = list(reader)
    assert len(feeds) == 2 and feeds[1]["input_ids"].tolist() == calib[1:2].tolist()
    assert feeds[0]["past_key_values.0.key"].shape == (1, 2, 0, 32)
    quantized = peers.ort_quantize(path, tmp_path / "gptq.onnx", "gptq", calib=calib)
    assert sum(n.op_type == "MatMulNBits" for n in quantized.graph.node) == DECODER_LINEARS
    assert np.isfinite(peers.ort_perplexity(tmp_path / "gptq.onnx", windows, threads=1))


def test_nncf_int4_compresses_and_scores(tiny):
    pytest.importorskip("nncf")
    model, windows, calib, _ = tiny
    compressed = peers.nncf_compress(model, calib)
    assert peers.nncf_coverage(model, compressed).startswith(f"int4 x{DECODER_LINEARS}, int8 x")
    assert peers.state_dict_mb(compressed) < peers.state_dict_mb(model) / 2
    ppl = _torch_ppl(compressed, windows)
    assert np.isfinite(ppl) and ppl != pytest.approx(_torch_ppl(model, windows), rel=1e-6)


def test_verdicts_compute_gap_and_target():
    rows = [peers.Row("FP32", "", ppl_torch=10.0, ppl_ort=10.0),
            peers.Row("lowbit W3 g128 sym, RTN", "", ppl_torch=20.0, ppl_ort=30.0),
            peers.Row("lowbit W3 g128 sym, GPTQ", "", ppl_torch=14.0, ppl_ort=20.0),
            peers.Row("lowbit W4 g128 sym, GPTQ, lm_head float", "", ppl_torch=11.0, ppl_ort=11.5),
            peers.Row("ORT matmul_nbits_quantizer, default", "", ppl_ort=11.2),
            peers.Row("NNCF compress_weights, int4_sym g128, ratio 1.0", "", ppl_torch=12.0)]
    lines = bench.verdicts(rows)
    assert lines[0] == "W3 g128, PyTorch: GPTQ closes 60.0% of RTN's gap to FP32 (target >= 60%)."
    assert lines[1] == "W3 g128, ORT: GPTQ closes 50.0% of RTN's gap to FP32 (target >= 60%)."
    assert "1.1000x FP32 in PyTorch (target <= 1.12x: met)" in lines[2]
    assert "closer to FP32 than 1 of 2" in lines[2] and "(not: ORT matmul_nbits_quantizer, default)" in lines[2]
    assert len(bench.table(rows)) == 2 + len(rows)


def test_ort_hqq_fits_zero_points_and_scores(tiny, tmp_path):
    _, windows, _, path = tiny
    quantized = peers.ort_quantize(path, tmp_path / "hqq.onnx", "hqq", accuracy_level=4)
    coverage = peers.onnx_coverage(quantized)
    assert coverage.startswith(f"{DECODER_LINEARS} MatMulNBits (4-bit x{DECODER_LINEARS}, {DECODER_LINEARS} with zero")
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4
               for n in quantized.graph.node if n.op_type == "MatMulNBits")
    assert np.isfinite(peers.ort_perplexity(tmp_path / "hqq.onnx", windows, threads=1))


def test_lowbit_mixed_stage_gives_some_linears_8_bits_and_scores(tiny, tmp_path):
    model, windows, calib, _ = tiny
    ids = [{"input_ids": w[None]} for w in calib]
    qmodel = bench.mixed_quantize(model, ids, 5.0, ["gptq"])
    bits = {n: m.weight_quantizer.spec.bits for n, m in qmodel.named_modules() if hasattr(m, "weight_quantizer")
            and n != "model.embed_tokens"}
    assert set(bits.values()) == {4, 8}
    params = {n: qmodel.get_submodule(n).weight.numel() for n in bits}
    assert sum(params[n] * bits[n] for n in bits) / sum(params.values()) <= 5.0 + 1e-9
    export_llm(qmodel, tmp_path / "mixed.onnx", accuracy_level=0, max_length=WINDOW)
    assert peers.ort_perplexity(tmp_path / "mixed.onnx", windows, threads=1) == pytest.approx(
        _torch_ppl(qmodel, windows), rel=1e-4)


def test_mixed_verdict_compares_with_nncfs_ratio_08_mix():
    rows = [peers.Row("FP32", "", ppl_torch=10.0, ppl_ort=10.0),
            peers.Row("lowbit mixed W4 g128 / W8, 4.5 avg bits, GPTQ", "", ppl_torch=10.5, ppl_ort=10.6, size_mb=90.0),
            peers.Row("NNCF compress_weights, int4_sym g128, ratio 0.8 (Hessian)", "", ppl_torch=11.0, size_mb=180.0)]
    line = bench.verdicts(rows)[-1]
    assert line.startswith("lowbit mixed W4 g128 / W8, 4.5 avg bits, GPTQ: 1.0500x FP32 in PyTorch (target <= 1.06x: met)")
    assert "closer to FP32, at equal or smaller size (90.0 vs 180.0 MB)" in line


def test_awq_batches_reach_the_step_and_the_label():
    import argparse

    import lowbit

    args = argparse.Namespace(awq_batches=16, calib=64)
    awq, gptq = bench.algorithm_steps("AWQ+GPTQ", args)
    assert isinstance(awq, lowbit.ptq.AWQ) and awq.batches == 16 and gptq == lowbit.ptq.GPTQ(clip=False)
    clip = argparse.Namespace(awq_batches=None, calib=64, gptq_clip="auto")
    assert bench.algorithm_steps("GPTQ", clip) == [lowbit.ptq.GPTQ(clip="auto")]
    assert bench.algorithm_label("GPTQ", clip) == "GPTQ with clip search"
    assert bench.algorithm_label("AWQ+GPTQ", clip) == "AWQ+GPTQ"  # auto: AWQ's clip, none of GPTQ's
    assert bench.algorithm_label("AWQ+GPTQ", args) == "AWQ+GPTQ (AWQ search on 16 windows)"
    assert bench.algorithm_label("GPTQ", args) == "GPTQ"
    best = argparse.Namespace(awq_batches=None, calib=64, gptq_clip="auto", tie=True,
                              gptq="gptq(true_sequential=true,asymmetric=true,rescale=true)")
    gptq, tie = bench.algorithm_steps("GPTQ", best)
    assert gptq == lowbit.ptq.GPTQ(clip="auto", true_sequential=True, asymmetric=True, rescale=True)
    assert tie == lowbit.ptq.TieEmbedding()
    assert bench.algorithm_steps("GPTQ", best, "decoder") == [gptq]  # lm_head float: nothing to tie
    assert bench.algorithm_label("GPTQ", best) == "GPTQ with clip search, true sequential, the float target, scale refit"
    every = argparse.Namespace(awq_batches=None, calib=64)
    assert bench.algorithm_steps("AWQ+GPTQ", every)[0].batches is None
    assert bench.algorithm_label("AWQ+GPTQ", every) == "AWQ+GPTQ"
