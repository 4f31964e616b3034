"""``manifest.json``: what a saved model is and how to rebuild it, checked before anything loads.

    {"format": "lowbit.saved_model", "version": 2, "lowbit_version": "0.1.0",
     "summary": {"kind": "quantize", "algorithms": [{"name": "fold_bn"}, ...],  # the recipe
                 "reports": [...], "options": {...}, "config": {...}, ...},
     "modules": {name: class name}, "training": true, "training_differs": [...],
     "extra_state": {state_dict key: JSON value}, "aliases": {key: key written},
     "tensors": {"file": "model.safetensors", "bytes": N, "sha256": "..."},
     "packed": {weight key: how it is stored},   # version 3 only (save with packed=True)
     "checksum": sha256 of the rest of the manifest}

The checksum covers the manifest itself (canonical JSON: sorted keys, no spaces), so any
change to either file is an error that names it; a newer format version, unknown or missing
fields are errors too.  Nothing here runs code: JSON and safetensors only.

Versions: 3 adds the field ``packed`` (``lowbit.save(..., packed=True)``): ``{weight key: {"tensor":
stored name, "layout": "nibbles" | "bytes", "shape", "dtype", "spec", "scale", "zero_point"}}``, the
weights stored as integer codes (``lowbit.persist._packed``).  A save without ``packed`` still writes
version 2, byte for byte as before, so an older lowbit reads it.  2 records quantize's algorithms
as an ordered list of steps (``lowbit.ptq.steps``) with one report each; 1 recorded them as flags
in ``summary.options`` and SmoothQuant's report in ``summary.smoothing``.  All three load
(``lowbit.persist._rebuild.upgrade_summary``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .._files import sha256_file

FORMAT = "lowbit.saved_model"
VERSION = 2  # what save writes without packed weights (unchanged: an older lowbit reads it)
PACKED_VERSION = 3  # the newest format, which save writes with packed weights; read takes 1..PACKED_VERSION
MANIFEST = "manifest.json"
TENSORS = "model.safetensors"
FIELDS = ("format", "version", "lowbit_version", "torch_version", "summary", "modules", "training",
          "training_differs", "extra_state", "aliases", "tensors", "checksum")
PACKED_FIELDS = (*FIELDS, "packed")  # version 3
_AGAIN = "save the model again with lowbit.save"


def checksum(manifest: dict) -> str:
    """sha256 of the manifest without its ``checksum`` field, as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode(manifest: dict) -> bytes:
    """The manifest with its checksum, as the bytes to write."""
    manifest = {**manifest, "checksum": checksum(manifest)}
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _parse(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {path.parent} is not a folder written by lowbit.save "
                                f"(it holds {MANIFEST} and {TENSORS})")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"{path} is empty (0 bytes): the save did not finish; {_AGAIN}")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is truncated or corrupted: not valid JSON ({exc}); {_AGAIN}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lowbit saved-model manifest (format {FORMAT!r})")
    return manifest


def read(folder: Path) -> dict:
    """The checked manifest of a saved-model folder.

    Raises:
        FileNotFoundError: no manifest in ``folder``.
        ValueError: empty, not JSON, another format, a newer version, a checksum mismatch,
            unknown or missing fields (the message names the file).
    """
    path = folder / MANIFEST
    manifest = _parse(path)
    version = manifest.get("version")
    if not isinstance(version, int) or version > PACKED_VERSION or version < 1:
        raise ValueError(f"{path} has format version {version!r}; this lowbit reads versions 1 to {PACKED_VERSION} "
                         "(a newer lowbit wrote it: upgrade lowbit to load it)")
    if manifest.get("checksum") != checksum(manifest):
        raise ValueError(f"{path} is corrupted: its content does not match its checksum (changed after "
                         f"lowbit.save wrote it); {_AGAIN}")
    fields = PACKED_FIELDS if version >= PACKED_VERSION else FIELDS
    unknown = sorted(set(manifest) - set(fields))
    missing = sorted(set(fields) - set(manifest))
    if unknown or missing:
        raise ValueError(f"{path}: unknown field(s) {unknown}, missing field(s) {missing}; "
                         f"it was not written by lowbit.save format version {version}")
    if not isinstance(manifest.get("packed", {}), dict):
        raise ValueError(f"{path}: its field packed is not an object; {_AGAIN}")  # noqa: TRY004 (a bad file)
    return manifest


def check_tensors_file(folder: Path, manifest: dict) -> Path:
    """The tensors file, checked against the manifest's size and sha256.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: empty, truncated, longer, or its sha256 differs (named).
    """
    info = manifest["tensors"]
    path = folder / info["file"]
    if path.name != info["file"] or not path.is_file():
        raise FileNotFoundError(f"{path} not found: the saved model in {folder} is incomplete; {_AGAIN}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the save did not finish; {_AGAIN}")
    if size != info["bytes"]:
        what = "truncated" if size < info["bytes"] else "longer than written"
        raise ValueError(f"{path} is {what}: {size} bytes, {folder / MANIFEST} says {info['bytes']}; {_AGAIN}")
    if sha256_file(path) != info["sha256"]:
        raise ValueError(f"{path} is corrupted: its sha256 does not match {folder / MANIFEST} (the file changed "
                         f"after lowbit.save wrote it); {_AGAIN}")
    return path
