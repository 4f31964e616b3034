"""Models over 2 GiB: ONNX external data in one ``<file>.data`` beside the ``.onnx``.

A serialized ModelProto cannot pass 2 GiB (protobuf's limit).  When the exported model would,
``save`` writes every initializer of at least ``MIN_EXTERNAL_BYTES`` into ``model.onnx.data``
(``model.onnx`` then holds the graph, the small tensors and, per large tensor, the file's name, an
offset and a length: ONNX's external-data layout, which ONNX Runtime and ``onnx.load`` read).
Offsets of tensors from 1 MiB up are aligned to 64 KiB, so a runtime can map them from the file.

Both files are written as ``lowbit._files`` writes every file: under temporary names in the
target's folder, checked (``onnx.checker`` on the temporary pair), then renamed into place, the
data file first.  A failure before the renames leaves the old files as they were; only between
the two renames (microseconds) does a reader see the new data beside the old graph.

Tracing a model that large, the TorchScript exporter itself writes each constant to its own file
in a folder (``trace_folder``); ``save`` reads their bytes from there (``base_dir``), so the
constants are loaded one at a time, not all at once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper
from torch import nn

from .._files import atomic_path, write_atomic

PROTOBUF_LIMIT = 2**31 - 1  # bytes: the largest message protobuf serializes
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT  # bytes of ModelProto above which tensors go to the .data file
MIN_EXTERNAL_BYTES = 1024  # smaller tensors (scales, zero-points, shapes) stay in the .onnx
_ALIGN_FROM, _ALIGNMENT = 2**20, 2**16  # tensors >= 1 MiB start at a multiple of 64 KiB


def data_path(path: str | os.PathLike) -> Path:
    """The external-data file of the ONNX file at ``path``: ``model.onnx`` -> ``model.onnx.data``."""
    path = Path(path)
    return path.with_name(f"{path.name}.data")


def estimated_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers: more than its export holds (a quantized
    weight is written as 1-byte integers), so a safe test of whether the trace may pass 2 GiB."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


@contextlib.contextmanager
def trace_folder(path: str | os.PathLike) -> Iterator[str]:
    """A temporary folder beside ``path`` (same file system, so no copy across disks) for the
    TorchScript exporter to write a large model into; removed on leaving the block."""
    parent = Path(path).parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{Path(path).name}.", suffix=".trace", dir=parent) as folder:
        yield folder


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def needs_external(model: onnx.ModelProto) -> bool:
    """True if ``model`` must be written with external data (too large, or already referring to it)."""
    return any(_is_external(t) for t in model.graph.initializer) or model.ByteSize() > EXTERNAL_DATA_THRESHOLD


def _tensor_bytes(t: onnx.TensorProto, base_dir: str) -> bytes:
    """The raw little-endian bytes of ``t`` (ONNX's raw_data layout), wherever they are stored."""
    if _is_external(t):
        info = external_data_helper.ExternalDataInfo(t)
        with open(os.path.join(base_dir, info.location), "rb") as f:
            f.seek(info.offset or 0)
            return f.read(info.length) if info.length else f.read()
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(t)).raw_data  # typed fields (float_data ...)


def _nbytes(t: onnx.TensorProto) -> int:
    if _is_external(t):
        return MIN_EXTERNAL_BYTES  # already out of the proto: keep it out
    return len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()


def _move_out(model: onnx.ModelProto, f, location: str, base_dir: str) -> None:
    """Write the large initializers' bytes to ``f`` and make them refer to ``location`` there."""
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or _nbytes(t) < MIN_EXTERNAL_BYTES:
            continue
        data = _tensor_bytes(t, base_dir)
        if len(data) >= _ALIGN_FROM:
            f.write(b"\0" * (-f.tell() % _ALIGNMENT))
        offset = f.tell()
        f.write(data)
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field)
        del t.external_data[:]
        for key, value in (("location", location), ("offset", offset), ("length", len(data))):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        t.data_location = onnx.TensorProto.EXTERNAL


def _relocate(model: onnx.ModelProto, location: str) -> None:
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location


def _internalize_attributes(model: onnx.ModelProto, base_dir: str) -> None:
    """Tensors in node attributes (a Constant the passes left as a node) back into the proto."""
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and _is_external(a.t):
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t, base_dir), a.t.name))


def save(model: onnx.ModelProto, path: str | os.PathLike, *, base_dir: str | None = None) -> None:
    """Check ``model`` with ``onnx.checker`` and write it to ``path`` atomically: one file, or with
    external data (``data_path(path)``) when ``needs_external(model)``.  Tensors already external
    are read from ``base_dir``.  ``model`` is left referring to the file it was written to."""
    path = Path(path)
    if base_dir is not None:
        _internalize_attributes(model, base_dir)
    if not needs_external(model):
        onnx.checker.check_model(model, full_check=True)
        write_atomic(path, model.SerializeToString(deterministic=True))
        return
    with atomic_path(path) as tmp_model, atomic_path(data_path(path)) as tmp_data:  # data is renamed first
        with open(tmp_data, "wb") as f:
            _move_out(model, f, tmp_data.name, base_dir or "")
        tmp_model.write_bytes(model.SerializeToString(deterministic=True))
        onnx.checker.check_model(tmp_model, full_check=True)  # by path: it reads the data file beside
        _relocate(model, data_path(path).name)
        tmp_model.write_bytes(model.SerializeToString(deterministic=True))


def check_data_files(path: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming the external-data files the ONNX file at ``path`` refers to
    but its folder lacks (a runtime's own message for that names no fix); nothing if all are there."""
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (OSError, DecodeError):  # not a readable ONNX file: the caller's own error says more
        return
    folder = Path(path).parent
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    missing = sorted(loc for loc in locations if not (folder / loc).is_file())
    if missing:
        raise FileNotFoundError(f"{Path(path).name} keeps its tensors in {', '.join(missing)}, which is not in "
                                f"{folder}; copy the .data file written beside it along with the .onnx")
