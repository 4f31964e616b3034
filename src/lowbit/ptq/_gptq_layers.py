"""GPTQ over the layers of a model: which layers it takes, untying shared weights, and the input
Hessians of the layers in one part of the model (a decoder block, or the whole model), gathered by
forward pre-hooks and passed to ``lowbit.ptq.gptq.gptq_layer``.  The order of the parts is
``lowbit.ptq._blocks``'s."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..nn.modules import is_quantized
from ..nn.registry import CONV, GEMM, kind_of
from .gptq import Hessian, gptq_layer, unsupported

log = logging.getLogger(__name__)


class StopPass(Exception):
    """Raised by a hook to end a forward pass once what it needs has been seen."""


# -- the layers --------------------------------------------------------------------------------
def candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized gemm / conv layers GPTQ can take (frozen weight quantizer, plain float32 weight), by
    name in module order; the others are logged with the reason."""
    found = {}
    for name, m in model.named_modules():
        kind = kind_of(m) if is_quantized(m) else None
        q = getattr(m, "weight_quantizer", None)
        if kind is None or kind.kernel not in (GEMM, CONV) or q is None or q.mode == "disabled":
            continue
        why = unsupported(m)
        if why is None and (q.mode != "static" or not q.is_frozen):
            why = f"its weight quantizer is {q.mode!r}, not frozen (static)"
        elif why is None and m.quantized_weight_source() is not m.weight:
            why = "its quantized weight is not its plain weight (a QAT conv-BN pair folds it)"
        elif why is None and m.weight.dtype != torch.float32:
            why = f"its weight is {m.weight.dtype}, not float32"
        if why:
            log.info("gptq: %s skipped: %s", name, why)
            continue
        found[name] = m
    return found


def _own_weight(model: nn.Module, layer: nn.Module) -> None:
    weight = layer.weight
    layer._parameters["weight"] = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    config = getattr(model, "config", None)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is layer and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # or transformers would tie them again (tie_weights)


def untie(model: nn.Module, names: Iterable[str]) -> None:
    """Give each layer of ``names`` a weight Parameter of its own (``GPTQ.rebuild``: what ``run`` did)."""
    for name in names:
        _own_weight(model, model.get_submodule(name))


def untie_shared(model: nn.Module, layers: Mapping[str, nn.Module]) -> list[str]:
    """Untie each of ``layers`` whose weight Parameter another module also holds; their names."""
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    shared = [name for name, layer in layers.items() if holders.get(id(layer.weight), 0) > 1]
    for name in shared:
        _own_weight(model, layers[name])
        log.info("gptq: %s's weight was tied to another module's; it now has its own", name)
    return shared


# -- Hessians over one part of the model -------------------------------------------------------
Feed = Callable[[int | None], None]
"""Runs the calibration inputs (the first ``limit``, or all with None) through the part of the
model that holds the layers; a ``StopPass`` raised by a hook ends that input's pass."""


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _float_input(layer: nn.Module) -> bool:
    q = layer.input_quantizer
    return q is None or q.mode == "disabled"


def _input_groups(layers: Mapping[str, nn.Module], feed: Feed) -> list[list[str]]:
    """The layers the first input reaches, in call order, grouped by the tensor they are fed
    (q/k/v; gate/up), then those it does not reach (a MoE's other experts), one group each.  A
    layer called twice makes every layer a group of its own."""
    seen: list[tuple[str, torch.Tensor]] = []  # (the tensors are held, so no id is reused)

    def hook(name):
        return lambda _m, args, kwargs: seen.append((name, _first_input(args, kwargs)))

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    try:
        feed(1)
    finally:
        for h in handles:
            h.remove()
    names = [n for n, _ in seen]
    unseen = [[n] for n in layers if n not in names]
    if len(set(names)) < len(names):
        return [[n] for n in dict.fromkeys(names)] + unseen
    groups: list[tuple[list[str], torch.Tensor]] = []
    for name, x in seen:
        if groups and x is groups[-1][1]:
            groups[-1][0].append(name)
        else:
            groups.append(([name], x))
    return [names for names, _ in groups] + unseen


class FloatInputs:
    """What the float model feeds each layer of one part on the current calibration item, recorded
    by a float pass (``recording``) before the quantized pass, whose Hessians take them (GPTQ's
    float target, ``Hessian.shift``).  ``hooks`` records on every layer of ``layers``."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.layers, self.recording, self.installed = layers, False, False
        self.seen: dict[str, list[torch.Tensor]] = {}

    @contextlib.contextmanager
    def hooked(self, wanted: Iterable[str]) -> Iterator[None]:
        """Record the inputs of the layers ``wanted`` inside (the feed runs its float passes only
        then); a float pass ends (``StopPass``) once each has been fed."""
        wanted = set(wanted)

        def record(name):
            def hook(_m, args, kwargs):
                if self.recording:
                    self.seen.setdefault(name, []).append(_first_input(args, kwargs))
                    if wanted <= self.seen.keys():
                        raise StopPass
            return hook
        handles = [self.layers[n].register_forward_pre_hook(record(n), with_kwargs=True) for n in wanted]
        self.installed = True
        try:
            yield
        finally:
            self.installed = False
            for h in handles:
                h.remove()

    def take(self, name: str) -> torch.Tensor:
        """The float input of ``name``'s next call on this item."""
        waiting = self.seen.get(name)
        if not waiting:
            raise RuntimeError(f"gptq: {name} ran in the quantized pass but not in the float one (a lowbit bug)")
        return waiting.pop(0)


