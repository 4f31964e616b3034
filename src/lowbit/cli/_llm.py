"""Causal language models in the CLI: what is one, loading it with its tokenizer, its text, its recipe.

A model is a causal LM when it is a Hugging Face folder whose ``config.json`` lists an
architecture ending in ``ForCausalLM`` (``LlamaForCausalLM`` ...); it loads offline with
``AutoModelForCausalLM`` in float32, and its tokenizer (``AutoTokenizer``) from the same folder.

Text: calibration sequences are the first ``calib_samples`` windows of ``seq_len`` tokens of
``lowbit.zoo.english_text("calib")`` (or of ``--calib-text FILE``); evaluation windows the first
``windows`` of ``english_text("eval")`` (or ``--eval-text FILE``); the two splits share no page.

A GGUF file is not taken as a model: transformers' GGUF loader dequantizes the whole file on every
load (~20 s for SmolLM2-135M, minutes for larger models), and every command (quantize, perplexity,
export's replay) would pay it again, where a converted folder loads in about a second; and a GGUF
file holds weights that are already quantized.  Convert it once to a folder (the error says how;
``lowbit.zoo.smollm2`` keeps SmolLM2's converted folder in the cache).

The recipe of a causal-LM quantize is a quantize recipe with an ``llm`` section: where the
calibration text came from, how much of it, and how the file was exported (``LLM_FIELDS``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ._common import UserError, check_fields, config_from_dict, load_factory

log = logging.getLogger("lowbit.cli")

# recipe["llm"]: calibration text (None: english_text("calib")), its amount, and export_llm's options;
# "fuse" (q/k/v and gate/up as one MatMulNBits each where their grids allow) is optional: recipes
# written before it replay unfused, as they were exported
LLM_REQUIRED = ("calib_samples", "seq_len", "calib_text", "accuracy_level", "max_length")
LLM_FIELDS = (*LLM_REQUIRED, "fuse")
GGUF_HINT = ("convert it once into a folder (transformers: AutoModelForCausalLM.from_pretrained(folder, "
             "gguf_file=name, dtype=torch.float32) and AutoTokenizer the same way, then save_pretrained "
             "both; lowbit.zoo.smollm2 shows how) and pass the folder; SmolLM2's, once lowbit.zoo.smollm2() "
             "made it: python -c 'from lowbit.zoo.smollm2 import cached_folder; print(cached_folder())'")


# -- what a model is ----------------------------------------------------------------------------
def causal_architecture(ref: str) -> str | None:
    """The ``*ForCausalLM`` architecture a model folder's config.json names, or None when ``ref`` is
    not such a folder (a module:function, an encoder folder, a folder without config.json)."""
    config = Path(ref) / "config.json"
    if not config.is_file():
        return None
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise UserError(f"{config} is not a Hugging Face config (invalid JSON object: {exc})") from None
    return next((a for a in architectures if isinstance(a, str) and a.endswith("ForCausalLM")), None)


def refuse_gguf(ref: str) -> None:
    """A UserError for a ``.gguf`` model, saying how to convert it (see the module docstring)."""
    if ref.lower().endswith(".gguf"):
        raise UserError(f"{ref}: lowbit reads Hugging Face model folders, not GGUF files; {GGUF_HINT}")


def check_causal_folder(ref: str, command: str) -> str:
    """``ref`` as a causal-LM folder, or a UserError that says what it is instead; its architecture."""
    refuse_gguf(ref)
    path = Path(ref)
    if not path.is_dir():
        raise UserError(f"model folder {ref} does not exist" if not path.exists()
                        else f"{ref} is a file; lowbit {command} takes a Hugging Face causal LM folder")
    if not (path / "config.json").is_file():
        raise UserError(f"model folder {ref} has no config.json; expected a Hugging Face model folder")
    arch = causal_architecture(ref)
    if arch is None:
        found = json.loads((path / "config.json").read_text()).get("architectures") or ["no architectures"]
        raise UserError(f"{ref} is not a causal language model (config.json: {', '.join(map(str, found))}); "
                        f"lowbit {command} needs a *ForCausalLM folder (Llama, Qwen2, Mistral ...)")
    return arch


# -- loading ------------------------------------------------------------------------------------
def load_tokenizer(folder: str, flag: str = "model folder"):
    """The folder's Hugging Face tokenizer (offline); a UserError when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:  # no tokenizer files, or files transformers cannot read
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"{flag} {folder} has no tokenizer lowbit can load ({reason}); save the model's "
                        "tokenizer into it (tokenizer.save_pretrained(folder))") from None


def load_causal_lm(folder: str, progress: bool = True):
    """The float32 ``AutoModelForCausalLM`` of a checked folder, offline, in eval mode (``progress``:
    transformers' bar over the weights it loads)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()


# -- text ---------------------------------------------------------------------------------------
def read_text(path: str | None, split: str, flag: str) -> tuple[str, str]:
    """(text, where it came from): the file ``path``, or ``english_text(split)`` when None."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            what = "is a folder" if p.is_dir() else "does not exist"
            raise UserError(f"{flag} {path} {what}; give a text file")
        return p.read_text(encoding="utf-8", errors="replace"), path
    from ..zoo import english_text

    try:
        return english_text(split), f"english_text({split!r})"
    except (OSError, RuntimeError, ValueError) as exc:  # no apt-get, no package lists, an offline machine
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"the {split} text (lowbit.zoo.english_text({split!r}), Debian's python3.11-doc) is "
                        f"not available: {reason}; pass {flag} FILE (plain text)") from None


