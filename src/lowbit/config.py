"""Layer 4: which layer gets which quantization.

A ``QuantConfig`` is an ordered list of rules, each a glob on the module's
qualified name (``"encoder.layer.*.attention.*"``) or on its type
(``"type:Embedding"``) mapped to a ``LayerQuant`` or to None (keep float).  The
first matching rule wins; a layer no rule matches gets ``default``.  Presets are
named constants; ``CONFIGS`` is derived from them.

Two position patterns name layers by place rather than name: ``"@first"`` and ``"@last"``
are the model's first and last compute layer (Linear / Conv, or any registered gemm / conv
kind, in module registration order; embeddings are not counted).  ``QuantConfig.bind(model)``
turns them into exact names just before layers are swapped, so a recipe keeps the position,
not one model's layer names.
The 4-bit presets for QAT (``w4a8``, ``w4a4``) use them to keep the first and last layers at
8 bits, the usual protocol for low-bit networks (Esser et al. 2020, LSQ): the input image and
the logits are where 4 bits cost the most.

The weight-only presets for LLMs (``w4a16-g128``, ``w4a16-g32``, ``w3a16-g128``, ``w8a16``)
quantize every Linear, ``lm_head`` included, by round-to-nearest on each group's (or row's)
min-max range, and leave activations float, so they need no calibration data:
``lowbit.quantize(model, None, "w4a16-g128")``.

    cfg = W8A8.with_rules(Rule(pattern="classifier.*", layer=None))   # keep the head in float
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from .nn.modules import TensorQuant
from .nn.registry import contraction_types, kind_of
from .numerics import (
    INT3_WEIGHT_G128,
    INT4_WEIGHT,
    INT4_WEIGHT_G32,
    INT4_WEIGHT_G128,
    INT8_WEIGHT,
    UINT4_ACTIVATION,
    UINT8_ACTIVATION,
    QuantSpec,
)
from .numerics.spec import preset

CONFIG_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class LayerQuant:
    """What a matched layer gets: a TensorQuant (or None = float) per tensor role."""

    weight: TensorQuant | None = None
    input: TensorQuant | None = None
    output: TensorQuant | None = None

    def __post_init__(self) -> None:
        for role in ("weight", "input", "output"):
            value = getattr(self, role)
            if value is not None and not isinstance(value, TensorQuant):
                raise TypeError(f"LayerQuant.{role} must be a TensorQuant or None, got {type(value).__name__}")
        if self.weight is None and self.input is None and self.output is None:
            raise ValueError("LayerQuant quantizes nothing; use layer=None in the Rule to keep a layer in float")


@dataclass(frozen=True, kw_only=True)
class Rule:
    """``pattern`` -> ``layer``. ``pattern`` globs a module name, or a type name after ``type:``."""

    pattern: str
    layer: LayerQuant | None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError("Rule.pattern must be a non-empty glob string")

    @classmethod
    def exact(cls, name: str, layer: LayerQuant | None) -> Rule:
        """A rule for the one module called ``name`` (glob characters in it matched literally)."""
        return cls(pattern=_escape_glob(name) if name else "*", layer=layer)

    def matches(self, name: str, module: nn.Module) -> bool:
        if self.pattern in POSITIONS:  # unbound: QuantConfig.bind(model) names the layer
            return False
        if self.pattern.startswith("type:"):
            wanted = self.pattern[len("type:"):]
            return any(fnmatch.fnmatchcase(cls.__name__, wanted) for cls in type(module).__mro__)
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Ordered rules plus a default; see the module docstring."""

    name: str = "custom"
    rules: tuple[Rule, ...] = ()
    default: LayerQuant | None = None
    # Widest signed weight grid for layers on u8 x s8 integer kernels (None: no limit).  Set by
    # ``for_target`` for CPUs whose kernels saturate (x86 without VNNI, ``x86-avx2-w7``); layers
    # with float inputs (weight-only) and depthwise convs (ORT's depthwise kernel sums in int32
    # on every x86 CPU) keep their width.
    max_weight_bits: int | None = None
    # Every quantized layer's output is quantized too, where no quantizer reads it already (a
    # model output, a float op): the runtime's integer kernels write quantized outputs (TFLite).
    # Set by ``for_target``; ``lowbit.ptq.read_output_quantizers`` adds the quantizers.
    quantized_outputs: bool = False

    def __post_init__(self) -> None:
        if self.max_weight_bits is not None and (isinstance(self.max_weight_bits, bool) or self.max_weight_bits
                                                 not in range(2, 9)):
            raise ValueError(f"QuantConfig.max_weight_bits must be None or 2..8, got {self.max_weight_bits!r}")
        if not isinstance(self.quantized_outputs, bool):
            raise TypeError(f"QuantConfig.quantized_outputs must be a bool, got {self.quantized_outputs!r}")
        if not isinstance(self.rules, tuple):
            object.__setattr__(self, "rules", tuple(self.rules))
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"QuantConfig.rules must hold Rule objects, got {type(rule).__name__}")

    def resolve(self, name: str, module: nn.Module) -> tuple[LayerQuant | None, str]:
        """The LayerQuant for ``module`` (None = float) and what decided it."""
        for rule in self.rules:
            if rule.matches(name, module):
                return self._cap(rule.layer, module), f"rule {rule.pattern!r}"
        return self._cap(self.default, module), "default"

    def _cap(self, layer: LayerQuant | None, module: nn.Module) -> LayerQuant | None:
        """``layer`` with its weight limited to ``max_weight_bits`` where that applies."""
        if self.max_weight_bits is None or layer is None or layer.weight is None or layer.input is None:
            return layer
        spec = layer.weight.spec
        if not spec.signed or spec.bits <= self.max_weight_bits or _is_depthwise(module):
            return layer
        weight = dataclasses.replace(layer.weight, spec=dataclasses.replace(spec, bits=self.max_weight_bits))
        return dataclasses.replace(layer, weight=weight)

    def bind(self, model: nn.Module) -> QuantConfig:
        """A copy in which the position patterns ``"@first"`` / ``"@last"`` are the exact names of
        ``model``'s first / last compute layer (an instance of a registered gemm or conv kind:
        Linear, Conv1d, Conv2d ..., in module order; the model itself when it is one such layer).
        Unchanged when no rule uses them."""
        if not any(r.pattern in POSITIONS for r in self.rules):
            return self
        compute = contraction_types()
        names = [name for name, m in model.named_modules() if isinstance(m, compute)]
        where = {"@first": names[0] if names else None, "@last": names[-1] if names else None}
        rules = []
        for rule in self.rules:
            if rule.pattern in POSITIONS:
                name = where[rule.pattern]
                if name is None:
                    continue  # no compute layer: nothing to name
                # (the model itself, named "": a one-layer model, which "*" matches and nothing else)
                rule = Rule.exact(name, rule.layer)
            rules.append(rule)
        return dataclasses.replace(self, rules=tuple(rules))

    def without_positions(self) -> QuantConfig:
        """A copy without the ``"@first"`` / ``"@last"`` rules: every layer as the rest are."""
        return dataclasses.replace(self, rules=tuple(r for r in self.rules if r.pattern not in POSITIONS))

    def with_rules(self, *rules: Rule) -> QuantConfig:
        """A copy with ``rules`` taking precedence over the existing ones."""
        return dataclasses.replace(self, rules=tuple(rules) + self.rules)

    def skip(self, *patterns: str) -> QuantConfig:
        """A copy that keeps layers matching ``patterns`` in float."""
        return self.with_rules(*(Rule(pattern=p, layer=None) for p in patterns))

    def with_observer(self, observer: str, *, role: str = "input", **options) -> QuantConfig:
        """A copy whose ``role`` tensors (input/weight/output) use ``observer`` for calibration."""

        def change(layer: LayerQuant | None) -> LayerQuant | None:
            tq = None if layer is None else getattr(layer, role)
            if tq is None or tq.dynamic:
                return layer
            new = dataclasses.replace(tq, observer=observer, observer_options=tuple(sorted(options.items())))
            return dataclasses.replace(layer, **{role: new})

        rules = tuple(dataclasses.replace(r, layer=change(r.layer)) for r in self.rules)
        return dataclasses.replace(self, rules=rules, default=change(self.default))

    def for_target(self, target) -> QuantConfig:
        """A copy that quantizes as ``target`` (a ``lowbit.targets.Target``) computes:

        * weights: signed weights of layers that run as u8 x s8 integer matmuls get at most
          ``target.max_weight_bits`` bits (``max_weight_bits``, applied by ``resolve``);
        * activations: every input / output quantizer, static or dynamic, of every rule and of
          the default is put on ``target.activation_grid`` (``activations_on_grid``), e.g.
          signed symmetric for ``"tensorrt"``; its width, granularity and observer are kept;
        * outputs: ``quantized_outputs`` when the runtime's integer kernels write quantized
          outputs (``target.quantized_outputs``: TFLite).

        ``self`` itself when nothing changes (8-bit ONNX Runtime targets keep the config's grid).

        Example:
            >>> W8A8.for_target(lowbit.targets.TENSORRT).default.input.spec.describe()
            'int8 sym per-tensor'
        """
        config = self
        if target.max_weight_bits < 8 and self.max_weight_bits != target.max_weight_bits:
            config = dataclasses.replace(config, max_weight_bits=target.max_weight_bits)
        if getattr(target, "quantized_outputs", False) and not config.quantized_outputs:
            config = dataclasses.replace(config, quantized_outputs=True)
        grid = getattr(target, "activation_grid", None)
        return config if grid is None else config.activations_on_grid(grid)

    def activations_on_grid(self, grid: str) -> QuantConfig:
        """A copy whose activation quantizers (``input`` and ``output`` of the default and of every
        rule) use ``grid``: ``"u8-affine"`` and ``"s8-affine"`` -> unsigned affine codes (the
        s8 affine grid is the same numbers shifted by 128, which its exporter writes),
        ``"s8-symmetric"`` -> signed, zero point 0, full range (-128..127 at 8 bits).  Bits,
        granularity, observer and dynamic-ness are kept; ``self`` when nothing changes."""
        if grid not in _GRID_FIELDS:
            raise ValueError(f"unknown activation grid {grid!r}; grids: {', '.join(_GRID_FIELDS)}")

        def move(tq: TensorQuant | None) -> TensorQuant | None:
            if tq is None:
                return None
            return dataclasses.replace(tq, spec=dataclasses.replace(tq.spec, **_GRID_FIELDS[grid]))

        def change(layer: LayerQuant | None) -> LayerQuant | None:
            if layer is None:
                return None
            return dataclasses.replace(layer, input=move(layer.input), output=move(layer.output))

        rules = tuple(dataclasses.replace(r, layer=change(r.layer)) for r in self.rules)
        moved = dataclasses.replace(self, rules=rules, default=change(self.default))
        return self if moved == self else moved

    # -- recipe files -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "lowbit.QuantConfig", "version": CONFIG_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> QuantConfig:
        data = dict(data)
        if data.pop("format", None) != "lowbit.QuantConfig":
            raise ValueError("not a lowbit QuantConfig recipe (missing format: lowbit.QuantConfig)")
        version = data.pop("version", None)
        if version != CONFIG_FORMAT_VERSION:
            raise ValueError(f"QuantConfig recipe version {version!r} is not supported (expected {CONFIG_FORMAT_VERSION})")
        _check_fields(cls, data)
        rules = tuple(_rule_from_dict(r) for r in data.pop("rules", ()))
        return cls(rules=rules, default=_layer_from_dict(data.pop("default", None)), **data)