def _accumulate(layers: Mapping[str, nn.Module], groups: list[list[str]], feed: Feed, *,
                stop: bool = False, floats: FloatInputs | None = None) -> dict[str, Hessian]:
    """The Hessians of the layers of ``groups`` over one pass of every input; the layers of a group
    share one when their inputs stay float.  ``stop``: end each pass once the last is fed.
    ``floats``: ``feed`` runs a float pass per item first (ignored here) and each Hessian also takes
    the float inputs it recorded."""
    hessians: dict[str, Hessian] = {}
    owners: list[tuple[str, Hessian]] = []
    for names in groups:
        if all(_float_input(layers[n]) for n in names):
            h = Hessian(layers[names[0]], names[0])
            hessians.update(dict.fromkeys(names, h))
            owners.append((names[0], h))
        else:
            for n in names:
                hessians[n] = Hessian(layers[n], n)
                owners.append((n, hessians[n]))

    def hook(name: str, h: Hessian, layer: nn.Module, last: bool):
        def add(_m, args, kwargs):
            if floats is not None and floats.recording:
                return
            x_float = None if floats is None else floats.take(name)
            h.add(layer._quant_input(_first_input(args, kwargs)), x_float)  # as the layer sees it deployed
            if last:
                raise StopPass
        return add

    handles = [layers[n].register_forward_pre_hook(hook(n, h, layers[n], stop and i == len(owners) - 1),
                                                   with_kwargs=True) for i, (n, h) in enumerate(owners)]
    try:
        with floats.hooked(n for n, _ in owners) if floats is not None else contextlib.nullcontext():
            feed(None)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def gptq_group(names: list[str], layers: Mapping[str, nn.Module], hessians: Mapping[str, Hessian],
               options: dict, report: dict) -> list[str]:
    """GPTQ of the layers ``names`` whose Hessians saw data (``gptq_layer``'s options; reports by
    name); returns their names."""
    done = []
    for name in names:
        if hessians[name].rows > 0:
            report[name] = gptq_layer(layers[name], hessians[name].matrix(), name=name, shift=hessians[name].shift(),
                                      **options)
            report[name]["rows"] = hessians[name].rows
            done.append(name)
    return done


ROWS_PER_COLUMN = 16
"""Calibration rows (tokens) per weight column below which ``warn_few_rows`` warns.  GPTQ fits the
calibration inputs' Hessian, whose small eigenvalues are underestimated from few rows, so its gain
can vanish on other text: SmolLM2's ``down_proj`` (1536 columns) with 16 x 512 tokens (5 rows per
column) had 0.26-0.38x round to nearest's output error on the calibration text but 0.7-1.3x on held-out
text; 64 x 512 tokens lowered the held-out perplexity further (BENCHMARKS.md, "GPTQ on the decoder")."""


def warn_few_rows(layers: Mapping[str, nn.Module], report: Mapping[str, dict]) -> None:
    """One warning naming the layers GPTQ fitted on fewer than ``ROWS_PER_COLUMN`` rows per column."""
    per_column = {name: r["rows"] / layers[name].weight[0].numel() for name, r in report.items() if "rows" in r}
    few = {name: ratio for name, ratio in per_column.items() if ratio < ROWS_PER_COLUMN}
    if few:
        worst = min(few, key=few.get)
        log.warning("gptq: %d of %d layers saw fewer than %d calibration rows (tokens) per weight column (%s: "
                    "%.1f); GPTQ's gain may not carry over to other inputs: give it more calibration data",
                    len(few), len(report), ROWS_PER_COLUMN, worst, few[worst])


def quantize_part(layers: Mapping[str, nn.Module], feed: Feed, options: dict, report: dict, *,
                  true_sequential: bool, floats: FloatInputs | None = None) -> list[str]:
    """GPTQ of the ``layers`` that ``feed`` reaches, with their Hessians over every input: all in
    one pass, or (``true_sequential``) group after group.  ``floats``: the float inputs ``feed``
    records (``FloatInputs``), GPTQ's target then the float model's outputs.  Returns the names reached."""
    if not layers:
        return []
    groups = _input_groups(layers, feed)
    reached = []
    hessians = None if true_sequential else _accumulate(layers, groups, feed, floats=floats)
    for group in groups:  # true_sequential: each group's Hessians once the groups before are quantized
        found = hessians if hessians is not None else _accumulate(layers, [group], feed, stop=True, floats=floats)
        reached += gptq_group(group, layers, found, options, report)
    return reached


def log_unreached(layers: Iterable[str], reached: Iterable[str]) -> None:
    """Log the layers of ``layers`` not in ``reached`` (their weights keep round to nearest)."""
    for name in sorted(set(layers) - set(reached)):
        log.info("gptq: %s skipped: the calibration data never reaches it", name)
