"""Save a quantized model and rebuild it on a fresh float model (ModelOpt's "restore" pattern).

A saved model is a folder::

    model.safetensors   every tensor of the quantized model's state_dict (weights, scales,
                        zero-points, observer statistics), each shared tensor once
    manifest.json       the recipe to rebuild it (quantize and its algorithms, or prepare_qat;
                        the structural options, the config, the target), each module's extra
                        state, and checksums of both files (``lowbit.persist.manifest``)

``load`` replays the recipe's structural steps on your float model without data, loads the
tensors strictly, and gives a model whose outputs equal the saved one's bit for bit.  No
pickle anywhere: a saved model cannot run code when loaded.

``save(..., packed=True)`` stores each weight on a frozen static grid as its integer codes
(2 to 4 bits two a byte, 5 to 8 bits one a byte) instead of float: a W4 model's file shrinks
about 8x.  ``load`` puts back ``scale * (codes - zero_point)``, which the quantizer maps to the
same codes, so outputs still equal the saved model's bit for bit; the float weights off the grid
are gone (``lowbit.persist._packed`` says what packs and what stays float).

    lowbit.save(qmodel, "runs/resnet-w8a8")
    qmodel = lowbit.load(resnet18(), "runs/resnet-w8a8")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .._files import atomic_path, sha256_file, write_atomic
from ..nn.swap import SwapReport
from . import _packed
from . import manifest as _manifest
from ._rebuild import (
    conform,
    dtype_problem,
    module_types,
    replay,
    set_training,
    structure_problem,
    summary_from_dict,
    summary_to_dict,
    training_differs,
    upgrade_summary,
)
from ._state import merge_state, split_state, tie_aliases

log = logging.getLogger(__name__)


def save(qmodel: nn.Module, path: str | os.PathLike, *, packed: bool = False) -> Path:
    """Write ``qmodel`` (from ``lowbit.quantize`` or ``lowbit.prepare_qat``, trained or not) to
    the folder ``path``: ``model.safetensors`` and ``manifest.json``.

    Each file is written to a temporary name and renamed into place (the manifest last), with
    the umask's permissions; the folder is created.  Saving again overwrites the model.

    Args:
        qmodel: the quantized model; it is not changed.
        path: the folder to write.
        packed: store every weight whose quantizer has a frozen static grid as integer codes
            (4 bits and fewer two a byte, low nibble first; 5 to 8 bits one a byte) next to its
            scale and zero-point, instead of float (manifest version 3).  The loaded model
            computes the same outputs bit for bit, but its float weights are the dequantized
            codes: pack a model for inference or export, not one you will train on.  Weights
            that cannot pack exactly stay float, logged (tied weights, QAT conv-BN, learned or
            dynamic ranges).  False (the default) writes every tensor as it is (version 2).

    Returns:
        The folder, as a ``Path``.

    Raises:
        ValueError: not a lowbit model, a model on the meta device, or ``path`` is a file.
        TypeError: a module's extra state is not a JSON value (named).

    Example:
        >>> qmodel = lowbit.quantize(model, calib, "w8a8")
        >>> lowbit.save(qmodel, "runs/w8a8")
        >>> lowbit.save(lowbit.quantize(llm, None, "w4a16-g128"), "runs/w4", packed=True)
    """
    from safetensors.torch import save_file

    import lowbit

    from ..ptq import check_has_data

    summary = summary_to_dict(getattr(qmodel, "lowbit_summary", None))
    check_has_data(qmodel, "lowbit.save")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; lowbit.save writes a folder (model.safetensors + manifest.json)")
    tensors, extra, aliases = split_state(qmodel.state_dict())
    if packed:
        tensors, packed_weights = _packed.pack_state(qmodel, tensors, aliases)
    with atomic_path(folder / _manifest.TENSORS) as tmp:
        save_file(tensors, tmp, metadata={"format": _manifest.FORMAT})
        info = {"file": _manifest.TENSORS, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    manifest = {
        "format": _manifest.FORMAT, "version": _manifest.VERSION, "lowbit_version": lowbit.__version__,
        "torch_version": torch.__version__, "summary": summary, "modules": module_types(qmodel),
        "training": qmodel.training, "training_differs": training_differs(qmodel),
        "extra_state": extra, "aliases": aliases, "tensors": info,
    }
    if packed:
        manifest.update(version=_manifest.PACKED_VERSION, packed=packed_weights)
    write_atomic(folder / _manifest.MANIFEST, _manifest.encode(manifest))
    log.info("saved %s: %d tensors (%.1f MB), %d shared", folder, len(tensors), info["bytes"] / 1e6, len(aliases))
    return folder


def load(model: nn.Module, path: str | os.PathLike, *, inplace: bool = False) -> nn.Module:
    """Rebuild the quantized model saved in ``path`` on ``model``, a fresh float model of the
    same architecture (its weights are replaced by the saved ones).

    The recipe's structural steps run again without data (each algorithm's ``rebuild``:
    BatchNorm folding, ReLU6 -> ReLU, SmoothQuant wrappers; the residual-add rewrite, conv-BN
    fusion, layer swaps), then every saved tensor and quantizer state is loaded strictly
    (manifests of format 1, 2 and 3 alike; packed weights are dequantized from their codes):
    outputs are bit-identical to the model that was saved, ``export_onnx`` writes the same
    file, and a QAT model trains on as before (build its optimizer after ``load``).

    Args:
        model: the float model the saved one was made from (same class and dtype; its device
            is used).  Untouched unless ``inplace``.
        path: a folder written by ``lowbit.save``.
        inplace: rebuild ``model`` itself instead of a copy (not possible when the recipe
            rewrites the model with torch.fx).

    Returns:
        The quantized model, with its ``lowbit_summary`` and train / eval flags as saved.

    Raises:
        FileNotFoundError: the folder, its manifest or its tensors file is missing.
        ValueError: an empty, truncated or corrupted file, a newer format, unknown fields
            (each names the file), a model on the meta device, or a float model that
            differs from the saved one's (the message names the first difference).

    Example:
        >>> qmodel = lowbit.load(resnet18(), "runs/w8a8")
        >>> lowbit.export_onnx(qmodel, "resnet.int8.onnx", x)
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..ptq import check_has_data

    folder = Path(path)
    if folder.is_file():
        raise ValueError(f"{folder} is a file; lowbit.load takes the folder lowbit.save wrote")
    manifest = _manifest.read(folder)
    try:  # the recipe parses before any work (summary fields, config, algorithms)
        manifest["summary"] = upgrade_summary(manifest["summary"], manifest["version"])
        summary_from_dict(manifest["summary"], SwapReport())
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{folder / _manifest.MANIFEST}: its recipe does not fit this lowbit ({type(exc).__name__}: "
                         f"{exc}); save the model again with this version") from None
    tensors_path = _manifest.check_tensors_file(folder, manifest)
    check_has_data(model, "lowbit.load")
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    try:
        tensors = load_file(tensors_path, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"{tensors_path} is not a readable safetensors file ({exc}); save the model again") from None
    tensors = _packed.unpack_state(tensors, manifest.get("packed", {}), str(tensors_path))
    qmodel, report = replay(model, manifest["summary"], inplace=inplace)
    every = {**tensors, **{key: tensors[src] for key, src in manifest["aliases"].items() if src in tensors}}
    conform(qmodel, every, manifest["extra_state"], manifest["modules"])
    tie_aliases(qmodel, manifest["aliases"])
    problem = structure_problem(manifest["modules"], qmodel) or dtype_problem(tensors, qmodel)
    if problem:
        raise ValueError(f"{folder}: the float model does not rebuild into the saved one ({problem}); pass "
                         "the same float model (architecture, dtype) that was quantized")
    state = merge_state(qmodel, tensors, manifest["extra_state"], manifest["aliases"])
    try:
        qmodel.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{folder}: the saved state does not load into the rebuilt model ({exc}); pass the "
                         "same float model (architecture, dtype) that was quantized") from None
    set_training(qmodel, manifest["training"], manifest["training_differs"])
    qmodel.lowbit_summary = summary_from_dict(manifest["summary"], report)
    log.info("loaded %s (%s, %d tensors)", folder, manifest["summary"]["kind"], len(tensors))
    return qmodel


__all__ = ["load", "save"]
