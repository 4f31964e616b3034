"""From ranges to (scale, zero_point), and tensor ranges laid out as a spec wants."""

from __future__ import annotations

import math

import torch

from .spec import QuantSpec

# Smallest normal float32: scales below it would be subnormal and lose precision.
_TINY = torch.finfo(torch.float32).tiny


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` if ``x`` holds NaN or Inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name}: contains {n_nan} NaN and {n_inf} Inf value(s) out of {x.numel()}; "
            "quantization needs finite values (check the data or the layer that produced it)"
        )


def group_padding(shape: torch.Size | tuple[int, ...], spec: QuantSpec, name: str = "tensor") -> int:
    """Elements ``group_view`` appends along the axis to complete a ragged last group:
    ``ceil(D / group_size) * group_size - D`` for a group-wise ``spec`` whose group size does
    not divide the axis' size ``D``, else 0."""
    if spec.granularity != "group":
        return 0
    size = tuple(shape)[spec.resolved_axis(len(shape), name)]
    assert spec.group_size is not None
    return -size % spec.group_size


def group_view(x: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> tuple[torch.Tensor, int]:
    """View of ``x`` in which each scale of ``spec`` owns one slice.

    Returns ``(view, axis)``:
      * tensor:  ``x`` itself, axis -1 (no parameter axis);
      * channel: ``x``, with the channel axis;
      * group:   ``x`` reshaped so ``axis`` splits into ``(n_groups, group_size)``;
                 the group axis is ``axis`` and the members lie on ``axis + 1``.
    A parameter of ``spec.param_shape(x.shape)`` broadcasts against the view after
    ``param_view``; ``ungroup`` turns a result laid out as the view back into ``x``'s shape.

    A ragged last group (``group_size`` does not divide the axis) is padded to a whole group
    with copies of its own last element (``group_padding`` of them): the padded view is a new
    tensor, not a view of ``x``.  Copies of a member leave the group's min and max, so its
    range and scale, unchanged, whatever the sign of the data (zeros would widen an
    all-positive group's affine range); anything that counts values (a histogram) must
    discount them (``ragged_rows``).  When the size divides the axis this is a plain reshape,
    no copy.
    """
    spec.param_shape(x.shape, name)  # validates the axis
    if spec.granularity == "tensor":
        return x, -1
    axis = spec.resolved_axis(x.dim(), name)
    if spec.granularity == "channel":
        return x, axis
    shape = x.shape
    pad = group_padding(shape, spec, name)
    if pad:
        edge = x.narrow(axis, shape[axis] - 1, 1)
        x = torch.cat([x, edge.expand(shape[:axis] + (pad,) + shape[axis + 1 :])], dim=axis)
    n_groups = x.shape[axis] // spec.group_size
    return x.reshape(shape[:axis] + (n_groups, spec.group_size) + shape[axis + 1 :]), axis


def ungroup(view: torch.Tensor, shape: torch.Size | tuple[int, ...], spec: QuantSpec, axis: int) -> torch.Tensor:
    """The inverse of ``group_view``: ``view`` (laid out as ``group_view`` of a tensor of
    ``shape`` with ``axis``) back in ``shape``, the padding of a ragged last group cut off (a
    contiguous copy then; otherwise a reshape, as before groups could be ragged)."""
    shape = tuple(shape)
    if spec.granularity != "group" or view.shape[axis] * view.shape[axis + 1] == shape[axis]:
        return view.reshape(shape)
    padded = shape[:axis] + (view.shape[axis] * view.shape[axis + 1],) + shape[axis + 1 :]
    return view.reshape(padded).narrow(axis, 0, shape[axis]).contiguous()


def param_view(p: torch.Tensor, x_dim: int, spec: QuantSpec, axis: int) -> torch.Tensor:
    """Reshape a scale / zero-point so it broadcasts against ``group_view``'s view."""
    if spec.granularity == "tensor":
        return p
    if spec.granularity == "channel":
        shape = [1] * x_dim
        shape[axis] = -1
        return p.reshape(shape)
    return p.unsqueeze(axis + 1)


def expand_param(p: torch.Tensor, shape: torch.Size | tuple[int, ...], spec: QuantSpec,
                 name: str = "tensor") -> torch.Tensor:
    """A scale / zero-point of ``spec`` (laid out for a tensor of ``shape``) with one value per
    element of that tensor: what each element is quantized with.  For code that works element
    by element (AdaRound's grid, GPTQ's column updates, references in tests).

    Example:
        >>> spec = QuantSpec(bits=4, granularity="group", axis=1, group_size=4)
        >>> expand_param(torch.tensor([[1.0, 2.0]]), (1, 6), spec).tolist()
        [[1.0, 1.0, 1.0, 1.0, 2.0, 2.0]]
    """
    shape = tuple(shape)
    expected = spec.param_shape(shape, name)
    if tuple(p.shape) != expected:
        raise ValueError(f"{name}: parameter has shape {tuple(p.shape)} but {spec.describe()} on a tensor of "
                         f"shape {shape} needs {expected}")
    if spec.granularity == "tensor":
        return p.expand(shape)
    axis = spec.resolved_axis(len(shape), name)
    if spec.granularity == "channel":
        view = [1] * len(shape)
        view[axis] = -1
        return p.reshape(view).expand(shape)
    return p.repeat_interleave(spec.group_size, dim=axis).narrow(axis, 0, shape[axis])


def rows_view(x: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` as a 2-D ``[n_params, elements]`` matrix: row i holds the elements that
    share scale i.  Returns ``(rows, param_shape)``; ``values.reshape(param_shape)``
    turns one value per row back into the spec's scale layout.

    The rows of a ragged last group end with copies of that group's last element (see
    ``group_view``; ``ragged_rows`` says which rows and how many copies): their min and
    max are exact, counts are not.
    """
    param_shape = spec.param_shape(x.shape, name)
    if spec.granularity == "tensor":
        return x.reshape(1, -1), param_shape
    view, axis = group_view(x, spec, name)
    if spec.granularity == "channel":
        return view.movedim(axis, 0).reshape(view.shape[axis], -1), param_shape
    return view.movedim(axis + 1, -1).reshape(-1, spec.group_size), param_shape


def ragged_rows(shape: torch.Size | tuple[int, ...], spec: QuantSpec,
                name: str = "tensor") -> tuple[torch.Tensor, int] | None:
    """Which rows of ``rows_view`` (of a tensor of ``shape``) hold a ragged last group, and how
    many padding copies of its last element each ends with: ``(row indices (int64), copies)``;
    None when no group is ragged."""
    pad = group_padding(shape, spec, name)
    if not pad:
        return None
    param_shape = spec.param_shape(shape, name)
    axis = spec.resolved_axis(len(param_shape), name)
    index = torch.arange(math.prod(param_shape)).reshape(param_shape).select(axis, param_shape[axis] - 1)
    return index.reshape(-1), pad


def row_ranges(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(min, max)`` of a 2-D ``[n_rows, k]`` tensor, NaN propagating, as
    ``torch.aminmax(rows, dim=1)`` gives.

    ``aminmax`` along a dimension runs several times slower than a whole-tensor ``aminmax`` or
    than ``amin`` and ``amax`` (two vectorised passes); the values are the same.
    """
    if rows.shape[0] == 1:
        lo, hi = torch.aminmax(rows.reshape(-1))
        return lo.reshape(1), hi.reshape(1)
    return rows.amin(1), rows.amax(1)


