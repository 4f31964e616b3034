"""Integer targets: what the CPU that runs the exported file can compute exactly.

ONNX Runtime's u8 x s8 integer kernels (QLinearConv, QGemm, MatMulInteger,
DynamicQuantizeMatMul) accumulate exactly in int32 on CPUs with VNNI (AVX512-VNNI or
AVX-VNNI: ``vpdpbusd``).  Without VNNI (AVX2 only, e.g. AMD Zen 3, or AVX-512 without
VNNI, e.g. Skylake-SP) they use ``vpmaddubsw``, which adds two adjacent u8 * s8 products
into a *saturating* int16: 255 * 127 * 2 = 64770 > 32767, so a layer whose activation
codes and weights are both large gives a different (clipped) result from the one the
simulation computed, silently.  A target says which arithmetic the file will meet, and
quantization and export shape the model so that arithmetic is exact there:

    x86-vnni        int8 weights, uint8 activations: exact int32 (vpdpbusd)
    x86-avx2-u8u8   the same 8-bit grid, weights stored as uint8 with zero point 128:
                    ORT's u8 x u8 kernels widen to int16 and multiply-add into int32
                    (vpmaddwd), exact on every x86 CPU; the numbers equal x86-vnni's
    x86-avx2-w7     7-bit weights (-64..63) in int8: a pair of products stays within
                    2 * 255 * 64 = 32640, so ``vpmaddubsw`` never saturates
                    (ONNX Runtime's ``reduce_range`` idea); one bit less on the weights
    x86-avx2        the default non-VNNI layout (see ``DEFAULT_AVX2``)
    arm64           int8 weights: ARM64 kernels (sdot/udot, or widening multiplies) are
                    exact in int32

``resolve_target("auto")`` reads the CPU of the machine that quantizes.  The target is
recorded in the model (``lowbit_summary.target``), in recipes, and in the exported file
(ONNX metadata ``lowbit.target``), and ``lowbit.runtime`` warns when a file made for
VNNI runs on a CPU without it.

    qmodel = lowbit.quantize(model, calib, "w8a8", target="x86-avx2")    # safe on any x86
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

log = logging.getLogger(__name__)

WeightLayout = Literal["s8", "u8"]


@dataclass(frozen=True, kw_only=True)
class Target:
    """The integer arithmetic of one kind of CPU, and the layout lowbit gives it.

    Attributes:
        name: the target's name (``"x86-vnni"`` ...).
        exact_u8s8: u8 x s8 products accumulate exactly in int32 on this CPU.
        weight_layout: ``"s8"`` (int8 weights) or ``"u8"`` (uint8 weights, zero point 128)
            for layers that run on integer kernels.
        max_weight_bits: the widest signed weight grid that is exact here (7 under
            ``vpmaddubsw`` with int8 weights; 8 otherwise).
        description: one line for reports.
    """

    name: str
    exact_u8s8: bool
    weight_layout: WeightLayout = "s8"
    max_weight_bits: int = 8
    description: str = ""

    def __post_init__(self) -> None:
        if self.weight_layout not in ("s8", "u8"):
            raise ValueError(f"Target.weight_layout must be 's8' or 'u8', got {self.weight_layout!r}")
        if not 2 <= self.max_weight_bits <= 8:
            raise ValueError(f"Target.max_weight_bits must be in 2..8, got {self.max_weight_bits!r}")
        if not self.exact_u8s8 and self.weight_layout == "s8" and self.max_weight_bits > 7:
            raise ValueError(f"target {self.name!r}: int8 weights on a CPU without exact u8 x s8 kernels "
                             "saturate; use weight_layout='u8' or max_weight_bits=7")

    @property
    def safe_without_vnni(self) -> bool:
        """True when the file's integer kernels compute exactly on an x86 CPU without VNNI."""
        return self.weight_layout == "u8" or self.max_weight_bits <= 7


_TARGETS: dict[str, Target] = {}


def _target(target: Target) -> Target:
    _TARGETS[target.name] = target
    return target


X86_VNNI = _target(Target(name="x86-vnni", exact_u8s8=True,
                          description="x86-64 with AVX512-VNNI or AVX-VNNI: int8 weights, exact int32"))
X86_AVX2_U8U8 = _target(Target(name="x86-avx2-u8u8", exact_u8s8=False, weight_layout="u8",
                               description="x86-64 without VNNI: uint8 weights (zero point 128), "
                                           "exact u8 x u8 kernels"))
X86_AVX2_W7 = _target(Target(name="x86-avx2-w7", exact_u8s8=False, max_weight_bits=7,
                             description="x86-64 without VNNI: 7-bit weights, vpmaddubsw cannot saturate"))
ARM64 = _target(Target(name="arm64", exact_u8s8=True,
                       description="ARM64 (NEON dot products or widening multiplies): int8 weights, exact int32"))

