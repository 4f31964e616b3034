"""Integer-exact emulation: run a quantized model the way ONNX Runtime's integer kernels do.

``lowbit.quantize`` returns a fake-quant simulation: each layer computes in float32
on dequantized values, and the next quantizer rounds ``y / s_out``.  ONNX Runtime
runs the exported file in integers instead: an exact int32 accumulator, requantized
with a float32 multiplier ``s_in * s_w / s_out`` (QLinearConv, QGemm), scale ratios
for QLinearAdd, an integer sum for QLinearGlobalAveragePool.  Both are correct
roundings of the same model, but they differ by one code here and there, and a deep
network at W8A8 (MobileNetV2) turns those into different top-1 labels on inputs
the model is unsure about.  ``emulate_ort`` gives a PyTorch module that computes what
ORT computes, bit for bit: use it to predict a deployment's outputs without ORT, to
look at any intermediate code ORT produces, or to tell rounding from real export bugs.

What it reproduces is ONNX Runtime's CPU provider at its default settings on x86-64
(checked against ORT 1.32 on AVX-512 VNNI; the kernels are described in
``_ort_kernels``), for models with uint8 per-tensor activations, as lowbit's ``w8a8``
and ``w4a8`` give.  The arithmetic uses only exact integer sums and single IEEE float32
operations, so it should hold on other torch devices too (only CPU is tested).

The emulation is honest: each node becomes the kernel ORT runs for it (see
``kernels``); where ORT would run a float kernel (an unquantized layer, a Relu it
keeps, two different grids on one tensor, a conv whose output is returned) it raises
``EmulationError`` naming the node, rather than approximating.  The default
simulation is untouched: the emulation reads the quantized model and owns copies
of its integer constants (a snapshot: re-create it after changing the model).

Example:
    >>> qmodel = lowbit.quantize(model, calib, "w8a8")
    >>> lowbit.export_onnx(qmodel, "model.int8.onnx", x[:1])
    >>> emulated = emulate_ort(qmodel)
    >>> torch.equal(emulated(x), OrtModel("model.int8.onnx")(x))      # True
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import fx, nn

from ..export._patch import check_exportable
from ..export.onnx_export import model_target
from ..nn.registry import kind_of
from ..nn.trace import try_trace
from ..targets import cpu_info
from . import _ort_kernels as K
from . import _xnnpack_kernels as X
from ._ort_graph import (
    ADD,
    CONV,
    FREE,
    GAP,
    GEMM,
    MOVE,
    SHAPE,
    STUB,
    EmulationError,
    Grid,
    activation_grid,
    plan,
)


@dataclass(frozen=True, eq=False)
class _Codes:
    """An integer tensor (exact integers held in float32) on ``grid``: what flows between ORT's kernels."""

    codes: torch.Tensor
    grid: Grid


