"""PTQ algorithms as ordered, serialisable steps (llm-compressor's "modifiers", without a session).

A step is a frozen, keyword-only dataclass: its fields are the algorithm's settings, and it
runs in one phase of ``lowbit.quantize``::

    float       on the float model, before layers are swapped (each step in list order)
                FoldBatchNorm, CLE, SmoothQuant, AWQ (``lowbit.ptq.weight_steps``)
    (residual adds and pools get quantizers, layers are swapped, activations calibrated)
    calibrated  on the quantized model, after calibration (each step in list order)
                RTN, GPTQ (``lowbit.ptq.weight_steps``), AdaRound, BiasCorrection

so ``quantize(model, calib, "w8a8", algorithms=[CLE(), SmoothQuant(alpha=0.8), BiasCorrection()])``
runs CLE, then SmoothQuant, then calibrates, then corrects biases.  ``AdaRound`` (adaptive
rounding of the weights, ``lowbit.ptq.adaround``) goes before ``BiasCorrection`` when both run:
the bias then corrects the mean error of the rounding AdaRound chose.  A list whose phases go back
(``[BiasCorrection(), CLE()]``) is an error before any work: a float-model step cannot run on a
model that has already been quantized.

The same list as data, for recipes and ``lowbit.save``::

    step.to_dict()                  {"name": "smoothquant", "alpha": 0.8, "insert_scales": true}
    Step.from_dict(d)               the step again (unknown names or fields: ValueError naming them)
    str(step)                       "smoothquant(alpha=0.8)": the short form, non-default fields only
    lowbit.ptq.parse_steps("cle,smoothquant(alpha=0.8),bias_correction")   the CLI's --algorithms

Your own algorithm is a subclass registered by name::

    @register_step
    @dataclass(frozen=True, kw_only=True)
    class ClipWeights(Step):
        name = "clip_weights"          # its name in recipes and on the command line
        phase = FLOAT
        limit: float = 3.0

        def run(self, model, ctx):
            ...                         # change model in place (or return a new one)
            return model, None          # and a JSON-able report of what it did (or None)

``rebuild(model, report)`` is the step's structural part without data, which ``lowbit.load``
replays (default: nothing; the saved tensors overwrite every weight a step changed).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from torch import nn

from .. import passes
from ..config import QuantConfig
from ..passes.smooth import SmoothedGroup, SmoothReport, insert_smoothed_inputs
from .adaround import adaround

FLOAT = "float"  # on the float model, before layers are swapped
CALIBRATED = "calibrated"  # on the quantized model, after calibration
PHASES = (FLOAT, CALIBRATED)  # in the order quantize runs them
_WHERE = {FLOAT: "on the float model before layers are swapped",
          CALIBRATED: "on the quantized model after calibration"}


@dataclass(frozen=True)
class StepContext:
    """What a step may use besides the model."""

    calib_data: Iterable | None  # batches of model inputs; re-iterable when a step needs data
    config: QuantConfig  # the config being applied (already fitted to the target)
    progress: bool = True  # whether a step may show a progress bar
    steps: tuple = ()  # every step of the pipeline, in order (a step may adapt to what runs with it)


@dataclass(frozen=True, kw_only=True)
class Step:
    """One PTQ algorithm and its settings; see the module docstring."""

    name: ClassVar[str] = ""  # the registry name: recipes, --algorithms, to_dict
    phase: ClassVar[str] = FLOAT
    needs_data: ClassVar[bool] = False  # quantize refuses to run it without calibration data
    # True for a step that changes only quantizers' ranges: switched to float, a layer drops its
    # edits with its quantizers, so the sensitivity analyses may keep the step.
    ranges_only: ClassVar[bool] = False
    # Fields added after recipes were written, and what a recipe (a mapping with every other
    # field, as ``to_dict`` writes) without one meant, so an old recipe replays as it ran; the
    # dataclass default is for new steps, short forms and partial mappings.
    absent: ClassVar[Mapping[str, object]] = MappingProxyType({})

    def run(self, model: nn.Module, ctx: StepContext) -> tuple[nn.Module, object]:
        """Apply the step; returns the model (changed in place, or a new one) and a report of
        what it did: None or a value ``report_to_json`` can write."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def rebuild(self, model: nn.Module, report: object) -> nn.Module:
        """What ``run`` did to the module tree, without data (for ``lowbit.load``)."""
        return model

    def report_to_json(self, report: object) -> object:
        """``run``'s report as a JSON value, for ``lowbit.save`` (default: as it is)."""
        return report

    def report_from_json(self, data: object) -> object:
        """The report ``report_to_json`` wrote, for ``rebuild`` and the loaded summary."""
        return data

    def to_dict(self) -> dict:
        """``{"name": ..., field: value, ...}``: every field (JSON values: a step's fields should be
        numbers, strings, booleans or None), so a recipe keeps today's defaults."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, data: Mapping, *, short: bool = False) -> Step:
        """The step ``to_dict`` wrote (any registered step, looked up by ``data["name"]``).  A complete
        mapping from before a field existed takes the field's ``absent`` value (what it ran with);
        ``short`` (the ``parse_step`` form, naming only what differs) takes today's defaults.

        Raises:
            ValueError: an unknown name, unknown or missing fields, a bad value (named).
            TypeError: not a mapping, or a field of the wrong type.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"an algorithm must be a name or a mapping with a 'name', got {data!r}")
        data = dict(data)
        step_cls = step_class(data.pop("name", None))
        if not issubclass(step_cls, cls):
            raise TypeError(f"algorithm {step_cls.name!r} is a {step_cls.__name__}, not a {cls.__name__}")
        fields = [f for f in dataclasses.fields(step_cls) if f.init]
        if not short and all(f.name in data or f.name in step_cls.absent for f in fields):
            # every field ``to_dict`` wrote: a recipe, maybe older than some fields (short forms
            # and partial mappings name only what they change, and take today's defaults)
            data = {**{k: v for k, v in step_cls.absent.items() if k not in data}, **data}
        unknown = sorted(set(data) - {f.name for f in fields})
        missing = [f.name for f in fields if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if unknown or missing:
            what = f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}"
            raise ValueError(f"algorithm {step_cls.name!r}: {what}; "
                             f"{step_cls.__name__} takes {[f.name for f in fields] or 'no fields'}")
        return step_cls(**data)

    def __str__(self) -> str:
        changed = [f"{f.name}={_short(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return f"{self.name}({', '.join(changed)})" if changed else self.name


def _short(value: object) -> str:
    """``value`` as the short form writes it: JSON where it can be (``parse_step`` reads it back)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# -- the registry ------------------------------------------------------------------------------
_STEPS: dict[str, type[Step]] = {}
STEPS: Mapping[str, type[Step]] = MappingProxyType(_STEPS)
"""Registered step classes by name."""


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` (a frozen dataclass subclass of ``Step``) known by its ``name``
    to ``Step.from_dict``, ``parse_steps``, recipes and ``lowbit.load``.

    Raises:
        TypeError: not a frozen dataclass subclass of Step.
        ValueError: a bad or taken name, an unknown phase, a field called ``name``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Step) and dataclasses.is_dataclass(cls)
            and cls.__dataclass_params__.frozen):
        raise TypeError(f"register_step takes a frozen dataclass subclass of Step, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be an identifier (its name in recipes), got {name!r}")
    if _STEPS.get(name, cls) is not cls:
        raise ValueError(f"algorithm name {name!r} is taken by {_STEPS[name].__qualname__}; give "
                         f"{cls.__qualname__} another name")
    if cls.phase not in PHASES:
        raise ValueError(f"{cls.__name__}.phase must be one of {PHASES}, got {cls.phase!r}")
    if "name" in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"{cls.__name__} has a field called 'name', which to_dict uses for the algorithm")
    _STEPS[name] = cls
    return cls


def step_class(name: object) -> type[Step]:
    """The registered step class called ``name``; ValueError naming the known ones."""
    if isinstance(name, str) and name in _STEPS:
        return _STEPS[name]
    close = difflib.get_close_matches(str(name), list(_STEPS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown algorithm {name!r}{hint} (known: {', '.join(_STEPS)}; register your own "
                     "with lowbit.ptq.register_step)")


# -- checks used by the steps' __post_init__ ---------------------------------------------------
def _check_bool(step: Step, field: str) -> None:
    if not isinstance(getattr(step, field), bool):
        raise TypeError(f"{type(step).__name__}.{field} must be true or false, got {getattr(step, field)!r}")


def _check_int(step: Step, field: str, low: int) -> None:
    value = getattr(step, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{type(step).__name__}.{field} must be an integer >= {low}, got {value!r}")


def _check_number(step: Step, field: str, low: float, high: float, *, open_low: bool = False) -> None:
    """``field`` is a number in [low, high] (or (low, high]), stored as a float."""
    value = getattr(step, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (low < value if open_low else low <= value) or not value <= high:
        span = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ValueError(f"{type(step).__name__}.{field} must be a number in {span}, got {value!r}")
    object.__setattr__(step, field, float(value))  # 1 and 1.0 write and replay alike


# -- lowbit's steps ----------------------------------------------------------------------------
@register_step
@dataclass(frozen=True, kw_only=True)
class FoldBatchNorm(Step):
    """Fold eval-mode BatchNorm into the Conv / Linear before it (``passes.fold_batchnorm``).
    Report: the names of the BatchNorms folded (each now an ``nn.Identity``)."""

    name = "fold_bn"

    def run(self, model, ctx):
        return passes.fold_batchnorm(model)

    def rebuild(self, model, report):
        return passes.fold_batchnorm(model)[0]  # (removes the BatchNorms; a bias-free conv gains one)


@register_step
@dataclass(frozen=True, kw_only=True)
class CLE(Step):
    """Cross-layer equalization (Nagel et al. 2019; ``passes.cross_layer_equalize``): balances the
    per-channel weight ranges of consecutive layers.  Run it after FoldBatchNorm.
    ``relu6_to_relu`` also crosses ReLU6 by turning it into ReLU (changes the float model).
    Report: the equalized ``[first, second]`` layer pairs."""

    name = "cle"
    relu6_to_relu: bool = False
    iterations: int = 50
    tol: float = 1e-3

    def __post_init__(self) -> None:
        _check_bool(self, "relu6_to_relu")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"CLE.iterations must be an integer >= 1, got {self.iterations!r}")
        _check_number(self, "tol", 0.0, float("inf"), open_low=True)

    def run(self, model, ctx):
        model, pairs = passes.cross_layer_equalize(model, relu6_to_relu=self.relu6_to_relu,
                                                   iterations=self.iterations, tol=self.tol)
        return model, [list(pair) for pair in pairs]

    def rebuild(self, model, report):
        if self.relu6_to_relu:  # ReLU6 -> ReLU changes the tree; the weights are loaded anyway
            model, _ = passes.cross_layer_equalize(model, relu6_to_relu=True, iterations=1)
        return model


@register_step
@dataclass(frozen=True, kw_only=True)
class SmoothQuant(Step):
    """SmoothQuant (Xiao et al. 2023; ``passes.smooth_quant``): moves activation outliers into the
    weights with migration strength ``alpha`` in [0, 1]; ``insert_scales`` smooths also inputs no
    layer can absorb ``1 / s`` into (one float Mul each in ONNX).  Reads the calibration data once.
    Report: a ``SmoothReport``."""

    name = "smoothquant"
    needs_data = True
    alpha: float = 0.8
    insert_scales: bool = True

    def __post_init__(self) -> None:
        _check_number(self, "alpha", 0.0, 1.0)
        _check_bool(self, "insert_scales")

    def run(self, model, ctx):
        return model, passes.smooth_quant(model, ctx.calib_data, alpha=self.alpha, insert_scales=self.insert_scales)

    def rebuild(self, model, report):
        if report is not None:
            insert_smoothed_inputs(model, [g.consumers for g in report.inserted])
        return model

    def report_to_json(self, report):
        return None if report is None else dataclasses.asdict(report)

    def report_from_json(self, data):
        if data is None:
            return None
        groups = {k: [SmoothedGroup(**{**g, "consumers": tuple(g["consumers"])}) for g in data[k]]
                  for k in ("folded", "inserted", "left")}
        return SmoothReport(**{**data, **groups})


@register_step
@dataclass(frozen=True, kw_only=True)
class BiasCorrection(Step):
    """Empirical bias correction (``passes.correct_bias``) on the calibrated model: each layer's
    mean output error removed from its bias.  ``reference``: ``"layer"`` (one pass, each layer's
    own error) or ``"model"`` (against the float model, one pass per layer).
    Report: the corrected layers' names."""

    name = "bias_correction"
    phase = CALIBRATED
    needs_data = True
    reference: str = "layer"

    def __post_init__(self) -> None:
        if self.reference not in ("layer", "model"):
            raise ValueError(f"BiasCorrection.reference must be 'layer' or 'model', got {self.reference!r}")

    def run(self, model, ctx):
        return passes.correct_bias(None, model, ctx.calib_data, reference=self.reference)


@register_step
@dataclass(frozen=True, kw_only=True)
class RangeSearch(Step):
    """Loss-aware range search (``lowbit.ptq.range_search``) on the calibrated model: each static
    activation range, in graph order, set to the candidate (the calibrated range scaled by
    2**(k/2), ``|k| <= reach``, or the whole observed range) whose model output on the first
    ``batches`` calibration items is closest to the float model's, by ``objective`` ("mse" or
    "kl", for logits); those batches' intermediate values are held in memory.  Run it before BiasCorrection, which then corrects the chosen ranges' error.
    Report: ``{"objective", "error_before", "error_after", "changed": {quantizer: factor}}``."""

    name = "range_search"
    phase = CALIBRATED
    needs_data = True
    ranges_only = True
    batches: int = 2
    reach: int = 2
    objective: str = "mse"

    def __post_init__(self) -> None:
        _check_int(self, "batches", 1)
        _check_int(self, "reach", 1)
        if self.objective not in ("mse", "kl"):
            raise ValueError(f"RangeSearch.objective must be 'mse' or 'kl', got {self.objective!r}")

    def run(self, model, ctx):
        from .range_search import search_ranges

        return model, search_ranges(model, ctx.calib_data, batches=self.batches, reach=self.reach,
                                    objective=self.objective, progress=ctx.progress)


@register_step
@dataclass(frozen=True, kw_only=True)
class AdaRound(Step):
    """AdaRound (Nagel et al. 2020; ``lowbit.ptq.adaround``) on the calibrated model: each gemm /
    conv layer's weights rounded up or down, layer by layer, so that its output on the first
    ``batches`` calibration items stays close to the float output; the rounding is written into
    the weights (export, save and load are unchanged).  ``iterations`` Adam steps per layer
    (learning rate ``lr``) on ``batch_size`` rows each, regulariser weight ``reg_weight`` after
    the first ``warmup`` of them; ``sequential``: inputs from the quantized model (the layers
    before already rounded) or, False, from the float model.  Run it before BiasCorrection.
    Report: ``{layer: {"loss_nearest", "loss_adaround", "changed"}}`` (output MSE on the rows fitted)."""

    name = "adaround"
    phase = CALIBRATED
    needs_data = True
    iterations: int = 200
    reg_weight: float = 0.01
    batch_size: int = 256
    batches: int = 4
    sequential: bool = True
    lr: float = 0.01
    warmup: float = 0.2

    def __post_init__(self) -> None:
        for field in ("iterations", "batch_size", "batches"):
            _check_int(self, field, 1)
        _check_number(self, "reg_weight", 0.0, float("inf"))
        _check_bool(self, "sequential")
        _check_number(self, "lr", 0.0, float("inf"), open_low=True)
        _check_number(self, "warmup", 0.0, 1.0)

    def run(self, model, ctx):
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return model, adaround(model, ctx.calib_data, **options)


# -- lists of steps ----------------------------------------------------------------------------
def check_order(steps: Sequence[Step]) -> None:
    """ValueError when a step comes after one of a later phase (see the module docstring)."""
    latest = None
    for step in steps:
        if latest is not None and PHASES.index(step.phase) < PHASES.index(latest.phase):
            raise ValueError(
                f"algorithms out of order: {step} runs {_WHERE[step.phase]}, so it cannot come after {latest}, "
                f"which runs {_WHERE[latest.phase]}; list the {step.phase} steps first")
        if latest is None or PHASES.index(step.phase) > PHASES.index(latest.phase):
            latest = step


def steps_from_flags(*, fold_bn: bool = True, equalize: bool = False, equalize_relu6: bool = False,
                     smoothquant: float | None = None, bias_correction: bool = False) -> tuple[Step, ...]:
    """The steps ``quantize``'s keyword flags stand for, in the order it has always run them."""
    steps: list[Step] = [FoldBatchNorm()] if fold_bn else []
    if equalize or equalize_relu6:
        steps.append(CLE(relu6_to_relu=equalize_relu6))
    if smoothquant is not None:
        steps.append(SmoothQuant(alpha=smoothquant))
    if bias_correction:
        steps.append(BiasCorrection())
    return tuple(steps)


__all__ = ["CALIBRATED", "CLE", "FLOAT", "PHASES", "STEPS", "AdaRound", "BiasCorrection", "FoldBatchNorm",
           "RangeSearch", "SmoothQuant", "Step", "StepContext", "check_order", "register_step", "step_class", "steps_from_flags"]
