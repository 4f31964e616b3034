"""Sensitivity of a causal LM's linears from one streamed pass of its decoder blocks ("reconstruction").

A Linear ``y = W x`` given choice ``c`` gets the weight ``Q_c(W)`` (round to nearest, as the
choice's weight quantizer rounds it: ``lowbit.ptq._awq_search.weight_rounder``); on its calibration
inputs ``X`` (rows = tokens, ``n`` of them) its output changes by ``dY = X dW^T``, ``dW = Q_c(W) - W``:

    E_o = sum_t dY[t, o]^2 = (dW G dW^T)_oo,     G = X^T X                 (per output channel o)

``G`` is gathered as GPTQ gathers its Hessians (``lowbit.ptq._blocks``): the calibration items are run
up to decoder block 0 once, then each float block turns the cached hidden states into the next
block's while hooks on its Linears add ``x^T x``; the head (``lm_head``) reads the final norm of the
last block's outputs.  One pass of the blocks for every layer and every choice; nothing is
quantized.  Each ``G`` lives only while its block is processed.

Raw output errors are not comparable across layers (output scales differ, and so does how much of
an error reaches the loss), so the ``cost`` the solver sums is chosen by ``weighting``:

=========  =====================================================================  ================
weighting  cost                                                                   unit
=========  =====================================================================  ================
fisher     ``1/2 sum_o F_o E_o / n``, ``F_o`` the squared gradient of the          nats per token
           calibration text's summed next-token NLL w.r.t. output ``o``, summed    (predicted rise
           over positions, per predicted token (one backward pass of the float    of the mean NLL)
           model over ``fisher_batches`` items: the diagonal empirical Fisher of
           the layer's output, tokens assumed uncorrelated)
relative   ``sum_o E_o / sum_o S_o``, ``S_o = (W G W^T)_oo``: the layer's output  noise / signal
           noise-to-signal ratio
raw        ``sum_o E_o / n``: mean squared output error per token                 output units^2
=========  =====================================================================  ================

Every report row keeps all three in ``values`` (``fisher`` only when the gradient pass ran).  Which
one predicts the damage is measured on SmolLM2 by ``benchmarks/bench_llm_mixed.py --part
correlation``: the rank correlation of each weighting with the measured KL(FP32 || model) when
only that linear is at 4 bits (BENCHMARKS.md, "Mixed 4/8-bit weights by sensitivity").  ``fisher``
is the default because it is the only one in the loss's units.

    reports = reconstruction_sensitivities(model, calib, ["w4a16-g128", "w8a16"])
    reports["w4a16-g128"].ranked()[0].name      # 'lm_head' on SmolLM2
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.walk import run_model
from ..ptq._awq_search import weight_rounder
from ..ptq._blocks import _calibration_mode, _capture, _output_hidden, _probe, find_blocks
from ..targets import Target
from ._layers import Choice, choice_config, choice_name, decision_layers, layer_quant, weight_bits
from .result import LayerSensitivity, SensitivityReport

log = logging.getLogger(__name__)

WEIGHTINGS = ("fisher", "relative", "raw")
COST_UNITS = {"fisher": "predicted rise of the mean next-token NLL (nats), diagonal Fisher x output error",
              "relative": "output noise / output signal on the calibration tokens",
              "raw": "mean squared output error per calibration token"}
ROWS_CHUNK = 4096  # weight rows at a time when costing a layer (lm_head has 49152)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` looks like a Hugging Face causal LM this module can stream: input and output
    embeddings, and a stack of decoder blocks (``lowbit.ptq._blocks.find_blocks``)."""
    return (callable(getattr(model, "get_input_embeddings", None))
            and callable(getattr(model, "get_output_embeddings", None))
            and find_blocks(model) is not None)


# -- the statistics --------------------------------------------------------------------------
class Gram:
    """``G = X^T X`` (float64) over every input row a Linear receives, and the row count.  Products
    in the input's dtype (float32 for a float32 model, exact for a float64 one), summed in float64."""

    def __init__(self, columns: int, device) -> None:
        self.sum = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, rows: torch.Tensor, product: torch.Tensor) -> None:
        self.sum += product
        self.rows += rows.shape[0]


