"""torch.autograd.Functions whose ONNX ``symbolic`` emits Q/DQ nodes.

During export (see ``_patch.export_mode``) each quantizer's forward calls one of
these.  Their ``forward`` returns exactly what the fake-quant simulation returns
(so traced shapes and values match); their ``symbolic`` tells the TorchScript
ONNX exporter which ONNX nodes stand for them:

    _QDQ         x -> [Clip] -> QuantizeLinear -> DequantizeLinear   (static activations)
    _WeightDQ    int8 constant -> DequantizeLinear                   (weights: never a float copy;
                 group-wise ones -> a blocked DQ placeholder, see ``_blocked``)
    _BiasDQ      int32 constant -> DequantizeLinear                  (biases on the s_in * s_w grid)
    _DynamicQDQ  x -> DynamicQuantizeLinear -> DequantizeLinear      (dynamic activations)
    _EmbeddingDQ int8 table -> Gather -> dequantize the gathered rows

Constants are emitted as ``Constant`` nodes tagged with ``lowbit_name`` (and
compute nodes with ``lowbit_node``); ``_passes.lift_constants`` turns
those tags into initializer / node names and strips them, so the file carries
readable names such as ``fc.weight_quantized`` and no non-standard attributes.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..numerics import QuantSpec, dequantize, fake_quantize
from . import _blocked

# Integer range of the 8-bit containers a spec is stored in.
_CONTAINER_RANGE = {True: (-128, 127), False: (0, 255)}


@dataclass(frozen=True, eq=False)
class QParams:
    """Export-time constants of one quantizer, in ONNX layout.

    Attributes:
        name: the quantized tensor's name, e.g. ``"fc.weight"`` (names the ONNX constants).
        spec: the quantizer's spec (8-bit container, per tensor, per channel or per group).
        scale: float32, shape ``()``, ``(C,)`` or, per group, the weight's rank (``QuantSpec.param_shape``).
        zero_point: int8 / uint8 (the container type), same shape as ``scale``.
        quantized: for weights, the integer tensor itself (container dtype), else None.
    """

    name: str
    spec: QuantSpec
    scale: torch.Tensor
    zero_point: torch.Tensor
    quantized: torch.Tensor | None = None

    @property
    def zero_point_i32(self) -> torch.Tensor:
        return self.zero_point.to(torch.int32)

    @property
    def narrower_than_container(self) -> bool:
        """True when the grid (e.g. int4, or int8 narrow range) is inside its 8-bit container,
        so ONNX QuantizeLinear's saturation to the container would clip too little."""
        lo, hi = _CONTAINER_RANGE[self.spec.signed]
        return (self.spec.qmin, self.spec.qmax) != (lo, hi)


@contextlib.contextmanager
def _quiet_trace():
    """Silence TracerWarnings raised by lowbit's own numerics inside a Function's forward.

    The forward only supplies the traced value (the symbolic defines the graph), so
    the shape checks it runs on traced tensors are harmless; warnings about the
    user's own model code stay visible."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _const(g, value: torch.Tensor, name: str):
    return g.op("Constant", value_t=value, lowbit_name_s=name)


def _axis_kw(axis: int | None) -> dict:
    return {} if axis is None else {"axis_i": axis}


def _broadcast(t: torch.Tensor, axis: int | None, rank: int) -> torch.Tensor:
    """Per-channel vector ``(C,)`` -> shape broadcastable against a rank-``rank`` tensor."""
    if axis is None:
        return t
    shape = [1] * rank
    shape[axis] = -1
    return t.reshape(shape)


def _emit_clip(g, x, p: QParams, axis: int | None, rank: int):
    """Clip ``x`` to the float range of the grid, so that Q's container saturation
    gives the grid's saturation: ``Q(clip(x, lo, hi)) == saturate(Q(x), qmin, qmax)``."""
    lo = (p.spec.qmin - p.zero_point_i32).float() * p.scale
    hi = (p.spec.qmax - p.zero_point_i32).float() * p.scale
    if axis is None:
        return g.op("Clip", x, _const(g, lo, f"{p.name}_clip_min"), _const(g, hi, f"{p.name}_clip_max"))
    x = g.op("Max", x, _const(g, _broadcast(lo, axis, rank), f"{p.name}_clip_min"))
    return g.op("Min", x, _const(g, _broadcast(hi, axis, rank), f"{p.name}_clip_max"))


