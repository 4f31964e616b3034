"""QuantSpec: the integer grid a tensor is quantized to and the layout of its scales.

A spec says *what* the quantized tensor looks like (bit width, sign, symmetric or
affine, one scale per tensor / per channel / per block); it holds no data.  The
layout of scale and zero-point follows ONNX QuantizeLinear (opset 21):

* ``granularity="tensor"``:  scalar scale, shape ``()``.
* ``granularity="channel"``: 1-D scale of length ``x.shape[axis]``.
* ``granularity="group"``:   ONNX "blocked" quantization: scale has the rank of
  ``x`` with ``ceil(x.shape[axis] / group_size)`` entries along ``axis``; every run of
  ``group_size`` consecutive elements along ``axis`` shares one scale.  When
  ``group_size`` does not divide the dimension the last group is shorter (SmolLM2's
  hidden size 576 in groups of 128: four of 128 and one of 64), as ONNX's opset-21
  Quantize/DequantizeLinear and ONNX Runtime's MatMulNBits (which pads K to a whole
  block) lay it out.  Any ``group_size >= 1`` is valid for any dimension: one larger
  than the dimension gives a single (short) group, so a preset such as group 128 also
  applies to a layer narrower than 128 instead of failing on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
_GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        bits: integer width, 2..8 or 16 (16 as ONNX's int16/uint16).
        signed: two's-complement grid (``int8``) rather than unsigned (``uint8``).
        symmetric: zero-point fixed at 0 and range ``[-amax, amax]``; requires ``signed``.
        narrow_range: drop the most negative code (int8 uses -127..127), so the
            signed grid is symmetric around zero.  Only meaningful with ``signed``.
        signed_scale: (symmetric grids) the scale takes the sign of the largest-magnitude
            value in its range, which lands exactly on ``qmin``: ``scale = extreme / qmin``,
            negative when the extreme is positive.  The grid spends its extra negative code
            on the value that matters most, where ``amax / ((qmax - qmin) / 2)`` rounds it
            half a step off: GGUF's Q4_0 rule and ONNX Runtime's symmetric MatMulNBits
            quantizer's.  Worth it at 3-4 bits (SmolLM2 W4 g128, decoder round to nearest:
            see BENCHMARKS.md); the LLM weight-only presets use it.
        granularity: ``"tensor"``, ``"channel"`` or ``"group"`` (see module docstring).
        axis: the channel axis (``channel``) or the axis the blocks run along
            (``group``).  Negative values count from the end.  Must be None for
            ``tensor``.
        group_size: elements per block along ``axis``; only for ``group``.  Need not
            divide the dimension: the last block then holds the remainder.

    Example:
        >>> QuantSpec(bits=4, granularity="group", axis=1, group_size=128).qmin
        -8
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    signed_scale: bool = False
    granularity: Granularity = "tensor"
    axis: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.granularity not in _GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {_GRANULARITIES}, got {self.granularity!r}"
            )
        if self.symmetric and not self.signed:
            raise ValueError(
                "QuantSpec: symmetric quantization needs a signed grid; "
                "use signed=True, or symmetric=False for an unsigned (affine) grid"
            )
        if self.narrow_range and not self.signed:
            raise ValueError("QuantSpec: narrow_range applies to signed grids only; set signed=True")
        if self.signed_scale and (not self.symmetric or self.narrow_range):
            raise ValueError("QuantSpec: signed_scale puts a range's extreme on the extra negative code of a "
                             "symmetric grid: it needs symmetric=True and narrow_range=False")
        if self.granularity == "tensor":
            if self.axis is not None or self.group_size is not None:
                raise ValueError(
                    "QuantSpec: per-tensor quantization takes no axis or group_size; "
                    "use granularity='channel' or 'group' to set them"
                )
        else:
            if self.axis is None or isinstance(self.axis, bool) or not isinstance(self.axis, int):
                raise ValueError(f"QuantSpec: granularity={self.granularity!r} needs an integer axis")
        if self.granularity == "channel" and self.group_size is not None:
            raise ValueError("QuantSpec: group_size is only for granularity='group'")
        if self.granularity == "group" and (
            self.group_size is None
            or isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise ValueError(
                f"QuantSpec: granularity='group' needs a positive integer group_size, got {self.group_size!r}"
            )

    # -- the integer grid ---------------------------------------------------------
    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """torch dtype that holds the integers (4-bit and narrower live in 8-bit containers)."""
        if self.bits <= 8:
            return torch.int8 if self.signed else torch.uint8
        return torch.int16 if self.signed else torch.uint16

    @property
    def onnx_type(self) -> str:
        """ONNX TensorProto element type name used at export (``"INT4"``, ``"UINT8"``...)."""
        width = 4 if self.bits == 4 else (8 if self.bits <= 8 else 16)
        return f"{'INT' if self.signed else 'UINT'}{width}"

    # -- layout of scale / zero-point -----------------------------------------------
    def resolved_axis(self, ndim: int, name: str = "tensor") -> int:
        """``axis`` made non-negative for a tensor of rank ``ndim``; error if out of range."""
        if self.axis is None:
            raise ValueError(f"{name}: per-tensor spec has no axis")
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"{name}: axis {self.axis} is out of range for a tensor of rank {ndim} "
                f"(valid: {-ndim}..{ndim - 1})"
            )
        return self.axis % ndim

    def param_shape(self, shape: torch.Size | tuple[int, ...], name: str = "tensor") -> tuple[int, ...]:
        """Shape of scale / zero-point for a tensor of ``shape`` (ONNX layout).

        Per group: ``ceil(shape[axis] / group_size)`` entries along the axis (the last
        group shorter when the size does not divide the dimension).  Raises ValueError
        naming ``name`` when the axis is out of range.
        """
        shape = tuple(shape)
        if self.granularity == "tensor":
            return ()
        axis = self.resolved_axis(len(shape), name)
        if self.granularity == "channel":
            return (shape[axis],)
        assert self.group_size is not None
        return shape[:axis] + (-(-shape[axis] // self.group_size),) + shape[axis + 1 :]

    def describe(self) -> str:
        """Short human-readable form, e.g. ``int8 sym per-channel(axis=0)``."""
        kind = f"{'' if self.signed else 'u'}int{self.bits}"
        mode = ("sym signed-scale" if self.signed_scale else "sym") if self.symmetric else "affine"
        narrow = " narrow" if self.narrow_range else ""
        if self.granularity == "tensor":
            where = "per-tensor"
        elif self.granularity == "channel":
            where = f"per-channel(axis={self.axis})"
        else:
            where = f"group(axis={self.axis}, size={self.group_size})"
        return f"{kind} {mode}{narrow} {where}"

    def replace(self, **changes) -> QuantSpec:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> QuantSpec:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"QuantSpec: unknown field(s) {sorted(unknown)}")
        return cls(**data)


# -- presets: named constants; PRESETS is derived from these, never typed twice ----
_PRESETS: dict[str, QuantSpec] = {}


def _preset(name: str, spec: QuantSpec) -> QuantSpec:
    _PRESETS[name] = spec
    return spec


INT8_WEIGHT = _preset(
    "int8-weight", QuantSpec(bits=8, narrow_range=True, granularity="channel", axis=0)
)
"""Weights: int8, symmetric -127..127, one scale per output channel (axis 0)."""

INT8_WEIGHT_PER_TENSOR = _preset("int8-weight-per-tensor", QuantSpec(bits=8, narrow_range=True))
"""Weights: int8 symmetric -127..127 with a single scale."""

UINT8_ACTIVATION = _preset("uint8-activation", QuantSpec(bits=8, signed=False, symmetric=False))
"""Activations: uint8 affine per tensor (the fastest layout in ONNX Runtime on x86)."""

INT8_ACTIVATION = _preset("int8-activation", QuantSpec(bits=8))
"""Activations: int8 symmetric per tensor."""

INT4_WEIGHT_G128 = _preset(
    "int4-weight-g128", QuantSpec(bits=4, signed_scale=True, granularity="group", axis=1, group_size=128)
)
"""Weights: int4 symmetric, blocks of 128 along the input dimension (axis 1); each block's
largest-magnitude value exactly on -8 (``signed_scale``)."""

UINT4_WEIGHT_G128 = _preset(
    "uint4-weight-g128",
    QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", axis=1, group_size=128),
)
"""Weights: uint4 affine with zero-points, blocks of 128 (ONNX Runtime's MatMulNBits layout)."""

INT4_WEIGHT_G32 = _preset(
    "int4-weight-g32", QuantSpec(bits=4, signed_scale=True, granularity="group", axis=1, group_size=32)
)
"""Weights: int4 symmetric, blocks of 32 along the input dimension: GGUF Q4_0's grid (a signed
scale per 32, the block's largest-magnitude value on -8)."""

INT3_WEIGHT_G128 = _preset(
    "int3-weight-g128", QuantSpec(bits=3, signed_scale=True, granularity="group", axis=1, group_size=128)
)
"""Weights: int3 symmetric (-4..3, each block's largest-magnitude value on -4: ``signed_scale``),
blocks of 128 along the input dimension; stored in 8-bit containers."""

INT4_WEIGHT = _preset("int4-weight", QuantSpec(bits=4, granularity="channel", axis=0))
"""Weights: int4 symmetric per output channel."""

UINT4_ACTIVATION = _preset("uint4-activation", QuantSpec(bits=4, signed=False, symmetric=False))
"""Activations: uint4 affine per tensor (QAT's W4A4; ONNX Runtime has no 4-bit activation kernels)."""

PRESETS: Mapping[str, QuantSpec] = MappingProxyType(_PRESETS)
"""All named specs, by name."""


def preset(value, cls: type, presets: Mapping[str, object], what: str):
    """``value`` itself when it is a ``cls``, else the preset of that name (ValueError listing the names)."""
    if isinstance(value, cls):
        return value
    try:
        return presets[value]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {value!r}; presets: {', '.join(presets)}") from None


def get_spec(spec: QuantSpec | str) -> QuantSpec:
    """Resolve a preset name (see ``PRESETS``) or pass a QuantSpec through."""
    return preset(spec, QuantSpec, PRESETS, "quantization spec")
