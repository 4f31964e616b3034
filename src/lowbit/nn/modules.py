"""Quantized layers: the float layer plus one Quantizer per quantized tensor.

Each class is built on ``QuantLayer`` and subclasses its float layer (so
``isinstance(m, nn.Linear)`` still holds inside models such as HF transformers); it adds
``input_quantizer``, ``weight_quantizer`` and ``output_quantizer`` (any may be None: that
tensor stays float).  ``to_float`` undoes a swap, returning a float layer with the same
(float) parameters.  Which float type becomes which quantized type, and what the passes may
do with each, is the registry's (``lowbit.nn.registry``), where a user adds layer kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import QuantSpec
from .integer import (
    IntegerParams,
    bias_integers,
    bias_step,
    static_integers,
    weight_integers,
)
from .quantizer import Quantizer


@dataclass(frozen=True, kw_only=True)
class TensorQuant:
    """How one tensor of a layer is quantized: spec, range estimator, dynamic or not."""

    spec: QuantSpec
    observer: str = "minmax"
    observer_options: tuple[tuple[str, object], ...] = ()
    dynamic: bool = False

    def __post_init__(self) -> None:
        from ..observers import OBSERVERS

        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"TensorQuant.spec must be a QuantSpec, got {type(self.spec).__name__}; "
                            "use lowbit.numerics.get_spec(name) for a preset name")
        if self.observer not in OBSERVERS:
            raise ValueError(f"TensorQuant.observer {self.observer!r} is unknown; kinds: {', '.join(OBSERVERS)}")

    def make(self, name: str) -> Quantizer:
        return Quantizer(
            self.spec,
            observer=self.observer,
            observer_options=dict(self.observer_options),
            dynamic=self.dynamic,
            name=name,
        )


def adopt(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A new ``cls`` that shares ``module``'s attributes, parameters, buffers and children (not
    copied), with fresh hook and state dicts of its own: how a layer changes type in place."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in module.__dict__.items():
        if key not in new.__dict__ or key == "training":
            new.__dict__[key] = value
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


class QuantLayer:
    """The public base of quantized layers: ``class QuantMine(QuantLayer, Mine)``, then
    ``lowbit.nn.register(Mine, QuantMine, kernel=...)``.

    It holds the quantizers (built by ``from_float``), the integer view (``integer_params``) and
    the inverse swap (``to_float``).  A subclass's forward reads its tensors through
    ``_quant_input(x)``, ``_quant_weight()``, ``_quant_bias()`` and ``_quant_output(y)``: export
    replaces what they return by Q/DQ nodes and the int32 bias, so a forward built from them
    exports as it simulates.  The layer needs a ``weight`` (output channels on axis 0) and may
    have a ``bias``.

    Example::

        class QuantDense(QuantLayer, Dense):          # Dense: weight (out, in), bias; F.linear
            def forward(self, x):
                y = F.linear(self._quant_input(x), self._quant_weight(), self._quant_bias())
                return self._quant_output(y)

        lowbit.nn.register(Dense, QuantDense, kernel="gemm", kernel_only=True)
    """

    _float_type: type[nn.Module]
    input_quantizer: Quantizer | None
    weight_quantizer: Quantizer | None
    output_quantizer: Quantizer | None

    def _init_quantizers(self, name, weight, input, output) -> None:
        self.input_quantizer = None if input is None else input.make(f"{name}.input")
        self.weight_quantizer = None if weight is None else weight.make(f"{name}.weight")
        self.output_quantizer = None if output is None else output.make(f"{name}.output")

    def quantizers(self):
        """(role, Quantizer) pairs of this layer, skipping tensors left in float."""
        for role in ("input", "weight", "output"):
            q = getattr(self, f"{role}_quantizer")
            if q is not None:
                yield role, q

    def _quant_input(self, x):
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _quant_weight(self):
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def _quant_bias(self):
        """The bias on the int32 grid of scale ``s_input * s_weight``, as integer runtimes
        store it (ONNX Runtime's QLinearConv / QGemm); float when either scale is not fixed."""
        return self._round_bias(self.bias)

    def _round_bias(self, b):
        """``b`` on the int32 grid ``s_input * s_weight`` (see ``lowbit.nn.integer.bias_step``),
        or ``b`` itself where the bias stays float."""
        step = bias_step(self.input_quantizer, self.weight_quantizer, b, self.weight.dim())
        if step is None:
            return b
        rounded = torch.clamp(torch.round(b / step), -(2**31), 2**31 - 1) * step
        # Straight-through (the bias still trains in QAT), with the value exactly `rounded`:
        # b - b.detach() is 0, whereas b + (rounded - b) loses bits when the clamp bites.
        return rounded.detach() + (b - b.detach())

    def quantized_weight_source(self) -> torch.Tensor:
        """The tensor the weight quantizer sees (the layer's weight; a conv-BN pair folds it)."""
        return self.weight

    def quantized_bias_source(self) -> torch.Tensor | None:
        """The bias the simulation adds before rounding it to the int32 grid (or None)."""
        return getattr(self, "bias", None)  # (an Embedding has none)

    @torch.no_grad()
    def integer_params(self) -> IntegerParams:
        """The integers a runtime stores for this layer (``lowbit.nn.integer``): integer weight with
        its scale / zero-point, the int32 bias where the simulation rounds it to ``s_in * s_w``,
        and the fixed input / output qparams.  Export, the ONNX Runtime emulation and reports
        read this, so they agree with the forward by construction.

        Raises:
            ValueError: a quantizer is still calibrating (freeze it first).
        """
        wq = self.weight_quantizer
        active = wq is not None and wq.mode != "disabled"
        weight = weight_integers(wq, self.quantized_weight_source()) if active else None
        bias = self.quantized_bias_source()
        step = bias_step(self.input_quantizer, wq, bias, self.weight.dim())
        if step is not None:
            ints = bias_integers(f"{wq.name.removesuffix('.weight')}.bias", bias, step)
            if not torch.equal(ints.values.to(step.dtype) * step, self._round_bias(bias)):
                raise RuntimeError(f"{ints.name}: the int32 bias differs from the simulation's (a lowbit bug)")
            bias = ints
        else:
            bias = None
        return IntegerParams(weight=weight, bias=bias, input=static_integers(self.input_quantizer),
                             output=static_integers(self.output_quantizer))

    def _quant_output(self, y):
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError(f"build a {type(self).__name__} from a float layer: "
                        f"{type(self).__name__}.from_float(layer, name=..., weight=..., input=...)")

    @classmethod
    def from_float(cls, module, *, name, weight=None, input=None, output=None):
        """Wrap ``module`` (its parameters are shared, not copied; hooks are not carried over)."""
        qmod = adopt(cls, module)
        qmod._init_quantizers(name, weight, input, output)
        return qmod

    def to_float(self) -> nn.Module:
        """The float layer with the same parameters (quantizers dropped)."""
        module = self._float_type.__new__(self._float_type)
        module.__dict__.update(self.__dict__)
        module._modules = {k: v for k, v in self._modules.items() if not k.endswith("_quantizer")}
        module._parameters = dict(self._parameters)
        module._buffers = dict(self._buffers)
        for attr in ("input_quantizer", "weight_quantizer", "output_quantizer"):
            module.__dict__.pop(attr, None)
        return module


_QuantMixin = QuantLayer  # its name before it was public


class QuantLinear(QuantLayer, nn.Linear):
    _float_type = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_output(F.linear(self._quant_input(x), self._quant_weight(), self._quant_bias()))


class _QuantConv(QuantLayer):
    """Forward shared by the quantized convolutions (each float class supplies ``_conv_forward``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_output(self._conv_forward(self._quant_input(x), self._quant_weight(), self._quant_bias()))


class QuantConv1d(_QuantConv, nn.Conv1d):
    _float_type = nn.Conv1d


class QuantConv2d(_QuantConv, nn.Conv2d):
    _float_type = nn.Conv2d


class QuantEmbedding(QuantLayer, nn.Embedding):
    """Embedding with a quantized table (one scale per row); indices are never quantized."""

    _float_type = nn.Embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.embedding(
            x, self._quant_weight(), self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse,
        )
        return self._quant_output(out)


def tied_table(embedding: nn.Module, head: nn.Module) -> bool:
    """True when ``embedding`` looks up ``head``'s quantized weight: it holds the head's weight
    Parameter and weight quantizer (``lowbit.ptq.tie``)."""
    q = getattr(head, "weight_quantizer", None)
    return (getattr(embedding, "weight", None) is getattr(head, "weight", False) and q is not None
            and getattr(embedding, "weight_quantizer", None) is q)


QUANTIZED: Mapping[type[nn.Module], type[nn.Module]] = MappingProxyType({
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
})
"""The float layers lowbit quantizes out of the box -> their quantized types (read-only).  What
is swapped is the registry (``lowbit.nn.registered()``): these, the QAT ``ConvBn2d`` and the
kinds users register."""


def is_quantized(module: nn.Module) -> bool:
    """True for a swapped layer (QuantLinear, QuantConv2d, a user's QuantLayer ...), which
    ``to_float`` can undo."""
    return isinstance(module, QuantLayer)


class QuantAdd(nn.Module):
    """``a + b`` with both operands fake-quantized (a residual add that runs in integers).

    Inserted by the graph pass for residual connections; ONNX Runtime fuses
    ``DQ(a) + DQ(b) -> Q`` into QLinearAdd.  The output is quantized by whatever
    consumes it (the next layer's input quantizer).
    """

    def __init__(self, a: TensorQuant, b: TensorQuant, *, name: str) -> None:
        super().__init__()
        self.name = name
        self.a_quantizer = a.make(f"{name}.a")
        self.b_quantizer = b.make(f"{name}.b")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quantizer(a) + self.b_quantizer(b)

    def quantizers(self):
        yield "a", self.a_quantizer
        yield "b", self.b_quantizer


class QuantStub(nn.Module):
    """Fake-quantizes the tensor passing through it (e.g. the input of a global average pool),
    so the runtime can keep the op that consumes it in integers."""

    def __init__(self, tensor: TensorQuant, *, name: str) -> None:
        super().__init__()
        self.name = name
        self.input_quantizer = tensor.make(f"{name}.input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x)

    def quantizers(self):
        yield "input", self.input_quantizer


def has_quantizers(module: nn.Module) -> bool:
    """True for any lowbit module that owns quantizers (swapped layers, QuantAdd, QuantStub)."""
    return isinstance(module, (QuantLayer, QuantAdd, QuantStub))
