"""Finding chains of layers in a float model: with torch.fx where it traces, else in Sequentials.

A *chain* is ``first -> link* -> second`` where each step's output feeds only the
next step (e.g. ``Conv2d -> BatchNorm2d`` for folding, ``Conv2d -> ReLU -> Conv2d``
for equalization).  The passes that use chains edit the model's own modules in
place; the fx graph is only read, never returned.

Where the whole model cannot be traced (HF models with data-dependent control flow,
for instance), the search goes down the module tree: every submodule that traces is
searched with fx, and every ``nn.Sequential`` that does not is scanned as the plain
list of layers it is (nested Sequentials flattened), so the common
``Conv -> BN -> ReLU`` containers are still found.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from torch import fx, nn

from ..nn.trace import try_trace

log = logging.getLogger(__name__)

# Predicate on a module, or on the function of an fx ``call_function`` node (F.relu ...).
Match = Callable[[object], bool]


@dataclass(frozen=True)
class Chain:
    """``first -> links -> second``; qualified module names in the model searched.

    ``links`` lists the modules between the two (functional links such as
    ``F.relu`` found by fx have no module and are not listed).
    """

    first: str
    links: tuple[str, ...]
    second: str


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward is Sequential's own (so it is a list of layers run in order)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flat_layers(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the layers ``seq`` runs, in order, nested plain Sequentials expanded."""
    out = []
    for name, child in seq.named_children():
        qual = _join(prefix, name)
        if _is_plain_sequential(child):
            out += _flat_layers(child, qual)
        else:
            out.append((qual, child))
    return out


def _sequential_chains(
    seq: nn.Sequential, prefix: str, first: Match, link: Match, second: Match
) -> list[Chain]:
    layers = _flat_layers(seq, prefix)
    chains = []
    for i, (name, module) in enumerate(layers):
        if not first(module):
            continue
        j, links = i + 1, []
        while j < len(layers) and not second(layers[j][1]) and link(layers[j][1]):
            links.append(layers[j][0])
            j += 1
        if j < len(layers) and second(layers[j][1]):
            chains.append(Chain(name, tuple(links), layers[j][0]))
    return chains


def _only_input_is(node: fx.Node, producer: fx.Node) -> bool:
    """``node`` consumes ``producer`` and no other graph value."""
    return node.all_input_nodes == [producer]


def _graph_chains(gm: fx.GraphModule, prefix: str, first: Match, link: Match, second: Match) -> list[Chain]:
    """Chains in a traced graph. A module called at more than one site is never part of a chain
    (editing its weights would change every call)."""
    modules = dict(gm.named_modules())
    calls = Counter(id(modules[n.target]) for n in gm.graph.nodes if n.op == "call_module")

    def single_module(node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        module = modules[node.target]
        return module if calls[id(module)] == 1 else None

    chains = []
    for node in gm.graph.nodes:
        start = single_module(node)
        if start is None or not first(start):
            continue
        current, links = node, []
        while len(current.users) == 1:
            nxt = next(iter(current.users))
            if not _only_input_is(nxt, current):
                break
            module = single_module(nxt)
            if module is not None and second(module):
                chains.append(Chain(_join(prefix, node.target), tuple(links), _join(prefix, nxt.target)))
                break
            if module is not None and link(module):
                links.append(_join(prefix, nxt.target))
            elif not (nxt.op == "call_function" and link(nxt.target)):
                break
            current = nxt
    return chains


def find_chains(model: nn.Module, first: Match, link: Match, second: Match) -> tuple[list[Chain], list[str]]:
    """All chains ``first -> link* -> second`` in ``model``.

    Args:
        model: the model to search (not modified).
        first, second: predicates on modules for the two ends.
        link: predicate on the modules (or functions, under fx) allowed in between.

    Returns:
        ``(chains, untraced)``: chains in graph order, no duplicates; and, for each
        module that fx could not trace, ``"name: reason"`` (empty when the whole model traced).

    Example:
        >>> chains, _ = find_chains(model, is_conv, lambda m: False, is_bn)   # Conv -> BN pairs
    """
    chains: list[Chain] = []
    untraced: list[str] = []
    _search(model, "", first, link, second, chains, untraced)
    unique = list(dict.fromkeys(chains))  # a Sequential scan and its traced children may overlap
    return unique, untraced


def _search(module, prefix, first, link, second, chains, untraced) -> None:
    if not any(True for _ in module.children()):
        return  # a leaf layer has nothing to chain
    gm, reason = try_trace(module)
    if gm is not None:
        chains += _graph_chains(gm, prefix, first, link, second)
        return
    untraced.append(f"{prefix or '<model>'}: {reason}")
    if _is_plain_sequential(module):
        chains += _sequential_chains(module, prefix, first, link, second)
    for name, child in module.named_children():
        _search(child, _join(prefix, name), first, link, second, chains, untraced)
