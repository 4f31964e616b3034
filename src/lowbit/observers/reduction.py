"""How the states of one observer class, run on different data, combine.

``Observer.merge`` (within a process: sharded calibration) and ``lowbit.qat.distributed``
(across ranks) run the same two reductions, so they agree on the result.  Each observer
class declares, per state buffer, one elementwise reduction (``Observer.reductions``):

* ``"min"`` / ``"max"``: extremes.  Idempotent: a state that is folded in twice counts once.
* ``"sum"``: additive statistics (histogram counts).
* ``"mean"``: the average over the observers that hold data (the moving average).

Additive buffers may depend on a frame that the extremes choose (a histogram's counts depend
on its range exponent); ``Observer._aligned_state(extremes)`` re-expresses them in the frame
of the reduced extremes first.  So a merge of any number of observers is, in this order:

1. MAX over every observer's ``extremes()`` (minima negated, so one MAX does both);
2. SUM over every observer's ``additive(reduced_extremes)``: its aligned additive buffers,
   then a 1 counting it as a holder of data (the divisor of the means);
3. ``load(reduced_extremes, reduced_additive)`` into the observer that keeps the result.

Both vectors are flat float64: within a process they are stacked and reduced, across ranks
each is one ``all_reduce`` (many observers share it by concatenating their vectors).  An
observer without data sends the identities (``-inf``, ``0``), so a rank that saw nothing can
take part.  float64 holds every float32 value and every integer below ``2**53`` exactly
(a histogram would need ``2**53`` values in one bin to leave that range), so the result is
the same wherever the reduction runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

ReduceOp = Literal["min", "max", "sum", "mean"]
EXTREME_OPS = ("min", "max")
ADDITIVE_OPS = ("sum", "mean")

# (buffer name, reduction, buffer shape)
_Field = tuple[str, str, tuple[int, ...]]


def check_reductions(observer, ops: Mapping[str, str]) -> None:
    """Raise unless ``ops`` gives one known reduction for every state buffer of ``observer``."""
    names = list(observer._state_names)
    unknown = {name: op for name, op in ops.items() if op not in (*EXTREME_OPS, *ADDITIVE_OPS)}
    missing = [name for name in names if name not in ops]
    extra = [name for name in ops if name not in names]
    if unknown or missing or extra:
        raise TypeError(
            f"{observer.name}: {type(observer).__name__}.reductions must map every state buffer "
            f"({', '.join(names) or 'none'}) to one of 'min', 'max', 'sum', 'mean'; "
            f"missing: {missing}, not state buffers: {extra}, unknown reductions: {unknown}"
        )


class StateReduction:
    """One observer's reducible state, flattened: what it sends, and how a result is installed.

    Args:
        observer: the observer, with or without data.
        shape: its scale layout; needed when it has no data (the identities' sizes).
        ops: buffer name -> reduction; the class's ``reductions`` by default.
    """

    def __init__(self, observer, shape: Sequence[int] | None = None, ops: Mapping[str, str] | None = None) -> None:
        ops = type(observer).reductions if ops is None else ops
        check_reductions(observer, ops)
        self.observer = observer
        self.shape = observer._param_shape() if shape is None else tuple(int(d) for d in shape)
        rows = math.prod(self.shape)
        fields = [(name, op, (rows, *observer._per_row[name])) for name, op in ops.items()]
        self.extremes: list[_Field] = [f for f in fields if f[1] in EXTREME_OPS]
        self.additive: list[_Field] = [f for f in fields if f[1] in ADDITIVE_OPS]
        self.n_extremes = sum(math.prod(f[2]) for f in self.extremes)
        # The additive buffers, then the holder count (only when there is something to add).
        self.n_additive = sum(math.prod(f[2]) for f in self.additive) + (1 if self.additive else 0)

    def _device(self) -> torch.device:
        return self.observer.num_batches.device

    def extremes_payload(self) -> torch.Tensor:
        """float64 [n_extremes]: the extremes, minima negated, to reduce with MAX."""
        if not self.observer.has_data:
            return torch.full((self.n_extremes,), float("-inf"), dtype=torch.float64, device=self._device())
        parts = [getattr(self.observer, name).double().flatten() for name, _, _ in self.extremes]
        parts = [-p if op == "min" else p for p, (_, op, _) in zip(parts, self.extremes)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=self._device())

    def additive_payload(self, extremes: torch.Tensor) -> torch.Tensor:
        """float64 [n_additive]: the additive buffers in the frame of the reduced ``extremes``
        (from ``extremes_payload``, reduced), and 1 for this holder of data; to reduce with SUM."""
        if not self.additive or not self.observer.has_data:
            return torch.zeros(self.n_additive, dtype=torch.float64, device=self._device())
        aligned = self.observer._aligned_state(self.unflatten_extremes(extremes))
        parts = [aligned[name].double().flatten() for name, _, _ in self.additive]
        return torch.cat([*parts, torch.ones(1, dtype=torch.float64, device=parts[0].device)])

    def unflatten_extremes(self, extremes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reduced extremes as buffers: name -> tensor of the buffer's shape, dtype and device."""
        values = self._split(extremes, self.extremes)
        return {name: self._as_buffer(name, -v if op == "min" else v) for name, op, v in values}

    def load(self, extremes: torch.Tensor, additive: torch.Tensor, num_batches: int | None = None) -> None:
        """Install the reduced state (the observer's ``num_batches`` is kept when None)."""
        state = self.unflatten_extremes(extremes)
        if self.additive:
            holders = additive[-1]
            for name, op, v in self._split(additive, self.additive):
                state[name] = self._as_buffer(name, v / holders if op == "mean" else v)  # divided in float64
        self.observer._install_state(state, self.shape, num_batches)

    @staticmethod
    def _split(flat: torch.Tensor, fields: list[_Field]) -> list[tuple[str, str, torch.Tensor]]:
        """``flat`` cut into ``fields`` (name, reduction, float64 values of the buffer's shape)."""
        out, offset = [], 0
        for name, op, shape in fields:
            n = math.prod(shape)
            out.append((name, op, flat[offset:offset + n].reshape(shape)))
            offset += n
        return out

    def _as_buffer(self, name: str, value: torch.Tensor) -> torch.Tensor:
        buffer = getattr(self.observer, name)
        return value.to(device=buffer.device, dtype=buffer.dtype)


def merge_states(target, observers: Sequence, shape: tuple[int, ...]) -> None:
    """Install in ``target`` the merged state of ``observers`` (its class, all with data, scale
    layout ``shape``; ``target`` itself may be among them)."""
    plans = [StateReduction(obs, shape) for obs in observers]
    device = target.num_batches.device
    extremes = torch.stack([p.extremes_payload().to(device) for p in plans]).amax(0)
    additive = torch.stack([p.additive_payload(extremes).to(device) for p in plans]).sum(0)
    num_batches = sum(int(obs.num_batches) for obs in observers)
    StateReduction(target, shape).load(extremes, additive, num_batches)
