"""The registry of quantizable layer kinds: float type -> quantized type, and what passes may do.

Layer swapping, the config's position patterns and depthwise test, BatchNorm folding,
cross-layer equalization, bias correction and the ONNX Runtime emulation all read this table,
so a kind registered here is quantized, exported and handled by every pass its traits allow::

    class Dense(nn.Module):                      # weight (out, in), bias; forward: F.linear
        ...

    class QuantDense(lowbit.nn.QuantLayer, Dense):
        def forward(self, x):
            y = F.linear(self._quant_input(x), self._quant_weight(), self._quant_bias())
            return self._quant_output(y)

    lowbit.nn.register(Dense, QuantDense, kernel="gemm", kernel_only=True)

Types match exactly: a subclass of a registered float layer is not swapped (it may change
``forward``, which the quantized layer would drop); register the subclass itself.  The
built-in kinds at the bottom of this file are registered through the same call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from .conv_bn import ConvBn2d, QuantConvBn2d
from .modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLayer, QuantLinear

GEMM, CONV, LOOKUP = "gemm", "conv", "lookup"
KERNELS = (GEMM, CONV, LOOKUP)
"""``"gemm"``: ``y = x @ W.T + b`` over the last axis, weight ``(C_out, C_in)``; ``"conv"``: an
``nn.ConvNd``-like convolution, weight ``(C_out, C_in / groups, *k)``, with ``stride``,
``padding``, ``dilation``, ``groups`` and ``padding_mode`` attributes; ``"lookup"``: rows of a
table gathered by index (``nn.Embedding``)."""

_DEFAULT_AXIS = {GEMM: -1, CONV: 1, LOOKUP: -1}  # output channels: (..., C) / (N, C, *spatial)


@dataclass(frozen=True, kw_only=True)
class LayerKind:
    """One registered layer kind: its two classes and the traits the passes read.

    Attributes:
        float_cls: the float layer class (matched on exact type).
        quant_cls: its quantized class, ``class Q(lowbit.nn.QuantLayer, float_cls)``.
        kernel: the integer kernel the layer is, one of ``KERNELS``.
        channel_axis: the output channel axis of the layer's output (gemm -1, conv 1); bias
            correction averages its error per channel along it.
        kernel_only: the forward is exactly the kernel: ``F.linear`` / the convolution of
            ``_quant_input(x)`` and ``_quant_weight()`` plus ``_quant_bias()``, then
            ``_quant_output``, nothing else.  Export then writes one Gemm / Conv that ONNX Runtime
            fuses into QGemm / QLinearConv, and ``lowbit.runtime.emulate_ort`` reproduces it.
            False when the forward does more (a gain, an activation): ORT runs that part in
            float, so the emulation refuses the layer.
        fold_bn: a BatchNorm right after the layer may fold into its weight (axis 0) and bias
            (``lowbit.passes.fold_batchnorm``).
        equalize: cross-layer equalization may scale its output channels (weight axis 0 and
            bias) and input channels (weight axis 1) (``lowbit.passes.cross_layer_equalize``).
        correct_bias: bias correction may move its bias to cancel the mean output error
            (``lowbit.passes.correct_bias``).
        depthwise: ``module -> bool``, True for a layer with one input channel per output
            channel (ONNX Runtime's depthwise kernel sums exactly on every x86 CPU, so its
            weights keep 8 bits where other kernels would saturate); None: never.
    """

    float_cls: type[nn.Module]
    quant_cls: type[QuantLayer]
    kernel: str
    channel_axis: int
    kernel_only: bool
    fold_bn: bool
    equalize: bool
    correct_bias: bool
    depthwise: Callable[[nn.Module], bool] | None = None

    @property
    def contracts(self) -> bool:
        """A gemm or conv: weight output channels on axis 0, summed over its input channels."""
        return self.kernel in (GEMM, CONV)

    @property
    def traits(self) -> dict:
        """The keyword arguments of ``register`` that give this kind again."""
        return {name: getattr(self, name) for name in _TRAITS}

    def is_depthwise(self, module: nn.Module) -> bool:
        """Whether ``module`` (of this kind) has one input channel per output channel."""
        return self.depthwise is not None and bool(self.depthwise(module))


_TRAITS = ("kernel", "channel_axis", "kernel_only", "fold_bn", "equalize", "correct_bias", "depthwise")
_PASSES = ("fold_bn", "equalize", "correct_bias")
_KINDS: dict[type[nn.Module], LayerKind] = {}  # float type -> kind
_BY_QUANT: dict[type[nn.Module], LayerKind] = {}  # quantized type -> kind


def _check_classes(float_cls, quant_cls) -> None:
    if not (isinstance(float_cls, type) and issubclass(float_cls, nn.Module)) or issubclass(float_cls, QuantLayer):
        raise TypeError(f"register: float_cls must be a float nn.Module class, got {float_cls!r}")
    if not (isinstance(quant_cls, type) and issubclass(quant_cls, QuantLayer)):
        raise TypeError(f"register: {getattr(quant_cls, '__name__', quant_cls)!r} is not built on "
                        "lowbit.nn.QuantLayer; define it as "
                        f"`class Quant{float_cls.__name__}(lowbit.nn.QuantLayer, {float_cls.__name__})`")
    if not issubclass(quant_cls, float_cls):
        raise TypeError(f"register: {quant_cls.__name__} must subclass {float_cls.__name__} (isinstance checks "
                        "in the model keep working, and to_float / bias correction run the float forward); "
                        f"define it as `class {quant_cls.__name__}(lowbit.nn.QuantLayer, {float_cls.__name__})`")
    other = _BY_QUANT.get(quant_cls)
    if other is not None and other.float_cls is not float_cls:
        raise ValueError(f"register: {quant_cls.__name__} is the quantized class of {other.float_cls.__name__} "
                         "already; one quantized class undoes to one float class")
    own = quant_cls.__dict__.get("_float_type", float_cls)
    if own is not float_cls:
        raise ValueError(f"register: {quant_cls.__name__}._float_type is {own.__name__}, not {float_cls.__name__}")


def _check_traits(kind: LayerKind) -> None:
    if kind.kernel not in KERNELS:
        raise ValueError(f"register: kernel must be one of {', '.join(map(repr, KERNELS))}, got {kind.kernel!r}")
    if isinstance(kind.channel_axis, bool) or not isinstance(kind.channel_axis, int):
        raise TypeError(f"register: channel_axis must be an int, got {kind.channel_axis!r}")
    if kind.depthwise is not None and not callable(kind.depthwise):
        raise TypeError("register: depthwise must be None or a function module -> bool")
    for name in ("kernel_only", *_PASSES):
        if not isinstance(getattr(kind, name), bool):
            raise TypeError(f"register: {name} must be True or False, got {getattr(kind, name)!r}")
    asked = [name for name in ("kernel_only", *_PASSES) if getattr(kind, name)]
    if kind.kernel == LOOKUP and asked:
        raise ValueError(f"register: a lookup kernel has no contraction for {', '.join(asked)}")


def register(float_cls: type[nn.Module], quant_cls: type[QuantLayer], *, kernel: str,
             channel_axis: int | None = None, kernel_only: bool = False, fold_bn: bool | None = None,
             equalize: bool | None = None, correct_bias: bool | None = None,
             depthwise: Callable[[nn.Module], bool] | None = None, replace: bool = False) -> LayerKind:
    """Make layers of exact type ``float_cls`` quantizable: swapped for ``quant_cls``.

    Args:
        float_cls, quant_cls, kernel, kernel_only, depthwise: see ``LayerKind``.
        channel_axis: default -1 for gemm and lookup kernels, 1 for conv.
        fold_bn, equalize, correct_bias: default ``kernel_only`` (a layer that is exactly its
            contraction plus a bias meets the algebra of all three).
        replace: allow registering ``float_cls`` again (the new kind replaces the old).

    Returns:
        The ``LayerKind`` recorded.

    Raises:
        TypeError: ``quant_cls`` is not built on ``lowbit.nn.QuantLayer`` and ``float_cls``; a
            trait of the wrong type.
        ValueError: ``float_cls`` (or ``quant_cls``) is registered already and ``replace`` is
            False; an unknown kernel; a lookup kernel asked for a pass.

    Example:
        >>> lowbit.nn.register(Dense, QuantDense, kernel="gemm", kernel_only=True)
    """
    old = _KINDS.get(float_cls) if isinstance(float_cls, type) else None
    if old is not None and not replace:
        raise ValueError(f"register: {float_cls.__name__} is registered already (as {old.quant_cls.__name__}); "
                         "pass replace=True to replace it, or lowbit.nn.unregister it first")
    _check_classes(float_cls, quant_cls)
    given = {"fold_bn": fold_bn, "equalize": equalize, "correct_bias": correct_bias}
    kind = LayerKind(float_cls=float_cls, quant_cls=quant_cls, kernel=kernel, kernel_only=kernel_only,
                     channel_axis=_DEFAULT_AXIS.get(kernel, 0) if channel_axis is None else channel_axis,
                     depthwise=depthwise, **{k: kernel_only if v is None else v for k, v in given.items()})
    _check_traits(kind)
    if old is not None:
        del _BY_QUANT[old.quant_cls]
    quant_cls._float_type = float_cls  # what to_float returns (the inverse swap)
    _KINDS[float_cls] = _BY_QUANT[quant_cls] = kind
    return kind


def unregister(float_cls: type[nn.Module]) -> LayerKind:
    """Stop swapping ``float_cls``; returns its kind (``register(k.float_cls, k.quant_cls,
    **k.traits)`` gives it back).  Layers swapped already keep working and still ``to_float``.

    Raises:
        KeyError: ``float_cls`` is not registered.
    """
    kind = _KINDS.pop(float_cls, None)
    if kind is None:
        raise KeyError(f"unregister: {getattr(float_cls, '__name__', float_cls)!r} is not registered; "
                       f"registered: {', '.join(c.__name__ for c in _KINDS)}")
    del _BY_QUANT[kind.quant_cls]
    return kind


_VIEW: Mapping[type[nn.Module], LayerKind] = MappingProxyType(_KINDS)


def registered() -> Mapping[type[nn.Module], LayerKind]:
    """Float type -> ``LayerKind`` of every registered kind: a live, read-only view."""
    return _VIEW


def kind_of(module: nn.Module, *, subclasses: bool = False) -> LayerKind | None:
    """The kind of ``module``, a float layer or a quantized one, matched on its exact type (with
    ``subclasses``, on its nearest registered base class: for facts about its shape, such as
    being depthwise, not about its forward).  None when it is of no registered kind."""
    types = type(module).__mro__ if subclasses else (type(module),)
    for cls in types:
        kind = _KINDS.get(cls) or _BY_QUANT.get(cls)
        if kind is not None:
            return kind
    return None


def contraction_types() -> tuple[type[nn.Module], ...]:
    """The float classes of the registered gemm and conv kinds (for ``isinstance``)."""
    return tuple(cls for cls, kind in _KINDS.items() if kind.contracts)


# -- the built-in kinds ---------------------------------------------------------------------
def _one_input_channel_per_output(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


register(nn.Linear, QuantLinear, kernel=GEMM, kernel_only=True)
register(nn.Conv1d, QuantConv1d, kernel=CONV, kernel_only=True, depthwise=_one_input_channel_per_output)
register(nn.Conv2d, QuantConv2d, kernel=CONV, kernel_only=True, depthwise=_one_input_channel_per_output)
register(nn.Embedding, QuantEmbedding, kernel=LOOKUP)
# QAT's conv + BatchNorm (built by lowbit.qat, never in a float model a pass sees); in training it
# normalises with batch statistics, so it is not its kernel: ``lowbit.nn.convert`` folds it first.
register(ConvBn2d, QuantConvBn2d, kernel=CONV, depthwise=_one_input_channel_per_output)
