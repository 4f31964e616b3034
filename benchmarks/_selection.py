"""What a benchmark runs: models, quantization recipes and data chosen by name on its command
line, shared by the bench scripts so that one name means one model, one recipe and the same
inputs in every benchmark.

Models (``--models``): ``mobilenet_v2`` (torchvision's ImageNet weights), ``resnet18`` (the
ResNet-18 layout, random weights: a latency target) and ``minilm`` (all-MiniLM-L6-v2 with
positional inputs), each with its data as a ``Workload``.

Data: calibration, selection and evaluation images are disjoint seeded random crops of the 17
bundled photos (seeds 0 / 2 / 1); MiniLM's three sets are one seeded draw of distinct
sentences, split, padded to ``SEQ_LEN`` word pieces.

Recipes: a preset config by name (``lowbit.CONFIGS``), with its activation (and weight)
observer replaced where a benchmark says so.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lowbit

EVAL_BATCH = 32
CALIB_BATCH = 16
SEQ_LEN = 64  # MiniLM inputs are padded to this many word pieces (the sentences have 6-40 words)
SMOOTHQUANT_ALPHA = 0.8  # MiniLM: lowbit w8a8 with SmoothQuant at this migration strength (tests/e2e uses it too)
IMAGE_SEEDS = {"calib": 0, "select": 2, "eval": 1}  # disjoint draws of photo crops
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # BertModel's inputs, in forward order


# -- command line ---------------------------------------------------------------------------------
def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """``parser``'s arguments from ``argv`` (the process's when None), and that argv."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args(argv), argv


def command(script: str, argv: Sequence[str]) -> str:
    """The command line that reruns this benchmark, as BENCHMARKS.md quotes it."""
    return shlex.join(["python", f"benchmarks/{script}", *argv])


def log_to_stderr(log: logging.Logger) -> None:
    """Progress (``log``'s INFO) and every warning on stderr, off the printed markdown."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)


def add_models_argument(parser: argparse.ArgumentParser) -> None:
    """``--models``: which of ``MODELS`` to run (all by default)."""
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))


# -- recipes --------------------------------------------------------------------------------------
def recipe(config: str, *, observer: str | None = None, weight_observer: str | None = None):
    """Preset ``config`` with its activation observer (and weight observer) replaced where given."""
    cfg = lowbit.CONFIGS[config]
    if weight_observer:
        cfg = cfg.with_observer(weight_observer, role="weight")
    return cfg.with_observer(observer) if observer else cfg


def default_observer(config: str = "w8a8") -> str:
    """The activation calibrator of a preset (read, not assumed: the preset may change)."""
    return lowbit.CONFIGS[config].default.input.observer


# -- data -----------------------------------------------------------------------------------------
def image_batches(n: int, split: str, batch_size: int) -> list[torch.Tensor]:
    """``n`` photo crops of the ``split`` ("calib", "select" or "eval"), ImageNet-normalised, batched."""
    from lowbit.zoo import photo_batches

    return list(photo_batches(n, seed=IMAGE_SEEDS[split], batch_size=batch_size))


def tokenize(tokenizer, texts: list[str], seq_len: int = SEQ_LEN, fixed: bool = True) -> dict[str, torch.Tensor]:
    """BertModel's inputs for ``texts`` (``TEXT_INPUTS`` order): padded to ``seq_len`` word pieces,
    or with ``fixed=False`` to the longest sentence (truncated at ``seq_len``)."""
    enc = tokenizer(texts, padding="max_length" if fixed else True, truncation=True, max_length=seq_len,
                    return_tensors="pt")
    return {n: enc[n] for n in TEXT_INPUTS}


# -- models ---------------------------------------------------------------------------------------
class LastHidden(nn.Module):
    """BertModel with positional inputs and one output, so it exports as a plain graph."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, T, 384)


