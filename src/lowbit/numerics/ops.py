"""quantize / dequantize / fake_quantize: ONNX QuantizeLinear semantics in torch.

    q     = saturate(round_half_even(x / scale) + zero_point)      # QuantizeLinear
    x_hat = (q - zero_point) * scale                                # DequantizeLinear

All arithmetic is float32 and divides by the scale, exactly as ONNX's reference
and ONNX Runtime's CPU kernels do.  (torch's own fake-quant ops multiply by
``1 / scale`` instead; the two agree except where ``x / scale`` lies within one
float32 ulp of a rounding tie, about one element in a million.)
"""

from __future__ import annotations

import math

import torch

from .qparams import group_view, param_view, ungroup
from .spec import QuantSpec


def _prepare(x, scale, zero_point, spec: QuantSpec, name: str):
    """Validate parameter shapes; return ``group_view`` of ``x``, the parameters broadcastable
    against it, and its axis (for ``ungroup``)."""
    expected = spec.param_shape(x.shape, name)
    for label, p in (("scale", scale), ("zero_point", zero_point)):
        if p is not None and tuple(p.shape) != expected:
            raise ValueError(
                f"{name}: {label} has shape {tuple(p.shape)} but {spec.describe()} on a tensor of "
                f"shape {tuple(x.shape)} needs {expected}"
            )
    if spec.symmetric and zero_point is not None and not zero_point.requires_grad:
        # A symmetric grid's zero-point is 0 by definition: drop it (two fewer passes
        # over the tensor), but never silently ignore a nonzero one.
        if bool((zero_point != 0).any()):
            raise ValueError(f"{name}: {spec.describe()} is symmetric, so its zero_point must be 0; "
                             "use symmetric=False for an affine grid")
        zero_point = None
    view, axis = group_view(x, spec, name)
    s = param_view(scale, view.dim(), spec, axis)
    z = None if zero_point is None else param_view(zero_point, view.dim(), spec, axis)
    return view, s, z, axis


def _as_param(p, dtype=torch.float32) -> torch.Tensor | None:
    if p is None:
        return None
    return p if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=dtype)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    name: str = "tensor",
) -> torch.Tensor:
    """Map ``x`` to integers: ``saturate(round_half_even(x / scale) + zero_point)``.

    Args:
        x: float tensor.
        scale: float scale in ``spec.param_shape(x.shape)`` (ONNX layout).
        zero_point: integer zero-point of the same shape, or None for 0.
        spec: the target grid.
        name: tensor name for error messages.

    Returns:
        Integers in ``spec.storage_dtype`` with the shape of ``x``.

    Example:
        >>> quantize(torch.tensor([0.3, -2.0]), torch.tensor(0.1), None, INT8_ACTIVATION)
        tensor([  3, -20], dtype=torch.int8)
    """
    scale, zero_point = _as_param(scale), _as_param(zero_point, torch.int32)
    view, s, z, axis = _prepare(x, scale, zero_point, spec, name)
    q = torch.div(view.float(), s.float()).round_()
    if z is not None:
        q.add_(z)
    q.clamp_(spec.qmin, spec.qmax)
    return ungroup(q.to(spec.storage_dtype), x.shape, spec, axis)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    name: str = "tensor",
) -> torch.Tensor:
    """Map integers back to float32: ``(q - zero_point) * scale``."""
    scale, zero_point = _as_param(scale), _as_param(zero_point, torch.int32)
    view, s, z, axis = _prepare(q, scale, zero_point, spec, name)
    out = view.to(torch.float32)
    if z is not None:
        out = out - z.to(torch.float32)
    return ungroup(out * s.float(), q.shape, spec, axis)