POSITIONS = ("@first", "@last")

# QuantSpec fields that put an activation on each runtime grid (lowbit.targets.ACTIVATION_GRIDS).
_GRID_FIELDS = {
    "u8-affine": {"signed": False, "symmetric": False, "narrow_range": False},
    "s8-affine": {"signed": False, "symmetric": False, "narrow_range": False},  # uint8 codes, shifted on export
    "s8-symmetric": {"signed": True, "symmetric": True, "narrow_range": False},
}


def _is_depthwise(module: nn.Module) -> bool:
    """One input channel per output channel (its registered kind says): ONNX Runtime runs it on
    its depthwise kernel.  Looked up through base classes: a shape, not a forward, is asked."""
    kind = kind_of(module, subclasses=True)
    return kind is not None and kind.is_depthwise(module)


def _escape_glob(name: str) -> str:
    """``name`` as a glob that matches exactly it (``[``, ``*`` and ``?`` bracketed)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def _check_fields(cls, data: Mapping) -> None:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")


def _rule_from_dict(data: Mapping) -> Rule:
    _check_fields(Rule, data)
    if "pattern" not in data or "layer" not in data:
        raise ValueError("Rule in a recipe needs both 'pattern' and 'layer' (null keeps the layer in float)")
    return Rule(pattern=data["pattern"], layer=_layer_from_dict(data["layer"]))


def _tensor_from_dict(data: Mapping | None) -> TensorQuant | None:
    if data is None:
        return None
    data = dict(data)
    _check_fields(TensorQuant, data)
    spec = QuantSpec.from_dict(data.pop("spec"))
    options = tuple((k, v) for k, v in data.pop("observer_options", ()))
    return TensorQuant(spec=spec, observer_options=options, **data)


def _layer_from_dict(data: Mapping | None) -> LayerQuant | None:
    if data is None:
        return None
    _check_fields(LayerQuant, data)
    return LayerQuant(**{role: _tensor_from_dict(data.get(role)) for role in ("weight", "input", "output")})


# -- presets ------------------------------------------------------------------------------
_CONFIGS: dict[str, QuantConfig] = {}


def _config(config: QuantConfig) -> QuantConfig:
    _CONFIGS[config.name] = config
    return config


_INT8_W = TensorQuant(spec=INT8_WEIGHT)
_EMBEDDING_W8 = Rule(pattern="type:Embedding", layer=LayerQuant(weight=_INT8_W))

W8A8 = _config(QuantConfig(
    name="w8a8",
    rules=(_EMBEDDING_W8,),
    default=LayerQuant(weight=_INT8_W, input=TensorQuant(spec=UINT8_ACTIVATION, observer="mse")),
))
"""Static INT8: int8 per-channel weights, uint8 per-tensor activations whose clipping range
minimises the quantization MSE.  Measured here: MSE beats min-max on MobileNetV2 and matches it
on MiniLM, where percentile clipping cuts BERT's outlier features (see BENCHMARKS.md);
``W8A8.with_observer("percentile")`` is better still on MobileNetV2."""

W8A8_DYNAMIC = _config(QuantConfig(
    name="w8a8-dynamic",
    rules=(_EMBEDDING_W8,),
    default=LayerQuant(weight=_INT8_W, input=TensorQuant(spec=UINT8_ACTIVATION, dynamic=True)),
))
"""Dynamic INT8: int8 per-channel weights; activation ranges computed per batch at run time."""

W8 = _config(QuantConfig(name="w8", rules=(_EMBEDDING_W8,), default=LayerQuant(weight=_INT8_W)))
"""Weight-only INT8 per channel; activations stay float."""

_INT4_W = TensorQuant(spec=INT4_WEIGHT, observer="mse")
# The first and last compute layers stay at 8 bits in the 4-bit presets (see the module docstring).
_ENDS_W8A8 = (Rule(pattern="@first", layer=W8A8.default), Rule(pattern="@last", layer=W8A8.default))

W4A8 = _config(QuantConfig(
    name="w4a8",
    rules=(_EMBEDDING_W8, *_ENDS_W8A8),
    default=LayerQuant(weight=_INT4_W, input=TensorQuant(spec=UINT8_ACTIVATION, observer="mse")),
))
"""int4 per-channel weights (range by MSE), uint8 per-tensor activations, first and last layers
int8: the usual QAT target (``lowbit.prepare_qat``).  Exports as int8 containers holding int4
values, so ONNX Runtime runs it on its int8 kernels with the 4-bit grid's accuracy."""

