"""Observer: the streaming, mergeable, saveable base of every range estimator.

An observer sits on one tensor (a weight, or a layer's input) and watches the
values that pass through it.  Its statistics are kept *per row* of
``rows_view(x, spec)``: one row per scale of the spec (1 row per tensor, one
per channel, one per block), so every granularity is handled by the same code.

State lives in registered buffers that start empty (shape ``(0,)``) and take
their real shape on the first batch, so ``state_dict()`` / ``load_state_dict()``
and ``torch.save`` / ``torch.load(weights_only=True)`` round-trip an observer
whether or not it has seen data.  The memory an observer holds depends on the
spec and its options, never on the number of batches it saw.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from ..numerics import QuantSpec, compute_qparams, finite_row_ranges, get_spec, ragged_rows, rows_view
from .reduction import ADDITIVE_OPS, ReduceOp, check_reductions, merge_states

# Bumped when the meaning of the saved buffers changes.
STATE_VERSION = 1


@contextlib.contextmanager
def _updating_state() -> Iterator[None]:
    """Context for every change of an observer's state: no autograd, no inference tensors.

    Tensors made under ``torch.inference_mode()`` can never be updated in place
    outside it, so a state built during an inference-mode calibration could not be
    merged, fed or loaded afterwards.  Leaving inference mode here keeps the
    buffers ordinary tensors (reading inference-mode inputs is fine).
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


class _RecentTensors(threading.local):
    """Per thread: statistics of the last few tensors observed, shared by the observers that see
    the same tensor (a residual block's input feeds a Conv and the add; one input feeds the Q, K
    and V projections), so each batch is reduced and binned once per spec, not once per observer.

    Entries hold the tensor by weak reference (no activation outlives its batch because of this)
    and its version counter (an in-place change makes it another tensor here)."""

    def __init__(self) -> None:
        self.entries: list[tuple[weakref.ref, int, tuple, dict]] = []


_RECENT = _RecentTensors()
_RECENT_SIZE = 8


def _batch_memo(x: torch.Tensor, key: tuple) -> dict:
    """A dict shared by every observer that sees this very tensor, unchanged, under ``key``
    (the rows layout: spec and device); empty the first time."""
    try:
        version = x._version
    except RuntimeError:  # an inference tensor: no version counter, so nothing to match safely
        return {}
    entries = _RECENT.entries
    for ref, seen_version, seen_key, memo in entries:
        if ref() is x and seen_version == version and seen_key == key:
            return memo
    memo: dict = {}
    try:
        ref = weakref.ref(x)
    except TypeError:
        return memo
    entries.append((ref, version, key, memo))
    del entries[:-_RECENT_SIZE]
    return memo