def _fake_quantize_per_tensor(x: torch.Tensor, p: QParams) -> torch.Tensor:
    """``fake_quantize(x, p.scale, p.zero_point, p.spec)`` bit for bit, per tensor, in 4-5 in-place passes.

    The simulation computes ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``.  On the integers
    ``round(x / s)`` that is ``clamp(round(x / s), qmin - z, qmax - z) * s`` exactly (saturated
    values land on the same bound), except that a ``-0.0`` code comes out ``+0.0`` there
    (``-0.0 + z - z``); adding ``0.0`` last does the same.  A symmetric grid has no zero-point
    in the simulation (so no sign change either).  Export only needs this as the traced value;
    it is computed once per quantized activation of the example batch.
    """
    z = 0 if p.spec.symmetric else int(p.zero_point_i32)
    t = torch.div(x, p.scale).round_().clamp_(p.spec.qmin - z, p.spec.qmax - z).mul_(p.scale)
    return t if p.spec.symmetric else t.add_(0.0)


class _QDQ(torch.autograd.Function):
    """Static fake-quant of an activation: QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, p: QParams, axis: int | None, rank: int):
        with _quiet_trace():
            if axis is None and x.dtype == torch.float32 and p.scale.dim() == 0 and (
                not p.spec.symmetric or not bool(p.zero_point.any())  # else fake_quantize raises
            ):
                return _fake_quantize_per_tensor(x, p)
            return fake_quantize(x, p.scale, p.zero_point_i32, p.spec, name=p.name)

    @staticmethod
    def symbolic(g, x, p: QParams, axis: int | None, rank: int):
        if p.narrower_than_container:
            x = _emit_clip(g, x, p, axis, rank)
        scale = _const(g, p.scale, f"{p.name}_scale")
        zero_point = _const(g, p.zero_point, f"{p.name}_zero_point")
        q = g.op("QuantizeLinear", x, scale, zero_point, lowbit_node_s=p.name, **_axis_kw(axis))
        return g.op("DequantizeLinear", q, scale, zero_point, lowbit_node_s=p.name, **_axis_kw(axis))


class _WeightDQ(torch.autograd.Function):
    """A weight as an integer constant and its DequantizeLinear (no float copy, no Q node)."""

    @staticmethod
    def forward(ctx, w, p: QParams, axis: int | None):
        # The simulation's arithmetic on the traced weight, equal bit for bit to dequantizing
        # ``p.quantized`` (which is ``quantize(w)``).  Computed from constants alone, the tracer would
        # fold the value into a float constant it keeps until the export ends: 4x the integer weights.
        with _quiet_trace():
            return fake_quantize(w, p.scale, p.zero_point_i32, p.spec, name=p.name).to(w.dtype)

    @staticmethod
    def symbolic(g, w, p: QParams, axis: int | None):
        q = _const(g, p.quantized, f"{p.name}_quantized")
        scale = _const(g, p.scale, f"{p.name}_scale")
        zero_point = _const(g, p.zero_point, f"{p.name}_zero_point")
        if p.spec.granularity == "group":
            return _blocked.emit(g, w, q, scale, zero_point, p.spec, axis, p.name)
        return g.op("DequantizeLinear", q, scale, zero_point, lowbit_node_s=p.name, **_axis_kw(axis))


@dataclass(frozen=True, eq=False)
class BiasParams:
    """Export-time constants of a bias stored on the int32 grid of scale ``s_in * s_w``.

    Attributes:
        name: the bias's name, e.g. ``"fc.bias"`` (names the ONNX constants).
        quantized: int32, shape ``(C_out,)``: ``clamp(round(b / scale))``.
        scale: float32, shape ``()`` (per-tensor weight) or ``(C_out,)`` (per-channel weight).
    """

    name: str
    quantized: torch.Tensor
    scale: torch.Tensor


class _BiasDQ(torch.autograd.Function):
    """A bias as an int32 constant and its DequantizeLinear (zero-point 0, axis 0 per channel):
    the layout ONNX Runtime's ``quantize_static`` writes and fuses into QLinearConv / QGemm."""

    @staticmethod
    def forward(ctx, b, p: BiasParams):
        # int32 -> float32 is exact for every value the simulation's float32 rounding can give.
        return (p.quantized.to(p.scale.dtype) * p.scale).to(b.dtype)

    @staticmethod
    def symbolic(g, b, p: BiasParams):
        q = _const(g, p.quantized, f"{p.name}_quantized")
        scale = _const(g, p.scale, f"{p.name}_scale")
        zero_point = _const(g, torch.zeros(p.scale.shape, dtype=torch.int32), f"{p.name}_zero_point")
        axis = None if p.scale.dim() == 0 else 0
        return g.op("DequantizeLinear", q, scale, zero_point, lowbit_node_s=p.name, **_axis_kw(axis))


