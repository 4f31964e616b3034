"""Monitor with the real wandb package, offline: the run file on disk holds what was logged.

wandb (0.2x and later) writes an offline run as ``<dir>/wandb/offline-run-*/run-<id>.wandb``:
a LevelDB-style log of protobuf ``Record`` messages, which no public wandb API reads back
(``wandb sync`` does it in the Go core).  ``_records`` below reads it: a 7-byte file header
(``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte header
(CRC32C, length, type: FULL / FIRST / MIDDLE / LAST).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

wandb = pytest.importorskip("wandb")
pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

from lowbit.qat import Monitor

pytestmark = pytest.mark.usefixtures("one_thread")

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path):
    """Every ``Record`` in a .wandb file, in order."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B" and raw[4:6] == b"\xe1\xbe", raw[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        if _BLOCK - pos % _BLOCK < 7:  # too little room left for a chunk header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == _FULL:
            pending = data
        elif kind in (_FIRST, _MIDDLE):
            pending = (pending if kind == _MIDDLE else b"") + data
            continue
        elif kind == _LAST:
            pending += data
        else:
            continue  # zero padding at the end of a block
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _history(records) -> dict[int, dict]:
    """``{step: {key: value}}`` from the run's history rows."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Real wandb, offline, every file it writes under tmp_path, nothing printed or patched."""
    for var, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off", "WANDB_CONFIG_DIR": tmp_path / "config",
                       "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data",
                       "WANDB_ARTIFACT_DIR": tmp_path / "artifacts", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_monitor_writes_an_offline_wandb_run_that_holds_what_it_logged(offline):
    log_dir = offline / "tb"
    with Monitor(log_dir, config={"lr": 1e-4, "config": "w4a8"}) as mon:
        assert isinstance(mon.wandb, wandb.sdk.wandb_run.Run)
        assert mon.wandb.settings.mode == "offline"
        mon.scalar("train/loss", 0.5, step=1)
        mon.scalars({"train/loss": 0.25, "train/lr": 1e-4}, step=2)
        mon.log_scales({"fc.input": 0.5, "fc.weight/max": 0.125}, step=2)
        mon.log_weight_errors({"fc.weight": torch.tensor([0.1, -0.1, 0.0])}, step=2)
        mon.log_bit_widths({"int8": 24, "float32": 8}, "| stored as | parameters |", step=3)
    assert mon.wandb is None  # finished
    # finish() returns before wandb's core process has written the run file out (it buffers
    # the file until the run's stream closes); teardown waits for the core to exit.
    wandb.teardown()

    runs = list((log_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    records = list(_records(runs[0]))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "exit" in kinds

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "lowbit-qat" and runs[0].name == f"run-{run.run_id}.wandb"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["lr"] == 1e-4 and config["config"] == "w4a8"

    # one history row per step; what was logged at one step lands in one row
    history = _history(records)
    assert sorted(history) == [1, 2, 3]
    assert history[1]["train/loss"] == 0.5
    assert history[2]["train/loss"] == 0.25 and history[2]["train/lr"] == 1e-4
    assert history[2]["scale/fc.input"] == 0.5 and history[2]["scale/fc.weight/max"] == 0.125
    assert history[3]["model/params/int8"] == 24 and history[3]["model/params/float32"] == 8
    # histograms and the bit-width table reach W&B as they reach TensorBoard
    assert history[2]["quant_error/fc.weight/_type"] == "histogram"
    assert sum(history[2]["quant_error/fc.weight/values"]) == 3  # the three errors, binned
    assert history[3]["model/bit_widths/_type"] == "table-file" and history[3]["model/bit_widths/nrows"] == 1

    exit_record = next(r.exit for r in records if r.WhichOneof("record_type") == "exit")
    assert exit_record.exit_code == 0

    # TensorBoard got everything as before, next to the W&B run
    assert list(log_dir.glob("events.out.tfevents.*"))


def test_wandb_false_writes_no_run(offline):
    with Monitor(offline / "tb", wandb=False) as mon:
        assert mon.wandb is None
        mon.scalar("train/loss", 0.5, step=1)
    assert not (offline / "tb" / "wandb").exists()
