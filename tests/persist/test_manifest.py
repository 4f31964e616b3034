"""Bad saved models are refused with the file's name; saving leaves no half-written files."""

import json
import os

import pytest
import torch
from torch import nn

import lowbit
from lowbit import persist
from lowbit.persist import manifest
from lowbit.ptq import FoldBatchNorm

pytestmark = pytest.mark.usefixtures("one_thread")


def small(seed=0, width=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 36, 4)).eval()


X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path):
    return lowbit.save(lowbit.quantize(small(), X, "w8a8", progress=False), tmp_path / "m")


def _rewrite_manifest(folder, change):
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    data.pop("checksum")
    (folder / "manifest.json").write_bytes(manifest.encode(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p, flip: p.write_bytes(b""), r"model.safetensors is empty \(0 bytes\)"),
    (lambda p, flip: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), r"model.safetensors is truncated"),
    (lambda p, flip: flip(p, p.stat().st_size // 2), r"model.safetensors is corrupted: its sha256 does not match"),
    (lambda p, flip: flip(p, 8, n=4), r"model.safetensors is corrupted"),  # inside the safetensors header
])
def test_damaged_tensors_file_is_refused_with_its_name(saved, damage, message, flip_bytes):
    damage(saved / "model.safetensors", flip_bytes)
    with pytest.raises(ValueError, match=message):
        lowbit.load(small(1), saved)


@pytest.mark.parametrize("damage, message", [
    (lambda p, flip: p.write_bytes(b""), r"manifest.json is empty \(0 bytes\)"),
    (lambda p, flip: p.write_bytes(p.read_bytes()[:100]), r"manifest.json is truncated or corrupted: not valid JSON"),
    (lambda p, flip: p.write_text(p.read_text().replace('"static"', '"dynamic"', 1)),
     r"manifest.json is corrupted: its content does not match its checksum"),
    (lambda p, flip: p.write_text("[1, 2]"), r"manifest.json is not a lowbit saved-model manifest"),
])
def test_damaged_manifest_is_refused_with_its_name(saved, damage, message, flip_bytes):
    damage(saved / "manifest.json", flip_bytes)
    with pytest.raises(ValueError, match=message):
        lowbit.load(small(1), saved)


def test_newer_version_unknown_fields_and_a_foreign_recipe_are_errors(saved):
    _rewrite_manifest(saved, lambda d: d.update(version=manifest.PACKED_VERSION + 1))
    with pytest.raises(ValueError, match=r"manifest.json has format version 4; this lowbit reads versions 1 to 3 "
                                         r"\(a newer lowbit wrote it: upgrade lowbit"):
        lowbit.load(small(1), saved)
    _rewrite_manifest(saved, lambda d: d.update(version=manifest.VERSION, surprise=1))
    with pytest.raises(ValueError, match=r"manifest.json: unknown field\(s\) \['surprise'\]"):
        lowbit.load(small(1), saved)
    _rewrite_manifest(saved, lambda d: (d.pop("surprise"), d["summary"].update(kind="gptq")))
    with pytest.raises(ValueError, match=r"manifest.json: its recipe does not fit this lowbit"):
        lowbit.load(small(1), saved)


def test_missing_files_and_another_float_model(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*manifest.json"):
        lowbit.load(small(1), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a file; lowbit.load takes the folder"):
        lowbit.load(small(1), saved / "manifest.json")
    with pytest.raises(ValueError, match="does not rebuild into the saved one|does not load into the rebuilt"):
        lowbit.load(small(1, width=4), saved)
    with pytest.raises(ValueError, match=r"\d\.(weight|bias) is torch.float32 in the file but torch.float64"):
        lowbit.load(small(1).double(), saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        lowbit.load(small(1), saved)


def test_inplace_load_rebuilds_the_given_model(saved):
    fresh = small(1)
    loaded = lowbit.load(fresh, saved, inplace=True)
    assert loaded is fresh and loaded.lowbit_summary.algorithms == (FoldBatchNorm(),)
    with torch.no_grad():
        assert torch.equal(loaded(X), lowbit.load(small(2), saved)(X))


def test_a_model_on_the_meta_device_is_refused_before_any_work(saved):
    with torch.device("meta"):
        meta = small()
    with pytest.raises(ValueError, match=r"lowbit.load: the model has no data \(0.weight is on the meta device.*to_empty"):
        lowbit.load(meta, saved)


def test_only_lowbit_models_are_saved(tmp_path):
    with pytest.raises(ValueError, match="saves models made by lowbit.quantize or lowbit.prepare_qat"):
        lowbit.save(small(), tmp_path / "m")
    (tmp_path / "file").write_text("x")
    qmodel = lowbit.quantize(small(), X, "w8a8", progress=False)
    with pytest.raises(ValueError, match="is a file; lowbit.save writes a folder"):
        lowbit.save(qmodel, tmp_path / "file")


def test_files_get_the_umask_permissions(tmp_path):
    qmodel = lowbit.quantize(small(), X, "w8a8", progress=False)
    old = os.umask(0o022)
    try:
        folder = lowbit.save(qmodel, tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "manifest.json": 0o644, "model.safetensors": 0o644}


def test_a_failed_save_leaves_the_previous_model_and_no_temporary(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    qmodel = lowbit.quantize(small(2), X, "w8a8", progress=False)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lowbit.save(qmodel, saved)
    monkeypatch.undo()

    def crash_manifest(manifest_dict):
        raise OSError("disk full")

    monkeypatch.setattr(persist._manifest, "encode", crash_manifest)
    with pytest.raises(OSError, match="disk full"):
        lowbit.save(qmodel, saved)
    monkeypatch.undo()
    # no temporary left; the tensors file was replaced but the old manifest no longer matches it
    assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "model.safetensors"]
    assert (saved / "manifest.json").read_bytes() == before["manifest.json"]
    with pytest.raises(ValueError, match="model.safetensors is"):
        lowbit.load(small(1), saved)