def finite_row_ranges(rows: torch.Tensor, x: torch.Tensor, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """``row_ranges(rows)``, checked finite: NaN and Inf propagate into the ranges, so checking
    these few values replaces a full ``isfinite`` pass over ``x`` (the tensor ``rows`` views).

    Raises:
        ValueError: ``x`` holds NaN / Inf (counted, naming ``name``).
    """
    lo, hi = row_ranges(rows)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        check_finite(x, name)  # raises, counting the NaN / Inf
    return lo, hi


def tensor_minmax(x: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` per scale of ``spec``, in ``spec.param_shape(x.shape)``.

    Raises:
        ValueError: ``x`` is empty or holds NaN / Inf.
    """
    if x.numel() == 0:
        raise ValueError(f"{name}: cannot take the range of an empty tensor")
    rows, param_shape = rows_view(x.detach(), spec, name)
    lo, hi = finite_row_ranges(rows, x, name)
    return lo.float().reshape(param_shape), hi.float().reshape(param_shape)


def compute_qparams(
    min_val: torch.Tensor | float,
    max_val: torch.Tensor | float,
    spec: QuantSpec,
    name: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that map ``[min_val, max_val]`` onto ``spec``'s grid.

    The range is widened to include 0, so that zero is exactly representable
    (padding and ReLU outputs stay exact).  Symmetric specs use
    ``scale = amax / ((qmax - qmin) / 2)`` and zero-point 0 (with ``spec.signed_scale``,
    ``scale = extreme / qmin``: the larger-magnitude end of the range lands on ``qmin``, and the
    scale is negative when that end is ``max_val``; the negative end wins a tie); affine specs use
    ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = qmin - round(min / scale)``.
    A zero range (an all-zero tensor) gets scale 1.0: a valid grid, never a division by zero.

    Args:
        min_val, max_val: observed ranges, any matching shapes (e.g. per channel).
        spec: the target grid.
        name: tensor name used in error messages.

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of the ranges' shape.

    Example:
        >>> s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), UINT8_ACTIVATION)
    """
    lo = torch.as_tensor(min_val, dtype=torch.float32)
    hi = torch.as_tensor(max_val, dtype=torch.float32)
    if lo.shape != hi.shape:
        raise ValueError(f"{name}: min shape {tuple(lo.shape)} != max shape {tuple(hi.shape)}")
    check_finite(lo, f"{name} (min of range)")
    check_finite(hi, f"{name} (max of range)")
    if bool((lo > hi).any()):
        raise ValueError(f"{name}: min of range exceeds max of range; was the observer fed any data?")
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric and spec.signed_scale:
        extreme = torch.where(-lo >= hi, lo, hi)
        magnitude = _valid_scale(extreme.abs() / -qmin)
        scale = torch.where(extreme > 0, -magnitude, magnitude)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = _valid_scale(amax / ((qmax - qmin) / 2))
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    # float32 arithmetic as torch's observers and ORT's calibrator use; only a range wider
    # than float32's max (hi - lo overflows) is computed in float64.
    width = hi - lo
    scale = torch.where(torch.isfinite(width), width / (qmax - qmin),
                        ((hi.double() - lo.double()) / (qmax - qmin)).float())
    scale = _valid_scale(scale)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def _valid_scale(scale: torch.Tensor) -> torch.Tensor:
    # Zero range (or one so small the division underflows) -> 1.0: any positive scale
    # represents 0 exactly.  Other tiny scales are lifted to the smallest normal float.
    return torch.where(scale > 0, scale.clamp_min(_TINY), torch.ones_like(scale))
