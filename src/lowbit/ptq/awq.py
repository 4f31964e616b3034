"""AWQ, activation-aware weight quantization (Lin et al. 2024), on the float model, block by block.

A weight column that meets large activations matters more than the others; AWQ protects such
columns by scaling them up before rounding (``W * s``) and their inputs down (``x / s``, folded into
the norm or Linear that makes ``x``), which leaves the float model's function as it was.  Then it
clips each weight group's range where that lowers the group's output error.  Both searches are in
``lowbit.ptq._awq_search``; this module feeds them, following GPTQ's driver (``lowbit.ptq._blocks``)::

    capture   what decoder block 0 receives, per calibration item (``_blocks._capture``)
    block k   one float pass with hooks keeps the block's outputs (block k + 1's inputs), the inputs
              of its Linears and the calls of its groups' inspected modules; per scale group of
              the family (``FAMILIES[...].scale_groups``: input_layernorm -> q/k/v,
              v_proj -> o_proj when the shapes allow, post_attention_layernorm -> gate/up,
              up_proj -> down_proj) the scale search against the float outputs; every group's
              scales folded, the block's output checked unchanged; then the clip search of
              each quantized Linear but q and k (``clip_skip``), on its inputs divided by ``s``

Every block's inputs are the float model's (block k's float outputs, taken before its weights are
clipped), as in the paper's code.  The weights are rounded as the config will round them
(``ctx.config`` of the step: each Linear's weight spec and observer); inputs are not quantized in
the search (AWQ is a weight-only method; with an activation-quantized config the search ignores
the activation grid).

Left alone: models without a ``FAMILIES`` entry that has scale groups (logged, reported); groups
whose producer cannot take ``1 / s`` (grouped-query attention's v_proj -> o_proj, a tied parameter,
a consumer the config keeps float), with the reason in the report; layers outside the blocks
(``lm_head``: the final norm could take ``1 / s``, but SmolLM2's ``lm_head`` is tied to the token
embedding, which must not be scaled or clipped; the paper leaves it too).  At 3 bits a
round-to-nearest head can dominate the model's error: follow AWQ with GPTQ, which takes the head,
or keep the head at more bits.

Memory: the cached hidden states, one block's recorded Linear inputs (shared where layers read one
tensor) and module outputs, Gram matrices of one layer's inputs.

Example::

    report = awq_model(model, calib, get_config("w4a16-g128"))     # float model, in place
    qmodel = lowbit.quantize(model, calib, "w4a16-g128")           # or algorithms=["awq", "gptq"]
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import QuantConfig
from ..nn.modules import TensorQuant
from ._awq_search import (
    Rounder,
    clip_group_size,
    clip_weight,
    fold_scales,
    gram,
    linear_loss,
    mean_abs,
    module_loss,
    search_clip,
    search_scale,
    weight_rounder,
)
from ._blocks import (
    FAMILIES,
    Family,
    ScaleGroup,
    _Cache,
    _calibration_mode,
    _capture,
    _output_hidden,
    _probe,
    find_blocks,
)

log = logging.getLogger(__name__)

CHECK_RTOL = 1e-3  # a block's output after folding: largest change allowed, relative to its max |output|


# -- what one float pass of a block shows ------------------------------------------------------
@dataclass
class _Record:
    """One block's float pass over every item: its outputs, its Linears' inputs, the calls
    (args, kwargs) and outputs of the inspected modules, by path relative to the block."""

    outputs: list[torch.Tensor] = field(default_factory=list)
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    calls: dict[str, list[tuple[tuple, dict]]] = field(default_factory=dict)
    results: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _record(block: nn.Module, k: int, cache: _Cache, linears: list[str], inspected: list[str],
            once: set[str]) -> _Record:
    """Run block ``k`` on every cached item with hooks (see ``_Record``); the modules of ``once``
    must run once per item (RuntimeError)."""
    rec = _Record(inputs={n: [] for n in linears}, calls={n: [] for n in inspected},
                  results={n: [] for n in inspected})

    def keep_input(name):
        return lambda _m, args, kwargs: rec.inputs[name].append(args[0] if args else next(iter(kwargs.values())))

    def keep_call(name):
        return lambda _m, args, kwargs: rec.calls[name].append((args, dict(kwargs)))

    def keep_result(name):
        return lambda _m, _args, out: rec.results[name].append(_output_hidden(out))

    handles = [block.get_submodule(n).register_forward_pre_hook(keep_input(n), with_kwargs=True) for n in linears]
    for n in inspected:
        module = block.get_submodule(n)
        handles.append(module.register_forward_pre_hook(keep_call(n), with_kwargs=True))
        handles.append(module.register_forward_hook(keep_result(n)))
    try:
        for i in range(len(cache.hidden)):
            rec.outputs.append(cache.run(block, k, i))
    finally:
        for h in handles:
            h.remove()
    for name, seen in [*rec.inputs.items(), *rec.calls.items()]:
        if name in once and len(seen) != len(cache.hidden):
            raise RuntimeError(f"awq: block {k}'s {name} ran {len(seen)} time(s) on {len(cache.hidden)} "
                               "item(s); AWQ needs each layer of a scale group called once per pass")
    return rec


# -- the groups of one block -------------------------------------------------------------------
def _shared(model: nn.Module) -> set[int]:
    """Ids of the parameters more than one module holds (tied weights)."""
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    return {i for i, n in holders.items() if n > 1}


def _why_not(block: nn.Module, prefix: str, group: ScaleGroup, rounders: dict[str, Rounder], shared: set[int]
             ) -> str:
    """"" when ``group`` can be scaled in ``block`` (named ``prefix``), else why not."""
    producer = block.get_submodule(group.producer)
    consumers = [block.get_submodule(c) for c in group.consumers]
    if not all(isinstance(c, nn.Linear) for c in consumers):
        return "a consumer is not a Linear"
    widths = {c.in_features for c in consumers}
    out = getattr(producer, "weight", None)
    if out is None or len(widths) != 1 or out.shape[0] != next(iter(widths)):
        return (f"{prefix}{group.producer} makes {None if out is None else out.shape[0]} channels, its consumers take "
                f"{sorted(widths)} (grouped-query attention): 1/s cannot fold into it")
    if any(id(p) in shared for m in (producer, *consumers) for p in m.parameters(recurse=False)):
        return "a parameter is tied to another module's"
    if all(prefix + c not in rounders for c in group.consumers):
        return "the config keeps every consumer float"
    return ""


def _plan(block: nn.Module, prefix: str, groups: tuple[ScaleGroup, ...], rounders: dict, shared: set[int],
          report: dict) -> list[ScaleGroup]:
    """The groups to scale in ``block`` (named ``prefix``); the others go to ``report["skipped"]``."""
    todo = []
    for group in groups:
        why = _why_not(block, prefix, group, rounders, shared)
        if why:
            report["skipped"].append({"producer": prefix + group.producer,
                                      "consumers": [prefix + c for c in group.consumers], "why": why})
        else:
            todo.append(group)
    return todo


def _scale_group(block: nn.Module, prefix: str, group: ScaleGroup, rec: _Record, rounders: dict,
                 grid: int) -> tuple[torch.Tensor, dict]:
    """The scale search of one group; returns its scales and its report entry."""
    consumers = [block.get_submodule(c) for c in group.consumers]
    inputs = rec.inputs[group.consumers[0]]
    if any(rec.inputs[c][i] is not x for c in group.consumers for i, x in enumerate(inputs)):
        raise RuntimeError(f"awq: the consumers {', '.join(prefix + c for c in group.consumers)} do not read one "
                           "tensor: the block is not laid out as its FAMILIES entry (lowbit.ptq._blocks) says")
    s_x = mean_abs(inputs, prefix + group.consumers[0])
    if group.consumers == (group.inspect,):  # a lone Linear: its error through its inputs' Gram matrix
        g, rows = gram(inputs)
        loss = linear_loss(consumers[0], consumers[0].weight.detach().clone(), g, rows)
    else:
        loss = module_loss(block.get_submodule(group.inspect), rec.calls[group.inspect],
                           rec.results[group.inspect], _output_hidden)
    choice = search_scale(consumers, [rounders.get(prefix + c) for c in group.consumers], s_x, loss, grid)
    entry = {"producer": prefix + group.producer, "consumers": [prefix + c for c in group.consumers],
             "alpha": choice.alpha, "error_rtn": choice.error_rtn, "error_awq": choice.error_awq}
    log.info("awq: %s -> %s: alpha %.2f, output error %.4g (round to nearest %.4g)", entry["producer"],
             ", ".join(group.consumers), choice.alpha, choice.error_awq, choice.error_rtn)
    return choice.scales, entry


def _fold_all(block: nn.Module, k: int, prefix: str, done: list[tuple[ScaleGroup, torch.Tensor]],
              cache: _Cache, reference: torch.Tensor) -> None:
    """Fold every group's scales; undone (and RuntimeError) if the block's output on item 0 moved
    from its float ``reference`` by more than ``CHECK_RTOL`` of its largest magnitude."""
    for group, s in done:
        fold_scales(block.get_submodule(group.producer), [block.get_submodule(c) for c in group.consumers], s)
    out = cache.run(block, k, 0)
    change = float((out - reference).abs().max() / reference.abs().max().clamp(min=1e-30))
    if change > CHECK_RTOL:
        for group, s in reversed(done):
            fold_scales(block.get_submodule(group.producer), [block.get_submodule(c) for c in group.consumers],
                        1.0 / s)
        raise RuntimeError(f"awq: folding the scales changed {prefix.rstrip('.')}'s output by {change:.3g} "
                           "(relative), so they were undone: the block is not laid out as its FAMILIES entry "
                           "(lowbit.ptq._blocks) says; fix the entry or leave AWQ out")


def _clip_layer(layer: nn.Linear, name: str, x: torch.Tensor, tq: TensorQuant, options: dict) -> dict | str:
    """The clip search of one Linear on its inputs ``x`` (tokens, in_features), applied by clamping
    its float weight; its report entry, or why it was not clipped."""
    size = clip_group_size(tq.spec, layer.weight)
    if size is None:
        return f"its weight grid ({tq.spec.describe()}) has no per-row ranges to clip"
    if options["clip_tokens"] is not None:
        x = x[::max(1, x.shape[0] // options["clip_tokens"])][:options["clip_tokens"]]
    choice = search_clip(layer.weight.detach(), x, weight_rounder(tq, f"{name}.weight"), size,
                         symmetric=tq.spec.symmetric, grid=options["clip_grid"], max_shrink=options["max_shrink"])
    with torch.no_grad():
        layer.weight.copy_(clip_weight(layer.weight.detach(), choice.ratios, size, tq.spec.symmetric))
    return {"ratio_mean": float(choice.ratios.mean()), "ratio_min": float(choice.ratios.min()),
            "clipped": float((choice.ratios < 1).float().mean()),
            "objective_before": choice.objective_before, "objective_after": choice.objective_after}


# -- one block, the model ----------------------------------------------------------------------
def _block(block: nn.Module, k: int, prefix: str, cache: _Cache, family: Family, quants: dict[str, TensorQuant],
           shared: set[int], options: dict, report: dict) -> list[torch.Tensor]:
    """AWQ of decoder block ``k`` (named ``prefix``): scales, then clipping; returns its float outputs."""
    rounders = {n: weight_rounder(tq, f"{n}.weight") for n, tq in quants.items() if n.startswith(prefix)}
    groups = _plan(block, prefix, family.scale_groups, rounders, shared, report)
    clip = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and prefix + n in quants
            and n not in family.clip_skip and id(m.weight) not in shared] if options["clip"] else []
    linears = list(dict.fromkeys([c for g in groups for c in g.consumers] + clip))
    inspected = list(dict.fromkeys(g.inspect for g in groups if g.consumers != (g.inspect,)))
    rec = _record(block, k, cache, linears, inspected, {c for g in groups for c in (*g.consumers, g.inspect)})
    done = []
    for group in groups:
        scales, entry = _scale_group(block, prefix, group, rec, rounders, options["grid"])
        done.append((group, scales))
        report["groups"].append(entry)
    _fold_all(block, k, prefix, done, cache, rec.outputs[0])
    scaled = {c: s for g, s in done for c in g.consumers}
    for name in clip:
        if not rec.inputs[name]:
            report["not_clipped"][prefix + name] = "the calibration data never reaches it"
            continue
        x = torch.cat([t.detach().reshape(-1, t.shape[-1]) for t in rec.inputs[name]])
        result = _clip_layer(block.get_submodule(name), prefix + name, x / scaled[name] if name in scaled else x,
                             quants[prefix + name], options)
        (report["clip"] if isinstance(result, dict) else report["not_clipped"])[prefix + name] = result
    for name in family.clip_skip:
        if prefix + name in quants and options["clip"]:
            report["not_clipped"][prefix + name] = "skipped as in the paper (its error passes through q.k)"
    return rec.outputs


def _weight_quants(model: nn.Module, config: QuantConfig) -> dict[str, TensorQuant]:
    """The weight TensorQuant the config gives each Linear it quantizes, by name."""
    config = config.bind(model)
    quants = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            layer, _ = config.resolve(name, m)
            if layer is not None and layer.weight is not None:
                quants[name] = layer.weight
    return quants


def _outside(model: nn.Module, blocks: list[nn.Module], quants: dict[str, TensorQuant], shared: set[int]) -> dict:
    """Why each quantized Linear outside the blocks is left to the config's rounding."""
    inside = {id(m) for b in blocks for m in b.modules()}
    notes = {}
    for name, m in model.named_modules():
        if name in quants and id(m) not in inside:
            tied = " and its weight is tied to another module's (the token embedding), which must keep its values" \
                if id(m.weight) in shared else ""
            notes[name] = f"outside the decoder blocks: no scale group{tied}; left to the config's rounding"
    return notes