class _IntLayer(nn.Module):
    """The integer constants of one quantized conv / gemm layer (QuantConv2d, QuantLinear, a registered
    kind of either), as ``lowbit.export`` writes them: read from ``layer.integer_params()``."""

    def __init__(self, layer: nn.Module, where: str, kind: str, out_grid: Grid | None, *,
                 saturating: bool = False) -> None:
        super().__init__()
        self.where, self.kind, self.out_grid = where, kind, out_grid
        self.in_grid = activation_grid(layer.input_quantizer, where)
        wq = layer.weight_quantizer
        if wq is None or wq.mode == "disabled":
            raise EmulationError(f"{where}: its weight is not quantized, so ORT runs a float {kind}")
        if wq.spec.granularity == "group":
            raise EmulationError(f"{wq.name}: {wq.spec.describe()} exports as a blocked DequantizeLinear, "
                                 f"so ORT runs {where} as a float {kind}")
        check_exportable(wq.spec, wq.name)
        ints = layer.integer_params()
        wp = ints.weight
        if wq.spec.granularity == "channel" and wq.spec.resolved_axis(layer.weight.dim(), wq.name) != 0:
            raise EmulationError(f"{wq.name}: per-channel scales along axis != 0 are not an ORT integer layout")
        zp = wp.zero_point.to(torch.float32)
        if kind == CONV and zp.numel() > 1 and bool((zp != zp.reshape(-1)[0]).any()):
            raise EmulationError(f"{wq.name}: QLinearConv needs one weight zero point for all channels")
        rank = layer.weight.dim()
        self.register_buffer("weight", wp.values.to(torch.float32))
        self.register_buffer("weight_zp", zp.reshape(-1, *([1] * (rank - 1))) if zp.dim() == 1 else zp)
        self.register_buffer("weight_scale", wp.scale.float())
        bias = ints.bias
        if layer.bias is not None and bias is None:
            raise EmulationError(f"{where}: its bias stays float (not on the int32 grid s_in * s_w), which ORT "
                                 "quantizes with its own rounding; emulation needs lowbit's int32 bias")
        self.register_buffer("bias", None if bias is None else bias.values)
        g = self.in_grid
        x_range = max(g.zero_point - g.qmin, g.qmax - g.zero_point)  # largest |x - zx|
        self.bound = K.accumulator_bound(x_range, self.weight, self.weight_zp, self.bias)
        # per output channel: (C, 1, 1) against a conv's (N, C, H, W), (C,) against a gemm's (N, C)
        channel = self.weight_scale.reshape(-1, *([1] * (rank - 2))) if kind == CONV else self.weight_scale
        if out_grid is None:  # QGemm with a float output
            self.register_buffer("multiplier", K.gemm_float_output(torch.ones(()), self.in_grid.scale, channel))
        else:
            self.register_buffer("multiplier", K.output_multiplier(self.in_grid.scale, channel, out_grid.scale))
        if kind == CONV:
            if layer.padding_mode != "zeros":
                raise EmulationError(f"{where}: padding_mode={layer.padding_mode!r}; ORT pads with the zero point")
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                         "groups": layer.groups}
        # vpmaddubsw pairs (x86 without VNNI, int8 weights); ORT's depthwise kernel widens to
        # int16 products and sums in int32, so it is exact on every x86 CPU.
        depthwise = kind == CONV and kind_of(layer).is_depthwise(layer)
        self.saturating = saturating and not depthwise

    def forward(self, x: _Codes) -> torch.Tensor | _Codes:
        g = self.in_grid
        if self.kind == CONV:
            acc = K.conv_accumulate(x.codes, g.zero_point, self.weight, self.weight_zp, self.bias, self.conv,
                                    self.bound, self.where)
            lost = K.conv_saturation(x.codes, g.zero_point, self.weight, self.conv, g.qmin, g.qmax) \
                if self.saturating else None
        else:
            if x.codes.dim() != 2:
                raise EmulationError(f"{self.where}: Linear on a {x.codes.dim()}-D input exports as MatMul (+ Add), "
                                     "whose ORT kernels are not emulated; only 2-D inputs (Gemm -> QGemm) are")
            acc = K.gemm_accumulate(x.codes, g.zero_point, self.weight, self.weight_zp.reshape(-1), self.bias,
                                    self.bound, self.where)
            lost = K.gemm_saturation(x.codes, self.weight, g.qmin, g.qmax) if self.saturating else None
        if lost is not None:
            acc = acc.double() + lost
        multiplier = self.multiplier.float()  # float32 even after a .to(torch.float64)
        if self.out_grid is None:
            return acc.to(torch.float32) * multiplier
        o = self.out_grid
        return _Codes(K.requantize(acc, multiplier, o.zero_point, o.qmin, o.qmax), o)

    def extra_repr(self) -> str:
        out = "float" if self.out_grid is None else self.out_grid.name
        return f"{self.where}: {self.in_grid.name} -> {out}"


def _quantize(value, grid: Grid) -> _Codes:
    if isinstance(value, _Codes):
        return value  # the plan checked that it already lies on ``grid``
    return _Codes(K.quantize_linear(value, grid.scale, grid.zero_point, grid.qmin, grid.qmax), grid)


def _finish(value):
    """Model outputs: codes leave through DequantizeLinear (exact in float32)."""
    if isinstance(value, _Codes):
        return K.dequantize_linear(value.codes, value.grid.scale, value.grid.zero_point)
    if isinstance(value, (tuple, list)):
        return type(value)(_finish(v) for v in value)
    if isinstance(value, dict):
        return {k: _finish(v) for k, v in value.items()}
    return value


def _as_codes(value):
    return value.codes if isinstance(value, _Codes) else value


