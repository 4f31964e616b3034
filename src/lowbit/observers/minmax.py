"""Min-max observers: the running extremes, and their exponential moving average."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from ..numerics import QuantSpec
from .base import Observer


class MinMaxObserver(Observer):
    """Range = the smallest and largest value seen, per scale.

    Merging is exact: an observer that merged two others holds the same state as
    one that saw both streams.

    Args:
        spec: the grid (a ``QuantSpec`` or preset name).
        name: tensor name for error messages.

    Example:
        >>> obs = MinMaxObserver(INT8_WEIGHT, name="fc.weight")
        >>> _ = obs(torch.randn(16, 32))
        >>> obs.compute_range()[0].shape
        torch.Size([16])
    """

    kind = "minmax"
    reductions = MappingProxyType({"min_val": "min", "max_val": "max"})

    def __init__(self, spec: QuantSpec | str, name: str = "tensor") -> None:
        super().__init__(spec, name)
        # float32 [n_rows] each.
        self._add_state("min_val", torch.float32)
        self._add_state("max_val", torch.float32)

    def _update(self, rows: torch.Tensor, first: bool, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if first:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Range = exponential moving average of each batch's min and max, per scale.

    The first batch sets the range; each later batch moves it by
    ``averaging_constant`` towards that batch's extremes
    (``min += c * (batch_min - min)``), as torch.ao's
    ``MovingAverageMinMaxObserver`` / ``MovingAveragePerChannelMinMaxObserver`` do.

    ``merge`` replaces the state by the mean of the merged observers' states (those
    holding data), which is what an all-reduce average across ranks gives.  This is
    *not* the state one observer would reach on the concatenated stream (an EMA depends
    on the order of the batches); it is the usual, cheap approximation for data-parallel
    calibration.  The statistics of one batch, though, are its min and max, which merge
    exactly across shards (``_batch_observer``): that is how data-parallel training folds
    the global batch into every rank's average exactly.

    Args:
        spec: the grid (a ``QuantSpec`` or preset name).
        name: tensor name for error messages.
        averaging_constant: weight of the newest batch, in (0, 1].

    Example:
        >>> obs = MovingAverageMinMaxObserver(UINT8_ACTIVATION, averaging_constant=0.1)
        >>> for _ in range(10):
        ...     _ = obs(torch.randn(8, 16))
    """

    kind = "moving_average"
    reductions = MappingProxyType({"min_val": "mean", "max_val": "mean"})

    def __init__(
        self, spec: QuantSpec | str, name: str = "tensor", *, averaging_constant: float = 0.01
    ) -> None:
        super().__init__(spec, name)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(
                f"{name}: averaging_constant must be in (0, 1], got {averaging_constant!r}; "
                "0.01 is the usual choice"
            )
        self.averaging_constant = float(averaging_constant)

    def _options(self) -> dict[str, Any]:
        return {"averaging_constant": self.averaging_constant}

    def _update(self, rows: torch.Tensor, first: bool, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if first:
            self.min_val, self.max_val = lo, hi
            return
        c = self.averaging_constant
        # Same expression (and float32 rounding) as torch.ao's observers.
        self.min_val = self.min_val + c * (lo - self.min_val)
        self.max_val = self.max_val + c * (hi - self.max_val)

    def _batch_observer(self) -> Observer:
        # One batch's statistics are its extremes; they merge across shards exactly.
        return MinMaxObserver(self.spec, self.name).to(self.num_batches.device)

    def _fold_batch(self, batch: Observer) -> None:
        self._fold(None, batch.min_val.clone(), batch.max_val.clone(), batch._param_shape())