@dataclass
class Workload:
    """One model and its data.  A batch is a dict: input name -> tensor."""

    name: str
    title: str
    model: nn.Module  # float, eval mode; takes the batch's tensors positionally, in input_names order
    input_names: list[str]
    output_names: list[str]
    calib: list[dict]
    select: list[dict]
    evals: list[dict]
    compared: Callable[[list[np.ndarray], dict], torch.Tensor]  # ORT outputs of a batch -> compared tensor
    embedding: bool = False  # compare sentence embeddings (cosine, nearest neighbour), not logits
    latency_only: bool = False
    nncf_options: dict = field(default_factory=dict)
    ort_variants: tuple[tuple[str, dict], ...] = (("", {}),)  # (row suffix, extra quantize_static kwargs)
    smoothquant: float | None = None  # also run lowbit w8a8 with quantize(..., smoothquant=alpha)

    def args(self, batch: dict) -> tuple[torch.Tensor, ...]:
        return tuple(batch[n] for n in self.input_names)

    def feeds(self, batch: dict, b: int | None = None) -> dict[str, np.ndarray]:
        return {n: batch[n][:b].numpy() for n in self.input_names}

    def n(self, batches: list[dict]) -> int:
        return sum(len(b[self.input_names[0]]) for b in batches)


def _image_workload(name: str, title: str, model: nn.Module, args, latency_only: bool = False) -> Workload:
    def batches(n: int, split: str, size: int) -> list[dict]:
        return [{"input": x} for x in image_batches(n, split, size)]

    return Workload(name=name, title=title, model=model.eval(), input_names=["input"], output_names=["output"],
                    calib=batches(args.n_calib, "calib", CALIB_BATCH),
                    select=batches(args.n_select, "select", EVAL_BATCH),
                    evals=batches(args.n_eval, "eval", EVAL_BATCH),
                    compared=lambda outs, batch: torch.from_numpy(outs[0]), latency_only=latency_only)


def _mobilenet_v2(args) -> Workload:
    from lowbit.zoo import mobilenet_v2

    return _image_workload("mobilenet_v2", "MobileNetV2 (torchvision ImageNet weights)", mobilenet_v2(), args)


def _resnet18(args) -> Workload:
    from lowbit.zoo import resnet18

    return _image_workload("resnet18", "ResNet-18 layout, random init (latency target)", resnet18(seed=0), args,
                           latency_only=True)


def _minilm(args) -> Workload:
    from lowbit.zoo import english_sentences, minilm
    from lowbit.zoo.minilm import mean_pool

    bert, tokenizer = minilm()
    # One draw of distinct sentences, split, so the three sets are disjoint.
    texts = english_sentences(n=args.n_calib + args.n_select + args.n_eval, seed=0)
    calib_t, select_t = texts[: args.n_calib], texts[args.n_calib : args.n_calib + args.n_select]
    eval_t = texts[args.n_calib + args.n_select :]

    def batches(sentences: list[str], size: int) -> list[dict]:
        return [tokenize(tokenizer, sentences[i : i + size]) for i in range(0, len(sentences), size)]

    def pooled(outs: list[np.ndarray], batch: dict) -> torch.Tensor:
        # sentence-transformers' recipe: mean over real tokens, then L2 normalisation -> (B, 384)
        return F.normalize(mean_pool(torch.from_numpy(outs[0]), batch["attention_mask"]), dim=-1)

    nncf_options = {}
    with contextlib.suppress(ImportError):
        import nncf

        nncf_options = {"model_type": nncf.ModelType.TRANSFORMER}
    return Workload(name="minilm", title=f"all-MiniLM-L6-v2 (BertModel, seq {SEQ_LEN})",
                    model=LastHidden(bert).eval(), input_names=list(TEXT_INPUTS), output_names=["last_hidden_state"],
                    calib=batches(calib_t, CALIB_BATCH), select=batches(select_t, EVAL_BATCH),
                    evals=batches(eval_t, EVAL_BATCH), compared=pooled, embedding=True, nncf_options=nncf_options,
                    ort_variants=(("", {}), (", MatMul only", {"op_types_to_quantize": ["MatMul"]})),
                    smoothquant=SMOOTHQUANT_ALPHA)


MODELS: dict[str, Callable[[argparse.Namespace], Workload]] = {
    "mobilenet_v2": _mobilenet_v2, "resnet18": _resnet18, "minilm": _minilm}
"""Model name -> its workload, built from ``args.n_calib`` / ``n_select`` / ``n_eval``."""


def build_workload(name: str, args: argparse.Namespace) -> Workload:
    """The model called ``name`` and its calibration / selection / evaluation batches."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](args)