def _items(calib_data: Iterable | None, batches: int | None) -> list:
    if calib_data is None:
        raise ValueError("awq needs calibration data (an iterable of model inputs); pass calib_data")
    items = list(itertools.islice(iter(calib_data), batches)) if batches else list(calib_data)
    if not items:
        raise ValueError("awq needs calibration data: got an empty iterable of model inputs")
    return items


def awq_model(model: nn.Module, calib_data: Iterable | None, config: QuantConfig, *, grid: int = 20,
              clip: bool = True, clip_grid: int = 20, max_shrink: float = 0.5, clip_tokens: int | None = 512,
              batches: int | None = None, progress: bool = True) -> dict:
    """AWQ of a float causal LM, in place (see the module docstring): scales folded into the model,
    weights clipped; the float function changes only by the clipping.

    Args:
        model: a float Hugging Face causal LM whose ``config.model_type`` has scale groups in
            ``lowbit.ptq._blocks.FAMILIES`` (Llama, Mistral, Qwen2/3); others are left as they are.
        calib_data: re-iterable model inputs (tensors, tuples of args, dicts of kwargs).
        config: the config ``lowbit.quantize`` will apply: each Linear's weight grid and observer.
        grid: alphas ``i / grid`` tried, ``i < grid`` (1: alpha 0 only, round to nearest).
        clip: run the clip search.  ``clip_grid``, ``max_shrink``: ratios ``1 - i / clip_grid`` for
            ``i < max_shrink * clip_grid``.  ``clip_tokens``: input rows sampled (evenly) for it (None: all).
        batches: read only the first ``batches`` items (None: all).
        progress: a progress bar over the blocks.

    Returns:
        ``{"mode": "blocks" | "none", "blocks": n, "groups": [{"producer", "consumers", "alpha",
        "error_rtn", "error_awq"}], "skipped": [{"producer", "consumers", "why"}], "clip": {layer:
        {"ratio_mean", "ratio_min", "clipped", "objective_before", "objective_after"}}, "not_clipped":
        {layer: why}, "left": {layer or "model": why}}``; errors are mean squares of the inspected
        module's output, the clip objective the mean over rows of the summed squared group errors.

    Raises:
        ValueError: no or empty calibration data, NaN / Inf inputs, an item that misses a block.
        RuntimeError: folding changed a block's output (a wrong family entry; the block is restored).
    """
    items = _items(calib_data, batches)
    options = {"grid": grid, "clip": clip, "clip_grid": clip_grid, "max_shrink": max_shrink,
               "clip_tokens": clip_tokens}
    report: dict = {"mode": "none", "blocks": 0, "groups": [], "skipped": [], "clip": {}, "not_clipped": {},
                    "left": {}}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family, stack = FAMILIES.get(model_type), find_blocks(model)
    if family is None or not family.scale_groups or stack is None or stack.final is None:
        report["left"]["model"] = (f"no scale groups known for model_type {model_type!r} (lowbit.ptq._blocks."
                                   "FAMILIES): AWQ changed nothing")
        log.warning("awq: %s", report["left"]["model"])
        return report
    quants, shared = _weight_quants(model, config), _shared(model)
    with _calibration_mode(model):
        chained, same = _probe(model, stack.blocks, items[0])
        if not chained:
            raise ValueError(f"awq: the decoder blocks of {type(model).__name__} do not feed one another; "
                             "AWQ streams them block by block")
        _stream(model, stack.blocks, items, family, quants, shared, options, report, same, progress)
    report.update(mode="blocks", blocks=len(stack.blocks))
    report["left"].update(_outside(model, stack.blocks, quants, shared))
    return report


def _stream(model: nn.Module, blocks: list[nn.Module], items: list, family: Family, quants: dict[str, TensorQuant],
            shared: set[int], options: dict, report: dict, same: bool, progress: bool) -> None:
    """Block after block, each on the float outputs of the one before (``same``: every block
    receives the same keyword arguments)."""
    from tqdm.auto import tqdm

    names = {id(m): n for n, m in model.named_modules()}
    cache = _capture(model, blocks, items, per_block=not same, who="awq")
    for k, block in enumerate(tqdm(blocks, desc="awq", unit="block", disable=not progress)):
        cache.hidden = _block(block, k, names[id(block)] + ".", cache, family, quants, shared, options, report)