def _inside_mask(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1.0 where the clamp left the code alone (``q == t``), else 0.0, written over ``t``.

    A float mask, not a bool one: on CPU, writing a comparison straight into a float tensor and
    multiplying by it are each several times faster than making a bool tensor and then
    multiplying by it (or ``torch.where`` on it), which converts it element by element.  Reusing
    ``t``'s memory saves one allocation of the tensor's size (large ones cost page faults).
    """
    return torch.eq(q, t, out=t)


def _code_bounds(z, qmin: int, qmax: int, dtype: torch.dtype):
    """``(qmin - z, qmax - z)``: the clamp bounds of ``round(x / s)`` for an integer zero point ``z``
    (None: 0), scalars when ``z`` is one (a tensor-bound clamp is several times slower)."""
    if z is None:
        return qmin, qmax
    if z.numel() == 1:
        return qmin - float(z), qmax - float(z)
    return (qmin - z).to(dtype), (qmax - z).to(dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize; gradient 1 where the code did not saturate, else 0."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):
        # clamp(round(x/s) + z, qmin, qmax) - z == clamp(round(x/s), qmin - z, qmax - z) for an
        # integer z (every sum is an integer far inside float32's exact range), so the zero-point
        # costs no pass over x.  Only the sign of a zero can differ (-0.0 where the two-pass form
        # gives +0.0), which no comparison, sum or product downstream can tell apart.
        lo, hi = _code_bounds(z, qmin, qmax, x.dtype)
        t = torch.div(x, s).round_()
        if not ctx.needs_input_grad[0]:  # inference / calibration: no mask, no second buffer
            return t.clamp_(lo, hi).mul_(s)
        q = t.clamp(lo, hi)
        ctx.save_for_backward(_inside_mask(q, t))
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _FakeQuantLSQ(torch.autograd.Function):
    """Learned step size (Esser et al. 2020) and, with a float zero-point, LSQ+.

    Forward as ``_FakeQuantSTE`` with ``z`` rounded (and clamped to the grid).  With ``v = x / s`` and
    ``q = clamp(round(v) + z, qmin, qmax)``:
        d x_hat / d x = 1 inside the range, 0 outside (STE);
        d x_hat / d s = (q - z) - v * inside   (round(v) - v inside, qmin - z / qmax - z outside);
        d x_hat / d z = -s outside the range, 0 inside.
    Scale and zero-point gradients are summed over the elements each parameter
    covers and multiplied by ``grad_scale``.  The forward pass keeps only the mask and
    ``d x_hat / d s`` (one fused ``addcmul``), so the backward pass is a few products.
    """

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax, grad_scale):
        v = torch.div(x, s)
        # A learned zero-point is rounded and kept on the grid, as export stores it (qparams_for).
        zr = None if z is None else torch.round(z).clamp_(qmin, qmax)
        t = torch.round(v)
        if zr is not None:
            t.add_(zr)
        q = t.clamp(qmin, qmax)
        inside = _inside_mask(q, t)
        if zr is not None:
            q.sub_(zr)  # q - z from here on
        ds = torch.addcmul(q, v, inside, value=-1.0, out=v) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(inside, ds, s)
        ctx.grad_scale = grad_scale
        ctx.has_z = z is not None
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        inside, ds, s = ctx.saved_tensors
        g = ctx.grad_scale
        grad_x = grad * inside
        grad_s = None
        if ctx.needs_input_grad[1]:
            if s.numel() == 1:  # one dot product, no full-size temporary
                grad_s = torch.dot(grad.reshape(-1), ds.reshape(-1)).reshape(s.shape) * g
            else:
                grad_s = (grad * ds).sum_to_size(s.shape) * g
        grad_z = None
        if ctx.has_z and ctx.needs_input_grad[2]:
            grad_z = (grad - grad_x).sum_to_size(s.shape) * (-s * g)
        return grad_x, grad_s, grad_z, None, None, None


class _FakeQuantRescaled(torch.autograd.Function):
    """A learned scale that rescales codes fixed by an anchor step (``learn="rescale"``).

    ``q = clamp(round(x / a) + z, qmin, qmax) - z`` with the anchor ``a`` (the PTQ scale, a
    constant) and the output ``x_hat = s * q``: moving ``s`` scales the codes without re-rounding
    them (PEQA, Kim et al. 2023; EfficientQAT's E2E-QP, Chen et al. 2024), and ``x`` changes a
    code only where it crosses a rounding boundary of its anchored grid.  Gradients:
        d x_hat / d x = s / a inside the range, 0 outside (STE, in the units of the output);
        d x_hat / d s = q.
    LSQ's ``d x_hat / d s = round(v) - v`` is 0 for a weight that PTQ put on its grid (GPTQ),
    and an Adam step on such weights turns it into a gradient of one sign that shrinks every
    scale; this form has neither problem.  ``d/ds`` is summed per scale and multiplied by
    ``grad_scale``.
    """

    @staticmethod
    def forward(ctx, x, s, a, z, qmin, qmax, grad_scale):
        lo, hi = _code_bounds(z, qmin, qmax, x.dtype)
        t = torch.div(x, a).round_()
        q = t.clamp(lo, hi)
        ctx.save_for_backward(_inside_mask(q, t), q, s, a)
        ctx.grad_scale = grad_scale
        return q * s

    @staticmethod
    def backward(ctx, grad):
        inside, q, s, a = ctx.saved_tensors
        grad_x = grad * inside * (s / a) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (grad * q).sum_to_size(s.shape) * ctx.grad_scale
        return grad_x, grad_s, None, None, None, None, None


def lsq_grad_scale(x: torch.Tensor, spec: QuantSpec) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * qmax)``, N = elements per scale (rounded down to an
    integer: with a ragged last group, the average over the groups)."""
    elems_per_scale = x.numel() // max(1, math.prod(spec.param_shape(x.shape)))
    return 1.0 / math.sqrt(max(1, elems_per_scale) * max(1, spec.qmax))


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    *,
    learned: bool = False,
    grad_scale: float | None = None,
    anchor: torch.Tensor | None = None,
    name: str = "tensor",
) -> torch.Tensor:
    """Quantize then dequantize ``x``, differentiably.

    The forward value equals ``dequantize(quantize(x, ...), ...)`` bit for bit.

    Args:
        x: float tensor.
        scale, zero_point: as for :func:`quantize`.  ``zero_point`` may be a float
            tensor (it is rounded in the forward pass), or None for 0.
        spec: the grid.
        learned: False gives the straight-through estimator (gradient to ``x``
            only, 1 inside the clipping range and 0 outside).  True gives LSQ:
            gradients also flow to ``scale`` and, when it is a float tensor, to
            ``zero_point`` (LSQ+).
        grad_scale: multiplier of the scale / zero-point gradients; defaults to
            LSQ's ``1 / sqrt(N * qmax)`` (see :func:`lsq_grad_scale`).
        anchor: with ``learned``, a fixed scale of ``scale``'s shape that sets the codes
            (``round(x / anchor)``) which the learned ``scale`` multiplies (``learn="rescale"``);
            the zero-point then stays an integer constant.
        name: tensor name for error messages.

    Example:
        >>> w = torch.randn(16, 8, requires_grad=True)
        >>> s = torch.full((16,), 0.02, requires_grad=True)
        >>> fake_quantize(w, s, None, INT8_WEIGHT, learned=True).sum().backward()
    """
    scale, zero_point = _as_param(scale), _as_param(zero_point, torch.int32)
    view, s, z, axis = _prepare(x, scale, zero_point, spec, name)
    if view.dtype != torch.float32:
        view = view.float()
    if not learned:
        if z is not None:
            z = torch.round(z.detach()) if z.is_floating_point() else z
        out = _FakeQuantSTE.apply(view, s.detach().float(), z, spec.qmin, spec.qmax)
    else:
        if grad_scale is None:
            grad_scale = lsq_grad_scale(x, spec)
        if anchor is not None:
            if tuple(anchor.shape) != tuple(scale.shape):
                raise ValueError(f"{name}: anchor has shape {tuple(anchor.shape)}, the scale {tuple(scale.shape)}")
            a = param_view(anchor.detach().float(), view.dim(), spec, axis)
            if z is not None and z.is_floating_point():
                z = torch.round(z.detach())
            out = _FakeQuantRescaled.apply(view, s, a, z, spec.qmin, spec.qmax, float(grad_scale))
        else:
            if z is not None and not z.is_floating_point():
                z = z.float()
            out = _FakeQuantLSQ.apply(view, s, z, spec.qmin, spec.qmax, float(grad_scale))
    return ungroup(out, x.shape, spec, axis).to(x.dtype)