W4A4 = _config(QuantConfig(
    name="w4a4",
    rules=(_EMBEDDING_W8, *_ENDS_W8A8),
    default=LayerQuant(weight=_INT4_W, input=TensorQuant(spec=UINT4_ACTIVATION, observer="mse")),
))
"""int4 per-channel weights and uint4 per-tensor activations, first and last layers W8A8:
aggressive, for QAT.  ONNX Runtime has no 4-bit activation kernels: export clips to the 4-bit
range before each QuantizeLinear, which keeps the numbers exact but leaves the clipped layers
in float there."""

# -- weight-only presets for LLMs: round-to-nearest (RTN), the baseline GPTQ / AWQ improve on ----
# Every Linear takes the weight grid (lm_head too); embeddings int8 per row as in every preset: a table
# is read a row per token, so its bits cost memory, not arithmetic.  lm_head is often tied to the
# embedding (SmolLM2): tying is safe, since fake-quantization never writes the weight; each layer
# quantizes the shared float table its own way, and the file holds both.  To store one table (the
# head's), add the ``tie_embedding`` step (``lowbit.ptq.TieEmbedding``) after GPTQ / AWQ.


def _weight_only(name: str, spec: QuantSpec) -> QuantConfig:
    return QuantConfig(name=name, rules=(_EMBEDDING_W8,), default=LayerQuant(weight=TensorQuant(spec=spec)))