class OrtEmulation(nn.Module):
    """A quantized model run as ONNX Runtime's integer CPU kernels would run its exported file.

    Build it with :func:`emulate_ort`.  Call it like the model; it returns float32
    outputs equal, bit for bit, to ``OrtModel(exported_file)(inputs)``.  ``kernels``
    lists the ORT kernel of every quantized node; ``.to(device)`` moves the integer
    constants (integer sums run in float64 wherever float32 could round).
    """

    _add = staticmethod(K.qlinear_add)
    _mean = staticmethod(K.qlinear_global_average_pool)
    _names: ClassVar[Mapping[str, str]] = MappingProxyType({})  # kernel names of another runtime, keyed by ORT's
    _label: ClassVar[str] = "ORT CPU integer kernels"

    def __init__(self, qmodel: nn.Module, *, cpu: str = "auto") -> None:
        super().__init__()
        self.cpu = _arithmetic(cpu)
        self._build(qmodel, saturating=self.cpu == "x86-avx2" and model_target(qmodel).weight_layout == "s8")

    def _build(self, qmodel: nn.Module, *, saturating: bool) -> None:
        self.target = model_target(qmodel).name
        gm, why = (qmodel, "") if isinstance(qmodel, fx.GraphModule) else try_trace(qmodel)
        if gm is None:
            raise EmulationError(f"{type(qmodel).__name__} cannot be traced by torch.fx ({why}); integer "
                                 "emulation follows the model's graph")
        self.__dict__["_source"] = gm  # not a submodule: .to() must not move the user's model
        modules = dict(gm.named_modules())
        with torch.no_grad():
            self._plan = plan(gm.graph, modules)
            self.layers = nn.ModuleDict()
            for node in gm.graph.nodes:
                kind, module = self._plan.kinds[node.name]
                if kind in (CONV, GEMM):
                    self.layers[node.name] = _IntLayer(module, str(node.target), kind, self._plan.out_grid[node.name],
                                                         saturating=saturating)
        self._grids = {n.name: self._input_grids(n, modules) for n in gm.graph.nodes
                       if self._plan.kinds[n.name][0] in (ADD, STUB)}

    def _input_grids(self, node: fx.Node, modules) -> tuple[Grid, ...]:
        m = modules[node.target]
        qs = (m.a_quantizer, m.b_quantizer) if self._plan.kinds[node.name][0] == ADD else (m.input_quantizer,)
        return tuple(activation_grid(q, str(node.target)) for q in qs)

    @property
    def kernels(self) -> list[tuple[str, str]]:
        """(node, ORT kernel) for every kernel the emulation runs in integers, in graph order."""
        return [(where, self._names.get(kernel, kernel)) for where, kernel in self._plan.kernels]

    def kernel_counts(self) -> Counter:
        """How many of each ORT kernel, e.g. ``Counter({"QLinearConv": 52, "QLinearAdd": 10, ...})``."""
        return Counter(kernel.split(" ")[0] for _, kernel in self.kernels)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        """The model's outputs as ORT computes them (float32; quantized outputs are dequantized)."""
        env: dict[str, object] = {}

        def load(a):
            return fx.graph.map_arg(a, lambda n: env[n.name])

        placeholders = [n for n in self._source.graph.nodes if n.op == "placeholder"]
        for i, node in enumerate(placeholders):
            if i < len(args):
                env[node.name] = args[i]
            elif node.name in kwargs:
                env[node.name] = kwargs[node.name]
            elif node.args:
                env[node.name] = node.args[0]  # default value
            else:
                raise TypeError(f"missing input {node.name!r}")
        for node in self._source.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                return _finish(load(node.args[0]))
            env[node.name] = self._run(node, load(node.args), load(node.kwargs))
        raise RuntimeError("the graph has no output node")

    def _run(self, node: fx.Node, args, kwargs):
        kind, _ = self._plan.kinds[node.name]
        if kind in (CONV, GEMM):
            layer = self.layers[node.name]
            return layer(_quantize(args[0], layer.in_grid))
        if kind == STUB:
            return _quantize(args[0], self._grids[node.name][0])
        if kind == ADD:
            (ga, gb), out = self._grids[node.name], self._plan.out_grid[node.name]
            a, b = _quantize(args[0], ga), _quantize(args[1], gb)
            if a.codes.shape != b.codes.shape:
                raise EmulationError(f"{node.target}: operands of shapes {tuple(a.codes.shape)} and "
                                     f"{tuple(b.codes.shape)}; only same-shape QLinearAdd is emulated")
            codes = self._add(a.codes, ga.scale, ga.zero_point, b.codes, gb.scale, gb.zero_point,
                              out.scale, out.zero_point, out.qmin, out.qmax)
            return _Codes(codes, out)
        if kind == GAP:
            x, out = args[0], self._plan.out_grid[node.name]
            codes = self._mean(x.codes, x.grid.scale, x.grid.zero_point, out.scale, out.zero_point, out.qmin,
                               out.qmax)
            return _Codes(codes, out)
        if kind == FREE or node.name in self._plan.skipped:  # a Relu / Clip ORT removes
            return args[0] if args else next(iter(kwargs.values()))
        if isinstance(args[0] if args else None, _Codes):
            if kind == MOVE:
                return _Codes(self._call(node, (args[0].codes, *args[1:]), kwargs), args[0].grid)
            if kind == SHAPE:
                return self._call(node, tuple(_as_codes(a) for a in args), kwargs)
            raise EmulationError(f"{node.name}: unexpected op on integer codes (a lowbit bug: the plan allowed it)")
        return self._call(node, args, kwargs)

    def _call(self, node: fx.Node, args, kwargs):
        if node.op == "call_module":
            return self._source.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return functools.reduce(getattr, node.target.split("."), self._source)
        raise EmulationError(f"{node.name}: unexpected fx node {node.op!r}")

    def extra_repr(self) -> str:
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(self.kernel_counts().items()))
        return f"{self._label}: {counts}"


