"""What a benchmark ran on: CPU, cores, Python and package versions (shared by the bench scripts)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from collections.abc import Sequence

import torch

import lowbit


def package_version(package: str) -> str:
    """The installed version of ``package``, or "absent"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def machine(packages: Sequence[str]) -> dict:
    """CPU model, core count, torch's thread count, Python and ``packages``' versions, lowbit's version."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), **{p: package_version(p) for p in packages},
            "lowbit": lowbit.__version__}


def machine_line(info: dict, shown: Sequence[str], *, threads: bool = False) -> str:
    """``Machine: <cpu>, <n> cores; Python <v>; <package> <v>, ...`` for the packages in ``shown``
    (with ``threads``, torch's intra-op thread count after the cores)."""
    versions = ", ".join(f"{p} {info[p]}" for p in shown)
    in_use = f" (torch threads {info['torch_threads']})" if threads else ""
    return f"Machine: {info['cpu']}, {info['cores']} cores{in_use}; Python {info['python']}; {versions}"
