"""The weight-rounding steps for LLMs: ``RTN`` (round to nearest, named), ``GPTQ`` and ``AWQ``.

Registered with the other steps (``lowbit.ptq.steps``) when ``lowbit.ptq`` is imported; a module
of their own so that ``steps`` keeps the step machinery and the smaller built-in steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType

from ._blocks import gptq_model
from ._gptq_layers import untie
from .awq import awq_model
from .steps import CALIBRATED, FLOAT, Step, _check_bool, _check_int, _check_number, register_step
from .tie import tie_embedding


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
    ``clip`` (shrink each static range where that lowers its input-weighted rounding error,
    ``lowbit.ptq.gptq.clip_search``; no effect with ``static_groups=False``, whose ranges are refitted
    as GPTQ goes): ``"auto"`` (the default) searches unless an AWQ step with ``clip`` runs in the same
    pipeline (its clipped weights already set the ranges); True / False always / never.  Measured on
    SmolLM2 W4 g128 (BENCHMARKS.md): GPTQ alone 18.45 -> 17.10, no slower; after AWQ's clip 16.62 ->
    16.87 (worse, hence "auto"), and 17.01 searching only the layers AWQ leaves unclipped (q, k,
    lm_head).  Recipes written before the field read ``clip=False``.
    ``true_sequential``: see ``lowbit.ptq.gptq`` and ``lowbit.ptq._blocks``.  ``rescale``: after GPTQ,
    each range's scale refitted by least squares to the codes GPTQ chose (``lowbit.ptq.gptq.fit_scales``;
    a few seconds).  Off by default: on SmolLM2 it lowered the perplexity of the peers' 16 held-out
    windows (17.10 -> 17.02) and raised that of the CLI's 8 (18.29 -> 18.56 in ONNX Runtime): it fits
    the calibration text, and what it gains there does not reliably carry over (BENCHMARKS.md).
    ``asymmetric``: the float model's outputs as the target (GPTAQ's asymmetric calibration): each
    layer is fitted to map the inputs the quantized model gives it to the outputs the float model
    gives, so later layers correct what earlier ones lost (``Hessian.shift``; the float model's hidden
    states are carried beside the quantized ones, which costs one more block pass per item; best with
    ``true_sequential``, whose inputs are the finished model's).  SmolLM2 W4 g128, 64 windows:
    ``GPTQ(true_sequential=True, asymmetric=True)`` 16.21 (1.109x FP32) in 395 s, against 17.10 (1.170x)
    in 165 s for GPTQ with its range search (before ``rescale`` existed).  Report: ``{"mode", "clip",
    "blocks", "untied": [layers given their own weight], "layers": {name: {"objective_rtn",
    "objective_gptq", "kept", "damp", "dead", "seconds", "rows"}}}``; a warning when a layer saw fewer
    than ``lowbit.ptq._gptq_layers.ROWS_PER_COLUMN`` calibration rows per weight column."""

    name = "gptq"
    phase = CALIBRATED
    needs_data = True
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    clip: bool | str = "auto"
    true_sequential: bool = False
    rescale: bool = False
    asymmetric: bool = False
    absent = MappingProxyType({"clip": False})  # recipes from before the clip search ran without it
    batches: int | None = None

    def __post_init__(self) -> None:
        _check_int(self, "block_size", 1)
        _check_number(self, "damp", 0.0, 1.0, open_low=True)
        for field in ("act_order", "static_groups", "true_sequential", "rescale", "asymmetric"):
            _check_bool(self, field)
        if self.clip != "auto" and not isinstance(self.clip, bool):
            raise TypeError(f"GPTQ.clip must be true, false or 'auto', got {self.clip!r}")
        if self.batches is not None:
            _check_int(self, "batches", 1)
        if self.act_order and not self.static_groups:
            raise ValueError("GPTQ: static_groups=False with act_order=True would give columns the ranges of "
                             "groups in Hessian order, which export cannot write; set act_order=False")

    def run(self, model, ctx):
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        options["clip"] = self.clips(ctx.steps)
        # a head the embedding will read (TieEmbedding later in the pipeline) keeps the plain target
        float_head = not any(isinstance(s, TieEmbedding) for s in ctx.steps)
        report = gptq_model(model, ctx.calib_data, progress=ctx.progress, float_head=float_head, **options)
        return model, {**report, "clip": options["clip"]}

    def clips(self, steps=()) -> bool:
        """Whether the range search runs in a pipeline of ``steps`` (``clip="auto"``: unless AWQ clips)."""
        if self.clip != "auto":
            return self.clip
        return not any(isinstance(s, AWQ) and s.clip for s in steps)

    def rebuild(self, model, report):
        untie(model, (report or {}).get("untied", ()))
        return model