DEFAULT_AVX2 = X86_AVX2_U8U8
"""What ``target="x86-avx2"`` (and ``"auto"`` on a CPU without VNNI) means.  u8u8 keeps the
8-bit weight grid, so the model is the same, number for number, as on a VNNI CPU; w7 loses
one bit of every weight (see BENCHMARKS.md, "Integer targets", for both measured)."""

_ALIASES = {"x86-avx2": DEFAULT_AVX2.name}

TARGETS: Mapping[str, Target] = MappingProxyType(_TARGETS)
"""Targets by name (``"x86-avx2"`` and ``"auto"`` are accepted too; see ``resolve_target``)."""

TARGET_NAMES = ("auto", *_TARGETS, *_ALIASES)


# -- the CPU of this machine --------------------------------------------------------------------
@dataclass(frozen=True)
class CpuInfo:
    """What this machine's CPU can do, as far as integer kernels care."""

    arch: str  # "x86_64", "aarch64", ...
    model: str  # e.g. "AMD EPYC 7B13"; "" when unknown
    flags: frozenset[str]

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "x86", "i686")

    @property
    def is_arm64(self) -> bool:
        return self.arch.lower() in ("aarch64", "arm64")

    @property
    def has_vnni(self) -> bool:
        """AVX512-VNNI or AVX-VNNI: ORT's u8 x s8 kernels accumulate exactly."""
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    def describe(self) -> str:
        if self.is_x86:
            isa = "AVX512-VNNI" if "avx512_vnni" in self.flags else "AVX-VNNI" if "avx_vnni" in self.flags \
                else "AVX-512, no VNNI" if "avx512f" in self.flags else "AVX2, no VNNI" if "avx2" in self.flags \
                else "no AVX2"
            return f"{self.model or 'x86-64 CPU'} ({isa})"
        return f"{self.model or self.arch} ({self.arch})"


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (Linux: /proc/cpuinfo; elsewhere only the architecture is known)."""
    model, flags = _read_cpuinfo()
    return CpuInfo(arch=platform.machine(), model=model, flags=flags)


def detect_target(cpu: CpuInfo | None = None) -> Target:
    """The target for ``cpu`` (default: this machine).  An x86 CPU whose features cannot be
    read gets the non-VNNI default, which is exact on every x86 CPU."""
    cpu = cpu or cpu_info()
    if cpu.is_arm64:
        return ARM64
    if cpu.is_x86 and cpu.has_vnni:
        return X86_VNNI
    if cpu.is_x86 and not cpu.flags:
        log.info("cannot read this CPU's features; target %s (exact on every x86 CPU)", DEFAULT_AVX2.name)
    elif not cpu.is_x86:
        log.warning("no integer target is known for %s; using %s", cpu.arch, DEFAULT_AVX2.name)
    return DEFAULT_AVX2


def resolve_target(target: str | Target | None = "auto") -> Target:
    """A Target from a name, ``"auto"`` (this machine's CPU; ``LOWBIT_TARGET`` in the
    environment overrides it), or a Target.  None means ``"auto"``.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if isinstance(target, Target):
        return target
    if target is None or target == "auto":
        forced = os.environ.get("LOWBIT_TARGET")
        if forced and forced != "auto":
            return resolve_target(forced)
        return detect_target()
    name = _ALIASES.get(target, target) if isinstance(target, str) else None
    if name not in _TARGETS:
        raise ValueError(f"unknown target {target!r}; targets: {', '.join(TARGET_NAMES)}")
    return _TARGETS[name]


TARGET_METADATA = "lowbit.target"
"""The ONNX metadata_props key under which export records the target a file was made for."""


class TargetMismatchWarning(UserWarning):
    """An exported file runs on a CPU whose integer arithmetic differs from its target's."""


def running_mismatch(target_name: str | None, cpu: CpuInfo | None = None) -> str | None:
    """A warning, or None: what goes wrong running a file made for ``target_name`` on ``cpu``
    (default: this machine).  Only the one case that changes numbers is reported: a file with
    int8 weights on 8 bits (made for VNNI or ARM) run on an x86 CPU without VNNI."""
    if target_name is None or target_name not in _TARGETS:
        return None
    target, cpu = _TARGETS[target_name], cpu or cpu_info()
    if target.safe_without_vnni or not cpu.is_x86 or cpu.has_vnni or not cpu.flags:
        return None
    return (f"this model was quantized for target {target.name!r}, but this CPU ({cpu.describe()}) has no VNNI: "
            "ONNX Runtime's u8 x s8 kernels saturate int16 pair sums here, so its outputs differ from the "
            "simulation (on MobileNetV2: 55-59% top-1 agreement instead of ~100%). Quantize again with "
            "target='x86-avx2' (or 'auto' on this machine) and export again")


__all__ = [
    "ARM64",
    "DEFAULT_AVX2",
    "TARGETS",
    "TARGET_METADATA",
    "TARGET_NAMES",
    "X86_AVX2_U8U8",
    "X86_AVX2_W7",
    "X86_VNNI",
    "CpuInfo",
    "Target",
    "TargetMismatchWarning",
    "cpu_info",
    "detect_target",
    "resolve_target",
    "running_mismatch",
]