class Observer(torch.nn.Module, abc.ABC):
    """Base class of the range estimators.

    Subclasses set ``kind`` (the registry key), register their statistics with
    ``_add_state``, implement ``_update`` (fold one batch in) and ``_range_rows`` (one
    ``(min, max)`` per row), and say how their state combines with the state of the same
    observer run on other data (``merge``, data-parallel synchronisation), in one of two ways:

    * ``reductions``: one elementwise reduction per state buffer (``"min"``, ``"max"``,
      ``"sum"``, ``"mean"``; see ``lowbit.observers.reduction``), plus ``_aligned_state``
      when the additive buffers depend on the extremes.  Across ranks this is one
      ``all_reduce`` per kind of reduction for all observers together.
    * or ``_merge_state`` (fold one other observer in), when no elementwise reduction
      describes the state; across ranks the states are then all-gathered.

    Args:
        spec: the grid the range is for (a ``QuantSpec`` or a preset name); it fixes
            the rows (granularity, axis, group size) and, for the search-based
            estimators, the error being minimised.
        name: the tensor's name, used in every error message.

    Example:
        >>> obs = MinMaxObserver(INT8_ACTIVATION, name="layer1.input")
        >>> _ = obs(torch.randn(32, 64))
        >>> scale, zero_point = obs.qparams()
    """

    kind: ClassVar[str] = ""
    reductions: ClassVar[Mapping[str, ReduceOp]] = MappingProxyType({})
    """How each state buffer combines across observers, by buffer name (see the class docstring)."""

    def __init__(self, spec: QuantSpec | str, name: str = "tensor") -> None:
        super().__init__()
        self.spec = get_spec(spec)
        self.name = name
        self._state_names: list[str] = []
        self._per_row: dict[str, tuple[int, ...]] = {}  # state buffer -> its shape after the row axis
        # Scale layout seen on the first batch (int64, one entry per dimension;
        # empty for per-tensor specs), and how many batches have been folded in.
        self.register_buffer("param_shape", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))
        # During _update: statistics of this batch shared with other observers of the same tensor,
        # and the rows of a ragged last group with their number of padding copies (ragged_rows).
        self._memo: dict | None = None
        self._ragged: tuple[torch.Tensor, int] | None = None

    # -- subclass interface ----------------------------------------------------------
    def _add_state(self, name: str, dtype: torch.dtype, per_row: tuple[int, ...] = ()) -> None:
        """Register an empty per-row statistic buffer that ``reset`` and loading manage; with
        data it has shape ``(n_rows, *per_row)``."""
        self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self._state_names.append(name)
        self._per_row[name] = tuple(per_row)

    def _options(self) -> dict[str, Any]:
        """Constructor options that must agree for ``merge`` and ``load_state_dict``."""
        return {}

    @abc.abstractmethod
    def _update(self, rows: torch.Tensor, first: bool, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fold ``rows`` ([n_rows, elements], float32) into the statistics; ``lo`` / ``hi`` are
        the batch's per-row min and max (already computed, checked finite).  The rows in
        ``self._ragged`` (a ragged last group) end with padding copies of their last element,
        which a statistic that counts values must discount (``HistogramObserver`` does)."""

    def _merge_state(self, other: Observer) -> None:
        """Fold the statistics of ``other`` (same class, spec, options, rows; both with data) into
        ``self``.  Override it only for a state that ``reductions`` cannot describe."""
        raise NotImplementedError(f"{type(self).__name__} merges by its `reductions`, not pair by pair")

    def _aligned_state(self, extremes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The additive (``"sum"`` / ``"mean"``) buffers, expressed in the frame that the reduced
        extremes of all merged observers define (``extremes``: buffer name -> merged value).
        By default the buffers as they are; a histogram re-bins its counts to the merged range."""
        return {name: getattr(self, name) for name, op in self.reductions.items() if op in ADDITIVE_OPS}

    def _batch_observer(self) -> Observer:
        """A new, empty observer for one batch: merging those of the shards of a batch gives the
        statistics of the whole batch, which ``_fold_batch`` folds into this observer."""
        return self._fresh()

    def _fold_batch(self, batch: Observer) -> None:
        """Fold ``batch`` (from ``_batch_observer``; one batch, possibly merged from shards) in,
        as ``forward`` on that whole batch would.  By default a merge that counts one batch
        (exact when the statistics of a batch merge like those of two batches do)."""
        count = self.num_batches + 1
        self.merge(batch)
        with _updating_state():
            self.num_batches = count

    @abc.abstractmethod
    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` per row, float32 tensors of shape [n_rows]."""

    # -- public API ------------------------------------------------------------------
    @property
    def has_data(self) -> bool:
        """True once at least one batch (or a merged observer's data) has been seen."""
        return bool(self.num_batches > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update the statistics from ``x`` and return ``x`` unchanged.

        Raises:
            ValueError: ``x`` is empty, holds NaN/Inf, does not fit the spec, or gives a
                different scale layout than earlier batches.
        """
        with _updating_state():
            rows, shape = self._rows(x)
            memo = _batch_memo(x, (self.spec, rows.device))
            if "range" in memo:  # another observer with this spec just saw this very tensor
                lo, hi = (t.clone() for t in memo["range"])
            else:
                # One pass gives the row ranges every observer needs (and the finiteness check).
                lo, hi = finite_row_ranges(rows, x, self.name)
                memo["range"] = (lo.clone(), hi.clone())
            self._memo, self._ragged = memo, ragged_rows(x.shape, self.spec, self.name)
            try:
                self._fold(rows, lo, hi, shape)
            finally:
                self._memo = self._ragged = None
        return x

    def _fold(self, rows: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Fold one batch (its rows, per-row min / max, scale shape) into the state."""
        with _updating_state():
            self._update(rows, not self.has_data, lo, hi)
            if not self.has_data:
                self.param_shape = torch.tensor(shape, dtype=torch.int64, device=self.num_batches.device)
            self.num_batches += 1

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimated ``(min, max)``, float32 tensors in the spec's scale layout.

        Raises:
            RuntimeError: the observer has seen no data.
        """
        self._require_data()
        lo, hi = self._range_rows()
        shape = self._param_shape()
        return lo.float().reshape(shape), hi.float().reshape(shape)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the estimated range (see ``compute_qparams``).

        Raises:
            RuntimeError: the observer has seen no data.
        """
        lo, hi = self.compute_range()
        return compute_qparams(lo, hi, self.spec, self.name)

    def merge(self, others: Observer | Iterable[Observer]) -> Observer:
        """Fold the statistics of ``others`` (the same observer run on other data: calibration
        shards, ranks) into this observer, in place; returns ``self``.

        For min-max and the histogram observers the result is what one observer that saw all
        the data computes, bit for bit, whatever the order; a moving average becomes the mean
        of the states that hold data (an EMA depends on the order of its batches).  Merging
        an empty observer changes nothing; merging into an empty one copies.

        Args:
            others: one observer or several, each of this class, spec and options.

        Raises:
            ValueError: another class, spec or options, or another scale layout (a different
                tensor); the message names both observers.

        Example:
            >>> a, b = MinMaxObserver(INT8_ACTIVATION), MinMaxObserver(INT8_ACTIVATION)
            >>> _ = a(shard_1); _ = b(shard_2)
            >>> scale, zero_point = a.merge([b]).qparams()  # as if one observer saw both shards
        """
        if isinstance(others, Iterable) and not isinstance(others, (Observer, torch.Tensor)):
            others = list(others)
        else:
            others = [others]
        for other in others:
            self._check_compatible(other)
        filled = [obs for obs in others if obs.has_data]
        if not filled:
            return self
        parts = [self, *filled] if self.has_data else filled
        shape = parts[0]._param_shape()
        for obs in parts[1:]:
            if obs._param_shape() != shape:
                raise ValueError(
                    f"{self.name}: cannot merge the observer of {obs.name!r} that saw scale shape {obs._param_shape()} "
                    f"into one that saw {shape} (the observer of {parts[0].name!r}); both must watch the same tensor"
                )
        with _updating_state():
            if self._reducible():
                merge_states(self, parts, shape)
            else:
                for obs in filled:
                    self._merge_pairwise(obs)
        return self

    def _reducible(self) -> bool:
        """True when ``reductions`` describes the state, False when ``_merge_state`` merges it.

        Raises:
            NotImplementedError: the class does neither.
            TypeError: ``reductions`` leaves out a state buffer or names an unknown reduction.
        """
        if type(self).reductions:
            check_reductions(self, type(self).reductions)
            return True
        if type(self)._merge_state is Observer._merge_state:
            raise NotImplementedError(
                f"{self.name}: {type(self).__name__} does not say how to merge its state: set its "
                "`reductions` (a reduction per state buffer) or override `_merge_state`"
            )
        return False

    def _merge_pairwise(self, other: Observer) -> None:
        if not self.has_data:
            self._copy_state_from(other)
            return
        self._merge_state(other)
        self.num_batches += other.num_batches.to(self.num_batches.device)

    def _install_state(self, state: dict[str, torch.Tensor], shape: tuple[int, ...], num_batches: int | None) -> None:
        """Replace state buffers (fresh tensors), the scale layout and, unless None, the batch count."""
        with _updating_state():
            device = self.num_batches.device
            for name, value in state.items():
                setattr(self, name, value.to(device).clone())
            self.param_shape = torch.tensor(shape, dtype=torch.int64, device=device)
            if num_batches is not None:
                self.num_batches = torch.tensor(int(num_batches), dtype=torch.int64, device=device)

    def _fresh(self) -> Observer:
        """A new, empty observer of this class, spec, name and options, on this one's device."""
        return type(self)(self.spec, self.name, **self._options()).to(self.num_batches.device)

    def reset(self) -> None:
        """Forget everything seen so far (the buffers go back to empty)."""
        with _updating_state():
            for name in [*self._state_names, "param_shape"]:
                buf = getattr(self, name)
                setattr(self, name, torch.zeros(0, dtype=buf.dtype, device=buf.device))
            self.num_batches = torch.zeros_like(self.num_batches)

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self._options().items())
        return f"{self.spec.describe()}, name={self.name!r}{options}"

    # -- saving and loading ----------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        # Plain types only, so torch.load(weights_only=True) accepts it.
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "spec": self.spec.to_dict(),
            "options": self._options(),
        }

    def set_extra_state(self, state: Any) -> None:
        # Checked in _load_from_state_dict, where a mismatch becomes a load error.
        pass

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        extra = state_dict.get(prefix + "_extra_state")  # the key nn.Module gives get_extra_state()
        if extra is not None:
            problem = self._describe_mismatch(extra)
            if problem:
                error_msgs.append(problem)
                return
        with _updating_state():
            # Buffers start empty and grow on the first batch: give them the incoming
            # shapes (fresh tensors) before the default loader copies values in.
            for name in [*self._state_names, "param_shape", "num_batches"]:
                incoming = state_dict.get(prefix + name)
                current = getattr(self, name)
                if isinstance(incoming, torch.Tensor):
                    fresh = torch.zeros(incoming.shape, dtype=current.dtype, device=current.device)
                    setattr(self, name, fresh)
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )

    def _describe_mismatch(self, extra: Any) -> str:
        """Why a saved state cannot be loaded here, or '' when it can."""
        if not isinstance(extra, dict) or extra.get("version") != STATE_VERSION:
            return (
                f"{self.name}: saved observer state has an unknown format "
                f"(expected version {STATE_VERSION}); save it again with this version of lowbit"
            )
        mine = self.get_extra_state()
        for key in ("kind", "spec", "options"):
            theirs = extra.get(key)
            if key == "spec" and isinstance(theirs, dict):  # fields added since take their defaults
                theirs = {**QuantSpec().to_dict(), **theirs}
            if theirs != mine[key]:
                return (
                    f"{self.name}: saved observer state has {key}={extra.get(key)!r} but this observer has "
                    f"{key}={mine[key]!r}; build the observer with the same kind, spec and options to load it"
                )
        return ""

    # -- helpers -----------------------------------------------------------------------
    def _param_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.param_shape.tolist())

    def _require_data(self) -> None:
        if not self.has_data:
            raise RuntimeError(
                f"{self.name}: observer saw no data; run calibration batches through the model "
                "before asking for qparams"
            )

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Validate a batch; return it as float32 rows on the state's device, and its scale shape."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: observers take a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError(
                f"{self.name}: got an empty tensor of shape {tuple(x.shape)}; an observer needs at least "
                "one value per batch (drop empty batches from the calibration data)"
            )
        x = x.detach().to(device=self.num_batches.device, dtype=torch.float32)
        rows, shape = rows_view(x, self.spec, self.name)
        if self.has_data and shape != self._param_shape():
            raise ValueError(
                f"{self.name}: this batch gives scale shape {shape} but earlier batches gave "
                f"{self._param_shape()} ({self.spec.describe()}); keep the quantized dimension the same "
                "size across batches, or call reset() to start over"
            )
        return rows, shape

    def _check_compatible(self, other: Observer) -> None:
        same = type(other) is type(self) and other.spec == self.spec and other._options() == self._options()
        if not same:
            described = other.extra_repr() if isinstance(other, Observer) else "..."
            raise ValueError(
                f"{self.name}: cannot merge {type(other).__name__}({described}) into "
                f"{type(self).__name__}({self.extra_repr()}); merge only observers built with the same "
                "class, spec and options"
            )

    def _copy_state_from(self, other: Observer) -> None:
        device = self.num_batches.device
        for name in [*self._state_names, "param_shape", "num_batches"]:
            setattr(self, name, getattr(other, name).detach().clone().to(device))
