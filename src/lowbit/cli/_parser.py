"""The ``lowbit`` argument parser: one sub-parser per command, a help string on every option."""

from __future__ import annotations

import argparse

from ._analysis import cmd_autoquant, cmd_report, cmd_sensitivity
from ._llm_commands import cmd_perplexity
from ._ptq import cmd_export, cmd_quantize
from ._qat import cmd_qat
from ._tools import cmd_bench, cmd_inspect

MODEL_HELP = ("module:function returning an nn.Module (the module is looked up in the current folder first, "
              "like python -m), or a Hugging Face model folder (loaded offline)")


def _common_config(p: argparse.ArgumentParser, default: str | None, presets: str,
                   default_help: str = "") -> None:
    from ..observers import OBSERVERS
    from ..targets import TARGET_NAMES

    p.add_argument("--config", default=default,
                   help=f"preset name ({presets}; default {default_help or default}), a QuantConfig .json, "
                        "or a recipe.json whose config to reuse")
    p.add_argument("--skip", nargs="*", default=[], metavar="GLOB", help="module-name globs to keep in float")
    p.add_argument("--observer", choices=list(OBSERVERS),
                   help="activation range estimator for calibration (default: the preset's)")
    p.add_argument("--target", choices=TARGET_NAMES, default="auto",
                   help="integer target the exported file runs on (default auto: this machine's CPU); the recipe "
                        "records the resolved name, so it replays to the same bytes elsewhere")


def _target_names() -> tuple[str, ...]:
    from ..targets import TARGET_NAMES

    return TARGET_NAMES


def _algorithms_help() -> str:
    from ..ptq.steps import STEPS

    return ("PTQ algorithms to run, in order, comma-separated, each name or name(field=value, ...), e.g. "
            "'cle,smoothquant(alpha=0.8),bias_correction' (quote it for the shell); known: "
            f"{', '.join(STEPS)}.  BatchNorm folding runs first unless listed; recipe.json records the list")


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_llm_text(q: argparse.ArgumentParser) -> None:
    """The causal-LM options of lowbit quantize (each an error for other models)."""
    g = q.add_argument_group("causal LMs (a Hugging Face folder whose config.json names a *ForCausalLM)")
    g.add_argument("--calib-samples", type=_positive, metavar="N",
                   help="calibration sequences for algorithms that read data (gptq, awq; default 64: GPTQ wants at "
                        "least 16 tokens per weight column)")
    g.add_argument("--seq-len", type=_positive, metavar="L",
                   help="tokens per calibration sequence, per evaluation window and in the latency prefill "
                        "(default 512)")
    g.add_argument("--calib-text", metavar="FILE",
                   help="plain text to cut calibration sequences from (default: "
                        "lowbit.zoo.english_text('calib'))")
    g.add_argument("--eval-windows", type=_positive, metavar="N",
                   help="evaluation windows of --seq-len tokens for perplexity (default 8)")
    g.add_argument("--eval-text", metavar="FILE",
                   help="plain text for perplexity (default: lowbit.zoo.english_text('eval'), no page shared "
                        "with the calibration text)")
    g.add_argument("--new-tokens", type=_positive, metavar="N",
                   help="tokens greedy decoding adds per prompt, PyTorch vs ONNX Runtime (default 16)")
    g.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level of model.onnx: 4 int8 compute (fastest, default), "
                        "0/1 float")


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="PTQ a model, export it and report accuracy / size / latency",
                       description="Post-training quantization: calibrate, export OUT/fp32.onnx and "
                                   "OUT/model.int8.onnx (a causal LM: OUT/model.onnx, written by "
                                   "export_llm), write OUT/recipe.json and OUT/report.md / report.json.")
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--data", metavar="MODULE:FUNCTION",
                   help="returns an iterable of calibration inputs (tensors, tuples, or dicts of keyword tensors); "
                        "default for a Hugging Face folder: 128 bundled English sentences, tokenized (a "
                        "causal LM: --calib-samples sequences of --calib-text)")
    _common_config(q, None, "w8a8, w8a8-dynamic, w8, w4a16-g128, ...", "w8a8; w4a16-g128 for a causal LM")
    q.add_argument("--smoothquant", type=float, metavar="ALPHA",
                   help="SmoothQuant migration strength before calibration (BERT-style models: 0.8)")
    q.add_argument("--algorithms", metavar="LIST", help=_algorithms_help())
    q.add_argument("--threads", nargs="+", type=_positive, metavar="N",
                   help="ONNX Runtime intra-op threads for the latency table (default 1; 2 for a causal LM)")
    q.add_argument("--batch", nargs="+", type=_positive, metavar="N",
                   help="batch sizes for the latency table, at most the first calibration batch's (default 1)")
    q.add_argument("--latency-runs", type=_positive, metavar="N",
                   help="timed runs per latency cell (default 50; a causal LM: rounds of one prefill and "
                        "4 decode steps, default 5)")
    _add_llm_text(q)
    q.add_argument("--out", default="runs/quantize", help="output folder, created if missing (default runs/quantize)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)


def _add_qat_training(t: argparse.ArgumentParser) -> None:
    t.add_argument("--learn", choices=["lsq", "lsq+", "none"], default="lsq",
                   help="learned scales (none: observed ranges; default lsq)")
    t.add_argument("--no-fold-bn", action="store_true", help="train Conv and BatchNorm as separate layers")
    t.add_argument("--epochs", type=int, default=1, help="passes over the training batches (default 1)")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (fine-tuning: small; default 1e-4)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, not applied to scales")
    t.add_argument("--loss", default="cross_entropy", help="cross_entropy, mse, or module:function(output, target)")
    t.add_argument("--distill", type=float, default=0.0, help="share of distillation from the FP32 model, 0..1")
    t.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default 2)")
    t.add_argument("--freeze-bn-after", type=int, metavar="STEPS",
                   help="optimizer steps before BatchNorm statistics freeze")
    t.add_argument("--freeze-observers-after", type=int, metavar="STEPS",
                   help="steps before observed ranges freeze (--learn none)")
    t.add_argument("--max-grad-norm", type=float, help="clip the gradient norm")
    t.add_argument("--seed", type=int, default=0, help="seed for the model factory, shuffling and dropout")


