"""The GPTQ driver: which layers, in which order, on which inputs (the ``GPTQ`` step).

Causal language models (a stack of decoder blocks) are streamed block by block::

    capture   run the model on every calibration item up to decoder block 0 and keep what the
              block receives: the hidden states (items x seq x hidden) and its keyword arguments
              (attention mask, rotary embeddings, positions; caches switched off)
    block k   hooks on the block's quantized layers accumulate their input Hessians over all
              cached inputs in one pass (layers fed the same tensor, q/k/v and gate/up, share
              one), GPTQ each layer, then the quantized block turns the cached inputs into the
              next block's, in place
    head      layers after the last block (lm_head) take the final norm of the last block's
              outputs as their inputs

so block k's Hessians see the outputs of the blocks before it as already quantized, as deployed.
``asymmetric`` (GPTQ's float target) also carries the float model's hidden states: at the start of
block k its float outputs (the next block's float inputs) are computed with the block's float weights,
and each Hessian pass runs every item first through the float block (weights kept from before GPTQ,
quantizers off, stopped once the layers being measured are fed), so each layer pairs the float
model's input with the quantized model's, token by token (``FloatInputs``, ``Hessian.shift``).
``true_sequential`` splits a block further, into the groups of layers that share an input
(q/k/v, then o, then gate/up, then down), each group's Hessians taken after the groups before
it are quantized: four passes per Llama block (each stopped after its group) instead of one,
for little gain (a tiny random Llama, W4 g32: KL to the float model 0.0060 against 0.0062),
hence not the default (nor the paper code's).

What is model-specific is the small ``FAMILIES`` table (by ``config.model_type``: where the blocks
and the final norm are, under ``model.base_model``; for AWQ, ``lowbit.ptq.awq``, also a block's scale
groups and the layers its clipping skips).  A model not in it is streamed when it has a
``ModuleList`` of two or more blocks of one class holding quantized layers, its head then
calibrated by one more pass of the whole model.  Every model is first run once on one item to
check the blocks are chained (block k + 1 takes block k's output) and whether they all receive
the same keyword arguments (else each block's are kept: alternating sliding-window masks).

Other models (an ``nn.Sequential``, a CNN) take one pass over the whole model with hooks on
every quantized layer, then GPTQ each layer: their Hessians see the round-to-nearest layers
before them, not the GPTQ'd ones.  ``true_sequential`` there is one pass per group of layers
(sequential, as AdaRound; quadratic in depth).

Tied weights: a layer GPTQ will write whose weight Parameter another module also holds (lm_head
tied to the token embedding) first gets a Parameter of its own, and a Hugging Face config's
``tie_word_embeddings`` is cleared so transformers does not tie them again; the report lists it
(``"untied"``) and ``untie`` repeats it for ``lowbit.load``.

Memory: the cached hidden states, the Hessians of one block's layers (float64, K x K each) and
GPTQ's output for one weight (its working copies go ``ROWS_CHUNK`` rows at a time); the model is
never copied (an untied head gets its own weight).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from ..nn.registry import GEMM, kind_of
from ..nn.walk import fixed_weights, quantizers_disabled, run_model
from ._gptq_layers import (
    Feed,
    FloatInputs,
    StopPass,
    candidates,
    gptq_group,
    log_unreached,
    quantize_part,
    untie_shared,
    warn_few_rows,
)
from .gptq import Hessian

log = logging.getLogger(__name__)


# -- the families ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleGroup:
    """AWQ's unit inside a decoder block (paths relative to the block): ``consumers`` read one
    tensor that ``producer`` (a norm, or a Linear, by its output rows) makes, so ``1 / s`` folds
    into the producer and ``s`` into the consumers' weight columns; the scale ``s`` is chosen by
    the output error of ``inspect`` (the module whose output the group's error is measured on)."""

    producer: str
    consumers: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Family:
    """Where a family's decoder blocks (a ModuleList) and the modules between the last block and
    the head are, as paths under the Hugging Face ``model.base_model``; AWQ's scale groups of one
    block and the Linears its weight clipping skips (paths relative to the block)."""

    blocks: str
    final: tuple[str, ...]
    scale_groups: tuple[ScaleGroup, ...] = ()
    clip_skip: tuple[str, ...] = ()


# AWQ (Lin et al. 2024): v_proj -> o_proj only folds when the shapes allow (not with grouped-query
# attention, whose v_proj has fewer outputs than o_proj inputs); q and k are not clipped (the paper's
# code: their error passes through the q.k product, which a per-layer output error does not see).
_LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
_LLAMA = Family(blocks="layers", final=("norm",), scale_groups=_LLAMA_GROUPS,
                clip_skip=("self_attn.q_proj", "self_attn.k_proj"))
FAMILIES: Mapping[str, Family] = MappingProxyType({
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
})
"""Known causal-LM layouts by ``config.model_type``."""


@dataclass
class _Stack:
    blocks: list[nn.Module]
    final: list[nn.Module] | None  # None: unknown (the head is calibrated by a pass of the whole model)


def find_blocks(model: nn.Module) -> _Stack | None:
    """The decoder blocks of ``model``: from ``FAMILIES``, else the longest ``ModuleList`` of two or
    more modules of one class; None when there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is not None:
        base = getattr(model, "base_model", model)
        try:
            blocks = base.get_submodule(family.blocks)
            return _Stack(list(blocks), [base.get_submodule(n) for n in family.final])
        except AttributeError as exc:
            log.info("gptq: %s is not laid out as FAMILIES[%r] says (%s); looking for its blocks",
                     type(model).__name__, model_type, exc)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) >= 2
             and len({type(c) for c in m}) == 1]
    return _Stack(list(max(lists, key=len)), None) if lists else None


# -- what the blocks receive -------------------------------------------------------------------
def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_hidden(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]  # (older transformers return tuples)


def _same_value(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, (torch.Tensor, tuple, list, dict)) or isinstance(b, (torch.Tensor, tuple, list, dict)):
        return False
    return type(a) is type(b) and a == b


def _probe(model: nn.Module, blocks: list[nn.Module], item) -> tuple[bool, bool]:
    """Run ``model`` on one item: are ``blocks`` chained (each takes the previous one's output), and
    do they all receive the same keyword arguments (the same mask, rotary embeddings ...)?"""
    ins, outs, kws = {}, {}, {}

    def pre(k):
        def hook(_m, args, kwargs):
            ins.setdefault(k, _hidden_of(args, kwargs))
            kws.setdefault(k, {key: v for key, v in kwargs.items() if key != "hidden_states"})
        return hook

    def post(k):
        def hook(_m, _args, _kwargs, out):
            outs.setdefault(k, _output_hidden(out))
            if k == len(blocks) - 1:
                raise StopPass  # (the head's logits are not needed)
        return hook

    handles = [h for k, b in enumerate(blocks)
               for h in (b.register_forward_pre_hook(pre(k), with_kwargs=True),
                         b.register_forward_hook(post(k), with_kwargs=True))]
    try:
        with contextlib.suppress(StopPass):
            run_model(model, item)
    finally:
        for h in handles:
            h.remove()
    if len(ins) < len(blocks):
        return False, False
    chained = all(ins[k + 1] is outs[k] for k in range(len(blocks) - 1))
    same = all(kws[k].keys() == kws[0].keys() and all(_same_value(kws[k][key], kws[0][key]) for key in kws[0])
               for k in range(1, len(blocks)))
    return chained, same


def _clean(kwargs: dict) -> dict:
    """A block's keyword arguments without the hidden states and without a KV cache (the blocks are
    run once per pass, and a cache would grow with each)."""
    out = {key: value for key, value in kwargs.items() if key != "hidden_states"}
    for key, value in out.items():
        if hasattr(value, "get_seq_length"):  # a transformers Cache
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@dataclass
class _Cache:
    """What the blocks receive, per calibration item: the hidden states (replaced by each block's
    outputs in turn), the other positional arguments, the keyword arguments (``kwargs[0]`` shared
    by every block, or ``kwargs[k]`` per block)."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[list[dict]]

    def run(self, block: nn.Module, k: int, i: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``k`` on item ``i`` (on ``hidden`` instead of the cached hidden states when given):
        its output hidden states."""
        kwargs = self.kwargs[k if len(self.kwargs) > 1 else 0][i]
        return _output_hidden(block(self.hidden[i] if hidden is None else hidden, *self.args[i], **kwargs))


def _capture(model: nn.Module, blocks: list[nn.Module], items: list, *, per_block: bool,
             who: str = "gptq") -> _Cache:
    """Run ``model`` on every item up to block 0 (``per_block``: up to the last block, keeping each
    block's keyword arguments) and keep what block 0 receives (``who`` runs it: for messages)."""
    cache = _Cache([], [], [[] for _ in blocks] if per_block else [[]])
    last = len(blocks) - 1 if per_block else 0

    def hook(k):
        def record(_m, args, kwargs):
            if k == 0:
                cache.hidden.append(_hidden_of(args, kwargs))
                cache.args.append(tuple(args[1:]))
            cache.kwargs[k].append(_clean(kwargs))
            if k == last:
                raise StopPass
        return record

    handles = [blocks[k].register_forward_pre_hook(hook(k), with_kwargs=True) for k in range(last + 1)]
    try:
        for i, item in enumerate(items):
            with contextlib.suppress(StopPass):
                run_model(model, item)
            if len(cache.kwargs[last]) != i + 1:
                raise ValueError(f"{who}: calibration item {i} never reached decoder block {last}; every item "
                                 "must run the whole model")
    finally:
        for h in handles:
            h.remove()
    return cache


# -- the driver --------------------------------------------------------------------------------
def _feed_items(model: nn.Module, items: list, stop_at: nn.Module | None = None) -> Feed:
    """Runs the whole model on the items (``stop_at``: only up to that module)."""

    def stop(*_):
        raise StopPass

    def feed(limit: int | None) -> None:
        handle = None if stop_at is None else stop_at.register_forward_pre_hook(stop)
        try:
            for item in items[:limit]:
                with contextlib.suppress(StopPass):
                    run_model(model, item)
        finally:
            if handle is not None:
                handle.remove()

    return feed


def _feed_block(cache: _Cache, block: nn.Module, k: int, paired: _FloatPath | None = None) -> Feed:
    """Runs block ``k`` on the cached inputs; ``paired``: while its ``FloatInputs`` are hooked, each
    item first through the float block (its float weights, quantizers off) on the float path's inputs."""
    def feed(limit: int | None) -> None:
        for i in range(len(cache.hidden))[:limit]:
            if paired is not None and paired.floats.installed:
                paired.record(lambda i=i: cache.run(block, k, i, paired.hidden[i]))
            with contextlib.suppress(StopPass):
                cache.run(block, k, i)
    return feed


class _FloatPath:
    """GPTQ's float target (``asymmetric``): the float model's hidden states beside the quantized
    ones, and one block's float weights, kept while GPTQ writes the block (``true_sequential``
    quantizes a block's first layers before the later ones' Hessians are taken)."""

    def __init__(self, hidden: list[torch.Tensor]) -> None:
        self.hidden = list(hidden)
        self.block: nn.Module | None = None
        self.floats: FloatInputs | None = None
        self.weights: dict[str, tuple[nn.Module, nn.Parameter]] = {}

    def enter(self, block: nn.Module, layers: Mapping[str, nn.Module], cache: _Cache, k: int) -> list[torch.Tensor]:
        """Start block ``k``: keep its layers' float weights; returns the float block's outputs (the
        next block's float inputs), computed before GPTQ changes the block."""
        self.block, self.floats = block, FloatInputs(layers)
        self.weights = {n: (m, nn.Parameter(m.weight.detach().clone(), requires_grad=False)) for n, m in layers.items()}
        with quantizers_disabled(block):
            return [cache.run(block, k, i, h) for i, h in enumerate(self.hidden)]

    def record(self, run: Callable[[], object]) -> None:
        """``run()`` (the block on one item's float inputs) with the float weights and quantizers off,
        ``FloatInputs`` recording what each layer receives."""
        self.floats.seen.clear()
        live = {n: m.weight for n, (m, _) in self.weights.items()}
        try:
            for m, kept in self.weights.values():
                m._parameters["weight"] = kept
            self.floats.recording = True
            with quantizers_disabled(self.block), contextlib.suppress(StopPass):
                run()
        finally:
            self.floats.recording = False
            for n, (m, _) in self.weights.items():
                m._parameters["weight"] = live[n]


def _pairs(layers: Mapping[str, nn.Module]) -> list:
    """(layer, weight quantizer) pairs for ``fixed_weights``: each weight fake-quantized once per pass
    rather than once per call (a weight changed since is fake-quantized again, by its version)."""
    return [(layer, layer.weight_quantizer) for layer in layers.values()]


def _final(stack: _Stack, hidden: torch.Tensor) -> torch.Tensor:
    for m in stack.final:
        hidden = _output_hidden(m(hidden))
    return hidden


def _head(model, stack: _Stack, cache: _Cache, tail: dict[str, nn.Module], items: list, options: dict,
          report: dict, true_sequential: bool, path: _FloatPath | None) -> None:
    """GPTQ of the layers after the last block: on the final norm of the cached hidden states when
    the family says where it is (no logits computed), else on a pass of the whole model (no float
    target there)."""
    width = cache.hidden[0].shape[-1]
    if stack.final is None or any(kind_of(m).kernel != GEMM or m.weight.shape[1] != width
                                  for m in tail.values()):
        reached = quantize_part(tail, _feed_items(model, items), options, report,
                                true_sequential=true_sequential)
        log_unreached(tail, reached)
        return
    hessians = {name: Hessian(layer, name) for name, layer in tail.items()}
    for i, hidden in enumerate(cache.hidden):
        hidden = _final(stack, hidden)
        x_float = None if path is None else _final(stack, path.hidden[i])
        for name, layer in tail.items():
            hessians[name].add(layer._quant_input(hidden), x_float)
    log_unreached(tail, gptq_group(list(tail), tail, hessians, options, report))


def _stream(model: nn.Module, stack: _Stack, layers: dict[str, nn.Module], items: list, options: dict,
            report: dict, *, same_kwargs: bool, true_sequential: bool, asymmetric: bool, float_head: bool,
            progress: bool) -> None:
    """Block by block (see the module docstring)."""
    from tqdm.auto import tqdm

    block_of = {id(m): k for k, block in enumerate(stack.blocks) for m in block.modules()}
    inside: list[dict[str, nn.Module]] = [{} for _ in stack.blocks]
    outer: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        k = block_of.get(id(layer))
        (outer if k is None else inside[k])[name] = layer
    # layers before block 0 first (none in a causal LM), so block 0's inputs come from them quantized
    early = quantize_part(outer, _feed_items(model, items, stop_at=stack.blocks[0]), options, report,
                          true_sequential=true_sequential)
    cache = _capture(model, stack.blocks, items, per_block=not same_kwargs)
    # the float path starts from what block 0 receives in the quantized model: a quantized embedding's
    # rounding is not compensated (nor, with TieEmbedding later, the tied table's, not in place yet)
    path = _FloatPath(cache.hidden) if asymmetric else None
    tail = {name: layer for name, layer in outer.items() if name not in early}
    with tqdm(total=len(stack.blocks) + bool(tail), desc="gptq", unit="block", disable=not progress) as bar:
        for k, block in enumerate(stack.blocks):
            float_next = None if path is None else path.enter(block, inside[k], cache, k)
            with fixed_weights(_pairs(inside[k])):
                reached = quantize_part(inside[k], _feed_block(cache, block, k, path), options, report,
                                        true_sequential=true_sequential, floats=None if path is None else path.floats)
            log_unreached(inside[k], reached)
            with fixed_weights(_pairs(inside[k])):  # (the weights GPTQ wrote, fake-quantized once)
                for i in range(len(cache.hidden)):
                    cache.hidden[i] = cache.run(block, k, i)  # the next block's inputs, in place
            if path is not None:
                path.hidden = float_next
            bar.update()
        if tail:
            _head(model, stack, cache, tail, items, options, report, true_sequential, path if float_head else None)
            bar.update()


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, and (Hugging Face) no KV cache, restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    try:
        if use_cache is not None:
            config.use_cache = False
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            config.use_cache = use_cache


def gptq_model(model: nn.Module, calib_data: Iterable | None, *, batches: int | None = None,
               true_sequential: bool = False, asymmetric: bool = False, float_head: bool = True,
               progress: bool = True, **options) -> dict:
    """GPTQ of every quantized layer of ``model`` it can take, in place (see the module docstring).

    Args:
        model: a calibrated model from ``lowbit.quantize`` (frozen weight quantizers).
        calib_data: re-iterable model inputs (tensors, tuples of args, dicts of kwargs).
        batches: read only the first ``batches`` items (None: all).
        true_sequential: Hessians group by group of layers sharing an input, not block by block.
        asymmetric: the float model's outputs as GPTQ's target (``Hessian.shift``): the float model's
            hidden states are carried beside the quantized ones (streamed causal LMs only; other
            models ignore it, logged).
        float_head: with ``asymmetric``, the layers after the last block (lm_head) take the float
            target too; False gives them the plain one (a head whose table the embedding will read:
            its weight should stay the table, not absorb the network's error).
        progress: a progress bar over the blocks.
        **options: ``gptq_layer``'s (block_size, damp, act_order, static_groups).

    Returns:
        ``{"mode": "blocks" | "whole_model" | "none", "blocks": n, "untied": [names],
        "layers": {name: gptq_layer's report}}``, the layers in the order they were quantized.

    Raises:
        ValueError: no or empty calibration data, or an item that does not reach every block.
    """
    if calib_data is None:
        raise ValueError("gptq needs calibration data (an iterable of model inputs); pass calib_data")
    items = list(itertools.islice(iter(calib_data), batches)) if batches else list(calib_data)
    if not items:
        raise ValueError("gptq needs calibration data: got an empty iterable of model inputs")
    layers = candidates(model)
    report = {"mode": "none", "blocks": 0, "untied": untie_shared(model, layers), "layers": {}}
    if not layers:
        log.warning("gptq: %s has no gemm / conv layer with a frozen weight quantizer; nothing to do",
                    type(model).__name__)
        return report
    with _calibration_mode(model):
        stack = find_blocks(model)
        chained, same = False, False
        ours = {id(layer) for layer in layers.values()}
        if stack is not None and any(id(m) in ours for block in stack.blocks for m in block.modules()):
            chained, same = _probe(model, stack.blocks, items[0])
            if not chained:
                log.info("gptq: the blocks of %s do not feed one another; one pass over the whole model",
                         type(model).__name__)
        if chained:
            report.update(mode="blocks", blocks=len(stack.blocks))
            _stream(model, stack, layers, items, options, report["layers"], same_kwargs=same,
                    true_sequential=true_sequential, asymmetric=asymmetric, float_head=float_head,
                    progress=progress)
        else:
            report["mode"] = "whole_model"
            if asymmetric:
                log.info("gptq: asymmetric (the float model's outputs as the target) needs decoder blocks "
                         "streamed one by one; %s takes one pass, with the quantized inputs' target",
                         type(model).__name__)
            with fixed_weights(_pairs(layers)):
                reached = quantize_part(layers, _feed_items(model, items), options, report["layers"],
                                        true_sequential=true_sequential)
            log_unreached(layers, reached)
    warn_few_rows(layers, report["layers"])
    return report