class _DynamicQDQ(torch.autograd.Function):
    """Dynamic uint8 activation: DynamicQuantizeLinear -> DequantizeLinear.

    ONNX's DynamicQuantizeLinear is exactly lowbit's uint8 affine per-tensor
    quantization with the range widened to include 0 (see ``compute_qparams``).
    """

    @staticmethod
    def forward(ctx, x, quantizer, name: str):
        with _quiet_trace():
            scale, zero_point = quantizer.qparams_for(x)
            return fake_quantize(x, scale, zero_point, quantizer.spec, name=name)

    @staticmethod
    def symbolic(g, x, quantizer, name: str):
        q, scale, zero_point = g.op("DynamicQuantizeLinear", x, lowbit_node_s=name, outputs=3)
        return g.op("DequantizeLinear", q, scale, zero_point, lowbit_node_s=name)


class _EmbeddingDQ(torch.autograd.Function):
    """Embedding lookup on the integer table, then dequantize only the gathered rows.

    Per-row scales (axis 0) cannot be a DequantizeLinear axis after the Gather
    (each gathered row has its own scale), so they are gathered too:
    ``rows = Gather(q_table, ids)``; ``out = (Cast(rows) - Gather(zp, ids)) * Gather(scale, ids)``
    -- elementwise the same arithmetic as DequantizeLinear.
    """

    @staticmethod
    def forward(ctx, ids, p: QParams, axis: int | None):
        with _quiet_trace():
            table = dequantize(p.quantized, p.scale, p.zero_point_i32, p.spec, name=p.name)
            return F.embedding(ids, table)

    @staticmethod
    def symbolic(g, ids, p: QParams, axis: int | None):
        table = _const(g, p.quantized, f"{p.name}_quantized")
        rows = g.op("Gather", table, ids, axis_i=0, lowbit_node_s=f"{p.name}.gather")
        if axis != 0:  # one scale for all, or one per column: a plain DequantizeLinear
            scale = _const(g, p.scale, f"{p.name}_scale")
            zero_point = _const(g, p.zero_point, f"{p.name}_zero_point")
            kw = {} if axis is None else {"axis_i": -1}
            return g.op("DequantizeLinear", rows, scale, zero_point, lowbit_node_s=p.name, **kw)
        values = g.op("Cast", rows, to_i=1)  # 1 = FLOAT; integers up to 255 are exact in float32
        if bool(p.zero_point.any()):
            zp_rows = g.op("Gather", _const(g, p.zero_point_i32.float()[:, None], f"{p.name}_zero_point_f"), ids,
                           axis_i=0)
            values = g.op("Sub", values, zp_rows)
        scale_rows = g.op("Gather", _const(g, p.scale[:, None], f"{p.name}_scale"), ids, axis_i=0,
                          lowbit_node_s=f"{p.name}.gather_scale")
        return g.op("Mul", values, scale_rows, lowbit_node_s=f"{p.name}.dequantize")


def qdq(x: torch.Tensor, p: QParams) -> torch.Tensor:
    """Static Q/DQ of an activation (axis resolved against ``x``)."""
    axis = None if p.spec.granularity == "tensor" else p.spec.resolved_axis(x.dim(), p.name)
    return _QDQ.apply(x, p, axis, x.dim())


def weight_dq(w: torch.Tensor, p: QParams) -> torch.Tensor:
    """DQ of a weight stored as an integer constant."""
    axis = None if p.spec.granularity == "tensor" else p.spec.resolved_axis(w.dim(), p.name)
    return _WeightDQ.apply(w, p, axis)


def bias_dq(b: torch.Tensor, p: BiasParams) -> torch.Tensor:
    """DQ of a bias stored as an int32 constant."""
    return _BiasDQ.apply(b, p)


def dynamic_qdq(x: torch.Tensor, quantizer, name: str) -> torch.Tensor:
    """DynamicQuantizeLinear -> DQ of an activation."""
    return _DynamicQDQ.apply(x, quantizer, name)


def embedding_dq(ids: torch.Tensor, p: QParams) -> torch.Tensor:
    """Gather from the integer table, then dequantize the rows."""
    axis = None if p.spec.granularity == "tensor" else p.spec.resolved_axis(2, p.name)
    return _EmbeddingDQ.apply(ids, p, axis)