def _add_qat(sub) -> None:
    t = sub.add_parser("qat", help="quantization-aware training: prepare, fine-tune (resumable), save, export",
                       description="Prepare a model for QAT, fine-tune it, write OUT/qat_model.pt and "
                                   "OUT/recipe.json (and OUT/model.onnx with --onnx).  Running the same "
                                   "command again resumes from OUT/checkpoints.")
    t.add_argument("model", nargs="?", help=MODEL_HELP)
    t.add_argument("--data", metavar="MODULE:FUNCTION",
                   help="returns (train_batches, calib_batches[, eval_fn]) or a dict with keys train, calib, eval")
    t.add_argument("--recipe", help="replay a qat recipe.json (the model, data and training options are then "
                                    "taken from it)")
    _common_config(t, "w4a8", "w4a8, w4a4, w8a8, ...")
    _add_qat_training(t)
    t.add_argument("--checkpoint-dir", help="where the resumable checkpoint lives (default OUT/checkpoints)")
    t.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS",
                   help="optimizer steps between checkpoints (default 200)")
    t.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    t.add_argument("--log-dir", help="TensorBoard folder for loss / metric curves")
    t.add_argument("--onnx", action="store_true", help="also export OUT/model.onnx")
    t.add_argument("--out", default="runs/qat", help="output folder, created if missing (default runs/qat)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_qat)


def _add_tools(sub) -> None:
    e = sub.add_parser("export", help="replay a recipe.json (quantize or qat) and export the model to ONNX",
                       description="Run a recipe again (a qat recipe trains again: same recipe, same weights) "
                                   "and export the quantized model.")
    e.add_argument("recipe", help="a recipe.json written by lowbit quantize or lowbit qat")
    e.add_argument("--out", required=True, help="the .onnx file to write (its folder is created if missing)")
    e.add_argument("--target", choices=_target_names(),
                   help="the runtime / integer target to export for (default: the recipe's target); one other "
                        "than the recipe's runtime is refused: quantize again with that --target")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="latency of one or more .onnx files in ONNX Runtime or OpenVINO",
                       description="Time ONNX Runtime (or OpenVINO's CPU plugin, --runtime openvino) on made-up "
                                   "inputs: symbolic dimension 0 is the batch, other symbolic dimensions (sequence "
                                   "length) are --seq-len.")
    b.add_argument("--runtime", choices=["ort", "openvino"], default="ort",
                   help="ort (default) or openvino (pip install lowbit[openvino]; reads the .onnx itself)")
    b.add_argument("models", nargs="+", metavar="MODEL.onnx", help="ONNX files to time")
    b.add_argument("--threads", nargs="+", type=int, default=[1], metavar="N", help="intra-op threads (default 1)")
    b.add_argument("--batch", nargs="+", type=int, default=[1], metavar="N", help="batch sizes (default 1)")
    b.add_argument("--seq-len", type=int, default=128, help="size of symbolic non-batch dimensions (default 128)")
    b.add_argument("--runs", type=int, default=50, help="timed runs per cell, after 10 warm-up runs (default 50)")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="which kernels ONNX Runtime runs in integers and which stay float",
                       description="Print the kernel table of ORT's optimized graph (lowbit.inspect_onnx), the "
                                   "graph inputs and the target the file was made for.")
    i.add_argument("model", metavar="MODEL.onnx", help="the ONNX file to inspect")
    i.add_argument("--level", choices=["basic", "extended", "all"], default="all",
                   help="ORT graph optimization level (default all, what an InferenceSession uses)")
    i.set_defaults(func=cmd_inspect)


