"""QAT checkpoints: everything a killed run needs to continue as if it had never stopped.

One file holds the model's ``state_dict`` (weights, learned scales / zero-points, observer
statistics, each quantizer's mode), which conv-BN layers have frozen BatchNorm, the
optimizer, the ``QATSchedule`` position, the training position (step, epoch, batch within
the epoch), the RNG states (torch CPU and CUDA, Python ``random``, NumPy's global
generator) and a fingerprint of the model's structure and quantization config.

The file holds tensors and plain Python values only, so ``torch.load(weights_only=True)``
reads it (no code runs on load); it is written to a temporary file in the same folder and
renamed over the old one, so a crash mid-write leaves the previous checkpoint intact.  A
sha256 trailer follows the ``torch.save`` bytes (``torch.load`` ignores it): an empty,
truncated or corrupted file is refused with its name instead of resuming from damaged state.

    save_checkpoint(run / "checkpoint.pt", qmodel, opt, sched, step=step, epoch=epoch, batch=i + 1)
    ...
    ck = load_checkpoint(run / "checkpoint.pt", fresh_qmodel, opt, sched)   # restores RNG states too
    start_step = ck.step
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._files import sha256_file, write_atomic
from ..nn.conv_bn import QuantConvBn2d
from ..nn.quantizer import Quantizer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "lowbit.qat_checkpoint"
CHECKPOINT_VERSION = 2  # 2: a sha256 trailer after the torch.save bytes (1: none, still read)
_TRAILER_MAGIC = b"lowbit-sha256\0\0\0"  # 16 bytes, then the 32-byte digest of everything before
_TRAILER = len(_TRAILER_MAGIC) + 32
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


# -- fingerprint ---------------------------------------------------------------------------
def fingerprint(model: nn.Module) -> dict[str, list[str]]:
    """What must match for a checkpoint to load into ``model``: the quantization config and
    learn option, the module types, the parameter shapes and each quantizer's grid.

    Only things training never changes go in (not modes, not scale shapes), so the model
    a run saves and a fresh model prepared the same way give the same fingerprint.
    """
    summary = getattr(model, "lowbit_summary", None)
    config = getattr(summary, "config", None)
    return {
        "config": [json.dumps(config.to_dict(), sort_keys=True, default=str) if config is not None else "none"],
        "learn": [str(getattr(summary, "learn", None))],
        "modules": [f"{name or '<root>'}: {type(m).__name__}" for name, m in model.named_modules()],
        "parameters": [f"{name}: {tuple(p.shape)}" for name, p in model.named_parameters()],
        "quantizers": [f"{q.name}: {q.spec.describe()}, learn={q.learn}, observer={q.observer_kind}"
                       for q in model.modules() if isinstance(q, Quantizer)],
    }


def _digest(fp: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    if _digest(saved) == _digest(current):
        return
    for key, mine in current.items():
        theirs = saved.get(key, [])
        if mine == theirs:
            continue
        diff = next(((i, a, b) for i, (a, b) in enumerate(zip(theirs, mine, strict=False)) if a != b), None)
        if diff is None:
            detail = f"the checkpoint has {len(theirs)} entries, this model {len(mine)}"
        else:
            detail = f"checkpoint has {diff[1]!r}, this model {diff[2]!r}"
        what = {"config": "quantization config", "learn": "learn= option"}.get(key, key)
        raise ValueError(
            f"{path} was saved from a different model or QAT config ({what} differ: {detail}); "
            "prepare the same model with the same config and learn= option to resume it, "
            "or start a new run in an empty checkpoint folder"
        )


# -- RNG states ----------------------------------------------------------------------------
def rng_state() -> dict:
    """The global RNG states (torch CPU / CUDA, Python ``random``, NumPy), as plain values."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(obj):
    return tuple(_as_tuples(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


# -- writing ---------------------------------------------------------------------------------
def _check_plain(obj, where: str) -> None:
    """Only values ``torch.load(weights_only=True)`` reads back (no pickled classes)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; checkpoint keys are str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__name__}; a checkpoint holds tensors, str, int, float, "
                        "bool, None, lists and dicts only (so it loads with weights_only=True)")


def _first_nonfinite(state: dict, prefix: str) -> str | None:
    for key, value in state.items():
        if isinstance(value, dict):
            found = _first_nonfinite(value, f"{prefix}{key}.")
            if found:
                return found
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{prefix}{key}"
    return None


class _HashingWriter:
    """A binary file that also hashes what is written to it (``torch.save`` writes sequentially)."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename it over ``path``:
    readers see the old file or the new one, never half of one.  The file ends with a
    checksum trailer (``read_checkpoint`` checks it; ``torch.load`` ignores it)."""

    def write(f) -> None:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.write(_TRAILER_MAGIC + writer.sha.digest())

    return write_atomic(path, write)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    schedule=None,
    *,
    step: int = 0,
    epoch: int = 0,
    batch: int = 0,
    extra: dict | None = None,
) -> Path:
    """Write the whole QAT state to ``path`` (atomically; loads with ``weights_only=True``).

    Args:
        path: the checkpoint file; its folder is created.
        model: the prepared QAT model.
        optimizer, schedule: saved when given (a ``QATSchedule`` or anything with
            ``state_dict``).
        step, epoch, batch: the training position: optimizer steps done, the epoch being
            trained and how many of its batches were consumed.
        extra: your own plain values (tensors, numbers, strings, lists, dicts).

    Returns:
        ``path``.

    Raises:
        FloatingPointError: a model or optimizer tensor holds NaN/Inf; nothing is written,
            so the previous checkpoint stays the last good one.
    """
    path = Path(path)
    model_state = model.state_dict()
    opt_state = optimizer.state_dict() if optimizer is not None else None
    bad = _first_nonfinite(model_state, "model ") or (opt_state and _first_nonfinite(opt_state["state"], "optimizer "))
    if bad:
        raise FloatingPointError(f"not saving a checkpoint: {bad} holds NaN/Inf; the previous checkpoint "
                                 f"({path}) is kept as the last good state")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint(model),
        "model": model_state,
        "bn_frozen": [name for name, m in model.named_modules() if isinstance(m, QuantConvBn2d) and m.bn_frozen],
        "optimizer": opt_state,
        "optimizer_type": type(optimizer).__name__ if optimizer is not None else None,
        "schedule": schedule.state_dict() if schedule is not None else None,
        "position": {"step": int(step), "epoch": int(epoch), "batch": int(batch)},
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    _check_plain(payload["extra"], "extra")
    _check_plain(payload["schedule"], "schedule state")
    return atomic_save(payload, path)


# -- reading ---------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What ``load_checkpoint`` read besides the states it loaded into your objects."""

    path: Path
    step: int
    epoch: int
    batch: int
    rng: dict = field(repr=False)
    extra: dict = field(default_factory=dict)


_START_OVER = "delete it to start a new run (fit(resume=False), lowbit qat --no-resume), or put back a good copy"


def _verify_trailer(path: Path) -> bool:
    """Check the checksum trailer: True when it is there and matches, False when the file has
    none (a version-1 checkpoint, or a damaged trailer); raises on a mismatch or an empty file."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the run that wrote it did not finish; {_START_OVER}")
    if size <= _TRAILER:
        return False
    with open(path, "rb") as f:
        f.seek(size - _TRAILER)
        trailer = f.read(_TRAILER)
    if not trailer.startswith(_TRAILER_MAGIC):
        return False
    if sha256_file(path, skip_last=_TRAILER) != trailer[len(_TRAILER_MAGIC):].hex():
        raise ValueError(f"{path} is corrupted: its content does not match the sha256 written with it (the file "
                         f"changed after it was saved: a disk or copy error, or an edit); {_START_OVER}")
    return True


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict, its checksum verified, read with ``weights_only=True`` and its
    format checked.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an empty, truncated or corrupted file, or not a lowbit QAT checkpoint
            (the message names the file).
    """
    path = Path(path)
    checked = _verify_trailer(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} does not load safely with torch.load(weights_only=True): it holds "
                         f"more than tensors and plain values, so it is not a lowbit QAT checkpoint ({exc})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # what torch.load raises on damaged zips
        raise ValueError(f"{path} is truncated or corrupted and does not load ({type(exc).__name__}: {exc}); "
                         f"{_START_OVER}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a lowbit QAT checkpoint (format {CHECKPOINT_FORMAT})")
    version = payload.get("version")
    if version not in (1, CHECKPOINT_VERSION):
        raise ValueError(f"{path} has checkpoint version {version!r}; this lowbit reads versions 1 to "
                         f"{CHECKPOINT_VERSION} (a newer lowbit wrote it? upgrade lowbit to resume it)")
    if version >= 2 and not checked:
        raise ValueError(f"{path} is corrupted: its checksum trailer is missing or damaged; {_START_OVER}")
    if version == 1:
        log.warning("%s is a version-1 checkpoint without a checksum: loaded unchecked", path)
    return payload


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    schedule=None,
    *,
    restore_rng: bool = True,
) -> Checkpoint:
    """Load a ``save_checkpoint`` file into a model prepared the same way (and its optimizer
    and schedule, built the same way), in place.

    Args:
        path: the checkpoint file.
        model: a fresh ``prepare_qat`` model with the same config and ``learn=``.
        optimizer, schedule: loaded when given and saved in the checkpoint.
        restore_rng: set the global RNG states to the saved ones.

    Returns:
        A ``Checkpoint`` with the training position, the RNG states and ``extra``.

    Raises:
        ValueError: not a lowbit checkpoint, not loadable with ``weights_only=True``, or
            saved from a different model / config / optimizer (the message says what differs).
    """
    path = Path(path)
    payload = read_checkpoint(path)
    _check_fingerprint(payload["fingerprint"], fingerprint(model), path)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{path}: the model state does not load into this model: {exc}") from exc
    frozen = set(payload["bn_frozen"])
    for name, m in model.named_modules():
        if isinstance(m, QuantConvBn2d):
            m.bn_frozen = name in frozen
    if optimizer is not None and payload["optimizer"] is not None:
        if payload["optimizer_type"] != type(optimizer).__name__:
            raise ValueError(f"{path} holds a {payload['optimizer_type']} state but the optimizer is a "
                             f"{type(optimizer).__name__}; build the same optimizer to resume")
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path}: the optimizer state does not fit this optimizer ({exc}); build it "
                             "over the same parameters, in the same groups, to resume") from exc
    elif optimizer is not None:
        log.warning("%s holds no optimizer state; the optimizer starts fresh", path)
    if schedule is not None and payload["schedule"] is not None:
        schedule.load_state_dict(payload["schedule"])
    if restore_rng:
        set_rng_state(payload["rng"])
    pos = payload["position"]
    return Checkpoint(path=path, step=pos["step"], epoch=pos["epoch"], batch=pos["batch"], rng=payload["rng"],
                      extra=payload["extra"])
