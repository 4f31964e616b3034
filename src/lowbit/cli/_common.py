"""What every ``lowbit`` command shares: user errors, loading models / data / JSON, recipes."""

from __future__ import annotations

import difflib
import importlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

RECIPE_FORMAT = "lowbit.recipe"
RECIPE_VERSION = 1


class UserError(Exception):
    """A mistake in what the user asked for: ``main`` prints ``error: <message>`` and exits with 2."""


# -- module:function ----------------------------------------------------------------------------
def _import_from_cwd(module_name: str, ref: str, what: str):
    """Import ``module_name`` with the current folder first on sys.path, as ``python -m`` does."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{what} {ref!r}: cannot import module {module_name!r} ({exc}); it is looked up in the "
                        f"current folder ({cwd}) and the installed packages") from exc


def load_factory(ref: str, what: str = "factory"):
    """Import ``module:attr`` (the current folder first, like ``python -m``) and return the attribute.

    ``what`` names the argument in error messages (``model``, ``--data`` ...).
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{what} {ref!r} is not of the form module:function (e.g. mymodels:build_net)")
    module = _import_from_cwd(module_name, ref, what)
    try:
        value = module
        for part in attr.split("."):
            value = getattr(value, part)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{what} {ref!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                        f"{attr!r}{hint}") from None
    if not callable(value):
        raise UserError(f"{what} {ref!r} is a {type(value).__name__}, not a function that returns it")
    return value


def load_model(ref: str):
    """A model from ``module:function`` or a Hugging Face folder (loaded offline), in eval mode."""
    path = Path(ref)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"model folder {ref} has no config.json; expected a Hugging Face model folder")
        from transformers import AutoModel

        return AutoModel.from_pretrained(path, local_files_only=True).eval()
    if ":" not in ref and (os.sep in ref or ref.startswith(".")):
        raise UserError(f"model folder {ref} does not exist")
    if ":" not in ref:
        raise UserError(f"model {ref!r} is neither a folder nor module:function (e.g. mymodels:build_net)")
    return load_factory(ref, "model")().eval()


def load_data(ref: str | None, model_ref: str) -> list:
    """Calibration batches: a ``module:function`` factory, or bundled sentences tokenized for an HF folder."""
    if ref is not None:
        batches = load_factory(ref, "--data")()
        if not isinstance(batches, Iterable):
            raise UserError(f"--data {ref} returned a {type(batches).__name__}; it must return an iterable of "
                            "model inputs (tensors, tuples of tensors or dicts of keyword tensors)")
        batches = list(batches)
        if not batches:
            raise UserError(f"--data {ref} returned no batches")
        return batches
    if Path(model_ref).is_dir():
        from transformers import AutoTokenizer

        from ..zoo.sentences import english_sentences

        try:
            tok = AutoTokenizer.from_pretrained(model_ref, local_files_only=True)
        except (OSError, ValueError) as exc:  # no tokenizer files: not a text model, or an incomplete folder
            raise UserError(f"{model_ref} has no tokenizer lowbit can load ({exc}); "
                            "pass calibration batches with --data module:function") from None
        sentences = english_sentences(128)
        # dicts of (16, sequence) tensors named as the tokenizer names them: input_ids, attention_mask, ...
        return [dict(tok(sentences[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(sentences), 16)]
    raise UserError("--data module:function is required for a Python model factory")


def reject_options(args, flags: Mapping[str, str], why: str) -> None:
    """A UserError naming the options of ``flags`` (argparse dest -> flag) that were given, and ``why``
    they do not apply (their defaults are None, so "given" is "not None")."""
    given = [flag for dest, flag in flags.items() if getattr(args, dest, None) is not None]
    if given:
        raise UserError(f"{', '.join(given)}: {why}")


def first_batch(batches):
    """The first batch as ``export_onnx`` takes it (a list of tensors becomes a tuple)."""
    first = batches[0]
    return tuple(first) if isinstance(first, list) else first


# -- files -------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike, what: str) -> object:
    """Parse a JSON file; a missing file or bad JSON is a UserError naming the file (and line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} cannot be read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def output_folder(out: str) -> Path:
    """``--out`` as a folder, created (with its parents) when it does not exist."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file; give a folder (it is created if missing)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path} {'is a folder' if p.is_dir() else 'does not exist'}")
    return p


# -- recipes -----------------------------------------------------------------------------------
# Top-level fields of a recipe, by command; unknown fields are errors, not ignored.
RECIPE_FIELDS = {
    # calib_batches: calibrate on the first N batches of data (lowbit autoquant holds the rest out)
    # llm: a causal LM's calibration text and export options (lowbit.cli._llm.LLM_FIELDS)
    "quantize": {"required": {"format", "version", "model", "config"},
                 "optional": {"command", "data", "options", "target", "calib_batches", "llm"}},
    "qat": {"required": {"format", "version", "command", "model", "data", "config", "options", "training"},
            "optional": {"target"}},
    "sensitivity": {"required": {"format", "version", "command", "model", "config", "method"},
                    "optional": {"data", "options", "target"}},
}


def check_fields(data: Mapping, known: Iterable[str], where: str, required: Iterable[str] = ()) -> None:
    """UserError for fields of ``data`` outside ``known``, or ``required`` ones it lacks."""
    known = set(known)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown}; known: {', '.join(sorted(known))}")
    missing = sorted(set(required) - set(data))
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}")


def read_recipe(path: str, command: str | None = None) -> dict:
    """A recipe.json, checked: format, version, ``command`` (None: any), no unknown or missing fields."""
    recipe = read_json(path, "recipe")
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise UserError(f"{path} is not a lowbit recipe (no \"format\": \"{RECIPE_FORMAT}\")")
    if recipe.get("version") != RECIPE_VERSION:
        raise UserError(f"{path}: recipe version {recipe.get('version')!r} is not supported "
                        f"(this lowbit reads version {RECIPE_VERSION})")
    got = recipe.get("command", "quantize")
    if got not in RECIPE_FIELDS:
        raise UserError(f"{path}: unknown command {got!r}; expected one of {', '.join(RECIPE_FIELDS)}")
    if command is not None and got != command:
        raise UserError(f"{path} is a {got} recipe, not a {command} one")
    fields = RECIPE_FIELDS[got]
    check_fields(recipe, fields["required"] | fields["optional"], path, fields["required"])
    return recipe


def config_from_dict(data: object, where: str):
    """``QuantConfig.from_dict`` with its ValueError turned into a UserError naming ``where``."""
    from ..config import QuantConfig

    if not isinstance(data, Mapping):
        raise UserError(f"{where}: a config must be a JSON object, got {type(data).__name__}")
    try:
        return QuantConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: {exc}") from None