def _add_analysis(sub) -> None:
    from ..analysis._autoquant import RUNGS

    s = sub.add_parser("sensitivity", help="which layers lose the most when quantized (sqnr, ablation, hessian)",
                       description="Per-layer sensitivity of a model to a quantization config: writes "
                                   "OUT/sensitivity.json, sensitivity.md and recipe.json (replay with --recipe).")
    s.add_argument("model", nargs="?", help=MODEL_HELP)
    s.add_argument("--data", metavar="MODULE:FUNCTION", help="calibration inputs, as for lowbit quantize")
    s.add_argument("--recipe", help="replay a sensitivity recipe.json")
    _common_config(s, "w8a8", "w8a8, w4a8, ...")
    s.add_argument("--method", choices=["sqnr", "ablation", "hessian"], default="sqnr",
                   help="sqnr: output / weight / input SQNR per layer (fast); ablation: output divergence with only "
                        "this layer quantized and with only it float; hessian: Hutchinson trace x weight "
                        "perturbation (HAWQ-V2)")
    s.add_argument("--batches", type=int, default=4, help="batches the measurements run on (default 4)")
    s.add_argument("--probes", type=int, default=16, help="Hutchinson probes for --method hessian (default 16)")
    s.add_argument("--seed", type=int, default=0, help="seed of the Hessian probes")
    s.add_argument("--top", type=int, default=20, help="rows printed, most sensitive first (default 20)")
    s.add_argument("--out", default="runs/sensitivity", help="output folder (default runs/sensitivity)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_sensitivity)

    a = sub.add_parser("autoquant", help="escalate PTQ -> ranges -> algorithms -> selective float -> mixed -> QAT "
                                         "until the metric drop is within --max-drop",
                       description="The autoquant ladder.  Always writes its best model (OUT/model.onnx), "
                                   "OUT/recipe.json replaying it (lowbit export), autoquant.json / .md with every "
                                   "rung tried and the reason, and report.json (lowbit report OUT makes the HTML).")
    a.add_argument("model", help=MODEL_HELP)
    a.add_argument("--data", metavar="MODULE:FUNCTION",
                   help="model inputs; the last quarter of the batches is held out for evaluation")
    a.add_argument("--eval", metavar="MODULE:FUNCTION",
                   help="returns eval_fn(model) -> float, higher is better (default: top-1 agreement with FP32 for "
                        "logits, cosine otherwise, on the held-out batches)")
    a.add_argument("--max-drop", type=float, required=True, help="the largest acceptable drop of the metric")
    a.add_argument("--budget", metavar="KEY=NUMBER",
                   help="size_mb=..., avg_weight_bits=... or latency_ratio=... (vs uniform w8a8, measured in ORT)")
    a.add_argument("--train-data", metavar="MODULE:FUNCTION",
                   help="as lowbit qat --data: enables the QAT rung (distilled from FP32)")
    a.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs on the last rung (default 1)")
    a.add_argument("--rungs", nargs="+", default=list(RUNGS), choices=list(RUNGS), help="rungs to climb")
    _common_config(a, "w8a8", "w8a8, w4a8, ...")
    a.add_argument("--strict", action="store_true", help="exit with status 1 when no rung met the target")
    a.add_argument("--out", default="runs/autoquant", help="output folder (default runs/autoquant)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_autoquant)

    r = sub.add_parser("report", help="one self-contained HTML report of a quantize / sensitivity / autoquant folder",
                       description="Reads report.json, sensitivity.json and autoquant.json from FOLDER and writes "
                                   "FOLDER/report.html (tables and plots, no external files).")
    r.add_argument("folder", help="the --out folder of lowbit quantize, sensitivity or autoquant")
    r.add_argument("--out", help="the .html file to write (default FOLDER/report.html)")
    r.add_argument("--title", default="lowbit report", help="the page title")
    r.set_defaults(func=cmd_report)


def _add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a causal LM: a folder, a recipe's quantized model, "
                                          "or an .onnx file written by lowbit quantize",
                       description="Perplexity over non-overlapping windows of evaluation text, each scored "
                                   "on its own (lowbit.report.perplexity).")
    p.add_argument("model", nargs="?",
                   help="a Hugging Face causal LM folder, or the model.onnx / fp32.onnx of lowbit quantize "
                        "(then --tokenizer); with --recipe, the folder to quantize instead of the recipe's")
    p.add_argument("--recipe", help="a recipe.json of lowbit quantize on a causal LM: rebuild the quantized "
                                    "model (runs its algorithms again) and measure it in PyTorch")
    p.add_argument("--tokenizer", metavar="FOLDER", help="the folder whose tokenizer to use (default: the "
                                                         "model folder; needed for an .onnx model)")
    p.add_argument("--windows", type=_positive, default=8, metavar="N", help="windows to score (default 8)")
    p.add_argument("--seq-len", type=_positive, default=512, metavar="L",
                   help="tokens per window (default 512)")
    p.add_argument("--eval-text", metavar="FILE",
                   help="plain text to score (default: lowbit.zoo.english_text('eval'))")
    p.add_argument("--threads", type=_positive, default=2, metavar="N",
                   help="ONNX Runtime intra-op threads for an .onnx model (default 2)")
    p.add_argument("--json", metavar="FILE", help="also write the result to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_perplexity)


def build_parser(description: str, version: str) -> argparse.ArgumentParser:
    """The ``lowbit`` parser; ``description`` is the usage text shown by ``lowbit --help``."""
    parser = argparse.ArgumentParser(prog="lowbit", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lowbit {version}", help="print the version")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each layer got")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quantize(sub)
    _add_qat(sub)
    _add_tools(sub)
    _add_analysis(sub)
    _add_perplexity(sub)
    for command in sub.choices.values():  # also accepted after the command: lowbit quantize ... --debug
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log what each layer got")
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
    return parser
