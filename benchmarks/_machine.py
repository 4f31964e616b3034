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
