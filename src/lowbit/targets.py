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

``resolve_target("auto")`` (or ``"ort"``) reads the CPU of the machine that quantizes.

Other runtimes are targets too: each has its own rules for what runs in integers, and the
simulation quantizes activations on the grid its integer kernels take (``activation_grid``;
weights are int8 symmetric per output channel everywhere), so the simulated numbers are the
deployed numbers.  ``lowbit.export`` writes the runtime's artifact:

    openvino    OpenVINO (CPU plugin, oneDNN)           u8-affine activations
    tflite      TFLite / LiteRT                          s8-affine: int8 with a zero point; the u8
                                                         affine grid shifted by 128, so the
                                                         simulation keeps uint8 codes (the same
                                                         numbers) and the exporter shifts them
    qnn         Qualcomm QNN / SNPE (AIMET encodings)    u8-affine activations
    tensorrt    TensorRT explicit quantization           s8-symmetric: int8, zero point 0

The target is recorded in the model (``lowbit_summary.target``), in recipes, and in the
exported file (ONNX metadata ``lowbit.target``), and ``lowbit.runtime`` warns when a file
with 8-bit int8 weights runs in ONNX Runtime on a CPU without VNNI.

    qmodel = lowbit.quantize(model, calib, "w8a8", target="x86-avx2")    # safe on any x86
    qmodel = lowbit.quantize(model, calib, "w8a8", target="tensorrt")    # int8 symmetric activations
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
Runtime = Literal["onnxruntime", "openvino", "tflite", "qnn", "tensorrt"]
ActivationGrid = Literal["u8-affine", "s8-affine", "s8-symmetric"]

RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino", "tflite", "qnn", "tensorrt")
ACTIVATION_GRIDS: tuple[str, ...] = ("u8-affine", "s8-affine", "s8-symmetric")


@dataclass(frozen=True, kw_only=True)
class Target:
    """The runtime that runs the exported model, its integer arithmetic, and the layout lowbit
    gives it.

    Attributes:
        name: the target's name (``"x86-vnni"``, ``"tensorrt"`` ...).
        exact_u8s8: u8 x s8 products accumulate exactly in int32 on this CPU (for another
            runtime: in its integer kernels, as its vendor documents).
        weight_layout: ``"s8"`` (int8 weights) or ``"u8"`` (uint8 weights, zero point 128)
            for layers that run on integer kernels.
        max_weight_bits: the widest signed weight grid that is exact here (7 under
            ``vpmaddubsw`` with int8 weights; 8 otherwise).
        description: one line for reports.
        runtime: what runs the exported artifact: ``"onnxruntime"`` (the CPU targets),
            ``"openvino"``, ``"tflite"``, ``"qnn"`` or ``"tensorrt"``.
        activation_grid: the activation grid the runtime's integer kernels take, which
            ``QuantConfig.for_target`` puts every activation quantizer on: ``"u8-affine"``,
            ``"s8-affine"`` (simulated on uint8 codes: the same numbers, see the module
            docstring) or ``"s8-symmetric"`` (zero point 0).  None (the ONNX Runtime targets):
            the config's own grid, since ORT runs both (uint8 affine fastest on x86).
        quantized_outputs: every integer kernel of the runtime writes a quantized output (TFLite:
            an int8 CONV_2D / FULLY_CONNECTED has an int8 output tensor), so the simulation gives
            each quantized layer whose output no quantizer reads an output quantizer of its own
            (``QuantConfig.quantized_outputs``) and rounds where the file rounds.  False: the
            runtime can leave an integer layer's output float (ORT's QGemm, OpenVINO's fused
            dequantization, TensorRT).
    """

    name: str
    exact_u8s8: bool
    weight_layout: WeightLayout = "s8"
    max_weight_bits: int = 8
    description: str = ""
    runtime: Runtime = "onnxruntime"
    activation_grid: ActivationGrid | None = None
    quantized_outputs: bool = False

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"Target.runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.activation_grid is not None and self.activation_grid not in ACTIVATION_GRIDS:
            raise ValueError(f"Target.activation_grid must be None or one of {ACTIVATION_GRIDS}, "
                             f"got {self.activation_grid!r}")
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

    @property
    def is_cpu(self) -> bool:
        """True for the ONNX Runtime CPU targets (``x86-vnni`` ...), False for other runtimes."""
        return self.runtime == "onnxruntime"


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

