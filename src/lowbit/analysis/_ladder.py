"""The rungs of ``autoquant``, each a method of ``Ladder`` that tries candidates from the best so far.

A candidate is quantized, evaluated with the user's ``eval_fn``, sized from its quantizers and,
with example inputs, exported and timed in ONNX Runtime; ``Ladder._try`` does all of it, so
every rung's figures are measured the same way.  Within a rung candidates go cheapest first
and the rung stops at the first that meets the target.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig, Rule, get_config
from ..ptq import STEPS, quantize
from ..targets import resolve_target
from ._autoquant import AutoQuantResult, Rung
from ._layers import FLOAT_BITS, assignment_config, choice_name
from ._measure import Deployed, footprint
from ._solver import InfeasibleBudget

log = logging.getLogger(__name__)

LATENCY_NOISE = 0.05  # run-to-run spread of a median ORT latency on a busy 2-core machine
UNIFORM_RUNGS = ("ptq", "ranges", "algorithms")  # every layer quantized alike
OBSERVERS = ("percentile", "entropy", "minmax", "mse")  # the ranges rung tries these, in order
ALGORITHM_LISTS = (("cle",), ("bias_correction",), ("smoothquant",), ("cle", "bias_correction"))
QAT_TRAINING = {"weight_decay": 0.0, "distill_weight": 0.5, "temperature": 2.0, "seed": 0}


@dataclass
class _Candidate:
    row: Rung
    model: nn.Module | None  # dropped (None) once a better candidate makes it useless
    config: QuantConfig
    algorithms: tuple  # the steps that ran (lowbit_summary.algorithms), () for QAT
    training: dict | None = None  # QAT settings when trained
    float_kernels: tuple[str, ...] = ()  # quantized layers that ONNX Runtime runs in float all the same


class Ladder:
    """One autoquant run: the FP32 reference, the candidates tried, the rungs."""

    def __init__(self, model: nn.Module, calib_data: Iterable, eval_fn: Callable, max_drop: float, *,
                 budget: tuple[str, float] | None, train_data, config, deployed: Deployed | None, loss_fn,
                 qat_epochs: int, qat_lr: float, max_float_layers: int | None, target: str, progress: bool):
        self.model, self.eval_fn, self.max_drop, self.budget = model.eval(), eval_fn, max_drop, budget
        self.calib = calib_data if iter(calib_data) is not calib_data else list(calib_data)
        self.train_data, self.config, self.deployed = train_data, get_config(config), deployed
        self.loss_fn, self.qat_epochs, self.qat_lr = loss_fn or F.cross_entropy, qat_epochs, qat_lr
        self.max_float_layers, self.progress = max_float_layers, progress
        self.target = resolve_target(target)
        self.candidates: list[_Candidate] = []
        self.reference_ms: float | None = None
        self.sensitivity = self.mixed_result = None
        self.tmp = ""
        self.notes: list[str] = []  # rungs that could not run, and why (said in the reason)
        with torch.no_grad():
            self.fp32_metric = float(eval_fn(self.model))

    # -- one candidate ---------------------------------------------------------------------
    def _evaluate(self, rung: str, tried: str, qmodel: nn.Module, config: QuantConfig, start: float, *,
                  training: dict | None = None, note: str = "") -> _Candidate:
        qmodel.eval()
        with torch.no_grad():
            metric = float(self.eval_fn(qmodel))
        fp = footprint(qmodel)
        row = Rung(rung=rung, tried=tried, metric=metric, drop=self.fp32_metric - metric,
                   avg_weight_bits=fp["avg_weight_bits"], size_mb=fp["size_mb"], note=note)
        if self.deployed is not None:
            measured = self.deployed.measure(qmodel, self.tmp, f"candidate{len(self.candidates)}")
            row.onnx_mb, row.latency_ms = measured["onnx_mb"], measured["latency_ms"]
            if self.reference_ms:
                row.latency_ratio = row.latency_ms / self.reference_ms
        row.within_budget = self._fits(row)
        row.met = row.drop <= self.max_drop and row.within_budget
        row.seconds = time.perf_counter() - start
        algorithms = tuple(getattr(getattr(qmodel, "lowbit_summary", None), "algorithms", ()))
        layers = getattr(getattr(qmodel, "lowbit_summary", None), "layers", None)
        cand = _Candidate(row, qmodel, config, algorithms if training is None else (), training,
                          tuple(getattr(layers, "float_kernels", {})))
        self.candidates.append(cand)
        log.info("autoquant %s: %s -> metric %.4f (drop %.4f), %.2f bits%s", rung, tried, metric, row.drop,
                 row.avg_weight_bits, "" if row.latency_ms is None else f", {row.latency_ms:.2f} ms")
        self._drop_unused_models()
        return cand

    def _try(self, rung: str, tried: str, config: QuantConfig, algorithms=None) -> _Candidate:
        start = time.perf_counter()
        qmodel = quantize(self.model, self.calib, config, algorithms=algorithms, target=self.target,
                          progress=self.progress)
        return self._evaluate(rung, tried, qmodel, config, start)

    def _fits(self, row: Rung) -> bool:
        if self.budget is None:
            return True
        key, limit = self.budget
        value = getattr(row, key)
        # A latency is a measurement: within LATENCY_NOISE of the limit counts as within it, or a
        # file with the reference's very kernels would miss a ratio of 1.0 half of the time.
        slack = LATENCY_NOISE if key == "latency_ratio" else 1e-9
        return value is not None and value <= limit * (1 + slack)

    def _excess(self, row: Rung) -> float:
        """How far over budget, as a fraction of the budget (0 within it)."""
        if self.budget is None or self._fits(row):
            return 0.0
        key, limit = self.budget
        value = getattr(row, key)
        return math.inf if value is None else value / limit - 1

    def _rank(self, cand: _Candidate) -> tuple:
        """Sort key, best first: candidates that met the target, the fewest weight bits first (the
        mixed and selective rungs' cheaper points), then the highest metric; then the others,
        within budget (else the least excess) and by metric."""
        row = cand.row
        if row.met:
            return (0, round(row.avg_weight_bits, 6), -row.metric)
        return (1, self._excess(row), -row.metric)

    def best(self, *, ptq_only: bool = False, uniform: bool = False) -> _Candidate:
        """The best candidate so far (``_rank``); ``ptq_only``: not trained; ``uniform``: from the
        rungs that quantize every layer alike (ptq, ranges, algorithms), the base of the rungs
        that decide per layer."""
        pool = [c for c in self.candidates if c.model is not None and not (ptq_only and c.training)
                and not (uniform and c.row.rung not in UNIFORM_RUNGS)]
        return min(pool, key=self._rank)

    def _drop_unused_models(self) -> None:
        keep = {id(self.best()), id(self.best(ptq_only=True)), id(self.best(uniform=True))}
        for c in self.candidates:
            if id(c) not in keep:
                c.model = None

    def _met_in(self, rung: str) -> bool:
        return any(c.row.met for c in self.candidates if c.row.rung == rung)

    # -- the rungs --------------------------------------------------------------------------
    def ptq(self) -> None:
        self._try("ptq", f"{self.config.name} as it is", self.config)

    def ranges(self) -> None:
        base = self.best(ptq_only=True)
        current = getattr(base.config.default.input if base.config.default else None, "observer", None)
        for observer in OBSERVERS:
            if observer != current and not self._met_in("ranges"):
                config = dataclasses.replace(base.config.with_observer(observer), name=f"{base.config.name}-{observer}")
                self._try("ranges", f"{base.config.name}, activation ranges by {observer}", config,
                          _user_steps(base.algorithms))

    def algorithms(self) -> None:
        base = self.best(ptq_only=True)
        tried = []
        for names in ALGORITHM_LISTS:
            if not self._met_in("algorithms"):
                tried.append(self._try("algorithms", f"{_describe(base)} + {' + '.join(names)}", base.config,
                                       list(names)))
        # AdaRound (Nagel et al. 2020) is the fix for narrow weights, and costs minutes on a CNN:
        # tried only when some default weight has fewer than 8 bits.
        narrow = base.config.default is not None and base.config.default.weight is not None \
            and base.config.default.weight.spec.bits < 8
        if narrow and "adaround" in STEPS and not self._met_in("algorithms"):
            best = min(tried, key=self._rank) if tried else base
            names = [s for s in _user_steps(best.algorithms) if s != "bias_correction"]
            names += ["adaround"] + (["bias_correction"] if "bias_correction" in _user_steps(best.algorithms) else [])
            self._try("algorithms", f"{base.config.name} + {' + '.join(names)}", base.config, names)

    def selective(self) -> None:
        from ._sensitivity import is_switchable, sensitivity, switchable_steps

        base = self.best(uniform=True)
        # Measured on the model without the steps that tune layers for their quantized inputs
        # (bias correction, AdaRound): switched to float, a layer would keep their edits.
        switchable = switchable_steps(base.algorithms)
        reuse = all(is_switchable(step) for step in base.algorithms)
        report = sensitivity(self.model, self.calib, config=base.config, method="sqnr",
                             qmodel=base.model if reuse else None, algorithms=switchable, target=self.target)
        self.sensitivity = report
        ranked = [row.name for row in report.ranked()]
        limit = self.max_float_layers or max(1, len(ranked) // 4)
        k = 1
        while k <= min(limit, len(ranked)) and not self._met_in("selective"):
            names = ranked[:k]
            shown = ", ".join(names[:4]) + (f" and {k - 4} more" if k > 4 else "")
            cand = self._try("selective", f"{_describe(base)}, {k} most sensitive layer(s) float: {shown}",
                             base.config.with_rules(*(Rule.exact(n, None) for n in names)),
                             _user_steps(base.algorithms))
            # A quantized conv whose consumers now stay float runs in float in ONNX Runtime anyway
            # (no QuantizeLinear follows it): keeping it float too costs no latency, only its noise.
            extra = [n for n in cand.float_kernels if n not in names]
            if extra and not cand.row.met:
                self._try("selective", f"{_describe(base)}, {k} most sensitive layer(s) float: {shown}; and "
                          f"{', '.join(extra)}, which ONNX Runtime would run in float anyway",
                          base.config.with_rules(*(Rule.exact(n, None) for n in (*names, *extra))),
                          _user_steps(base.algorithms))
            k *= 2

    def mixed(self) -> None:
        """Mixed precision among the best config, its 8-bit-weight variant and float: the cheapest
        point of the solver's Pareto front that meets the target, found by bisection (the point
        with the least predicted error within the budget first; if even it misses, so do the rest)."""
        from .mixed import mixed_precision

        base = self.best(uniform=True)
        choices = _mixed_choices(base.config)
        by_name = {choice_name(c): c for c in choices}
        # the selective rung's analysis holds for this config when it has no position rules
        reuse = self.sensitivity is not None and base.config.without_positions() == base.config
        given = {base.config.name: self.sensitivity} if reuse else {}
        key, limit = self.budget if self.budget else ("avg_weight_bits", float(FLOAT_BITS))
        budget = {key: limit * (1 + LATENCY_NOISE) if key == "latency_ratio" else limit}  # as _fits reads it
        example = None if self.deployed is None else self.deployed.example_inputs
        try:
            result = mixed_precision(self.model, self.calib, choices, budget, sensitivities=given,
                                     target=self.target, base=base.config, example_inputs=example)
        except InfeasibleBudget as exc:
            self.notes.append(f"mixed: {exc}")
            log.info("autoquant mixed: %s", exc)
            return
        self.mixed_result = result
        front = sorted((p for p in result.front if p.resources[key] <= budget[key] * (1 + 1e-9)),
                       key=lambda p: p.resources[key])
        lo, hi = 0, len(front) - 1
        tried_hi = False
        while front and lo <= hi:
            mid = hi if not tried_hi else (lo + hi) // 2
            point = front[mid]
            config = assignment_config(self.model, {n: by_name[c] for n, c in point.assignment.items()}, base.config,
                                       self.target, name=f"mixed-{base.config.name}")
            counts = ", ".join(f"{sum(c == name for c in point.assignment.values())} {name}" for name in by_name)
            cand = self._try("mixed", f"{_describe(base)} mixed ({counts}; predicted {key} "
                             f"{point.resources[key]:.3g})", config, _user_steps(base.algorithms))
            if not tried_hi and not cand.row.met:
                return  # the least predicted error within budget misses: cheaper points will too
            tried_hi = True
            hi, lo = (mid - 1, lo) if cand.row.met else (hi, mid + 1)

    def qat(self) -> None:
        from ..qat import fit, prepare_qat

        base = self.best(ptq_only=True)
        start = time.perf_counter()
        qmodel = prepare_qat(self.model, base.config, self.calib, target=self.target, progress=self.progress)
        teacher = copy.deepcopy(self.model).eval()
        fit(qmodel, self.train_data, self.loss_fn, epochs=self.qat_epochs, lr=self.qat_lr, teacher=teacher,
            weight_decay=QAT_TRAINING["weight_decay"], distill_weight=QAT_TRAINING["distill_weight"],
            temperature=QAT_TRAINING["temperature"], seed=QAT_TRAINING["seed"], progress=self.progress)
        training = {"epochs": self.qat_epochs, "lr": self.qat_lr, **QAT_TRAINING}
        self._evaluate("qat", f"{base.config.name}, QAT {self.qat_epochs} epoch(s) distilled from FP32", qmodel,
                       base.config, start, training=training,
                       note="PTQ algorithms are not replayed in QAT" if _user_steps(base.algorithms) else "")

    # -- the climb --------------------------------------------------------------------------
    def climb(self, rungs: list[str]) -> AutoQuantResult:
        skipped = []
        with tempfile.TemporaryDirectory(prefix="lowbit-autoquant-") as tmp:
            self.tmp = tmp
            if self.budget is not None and self.budget[0] == "latency_ratio":
                self._reference_latency()
            for rung in rungs:
                if rung == "qat" and self.train_data is None:
                    skipped.append("qat (no train_data)")
                    continue
                log.info("autoquant: rung %s", rung)
                getattr(self, rung)()
                if self._met_in(rung):
                    break
        return self._result(skipped)

    def _reference_latency(self) -> None:
        qmodel = quantize(self.model, self.calib, "w8a8", target=self.target, progress=self.progress)
        self.reference_ms = self.deployed.measure(qmodel, self.tmp, "reference-w8a8")["latency_ms"]

    def _result(self, skipped: list[str]) -> AutoQuantResult:
        best = self.best()
        index = self.candidates.index(best)
        row = best.row
        budget = None if self.budget is None else {self.budget[0]: self.budget[1]}
        where = f"rung '{row.rung}' ({row.tried})"
        if row.met:
            reason = (f"{where} met the target: metric {row.metric:.4f}, drop {row.drop:.4f} <= {self.max_drop}"
                      + (f", within budget {budget}" if budget else "") + ".")
        else:
            fits = "within budget" if row.within_budget else f"over budget {budget} by {self._excess(row):.1%}"
            reason = (f"No rung met the target (drop <= {self.max_drop}{f' within {budget}' if budget else ''}). "
                      f"Returned the best trade-off found: {where}, metric {row.metric:.4f}, drop {row.drop:.4f}, "
                      f"{fits}.")
            if skipped:
                reason += f" Not tried: {', '.join(skipped)}."
            if self.notes:
                reason += " " + " ".join(n[0].upper() + n[1:] + "." for n in self.notes)
        return AutoQuantResult(model=best.model, config=best.config, recipe=self._recipe(best), steps=[
            c.row for c in self.candidates], chosen=index, met=row.met, reason=reason, fp32_metric=self.fp32_metric,
            max_drop=self.max_drop, budget=budget, sensitivity=self.sensitivity, mixed=self.mixed_result)

    def _recipe(self, cand: _Candidate) -> dict:
        """The chosen candidate as the CLI's recipe fields (without model and data)."""
        common = {"config": cand.config.to_dict(), "target": self.target.name}
        if cand.training is None:
            return {"command": "quantize", **common,
                    "options": {"algorithms": [s.to_dict() for s in cand.algorithms]}}
        return {"command": "qat", **common, "options": {"learn": "lsq", "fold_bn": True}, "training": cand.training}


def _mixed_choices(config: QuantConfig) -> tuple:
    """What the mixed rung lets a layer have: ``config``, the same with 8-bit weights where its
    default weights are narrower, and float."""
    weight = config.default.weight if config.default else None
    if weight is None or weight.spec.bits >= 8:
        return (config, None)
    wide = dataclasses.replace(weight, spec=dataclasses.replace(weight.spec, bits=8, narrow_range=True))
    widened = dataclasses.replace(config, name=f"{config.name}-w8",
                                  default=dataclasses.replace(config.default, weight=wide))
    return (config, widened, None)


def _user_steps(steps) -> list[str]:
    """Step names as a list quantize takes, BatchNorm folding left to quantize's default."""
    return [str(s) for s in steps if getattr(s, "name", s) != "fold_bn"]


def _describe(cand: _Candidate) -> str:
    steps = _user_steps(cand.algorithms)
    return cand.config.name + (f" + {' + '.join(steps)}" if steps else "")
