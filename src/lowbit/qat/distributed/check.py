"""Checking that replicas agree: bit-for-bit comparison of state across ranks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ._comm import _world


def _digests(named: Iterator[tuple[str, object]]) -> dict[str, str]:
    out = {}
    for name, value in named:
        h = hashlib.sha256()
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
        out[name] = h.hexdigest()
    return out


def _mismatches(modules: dict[str, nn.Module], group) -> list[str]:
    named = ((f"{prefix}.{k}", v) for prefix, m in modules.items() for k, v in m.state_dict(keep_vars=True).items())
    return _compare(_digests(named), group)


def _compare(digests: dict[str, str], group) -> list[str]:
    world = _world(group)
    gathered: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(gathered, digests, group=group)
    names = sorted(set().union(*(d.keys() for d in gathered)))
    return [n for n in names if len({d.get(n) for d in gathered}) > 1]


def replica_mismatches(model: nn.Module, group=None) -> list[str]:
    """Names in ``model.state_dict()`` (parameters, buffers, quantizer and observer state) whose
    value differs between ranks, bit for bit (one all-gather of SHA-256 digests).  Empty when
    the replicas are identical.  Every rank must call it."""
    return _compare(_digests(iter(model.state_dict(keep_vars=True).items())), group)
