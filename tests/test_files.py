"""lowbit._files: atomic writes with the umask's permissions, nothing left behind on failure."""

import hashlib
import os

import pytest

from lowbit._files import atomic_path, sha256_file, write_atomic


@pytest.fixture
def umask():
    def set_umask(value):
        old.append(os.umask(value))

    old = []
    yield set_umask
    if old:
        os.umask(old[0])


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_0666_minus_the_umask_like_open(tmp_path, umask, mask, mode):
    umask(mask)
    path = write_atomic(tmp_path / "new" / "folder" / "f.bin", b"abc")  # missing folders are created
    with open(tmp_path / "plain", "wb"):
        pass
    assert path.read_bytes() == b"abc"
    assert path.stat().st_mode & 0o777 == mode == (tmp_path / "plain").stat().st_mode & 0o777


def test_a_writer_that_recreates_the_file_still_gets_the_umask_mode(tmp_path, umask):
    umask(0o022)
    with atomic_path(tmp_path / "f") as tmp:
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as some writers (safetensors) do
        os.close(fd)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_a_failure_mid_write_leaves_no_file_and_no_temporary(tmp_path):
    def crash(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "f.bin", crash)
    assert list(tmp_path.iterdir()) == []

    write_atomic(tmp_path / "f.bin", b"good")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "f.bin", crash)
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"] and (tmp_path / "f.bin").read_bytes() == b"good"

    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "g.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_folder_is_not_overwritten(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_atomic(tmp_path / "d", b"x")


def test_sha256_file_can_leave_out_a_trailer(tmp_path):
    data = os.urandom(3 * 2**20 + 5)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f", skip_last=48) == hashlib.sha256(data[:-48]).hexdigest()