W4A16_G128 = _config(_weight_only("w4a16-g128", INT4_WEIGHT_G128))
"""Weight-only INT4 for LLMs: int4 symmetric, one scale per 128 consecutive input features of each
output row (the last group shorter where 128 does not divide ``in_features``: SmolLM2's 576 is
4 x 128 + 64), set by the group's largest-magnitude value, which lands exactly on -8 (the scale
takes its sign: ``QuantSpec.signed_scale``, the rule of GGUF's Q4_0 and of ONNX Runtime's quantizer;
it gave lower perplexity than ``max |w| / 7.5`` on SmolLM2, BENCHMARKS.md), round to nearest.  Activations stay float; no
calibration data.  Exports as blocked DequantizeLinear (opset 21), which ONNX Runtime runs as
MatMulNBits on a 3-D input."""

W4A16_G32 = _config(_weight_only("w4a16-g32", INT4_WEIGHT_G32))
"""Weight-only INT4, groups of 32 along the input dimension, otherwise as ``w4a16-g128``.

Symmetric (zero-point 0) like ``w4a16-g128``, so the two differ only in group size, and the grid is
GGUF's Q4_0 (a scale per 32), with no zero-points to store.  Not asymmetric: SmolLM2's GGUF weights
were stored on an asymmetric group-32 grid with a float minimum (Q4_1), which an asymmetric g32 grid
all but reproduces, so judging 4-bit quantization with it would flatter any method; a symmetric grid
does not line up with it.  For the asymmetric grid, use
``QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", axis=1, group_size=32)``."""

W3A16_G128 = _config(_weight_only("w3a16-g128", INT3_WEIGHT_G128))
"""Weight-only INT3 (-4..3, symmetric), groups of 128 along the input dimension, otherwise as
``w4a16-g128``.  ONNX has no 3-bit type: export stores the values in 8-bit integers, so the ONNX
file is no smaller than ``w8a16``'s; the simulation has the 3-bit accuracy."""

W8A16 = _config(dataclasses.replace(W8, name="w8a16"))
"""Weight-only INT8, one scale per output channel, min-max: the ``w8`` preset under the name the
LLM presets share."""

CONFIGS: Mapping[str, QuantConfig] = MappingProxyType(_CONFIGS)
"""Preset configs by name."""


def get_config(config: QuantConfig | str) -> QuantConfig:
    """Resolve a preset name or pass a QuantConfig through."""
    return preset(config, QuantConfig, CONFIGS, "config")
