"""The report of ``lowbit quantize`` on a causal LM: report.json and report.md.

report.json has the shape of ``lowbit.compare``'s (``rows``: one per model and place measured,
``notes``), so ``lowbit report`` renders it, plus an ``llm`` object with everything measured:
perplexity (PyTorch and ONNX Runtime, FP32 and quantized), file sizes, ONNX Runtime latency of
prefill and decode, greedy agreement, the CPU, and the quantization time.
"""

from __future__ import annotations

from pathlib import Path

MODELS = ("fp32", "quantized")


def file_bytes(path: Path) -> int:
    """Bytes of an ONNX file and of its external-data file (``<name>.data``) when it has one."""
    data = path.with_name(f"{path.name}.data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def build(llm: dict) -> dict:
    """report.json from the measurements in ``llm`` (see ``lowbit.cli._llm_commands``)."""
    rows = []
    for where, suffix in (("pytorch", ""), ("onnxruntime", " onnx")):
        for name in MODELS:
            size = llm["size_bytes"][name] / 1e6 if suffix else None
            rows.append({"model": name + suffix, "where": "ort" if suffix else "pytorch", "size_mb": size,
                         "metrics": {"perplexity": llm["perplexity"][name][where]["perplexity"]}})
    ev = llm["evaluation"]
    notes = [(f"Perplexity over {ev['windows']} windows of {ev['seq_len']} tokens ({ev['tokens']} predicted "
              f"tokens) of {ev['source']}.")]
    for row in llm["latency_ms"]:
        f, q = row["fp32"], row["quantized"]
        notes.append(f"ONNX Runtime latency, {row['threads']} thread(s), {llm['cpu']}: prefill of "
                     f"{ev['seq_len']} tokens {f['prefill']:.1f} ms FP32, {q['prefill']:.1f} ms quantized "
                     f"({q['prefill'] / f['prefill']:.2f}x); one decode step after them "
                     f"{f['decode']:.2f} ms, {q['decode']:.2f} ms ({q['decode'] / f['decode']:.2f}x).")
    return {"rows": rows, "latency": [], "notes": notes, "parity": {}, "llm": llm}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else ""


def _perplexity_table(llm: dict) -> list[str]:
    ppl, size = llm["perplexity"], llm["size_bytes"]
    base = ppl["fp32"]["pytorch"]["perplexity"]
    lines = ["| model | measured in | perplexity | vs FP32 (PyTorch) | file MB | size vs FP32 |",
             "|---|---|---:|---:|---:|---:|"]
    for where in ("pytorch", "onnxruntime"):
        for name in MODELS:
            value = ppl[name][where]["perplexity"]
            if where == "onnxruntime":
                label = "ONNX Runtime"
                file_cells = f"{size[name] / 1e6:.1f} | {_ratio(size[name], size['fp32'])}"
            else:
                label, file_cells = "PyTorch" + (" (simulation)" if name != "fp32" else ""), " | "
            lines.append(f"| {name} | {label} | {value:.3f} | {_ratio(value, base)} | {file_cells} |")
    return lines


def _latency_table(llm: dict) -> list[str]:
    seq = llm["evaluation"]["seq_len"]
    head = f"| threads | model | prefill {seq} tokens, ms | vs FP32 | decode 1 token after {seq}, ms |"
    lines = [head + " vs FP32 |", "|---:|---|---:|---:|---:|---:|"]
    for row in llm["latency_ms"]:
        for name in MODELS:
            t, f = row[name], row["fp32"]
            lines.append(f"| {row['threads']} | {name} | {t['prefill']:.1f} | "
                         f"{_ratio(t['prefill'], f['prefill'])} | {t['decode']:.2f} | "
                         f"{_ratio(t['decode'], f['decode'])} |")
    return lines


def _greedy_table(llm: dict) -> list[str]:
    lines = ["| prompt | fp32 | quantized |", "|---|---:|---:|"]
    for f, q in zip(llm["greedy"]["fp32"], llm["greedy"]["quantized"], strict=True):
        prompt = f["prompt"].replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| `{prompt}` | {f['agree']}/{f['generated']} | {q['agree']}/{q['generated']} |")
    return lines


def to_markdown(report: dict) -> str:
    """report.md: perplexity and size, latency, greedy agreement, how the model was quantized."""
    llm = report["llm"]
    ev, cal = llm["evaluation"], llm["calibration"]
    algorithms = ", ".join(llm["algorithms"]) or "round to nearest"
    if cal is None:
        calibrated = "no calibration data (no algorithm reads any)"
    elif "batches" in cal:
        calibrated = f"calibration: {cal['batches']} batches from {cal['source']}"
    else:
        calibrated = f"calibration: {cal['samples']} x {cal['seq_len']} tokens of {cal['source']}"
    return "\n".join([
        f"# {llm['model']}: {llm['config']} ({algorithms})", "",
        f"Quantized in {llm['quantize_seconds']:.1f} s; {calibrated}.", "",
        (f"Perplexity over {ev['windows']} windows of {ev['seq_len']} tokens ({ev['tokens']} predicted "
         f"tokens) of {ev['source']}; ONNX files written by export_llm (accuracy_level "
         f"{llm['accuracy_level']}); the PyTorch simulation computes what the file computes, MatMulNBits' "
         "int8 activations at accuracy_level 4 included (lowbit.runtime.matmulnbits_inputs):"), "",
        *_perplexity_table(llm), "",
        (f"ONNX Runtime latency (CPU provider, {llm['cpu']}), median of {llm['latency_rounds']} rounds; "
         "a decode step feeds one token after the prefilled cache:"), "",
        *_latency_table(llm), "",
        (f"Greedy decoding of {llm['new_tokens']} tokens, PyTorch vs ONNX Runtime (leading tokens equal / "
         "generated):"), "", *_greedy_table(llm),
    ])