@register_step
@dataclass(frozen=True, kw_only=True)
class AWQ(Step):
    """AWQ (Lin et al. 2024; ``lowbit.ptq.awq``, searches in ``lowbit.ptq._awq_search``) on the float
    model, before layers are swapped: per scale group of each decoder block (Llama family:
    input_layernorm -> q/k/v, v_proj -> o_proj where the shapes allow, post_attention_layernorm ->
    gate/up, up_proj -> down_proj) the per-channel scales ``s_x^alpha`` (alpha ``i / grid``) whose
    weights, rounded as the step's config rounds them, give the smallest output error, folded into the
    model (its float function unchanged); then (``clip``) each quantized Linear but q/k clipped per
    output row and group (ratios ``1 - i / clip_grid``, ``i < max_shrink * clip_grid``, judged on
    ``clip_tokens`` sampled input rows) by clamping its float weight.  Reads the first ``batches``
    calibration items (None: all).  Run it before ``gptq``: ``algorithms=["awq", "gptq"]``.
    Report: ``lowbit.ptq.awq.awq_model``'s (per group the alpha and the output error of round to
    nearest and of AWQ; per layer the clip ratios and objective).  Nothing to rebuild: AWQ changes
    only float weights, which ``lowbit.save`` stores."""

    name = "awq"
    phase = FLOAT
    needs_data = True
    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int | None = 512
    batches: int | None = None

    def __post_init__(self) -> None:
        for field in ("grid", "clip_grid"):
            _check_int(self, field, 1)
        _check_bool(self, "clip")
        _check_number(self, "max_shrink", 0.0, 1.0, open_low=False)
        if self.max_shrink >= 1.0:
            raise ValueError(f"AWQ.max_shrink must be below 1 (a ratio of 0 would clip weights to 0), "
                             f"got {self.max_shrink!r}")
        for field in ("clip_tokens", "batches"):
            if getattr(self, field) is not None:
                _check_int(self, field, 1)

    def run(self, model, ctx):
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return model, awq_model(model, ctx.calib_data, ctx.config, progress=ctx.progress, **options)


@register_step
@dataclass(frozen=True, kw_only=True)
class TieEmbedding(Step):
    """The token embedding reads the output head's quantized table (``lowbit.ptq.tie``): one table in
    the model, the ONNX file (``GatherBlockQuantized`` on the head's ``MatMulNBits`` weight) and the
    checkpoint, where the presets store an int8 copy beside the head's 4-bit one.  ``embedding`` /
    ``head``: module names (None: the Hugging Face getters).  Put it after GPTQ / AWQ, which write
    the head's weight.  Report: ``{"embedding", "head"}``, which ``rebuild`` ties again."""

    name = "tie_embedding"
    phase = CALIBRATED
    embedding: str | None = None
    head: str | None = None

    def run(self, model, ctx):
        return model, tie_embedding(model, self.embedding, self.head)

    def rebuild(self, model, report):
        tie_embedding(model, report["embedding"], report["head"])
        return model


__all__ = ["AWQ", "GPTQ", "RTN", "TieEmbedding"]
