"""Mixed precision: a choice (bit width or float) per layer, the least predicted error under a budget.

Each decision layer ``l`` (``_layers.decision_layers``) gets one of the ``choices``; the error of
an assignment is predicted as the sum of per-layer costs from a sensitivity analysis
(``SensitivityReport.cost``, additive; float costs 0), and the cheapest assignment within the
budget is found exactly by an integer program (``_solver``).  The budget is one of:

* ``avg_weight_bits``: the parameter-weighted mean of the decision layers' weight bits,
  ``sum params_l * bits_l / sum params_l``; a float layer counts 32 bits.  Only the decision
  layers (Linear, Conv ...) count: an LLM's token embedding (int8 under the LLM presets) and the
  group scales do not, while ``lm_head`` does (NNCF's ``ratio`` counts the block linears only).
* ``size_mb``: megabytes (1e6 bytes) of the weights: each decision layer's weight at its bits
  (4-bit weights counted packed, 4 bits each, although the ONNX file stores them in int8
  containers; float 32), plus every other parameter of the model (biases, norms, embedding
  tables ...) at 32 bits, except embedding tables the ``base`` choice quantizes, at its bits.
  Buffers (BatchNorm statistics) are not counted.
* ``latency_ratio``: the predicted ONNX Runtime latency of the exported file (``_latency``),
  relative to the same model with every layer at ``w8a8`` (uniform INT8).  The prediction adds
  per-layer times measured in uniform files: it holds for integer choices mixed together (within
  the run-to-run noise on the tests' net), and is a lower bound where an integer layer feeds a
  float one (ORT then runs that layer in float behind DequantizeLinear, and changes layouts).

    result = mixed_precision(model, calib, ("w4a8", "w8a8", None), {"avg_weight_bits": 5.0})
    qmodel = lowbit.quantize(model, calib, config=result.config)      # the mixed model
    print(result.to_markdown())                                       # bits per layer, the front
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from ..config import QuantConfig
from ..nn.registry import kind_of
from ..targets import resolve_target
from . import _solver
from ._latency import LatencyTable, latency_table
from ._layers import (
    FLOAT_BITS,
    Choice,
    assignment_config,
    choice_config,
    choice_name,
    decision_layers,
    layer_quant,
    weight_bits,
    weight_count,
)
from ._measure import check_budget
from .result import JsonFile, SensitivityReport

log = logging.getLogger(__name__)

LATENCY_REFERENCE = "w8a8"  # latency_ratio is relative to every layer at this choice
DEFAULT_BUDGET = MappingProxyType({"avg_weight_bits": 5.0})
FORMAT = "lowbit.MixedPrecisionResult"
VERSION = 1


@dataclass
class LayerInfo:
    """One decision layer: its size and its weight bits under each choice (by name)."""

    name: str
    kind: str
    params: int
    bits: dict[str, int]


@dataclass
class FrontPoint:
    """One non-dominated assignment: its predicted error and resources (every budget kind known)."""

    error: float
    resources: dict[str, float]
    assignment: dict[str, str]


@dataclass
class MixedPrecisionResult(JsonFile):
    """What ``mixed_precision`` chose, and the trade-off it chose from.

    ``config`` builds the model: ``lowbit.quantize(model, calib, config=result.config)``.
    ``predicted`` holds the error (sum of the chosen costs) and every resource of the
    assignment; ``front`` the non-dominated (resource, error) points of the budget's kind.
    """

    config: QuantConfig
    assignment: dict[str, str]  # layer -> choice name
    budget: dict[str, float]  # {kind: value}
    predicted: dict[str, float]
    front: list[FrontPoint]
    choices: list[str]
    base: str
    layers: list[LayerInfo]
    sensitivities: dict[str, SensitivityReport] = field(default_factory=dict)
    latency: LatencyTable | None = None
    seconds: float = 0.0

    # -- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "config": self.config.to_dict(),
                "assignment": self.assignment, "budget": self.budget, "predicted": self.predicted,
                "front": [asdict(p) for p in self.front], "choices": self.choices, "base": self.base,
                "layers": [asdict(layer) for layer in self.layers],
                "sensitivities": {k: r.to_dict() for k, r in self.sensitivities.items()},
                "latency": None if self.latency is None else self.latency.to_dict(), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: Mapping) -> MixedPrecisionResult:
        data = dict(data)
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"not a lowbit mixed-precision result (missing format: {FORMAT})")
        if data.pop("version", None) != VERSION:
            raise ValueError(f"mixed-precision result version is not {VERSION}")
        latency = data.pop("latency")
        return cls(config=QuantConfig.from_dict(data.pop("config")),
                   front=[FrontPoint(**p) for p in data.pop("front")],
                   layers=[LayerInfo(**layer) for layer in data.pop("layers")],
                   sensitivities={k: SensitivityReport.from_dict(r) for k, r in data.pop("sensitivities").items()},
                   latency=None if latency is None else LatencyTable.from_dict(latency), **data)

    def to_markdown(self) -> str:
        """The budget and prediction, a table of the layers' choices, and the front."""
        (kind, value), = self.budget.items()
        costs = {c: r.costs() for c, r in self.sensitivities.items()}
        title = (f"Mixed precision: {kind} <= {value:g}, choices {', '.join(self.choices)}, base {self.base}; "
                 f"predicted {_pairs(self.predicted)}")
        lines = [title, "",
                 "| layer | kind | params | choice | weight bits | cost |", "|---|---|---|---|---|---|"]
        for layer in self.layers:
            c = self.assignment[layer.name]
            cost = 0.0 if c == "float" else costs.get(c, {}).get(layer.name)
            lines.append(f"| {layer.name} | {layer.kind} | {layer.params} | {c} | {layer.bits[c]} | {_num(cost)} |")
        keys = sorted({k for p in self.front for k in p.resources}, key=lambda k: (k != kind, k))
        lines += ["", f"Pareto front ({len(self.front)} points, by {kind})", "",
                  "| " + " | ".join([*keys, "error", "layers per choice"]) + " |", "|---" * (len(keys) + 2) + "|"]
        for p in self.front:
            counts = ", ".join(f"{c}: {list(p.assignment.values()).count(c)}" for c in self.choices)
            lines.append("| " + " | ".join([*(_num(p.resources[k]) for k in keys), _num(p.error), counts]) + " |")
        return "\n".join(lines)


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _pairs(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


# -- the problem --------------------------------------------------------------------------------
def _layer_infos(model: nn.Module, layers: Sequence[str], choices: Sequence[Choice], target) -> list[LayerInfo]:
    configs = {choice_name(c): choice_config(c, target) for c in choices}
    infos = []
    for name in layers:
        module = model.get_submodule(name)
        bits = {c: weight_bits(layer_quant(cfg, name, module)) for c, cfg in configs.items()}
        infos.append(LayerInfo(name=name, kind=type(module).__name__, params=weight_count(module), bits=bits))
    return infos


def _other_megabytes(model: nn.Module, layers: Sequence[str], base: Choice, target) -> float:
    """Every parameter but the decision layers' weights, at 32 bits; embedding tables (any
    registered non-contraction kind) the base quantizes at its bits.  MB = 1e6 bytes."""
    decided = {id(model.get_submodule(name).weight) for name in layers}
    base_config = choice_config(base, target)
    bits = 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in decided:
                continue
            kind = kind_of(module)
            quantized = pname == "weight" and kind is not None and not kind.contracts
            bits += p.numel() * (weight_bits(layer_quant(base_config, name, module)) if quantized else FLOAT_BITS)
    return bits / 8 / 1e6


@dataclass
class _Resources:
    """Per-layer resource matrices ``(layers, choices)`` and constant offsets, by budget kind:
    an assignment's value is ``offset + sum matrix[l, choice_l]``."""

    matrix: dict[str, np.ndarray]
    offset: dict[str, float]

    def value(self, kind: str, choice: Sequence[int]) -> float:
        return self.offset[kind] + float(self.matrix[kind][np.arange(len(choice)), choice].sum())

    def values(self, choice: Sequence[int]) -> dict[str, float]:
        return {k: self.value(k, choice) for k in self.matrix}


def _resources(model, infos: list[LayerInfo], names: list[str], base: str, base_choice: Choice,
               latency: LatencyTable | None, target) -> _Resources:
    params = np.array([i.params for i in infos], dtype=float)
    bits = np.array([[i.bits[c] for c in names] for i in infos], dtype=float)
    matrix = {"avg_weight_bits": params[:, None] * bits / max(params.sum(), 1.0),
              "size_mb": params[:, None] * bits / 8 / 1e6}
    offset = {"avg_weight_bits": 0.0,
              "size_mb": _other_megabytes(model, [i.name for i in infos], base_choice, target)}
    if latency is not None:
        missing = [c for c in dict.fromkeys([*names, base, LATENCY_REFERENCE]) if c not in latency.other]
        missing += [i.name for i in infos if i.name not in latency.per_layer]
        if missing:
            raise ValueError(f"the latency table lacks {missing} (it needs every choice, the base {base!r}, "
                             f"{LATENCY_REFERENCE!r} to divide by, and every decision layer)")
        reference = latency.uniform(LATENCY_REFERENCE)
        matrix["latency_ratio"] = np.array([[latency.per_layer[i.name][c] for c in names] for i in infos]) / reference
        offset["latency_ratio"] = latency.other[base] / reference
    return _Resources(matrix, offset)


def _costs(sensitivities: Mapping[str, SensitivityReport], layers: Sequence[str], names: Sequence[str]) -> np.ndarray:
    costs = np.zeros((len(layers), len(names)))
    for j, c in enumerate(names):
        if c == "float":
            continue
        if c not in sensitivities:
            raise ValueError(f"no sensitivity report for choice {c!r}; sensitivities has {sorted(sensitivities)}")
        found = sensitivities[c].costs()
        missing = [layer for layer in layers if layer not in found]
        if missing:
            raise ValueError(f"the {c!r} sensitivity report has no row for layer(s) {missing[:5]}")
        costs[:, j] = [found[layer] for layer in layers]
    return costs


def _default_base(infos: list[LayerInfo], choices: Sequence[Choice]) -> Choice:
    """The non-float choice with the most (parameter-weighted) weight bits; float if none."""
    quantized = [c for c in choices if c is not None]
    if not quantized:
        return None
    total = max(sum(i.params for i in infos), 1)
    return max(quantized, key=lambda c: sum(i.params * i.bits[choice_name(c)] for i in infos) / total)


def _first_batch(calib_data):
    """The first calibration item cut to one sample (tensor, tuple of tensors or dict)."""
    item = calib_data if isinstance(calib_data, torch.Tensor) else next(iter(calib_data))
    if isinstance(item, torch.Tensor):
        return item[:1]
    if isinstance(item, Mapping):
        return {k: v[:1] for k, v in item.items()}
    return tuple(t[:1] for t in item)


def _method(model: nn.Module, method: str) -> str:
    """``"auto"``: ``"reconstruction"`` for a causal LM (one streamed pass of its blocks), else ``"sqnr"``."""
    if method != "auto":
        return method
    from ._llm_sensitivity import is_causal_lm

    return "reconstruction" if is_causal_lm(model) else "sqnr"


def _sensitivities(model, calib_data, choices, method, target, given, options) -> dict[str, SensitivityReport]:
    reports = dict(given or {})
    todo = [c for c in choices if c is not None and choice_name(c) not in reports]
    if todo and method == "reconstruction":  # every choice from one pass of the blocks
        from ._llm_sensitivity import reconstruction_sensitivities

        log.info("sensitivity of %s (reconstruction)", ", ".join(choice_name(c) for c in todo))
        reports.update(reconstruction_sensitivities(model, calib_data, todo, target=target, **options))
    elif todo:
        from ._sensitivity import sensitivity

        for c in todo:
            log.info("sensitivity of %s (%s)", choice_name(c), method)
            reports[choice_name(c)] = sensitivity(model, calib_data, config=c, method=method, target=target, **options)
    return reports


def mixed_precision(model: nn.Module, calib_data, choices: Sequence[Choice] = ("w4a8", "w8a8", None),
                    budget: Mapping[str, float] = DEFAULT_BUDGET, *, method: str = "auto",
                    sensitivities: Mapping[str, SensitivityReport] | None = None,
                    latency: LatencyTable | None = None, example_inputs=None, target="auto",
                    base: Choice = None, front_points: int = 12,
                    **sensitivity_options) -> MixedPrecisionResult:
    """Pick a choice per decision layer: the least predicted error within ``budget``.

    Args:
        model: the float model (not changed).
        calib_data: calibration batches, as ``lowbit.quantize`` takes them (also used by the
            sensitivity analysis and for the latency files).
        choices: what a layer may get: preset names, ``QuantConfig`` s, None (float).  A
            choice means its config's answer for each layer with ``@first`` / ``@last`` dropped.
        budget: exactly one of ``{"avg_weight_bits": b}``, ``{"size_mb": mb}``,
            ``{"latency_ratio": r}`` (see the module docstring).
        method: the sensitivity method for the costs (``"sqnr"``, ``"ablation"``, ``"hessian"``,
            ``"reconstruction"``: causal LMs, every choice from one streamed pass of the decoder
            blocks, ``_llm_sensitivity``); ``"auto"``: ``"reconstruction"`` for a causal LM, else
            ``"sqnr"``.
        sensitivities: ``{choice name: SensitivityReport}`` to use instead of analysing (any
            choice left out is analysed with ``lowbit.sensitivity``).
        latency: a ``LatencyTable`` (``_latency.latency_table``) for ``latency_ratio``; measured
            when None and the budget needs it.  Its columns must include every choice, the base
            and ``w8a8``.
        example_inputs: the inputs the latency files are timed on (default: the first
            calibration item, one sample).
        target: the integer target (``lowbit.targets``) the configs are fitted to.
        base: the choice the non-decision layers (embeddings, residual adds, pools) follow;
            None: the non-float choice with the most weight bits; ``"float"``: float.
        front_points: budgets swept for the Pareto front.
        **sensitivity_options: passed to ``sensitivity`` (``batches``, ``eval_fn`` ...).

    Returns:
        A ``MixedPrecisionResult``; ``lowbit.quantize(model, calib, config=result.config)``
        builds the mixed model.

    Raises:
        ValueError: a budget that is not one known kind, or that no assignment fits (the
            message gives the smallest achievable value).

    Example:
        >>> result = mixed_precision(model, calib, ("w4a8", "w8a8"), {"avg_weight_bits": 5.0})
        >>> qmodel = lowbit.quantize(model, calib, config=result.config)
    """
    start = time.perf_counter()
    kind, value = check_budget(budget)
    target = resolve_target(target)
    if not isinstance(calib_data, torch.Tensor | Sequence) and iter(calib_data) is calib_data:
        calib_data = list(calib_data)  # a one-shot iterator: read by every analysis and calibration
    model.eval()
    choices, layers = list(choices), decision_layers(model)
    names = [choice_name(c) for c in choices]
    if not choices or len(set(names)) != len(names):
        raise ValueError(f"choices must be distinct and at least one, got {names}")
    infos = _layer_infos(model, layers, choices, target)
    base_choice = _default_base(infos, choices) if base is None else None if base == "float" else base
    base_name = choice_name(base_choice)
    if kind == "latency_ratio" and latency is None:
        measured = {choice_name(c): c for c in [*choices, base_choice, LATENCY_REFERENCE]}
        example = _first_batch(calib_data) if example_inputs is None else example_inputs
        latency = latency_table(model, calib_data, list(measured.values()), example, target=target)
    resources = _resources(model, infos, names, base_name, base_choice, latency, target)
    matrix, offset = resources.matrix[kind], resources.offset[kind]
    smallest = offset + _solver.smallest_resource(matrix)
    if value < smallest - 1e-9 * max(1.0, abs(smallest)):  # before the (slow) sensitivity analyses
        raise _solver.InfeasibleBudget(value, smallest, f"no assignment of {names} fits {kind} <= {value:g}: the "
                                       f"smallest achievable {kind} is {smallest:.4g}")
    reports = _sensitivities(model, calib_data, choices, _method(model, method), target, sensitivities,
                             sensitivity_options)
    costs = _costs(reports, layers, names)
    best = _solver.solve(costs, matrix, value - offset)
    front = [FrontPoint(error=p.error, resources=resources.values(p.choice),
                        assignment=dict(zip(layers, (names[j] for j in p.choice))))
             for p in _solver.pareto_front(costs, matrix, front_points)]
    assignment = dict(zip(layers, (names[j] for j in best.choice)))
    config = assignment_config(model, {layer: choices[j] for layer, j in zip(layers, best.choice)},
                               base_choice, target, name="mixed")
    return MixedPrecisionResult(
        config=config, assignment=assignment, budget={kind: value},
        predicted={"error": best.error, **resources.values(best.choice)}, front=front, choices=names,
        base=base_name, layers=infos, sensitivities=reports, latency=latency,
        seconds=time.perf_counter() - start)
