"""The quantized model's outputs with one layer switched, re-running only what the switch changes.

Sensitivity by SQNR or ablation runs the model twice per layer: with only that layer quantized
("only") and with only that layer float ("without").  Every value of the network that does not
depend on the switched layer is the same in each of those runs as in one of two reference runs:
everything float (for "only") or everything quantized (for "without").  So, per evaluation batch,
``LayerSwitches`` runs the two references once, keeping every intermediate value, and each
switched run evaluates only the switched layer's call and what lies downstream of it in the
torch.fx graph, reading the rest from the reference (``lowbit.nn.replay``).  The outputs are the
same tensors a full forward pass gives (the same ops on the same inputs); on MobileNetV2 the
switched runs cost about half of full passes, since a layer has on average half the network
upstream of it.

A model torch.fx cannot trace (most Hugging Face models), a batch given as keyword arguments, or
a layer called inside another opaque module: full forward passes, as before.  Memory: the two
references' intermediate values for one batch (MobileNetV2, 8 photos: about 0.4 GB).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.replay import Replayer
from ..nn.trace import try_trace
from ..nn.walk import first_tensor, run_model
from ._layers import float_only, quantized_only


class BatchSwitches:
    """One batch's outputs with one layer switched (``only`` / ``without``) and fully quantized."""

    @torch.no_grad()
    def __init__(self, owner: LayerSwitches, batch) -> None:
        self._owner, self._batch = owner, batch
        replayer = owner.replayer if not isinstance(batch, Mapping) else None
        self._replayer = replayer
        if replayer is not None:
            args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            with quantized_only(owner.qmodel, []):
                self._float = replayer.record(args)
            self._quantized = replayer.record(args)
            self.full = _output(replayer.final(self._quantized))
        else:
            self.full = _output(run_model(owner.qmodel, batch))

    @torch.no_grad()
    def only(self, name: str) -> torch.Tensor:
        """The output with only the layer ``name`` quantized."""
        with quantized_only(self._owner.qmodel, [name]):
            return self._run(name, lambda: self._float)

    @torch.no_grad()
    def without(self, name: str) -> torch.Tensor:
        """The output with everything quantized but the layer ``name``."""
        with float_only(self._owner.qmodel, [name]):
            return self._run(name, lambda: self._quantized)

    def _run(self, name: str, reference) -> torch.Tensor:
        nodes = self._owner.nodes.get(name) if self._replayer is not None else None
        if nodes is None:
            return _output(run_model(self._owner.qmodel, self._batch))
        return _output(self._replayer.final(self._replayer.rerun(reference(), nodes)))


class LayerSwitches:
    """``for batch in LayerSwitches(qmodel, batches, names)``: each batch's ``BatchSwitches``
    (see the module docstring).  ``qmodel`` must be in eval mode and its quantizers frozen."""

    def __init__(self, qmodel: nn.Module, batches: Sequence, names: Sequence[str]) -> None:
        self.qmodel, self.batches = qmodel, list(batches)
        graph_module, _ = try_trace(qmodel)
        self.replayer = None if graph_module is None else Replayer(graph_module)
        self.nodes = {} if self.replayer is None else {name: self.replayer.downstream(name) for name in names}

    @property
    def replays(self) -> bool:
        """Whether switched runs re-run only the switched layer's part of the graph."""
        return self.replayer is not None and any(v is not None for v in self.nodes.values())

    def __iter__(self) -> Iterator[BatchSwitches]:
        for batch in self.batches:
            yield BatchSwitches(self, batch)


@dataclass
class SwitchedOutputs:
    """Per layer, its outputs batch by batch (float64, CPU) with only it quantized and with only
    it float; and the fully quantized outputs."""

    only: dict[str, list[torch.Tensor]]
    without: dict[str, list[torch.Tensor]]
    full: list[torch.Tensor]


def switched_outputs(qmodel: nn.Module, batches: Sequence, names: Sequence[str],
                     bar: Callable[[Iterable], Iterable] = iter,
                     around_only: Callable[[str], contextlib.AbstractContextManager] | None = None) -> SwitchedOutputs:
    """Every layer's "only" and "without" outputs on ``batches``, batch-major (one batch's
    reference values in memory at a time); ``around_only(name)`` is entered around each "only"
    run (e.g. hooks measuring the layer's input noise); ``bar`` wraps the (batch, layer) pairs."""
    result = SwitchedOutputs(only={n: [] for n in names}, without={n: [] for n in names}, full=[])
    switches = iter(LayerSwitches(qmodel, batches, names))
    if not names:
        result.full = [batch.full for batch in switches]
        return result
    current = -1
    for b, name in bar([(b, name) for b in range(len(batches)) for name in names]):
        if b != current:
            batch, current = next(switches), b
            result.full.append(batch.full)
        with around_only(name) if around_only else contextlib.nullcontext():
            result.only[name].append(batch.only(name))
        result.without[name].append(batch.without(name))
    return result


def _output(out) -> torch.Tensor:
    return first_tensor(out).detach().double().cpu()