class TFLiteEmulation(OrtEmulation):
    """A quantized model run as LiteRT's XNNPACK delegate runs its fully-integer ``.tflite``.

    Build it with :func:`emulate_tflite`.  Convolutions and fully-connected layers requantize as
    ONNX Runtime's do (float32 multiplier, round half to even); residual adds use XNNPACK's
    fixed-point arithmetic and the global average pool its MEAN (``_xnnpack_kernels``).  Every
    integer kernel writes int8, so the model must hold an output quantizer wherever the file's
    kernel writes one (``lowbit.quantize(..., target="tflite")`` adds them).
    """

    _add = staticmethod(X.add)
    _mean = staticmethod(X.mean)
    _names = MappingProxyType({"QLinearConv": "CONV_2D", "QGemm": "FULLY_CONNECTED", "QLinearAdd": "ADD",
                               "QLinearGlobalAveragePool": "MEAN", "QuantizeLinear": "QUANTIZE",
                               "DequantizeLinear": "DEQUANTIZE"})
    _label = "XNNPACK int8 kernels"

    def __init__(self, qmodel: nn.Module) -> None:
        nn.Module.__init__(self)
        self.cpu = "xnnpack"  # int8 products widened to int16 and summed in int32: exact on every x86 / ARM CPU
        self._build(qmodel, saturating=False)
        floating = [where for where, kernel in self._plan.kernels if kernel.endswith("(float output)")]
        if floating:
            raise EmulationError(f"{floating[0]}: its output is left float, but a TFLite integer kernel always writes "
                                 "int8; quantize the model with target='tflite', which quantizes that output")


def _arithmetic(cpu: str) -> str:
    """``"x86-vnni"`` (exact u8 x s8 sums) or ``"x86-avx2"`` (vpmaddubsw pairs) for ``cpu``."""
    if cpu == "auto":
        info = cpu_info()
        if info.is_x86 and info.flags:
            return "x86-vnni" if info.has_vnni else "x86-avx2"
        raise EmulationError(f"the integer arithmetic of this CPU ({info.describe()}) is not modelled; pass "
                             "cpu='x86-vnni' or cpu='x86-avx2' to emulate an x86 CPU")
    if cpu not in _ARITHMETIC:
        raise EmulationError(f"cpu must be 'auto' or one of {', '.join(_ARITHMETIC)}, got {cpu!r}")
    return cpu


_ARITHMETIC = ("x86-vnni", "x86-avx2")


def emulate_ort(qmodel: nn.Module, *, cpu: str = "auto") -> OrtEmulation:
    """A module that computes, bit for bit, what ONNX Runtime computes for ``export_onnx(qmodel)``.

    Args:
        qmodel: a model from ``lowbit.quantize`` (an ``fx.GraphModule`` for CNNs, or any model
            torch.fx traces) with static per-tensor 8-bit activations, as ``"w8a8"`` gives.

    Returns:
        An :class:`OrtEmulation`; ``qmodel`` itself is not changed.

    Raises:
        EmulationError: (a ``ValueError``) naming the first node ORT would run in float
            (unquantized or weight-only layers, dynamic activations, a Relu / Clip ORT keeps,
            one tensor on two grids, a Conv whose output is returned, ops with no integer kernel).

    Example:
        >>> emulated = emulate_ort(qmodel)
        >>> logits = emulated(images)          # ORT's logits, computed in PyTorch
        >>> emulated.kernel_counts()           # Counter({'QLinearConv': 52, 'QLinearAdd': 10, ...})
    """
    return OrtEmulation(qmodel, cpu=cpu)


def emulate_tflite(qmodel: nn.Module) -> TFLiteEmulation:
    """A module that computes, bit for bit, what LiteRT (XNNPACK delegate) computes for ``export_tflite(qmodel)``.

    Args:
        qmodel: a model from ``lowbit.quantize(..., "w8a8", target="tflite")`` that torch.fx traces
            (lowbit's CNNs), with static per-tensor 8-bit activations.

    Returns:
        A :class:`TFLiteEmulation`; call it like the model (float inputs, dequantized outputs).

    Raises:
        EmulationError: naming the first node the file would not run as an exact int8 kernel, or an
            output the simulation leaves float where the file's kernel writes int8.

    Example:
        >>> qmodel = lowbit.quantize(model, calib, "w8a8", target="tflite")
        >>> export_tflite(qmodel, "model.int8.tflite", x[:1])
        >>> torch.equal(emulate_tflite(qmodel)(x[:1]), TFLiteModel("model.int8.tflite")(x[:1]))   # True
    """
    return TFLiteEmulation(qmodel)


__all__ = ["EmulationError", "OrtEmulation", "TFLiteEmulation", "emulate_ort", "emulate_tflite"]