def windows(tokenizer, text: str, count: int, seq_len: int, where: str, flag: str):
    """The first ``count`` windows of ``seq_len`` tokens of ``text``: LongTensor ``(count, seq_len)``."""
    from ..zoo import token_windows

    try:
        return token_windows(tokenizer, text, window=seq_len, count=count)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}; or give a longer text with {flag} FILE") from None


def calibration_data(recipe: dict, tokenizer, steps) -> list | None:
    """The calibration batches of a causal-LM recipe: ``data`` (module:function) when given, else
    ``calib_samples`` windows of ``seq_len`` tokens of the calibration text; None when no step
    reads data (round to nearest needs none: the weight-only presets have no activation ranges)."""
    needing = [str(s) for s in steps if s.needs_data]
    if not needing:
        if recipe.get("data"):
            log.info("--data %s is not read: no algorithm needs calibration data", recipe["data"])
        return None
    if recipe.get("data"):
        batches = load_factory(recipe["data"], "--data")()
        batches = list(batches) if batches is not None else []
        if not batches:
            raise UserError(f"--data {recipe['data']} returned no batches; {', '.join(needing)} needs "
                            "calibration data")
        return batches
    llm = recipe["llm"]
    text, where = read_text(llm["calib_text"], "calib", "--calib-text")
    ids = windows(tokenizer, text, llm["calib_samples"], llm["seq_len"], where, "--calib-text")
    return [{"input_ids": row[None]} for row in ids]  # one (1, seq_len) sequence per batch


# -- recipes ------------------------------------------------------------------------------------
def check_llm_section(recipe: dict, where: str) -> dict:
    """The recipe's ``llm`` section, checked (every field of ``LLM_REQUIRED``, ``fuse`` optional, nothing else)."""
    llm = recipe.get("llm")
    if not isinstance(llm, dict):
        raise UserError(f"{where}: llm must be an object with {', '.join(LLM_REQUIRED)} (and optionally fuse)")
    check_fields(llm, LLM_FIELDS, f"{where}: llm", LLM_REQUIRED)
    if not isinstance(llm.get("fuse", False), bool):
        raise UserError(f"{where}: llm.fuse must be true or false, got {llm['fuse']!r}")
    return llm


@dataclass(frozen=True)
class QuantizedLM:
    """What ``quantize_llm_from_recipe`` made: the float model, its quantized copy, the tokenizer, the
    seconds ``lowbit.quantize`` took and the calibration batches it read (0: none)."""

    model: object
    qmodel: object
    tokenizer: object
    seconds: float
    calib_batches: int


def quantize_llm_from_recipe(recipe: dict, where: str = "recipe", *, model_ref: str | None = None,
                             progress: bool | None = None) -> QuantizedLM:
    """Load the causal LM a recipe names (or ``model_ref``), its tokenizer and calibration data, and
    quantize it (``progress``: show progress bars; None: as the recipe says)."""
    import time

    from ..ptq import quantize
    from ._ptq import QUANTIZE_OPTIONS, resolve_steps

    ref = model_ref or recipe["model"]
    check_causal_folder(ref, "quantize")
    check_llm_section(recipe, where)
    options = dict(recipe.get("options", {}))
    check_fields(options, QUANTIZE_OPTIONS, f"{where}: options")
    options["algorithms"] = resolve_steps(options.get("algorithms", []), f"{where}: options.algorithms")
    if progress is not None:  # the bars change no number
        options["progress"] = progress
    config = config_from_dict(recipe["config"], f"{where}: config")
    tokenizer = load_tokenizer(ref)
    model = load_causal_lm(ref, progress=options.get("progress", True))
    check_weight_only(model, config)
    batches = calibration_data(recipe, tokenizer, options["algorithms"])
    start = time.perf_counter()
    qmodel = quantize(model, batches, config, target=recipe["target"], **options)
    return QuantizedLM(model, qmodel, tokenizer, time.perf_counter() - start, len(batches or ()))


def check_weight_only(model, config) -> None:
    """A UserError when ``config`` quantizes a Linear's activations: ``export_llm`` writes weight-only
    models (MatMulNBits), so such a run would fail only after its calibration."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            layer, why = config.resolve(name, module)
            if layer is not None and (layer.input is not None or layer.output is not None):
                raise UserError(f"--config {config.name}: {name} gets quantized activations ({why}); a "
                                "causal LM is quantized weight-only for export (MatMulNBits): use "
                                "w4a16-g128, w4a16-g32, w3a16-g128 or w8a16")


def export_from_recipe(qmodel, path: Path, recipe: dict) -> None:
    """``export_llm`` with the recipe's export options (the same bytes on every replay)."""
    from ..export import export_llm

    llm = recipe["llm"]
    export_llm(qmodel, path, accuracy_level=llm["accuracy_level"], max_length=llm["max_length"],
               fuse=llm.get("fuse", False))