# -- other runtimes (the exporters: lowbit.export.<runtime>; lowbit.export dispatches on the target) --
# Weights: int8 symmetric per output channel (axis 0), as every preset has them already.
OPENVINO = _target(Target(name="openvino", exact_u8s8=True, runtime="openvino", activation_grid="u8-affine",
                          description="OpenVINO CPU plugin: uint8 affine activations, int8 per-channel weights"))
TFLITE = _target(Target(name="tflite", exact_u8s8=True, runtime="tflite", activation_grid="s8-affine",
                        quantized_outputs=True,
                        description="TFLite / LiteRT: int8 affine activations (uint8 grid shifted by 128), "
                                    "int8 per-channel weights, int32 bias"))
QNN = _target(Target(name="qnn", exact_u8s8=True, runtime="qnn", activation_grid="u8-affine",
                     description="Qualcomm QNN / SNPE through AIMET encodings: uint8 affine activations, "
                                 "int8 per-channel weights"))
TENSORRT = _target(Target(name="tensorrt", exact_u8s8=True, runtime="tensorrt", activation_grid="s8-symmetric",
                          description="TensorRT explicit quantization: int8 symmetric activations (zero point 0), "
                                      "int8 per-channel weights, float bias"))

DEFAULT_AVX2 = X86_AVX2_U8U8
"""What ``target="x86-avx2"`` (and ``"auto"`` on a CPU without VNNI) means.  u8u8 keeps the
8-bit weight grid, so the model is the same, number for number, as on a VNNI CPU; w7 loses
one bit of every weight (see BENCHMARKS.md, "Integer targets", for both measured)."""

_ALIASES = {"x86-avx2": DEFAULT_AVX2.name}
_THIS_CPU = ("auto", "ort")  # this machine's CPU target; "ort": ONNX Runtime, said the way lowbit.export says it

TARGETS: Mapping[str, Target] = MappingProxyType(_TARGETS)
"""Targets by name (``"x86-avx2"``, ``"auto"`` and ``"ort"`` are accepted too; see ``resolve_target``)."""

TARGET_NAMES = (*_THIS_CPU, *_TARGETS, *_ALIASES)


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
    environment overrides it), or a Target.  None means ``"auto"``; ``"ort"`` (ONNX Runtime)
    too, except that it stays a CPU target when ``LOWBIT_TARGET`` names another runtime.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if isinstance(target, Target):
        return target
    if target is None or target in _THIS_CPU:
        forced = os.environ.get("LOWBIT_TARGET")
        chosen = resolve_target(forced) if forced and forced not in _THIS_CPU else detect_target()
        return detect_target() if target == "ort" and not chosen.is_cpu else chosen
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
    (default: this machine) in ONNX Runtime.  Only the one case that changes numbers is reported:
    a file with int8 weights on 8 bits (made for VNNI, ARM or another runtime) run on an x86 CPU
    without VNNI."""
    if target_name is None or target_name not in _TARGETS:
        return None
    target, cpu = _TARGETS[target_name], cpu or cpu_info()
    if target.safe_without_vnni or not cpu.is_x86 or cpu.has_vnni or not cpu.flags:
        return None
    if not target.is_cpu:
        return (f"this model was made for {target.runtime} (target {target.name!r}); run in ONNX Runtime on this "
                f"CPU ({cpu.describe()}, no VNNI), its u8 x s8 kernels saturate int16 pair sums, so the outputs "
                "here differ from the simulation. Run it in its runtime, or, for ONNX Runtime on this CPU, "
                "quantize again with target='x86-avx2'")
    return (f"this model was quantized for target {target.name!r}, but this CPU ({cpu.describe()}) has no VNNI: "
            "ONNX Runtime's u8 x s8 kernels saturate int16 pair sums here, so its outputs differ from the "
            "simulation (on MobileNetV2: 55-59% top-1 agreement instead of ~100%). Quantize again with "
            "target='x86-avx2' (or 'auto' on this machine) and export again")


__all__ = [
    "ACTIVATION_GRIDS",
    "ARM64",
    "DEFAULT_AVX2",
    "OPENVINO",
    "QNN",
    "RUNTIMES",
    "TARGETS",
    "TARGET_METADATA",
    "TARGET_NAMES",
    "TENSORRT",
    "TFLITE",
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
