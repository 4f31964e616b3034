"""The weight-rounding steps for LLMs: ``RTN`` (round to nearest, named) and ``GPTQ``.

Registered with the other steps (``lowbit.ptq.steps``) when ``lowbit.ptq`` is imported; a module
of their own so that ``steps`` keeps the step machinery and the smaller built-in steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ._blocks import gptq_model
from ._gptq_layers import untie
from .steps import CALIBRATED, Step, _check_bool, _check_int, _check_number, register_step


@register_step
@dataclass(frozen=True, kw_only=True)
class RTN(Step):
    """Round to nearest: what the config's weight quantizers already do (ranges from the weights),
    named so recipes and the CLI can say so.  Nothing to run.  Report: a sentence saying so."""

    name = "rtn"
    phase = CALIBRATED

    def run(self, model, ctx):
        return model, "round to nearest: the config's weight quantizers already round every weight"


@register_step
@dataclass(frozen=True, kw_only=True)
class GPTQ(Step):
    """GPTQ (Frantar et al. 2022; ``lowbit.ptq.gptq``, driver ``lowbit.ptq._blocks``) on the calibrated
    model: each gemm / conv weight quantized column by column on its quantizer's grid, the error
    compensated on the columns left, from the layer's input Hessian on the first ``batches`` items
    (None: all); causal LMs block by block.  ``damp`` (relative), ``block_size`` (lazy batch),
    ``act_order``, ``static_groups`` (False: refit each group's range, needs ``act_order=False``),
    ``true_sequential``: see ``lowbit.ptq.gptq`` and ``lowbit.ptq._blocks``.  Report: ``{"mode",
    "blocks", "untied": [layers given their own weight], "layers": {name: {"objective_rtn",
    "objective_gptq", "kept", "damp", "dead", "seconds"}}}``."""

    name = "gptq"
    phase = CALIBRATED
    needs_data = True
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = False
    batches: int | None = None

    def __post_init__(self) -> None:
        _check_int(self, "block_size", 1)
        _check_number(self, "damp", 0.0, 1.0, open_low=True)
        for field in ("act_order", "static_groups", "true_sequential"):
            _check_bool(self, field)
        if self.batches is not None:
            _check_int(self, "batches", 1)
        if self.act_order and not self.static_groups:
            raise ValueError("GPTQ: static_groups=False with act_order=True would give columns the ranges of "
                             "groups in Hessian order, which export cannot write; set act_order=False")

    def run(self, model, ctx):
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return model, gptq_model(model, ctx.calib_data, progress=ctx.progress, **options)

    def rebuild(self, model, report):
        untie(model, (report or {}).get("untied", ()))
        return model


__all__ = ["GPTQ", "RTN"]
