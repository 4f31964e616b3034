"""Quantize PyTorch models, export them to ONNX and measure what it cost.

    lowbit quantize lowbit.zoo:mobilenet_v2 --data lowbit.zoo:photo_batches --config w8a8 --out runs/mnv2
    lowbit quantize path/to/hf-model-folder --out runs/minilm     # tokenizes bundled sentences
    lowbit quantize path/to/causal-lm-folder --config w4a16-g128 --algorithms gptq --out runs/lm
    lowbit perplexity runs/lm/model.onnx --tokenizer path/to/causal-lm-folder  # or a folder, or --recipe
    lowbit qat my.models:cnn --data my.data:digits --config w4a8 --epochs 3 --distill 0.5 --onnx --out runs/qat
    lowbit qat --recipe runs/qat/recipe.json --out runs/qat-again         # replay: the same weights
    lowbit export runs/mnv2/recipe.json --out runs/mnv2/again.onnx        # replay a recipe
    lowbit bench runs/mnv2/fp32.onnx runs/mnv2/model.int8.onnx --threads 1 2 --batch 1 8
    lowbit inspect runs/mnv2/model.int8.onnx                             # what runs in integers

A model is module:function (a Python factory returning an nn.Module; the module is
imported from the current folder first, like python -m) or a Hugging Face model
folder (a causal LM, whose config.json names a *ForCausalLM, is quantized weight-only,
calibrated on windows of text and exported with export_llm: see lowbit quantize --help);
data is module:function returning an iterable of model inputs (tensors,
tuples, or dicts of keyword tensors, which export as named ONNX inputs with dynamic
batch and sequence axes).  quantize writes the quantized ONNX file, the FP32 ONNX
file, recipe.json (everything needed to reproduce the run, the resolved target
included) and report.md / report.json.

For qat the data factory returns (train_batches, calib_batches[, eval_fn]) (or a
dict with keys train, calib, eval): (inputs, target) training batches,
model inputs for calibration (None: the first training inputs) and
eval_fn(model) -> float.  It writes qat_model.pt (the trained QAT state; loads with
torch.load(weights_only=True) or lowbit.qat.load_checkpoint into the model prepared
the same way), recipe.json, optionally model.onnx, and keeps a resumable
checkpoint in checkpoints/: run the same command again after a crash to continue.

Mistakes in what was asked (a bad module:function, a missing file, a recipe that does
not parse or has unknown fields, an unknown preset) print one line error: ... on
stderr and exit with status 2; --debug shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ._common import UserError, load_data, load_factory, load_model
from ._parser import build_parser

__all__ = ["UserError", "build_parser", "load_data", "load_factory", "load_model", "main"]

log = logging.getLogger("lowbit.cli")

EXIT_USER_ERROR = 2  # as argparse uses for a bad command line
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/lowbit


def _raised_in_lowbit(exc: BaseException) -> bool:
    """True when the innermost frame of exc's traceback is lowbit's own code (a checked input)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for an internal one (traceback)."""
    if isinstance(exc, UserError):
        message = str(exc)
    elif isinstance(exc, ModuleNotFoundError) and exc.name:
        message = f"{exc} (a missing package: pip install it, e.g. pip install 'lowbit[zoo]' for the zoo)"
    elif isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        message = str(exc)  # names the path
    elif isinstance(exc, ValueError) and _raised_in_lowbit(exc):
        message = str(exc)  # lowbit's checks name the tensor / file and the fix
    else:
        return None
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the lowbit command line; returns the exit status (0 ok, 2 user error)."""
    from .. import __version__

    args = build_parser(__doc__, __version__).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = None if args.debug else user_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