def _gram_hooks(layers: Mapping[str, nn.Module], grams: dict[str, Gram]) -> list:
    """Pre-hooks adding each layer's input to its ``Gram``; layers fed the same tensor object one
    after another (q/k/v, gate/up) reuse one ``x^T x`` product."""
    last: dict[str, torch.Tensor | None] = {"x": None, "product": None}

    def hook(name):
        def add(layer, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            if last["x"] is not args[0]:
                last["x"], last["product"] = args[0], (rows.T @ rows).double()
            grams.setdefault(name, Gram(layer.weight.shape[1], layer.weight.device)).add(rows, last["product"])
        return add
    return [layers[n].register_forward_pre_hook(hook(n)) for n in layers]


@contextlib.contextmanager
def _hooked(handles: list) -> Iterable[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _input_ids(item) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"reconstruction sensitivity: a calibration item has no 'input_ids' (keys "
                             f"{sorted(item)}); pass token ids, e.g. lowbit.zoo.calibration_batches")
        return item["input_ids"]
    return item[0]


def output_fisher(model: nn.Module, items: Sequence, layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per layer, per output channel: the squared gradient of the items' summed next-token NLL
    w.r.t. the layer's output, summed over positions, per predicted token (float64, shape (out,)).
    One forward and backward pass per item; no parameter gradient is computed."""
    sums = {name: torch.zeros(m.weight.shape[0], dtype=torch.float64) for name, m in layers.items()}

    def grad_hook(name):
        def add(grad):
            sums[name] += grad.detach().reshape(-1, grad.shape[-1]).pow(2).sum(0).double().cpu()
        return add

    def out_hook(name):
        def register(_m, _args, out):
            out.register_hook(grad_hook(name))
        return register

    def needs_grad(_m, _args, out):
        return out.requires_grad_(True)

    params = [p for p in model.parameters() if p.requires_grad]
    handles = [m.register_forward_hook(out_hook(n)) for n, m in layers.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    predicted = 0
    try:
        for p in params:
            p.requires_grad_(False)
        with _hooked(handles), torch.enable_grad():
            for item in items:
                ids = _input_ids(item)
                logits = run_model(model, item).logits
                logits = logits[:, :-1].flatten(0, 1)
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                loss = F.cross_entropy(logits, ids[:, 1:].flatten().to(logits.device), reduction="sum")
                loss.backward()
                predicted += ids[:, 1:].numel()
    finally:
        for p in params:
            p.requires_grad_(True)
    return {name: s / max(predicted, 1) for name, s in sums.items()}


def streamed_grams(model: nn.Module, items: Sequence, layers: Mapping[str, nn.Module], visit) -> None:
    """Gather each layer's ``Gram`` in one streamed pass of the float model's blocks (see the module
    docstring) and call ``visit(grams)`` with the grams of each block's layers, then of the layers
    outside the blocks (the head), each dict freed after its call."""
    stack = find_blocks(model)
    chained, same = _probe(model, stack.blocks, items[0])
    if not chained:
        raise ValueError(f"reconstruction sensitivity: the decoder blocks of {type(model).__name__} do not "
                         "feed one another, so they cannot be streamed; use method='sqnr' or 'hessian'")
    block_of = {id(m): k for k, block in enumerate(stack.blocks) for m in block.modules()}
    inside: list[dict[str, nn.Module]] = [{} for _ in stack.blocks]
    outer: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        k = block_of.get(id(layer))
        (outer if k is None else inside[k])[name] = layer
    cache = _capture(model, stack.blocks, items, per_block=not same, who="reconstruction sensitivity")
    early = {n: m for n, m in outer.items() if n not in _reached_from_final(stack, outer, cache)}
    if early:  # layers before or beside the blocks: one pass of the whole model for them
        grams: dict[str, Gram] = {}
        with _hooked(_gram_hooks(early, grams)):
            for item in items:
                run_model(model, item)
        visit(grams)
    for k, block in enumerate(stack.blocks):
        grams = {}
        with _hooked(_gram_hooks(inside[k], grams)):
            for i in range(len(cache.hidden)):
                cache.hidden[i] = cache.run(block, k, i)  # the next block's inputs, in place
        visit(grams)
    tail = {n: m for n, m in outer.items() if n not in early}
    if tail:
        grams = {}
        with _hooked(_gram_hooks(tail, grams)):
            for hidden in cache.hidden:
                for m in stack.final:
                    hidden = _output_hidden(m(hidden))
                for layer in tail.values():
                    layer(hidden)
        visit(grams)


def _reached_from_final(stack, outer: Mapping[str, nn.Module], cache) -> set[str]:
    """The layers outside the blocks that read the final norm's output (a known family's head)."""
    if stack.final is None or not cache.hidden:
        return set()
    width = cache.hidden[0].shape[-1]
    return {n for n, m in outer.items() if isinstance(m, nn.Linear) and m.in_features == width}


# -- the costs -------------------------------------------------------------------------------
def output_errors(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``diag(dW G dW^T)`` (float64, one per output row), ``dW = quantized - weight``: the squared output
    error per output channel summed over the rows ``G`` was gathered from.  Products in the weight's
    dtype (float64 exact), ``ROWS_CHUNK`` rows at a time."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    g = gram.to(dtype)
    out = torch.empty(weight.shape[0], dtype=torch.float64)
    for a in range(0, weight.shape[0], ROWS_CHUNK):
        d = (quantized[a:a + ROWS_CHUNK].to(dtype) - weight[a:a + ROWS_CHUNK].to(dtype))
        out[a:a + ROWS_CHUNK] = ((d @ g) * d).sum(1, dtype=torch.float64).cpu()
    return out


def layer_values(weight: torch.Tensor, quantized: torch.Tensor, gram: Gram,
                 fisher: torch.Tensor | None) -> dict[str, float]:
    """One layer under one choice: ``raw`` (mean squared output error per token), ``relative`` (output
    noise / signal), ``fisher`` (predicted NLL rise, nats per token; only with ``fisher``)."""
    errors = output_errors(weight, quantized, gram.sum)
    signal = float(output_errors(torch.zeros_like(weight), weight, gram.sum).sum())
    values = {"raw": float(errors.sum()) / gram.rows, "relative": float(errors.sum()) / max(signal, 1e-30)}
    if fisher is not None:
        values["fisher"] = 0.5 * float((fisher * errors).sum()) / gram.rows
    return values


def _rounders(model: nn.Module, layers: Sequence[str], choices: Sequence[Choice], target) -> dict:
    """``{choice name: {layer: (rounder or None, weight bits)}}``; None where the choice leaves the
    layer's weight float (cost 0)."""
    out = {}
    for c in choices:
        config = choice_config(c, target)
        per_layer = {}
        for name in layers:
            lq = layer_quant(config, name, model.get_submodule(name))
            per_layer[name] = (None if lq is None or lq.weight is None else weight_rounder(lq.weight, name),
                               weight_bits(lq))
        out[choice_name(c)] = per_layer
    return out


def _cost_rows(grams: Mapping[str, Gram], layers: Mapping[str, nn.Module], rounders: Mapping, fisher: Mapping,
               weighting: str, rows: dict[str, dict[str, LayerSensitivity]]) -> None:
    """Each layer of ``grams`` costed under every choice that quantizes it, into ``rows[choice][layer]``."""
    for name, gram in grams.items():
        weight = layers[name].weight.detach()
        for c, per_layer in rounders.items():
            rounder, bits = per_layer[name]
            if rounder is None:
                continue
            values = layer_values(weight, rounder(weight), gram, fisher.get(name))
            rows[c][name] = LayerSensitivity(name=name, kind=type(layers[name]).__name__, params=weight.numel(),
                                             weight_bits=bits, cost=values[weighting], values=values)


def _check(choices, weighting: str, batches: int, fisher_batches: int) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"reconstruction sensitivity: unknown weighting {weighting!r}; choose one of "
                         f"{', '.join(WEIGHTINGS)}")
    if not choices or any(c is None for c in choices):
        raise ValueError(f"reconstruction sensitivity: give the quantized choices to cost (float costs 0), "
                         f"got {[choice_name(c) for c in choices]}")
    for label, value in (("batches", batches), ("fisher_batches", fisher_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if label == "batches" else 0):
            raise ValueError(f"reconstruction sensitivity: {label} must be a positive integer, got {value!r}")
    if weighting == "fisher" and fisher_batches == 0:
        raise ValueError("reconstruction sensitivity: weighting='fisher' needs fisher_batches >= 1")


def reconstruction_sensitivities(model: nn.Module, calib_data, choices: Sequence[Choice], *,
                                 weighting: str = "fisher", batches: int = 8, fisher_batches: int = 4,
                                 target: str | Target = "auto", progress: bool = False
                                 ) -> dict[str, SensitivityReport]:
    """Every decision layer's cost under every choice, for a causal LM, from one streamed pass.

    Args:
        model: a float Hugging Face causal LM (``is_causal_lm``); not changed.
        calib_data: calibration items (``{"input_ids": LongTensor(b, seq)}`` dicts, as
            ``lowbit.zoo.calibration_batches`` gives, or the LongTensors).
        choices: the quantized choices to cost (preset names or QuantConfigs; not None).
        weighting: ``"fisher"``, ``"relative"`` or ``"raw"`` (see the module docstring): which
            value becomes ``cost``; every row holds them all in ``values``.
        batches: calibration items the Gram matrices are gathered over.
        fisher_batches: items of the gradient pass (0: none, only with another weighting).
        target: the integer target the choices are fitted to.
        progress: log each block as it is done.

    Returns:
        ``{choice name: SensitivityReport}`` (method ``"reconstruction"``), rows in model order
        for the layers the choice quantizes.

    Raises:
        ValueError: a model whose blocks cannot be streamed, no data, a bad weighting or count.

    Example:
        >>> reports = reconstruction_sensitivities(model, calib, ["w4a16-g128", "w8a16"])
        >>> reports["w4a16-g128"]["lm_head"].cost        # nats per token, predicted
    """
    start = time.perf_counter()
    _check(choices, weighting, batches, fisher_batches)
    if not is_causal_lm(model):
        raise ValueError(f"reconstruction sensitivity streams a causal LM's decoder blocks; "
                         f"{type(model).__name__} is not one: use method='sqnr', 'ablation' or 'hessian'")
    items = list(itertools.islice(iter(calib_data), batches))
    if not items:
        raise ValueError("reconstruction sensitivity: no calibration items; pass token batches, e.g. "
                         "lowbit.zoo.calibration_batches(tokenizer, n=8)")
    names = decision_layers(model)
    layers = {n: model.get_submodule(n) for n in names}
    rounders = _rounders(model, names, choices, target)
    fisher = output_fisher(model, items[:fisher_batches], layers) if fisher_batches else {}
    rows: dict[str, dict[str, LayerSensitivity]] = {c: {} for c in rounders}

    def visit(grams: dict[str, Gram]) -> None:
        _cost_rows(grams, layers, rounders, fisher, weighting, rows)
        if progress and grams:
            log.info("reconstruction sensitivity: %s done (%.0f s)", ", ".join(grams), time.perf_counter() - start)

    with _calibration_mode(model):
        streamed_grams(model, items, layers, visit)
    seconds = time.perf_counter() - start
    settings = {"method": "reconstruction", "weighting": weighting, "batches": len(items),
                "fisher_batches": min(fisher_batches, len(items)), "rounding": "round to nearest"}
    return {c: SensitivityReport(method="reconstruction", choice=c, cost_unit=COST_UNITS[weighting],
                                 layers=[found[n] for n in names if n in found], seconds=seconds,
                                 settings=settings)
            for c, found in rows.items()}
