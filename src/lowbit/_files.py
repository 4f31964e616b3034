"""Writing files safely: every file lowbit writes goes through ``write_atomic`` / ``atomic_path``.

A file is written under a temporary name in its own folder (so the rename stays on one file
system), flushed to disk, then renamed over the target: a reader sees the old file or the
new one, never half of one, and a failure mid-write removes the temporary and leaves the
old file as it was.  The temporary is created with mode ``0o666`` like a plain ``open``, so
the process umask applies (``tempfile.mkstemp`` would give ``0o600``, which a deployment
pipeline running as another user cannot read).  Missing parent folders are created.

    write_atomic("out/model.onnx", proto_bytes)
    write_atomic("out/ck.pt", lambda f: torch.save(state, f))
    with atomic_path("out/model.safetensors") as tmp:      # for writers that want a path
        safetensors.torch.save_file(tensors, tmp)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20  # bytes read at a time when hashing


def _create_temp(path: Path) -> Path:
    """A new empty file next to ``path`` (``.name.<random>.tmp``), mode 0o666 minus the umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync(path: Path, *, directory: bool = False) -> None:
    if directory and not hasattr(os, "O_DIRECTORY"):
        return  # (Windows: a folder cannot be opened to sync it; the rename is durable there)
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on leaving the block it is
    synced and renamed over ``path``.  If the block raises, the temporary is removed and
    ``path`` is untouched.

    Args:
        path: the file to (re)write; its parent folders are created.

    Example:
        >>> with atomic_path("run/model.safetensors") as tmp:
        ...     safetensors.torch.save_file(tensors, tmp)
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    mode = tmp.stat().st_mode & 0o777  # the umask's; a writer that recreates the file may not keep it
    try:
        yield tmp
        if tmp.stat().st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent, directory=True)  # make the rename itself durable


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, or a function that writes to the binary file it is given) to
    ``path`` atomically, with the umask's permissions (see the module docstring).

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> write_atomic("ck.pt", lambda f: torch.save(state, f))
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            data(f)
    return path


def sha256_file(path: str | os.PathLike, *, skip_last: int = 0) -> str:
    """Hex sha256 of a file's bytes, read in chunks (without its last ``skip_last`` bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = os.fstat(f.fileno()).st_size - skip_last
        while remaining > 0:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()
