"""From ranges to (scale, zero_point), and tensor ranges laid out as a spec wants."""

from __future__ import annotations

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


def group_view(x: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> tuple[torch.Tensor, int]:
    """View of ``x`` in which each scale of ``spec`` owns one slice.

    Returns ``(view, axis)``:
      * tensor:  ``x`` itself, axis -1 (no parameter axis);
      * channel: ``x``, with the channel axis;
      * group:   ``x`` reshaped so ``axis`` splits into ``(n_groups, group_size)``;
                 the group axis is ``axis`` and the members lie on ``axis + 1``.
    A parameter of ``spec.param_shape(x.shape)`` broadcasts against the view after
    ``param_view``.
    """
    spec.param_shape(x.shape, name)  # validates axis and divisibility
    if spec.granularity == "tensor":
        return x, -1
    axis = spec.resolved_axis(x.dim(), name)
    if spec.granularity == "channel":
        return x, axis
    shape = x.shape
    n_groups = shape[axis] // spec.group_size
    return x.reshape(shape[:axis] + (n_groups, spec.group_size) + shape[axis + 1 :]), axis


def param_view(p: torch.Tensor, x_dim: int, spec: QuantSpec, axis: int) -> torch.Tensor:
    """Reshape a scale / zero-point so it broadcasts against ``group_view``'s view."""
    if spec.granularity == "tensor":
        return p
    if spec.granularity == "channel":
        shape = [1] * x_dim
        shape[axis] = -1
        return p.reshape(shape)
    return p.unsqueeze(axis + 1)


def rows_view(x: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` as a 2-D ``[n_params, elements]`` matrix: row i holds the elements that
    share scale i.  Returns ``(rows, param_shape)``; ``values.reshape(param_shape)``
    turns one value per row back into the spec's scale layout.
    """
    param_shape = spec.param_shape(x.shape, name)
    if spec.granularity == "tensor":
        return x.reshape(1, -1), param_shape
    view, axis = group_view(x, spec, name)
    if spec.granularity == "channel":
        return view.movedim(axis, 0).reshape(view.shape[axis], -1), param_shape
    return view.movedim(axis + 1, -1).reshape(-1, spec.group_size), param_shape


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
    ``scale = amax / ((qmax - qmin) / 2)`` and zero-point 0; affine specs use
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
