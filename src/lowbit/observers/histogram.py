"""Streaming per-row histograms that merge exactly: the base of percentile, MSE and entropy.

Each row (one per scale of the spec) keeps ``bins`` int64 counts over the
symmetric range ``[-R, R)`` with ``R = 2**e`` the smallest power of two *strictly*
above the row's largest ``|x|`` so far (``e`` is the exponent ``frexp`` returns).
Bin ``j`` covers ``[(j - bins/2) * w, (j - bins/2 + 1) * w)`` with bin width
``w = R / (bins/2)``, a power of two as well.

Why powers of two: the bin of a value is ``floor(x * 2**s) + bins/2`` (exact
arithmetic in float64 for every finite float32), and when a later batch needs a
range ``2**d`` times larger the old counts coarsen exactly: bin ``j`` moves to
``floor((j - bins/2) / 2**d) + bins/2``, which is the bin the values would have
got at the larger range in the first place.  So the counts never depend on the
order of the batches, and merging two observers (bring both to the larger
range, add the counts) gives exactly the counts of one observer that saw both
streams.  Because R is strictly above ``max |x|``, no value sits on the range's
edge and no clamping is needed (clamping would break that exactness).

The exact per-row min and max are kept too, so estimates never leave the data's range.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from ..numerics import QuantSpec
from .base import Observer, _updating_state

# Rows whose values are all below 2**_MIN_EXP in magnitude (all-zero rows in
# particular, which have no exponent) use R = 2**_MIN_EXP.  -100 keeps every bin
# width a normal float32 for any bins up to 2**24.
_MIN_EXP = -100


def range_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Smallest ``e`` with ``amax < 2**e`` (int64), at least ``_MIN_EXP``.

    ``frexp`` writes ``amax = m * 2**e`` with ``0.5 <= m < 1``, so ``e`` is exact.
    """
    exponent = torch.frexp(amax).exponent.to(torch.int64)
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, _MIN_EXP))
    return exponent.clamp_min(_MIN_EXP)


def bin_indices(rows: torch.Tensor, exponent: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin index of every value: ``floor(x / w) + bins/2`` with ``w = 2**exponent / (bins/2)``.

    Args:
        rows: float32 [n_rows, k] with ``|x| < 2**exponent`` row-wise.
        exponent: int64 [n_rows].
        bins: even number of bins, a power of two.

    Returns:
        int32 (int64 past 2**31 total bins) [n_rows, k] in ``[0, bins)``.
    """
    half = bins // 2
    # 1 / w = 2**(log2(half) - e): multiplying by it is exact in float64.
    log2_half = half.bit_length() - 1
    shift = log2_half - exponent
    index_dtype = torch.int32 if rows.shape[0] * bins < 2**31 else torch.int64
    if bool((shift >= 0).all()):
        # Scaling by 2**shift >= 1 is exact in float32 and never underflows to zero, so
        # float32 gives the same bins as float64 at a third of the memory traffic.
        inv_width = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), shift)
        return torch.floor(rows * inv_width[:, None]).to(index_dtype) + half
    # Rows with |x| above `half`: a tiny negative x could underflow to -0.0 in float32.
    inv_width = torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), shift)
    return torch.floor(rows.double() * inv_width[:, None]).to(index_dtype) + half


# torch.histc counts in the input's dtype: float32 counts are exact up to 2**24 per call.
_HISTC_CHUNK = 1 << 24
# Bins of all rows together (row r's at r * bins); up to this many the float32 bin arithmetic
# below is exact.
_HISTC_MAX_BINS = 1 << 20


def _histc_counts(values: torch.Tensor, n_bins: int, left: float, right: float) -> torch.Tensor:
    """int64 ``torch.histc(values, n_bins, left, right)``, exact at any size (chunked)."""
    flat = values.reshape(-1)
    counts = torch.zeros(n_bins, dtype=torch.int64, device=values.device)
    for start in range(0, flat.numel(), _HISTC_CHUNK):
        counts += torch.histc(flat[start : start + _HISTC_CHUNK], n_bins, left, right).to(torch.int64)
    return counts


def bin_counts(
    rows: torch.Tensor, exponent: torch.Tensor, bins: int, nonnegative: bool = False
) -> torch.Tensor:
    """Counts of ``bin_indices(rows, exponent, bins)`` per row: int64 [n_rows, bins].

    Built with ``torch.histc`` (multithreaded; one pass) in float32 arithmetic that is exact here.
    histc puts ``x`` in bin ``trunc((x - left) * n / (right - left))``:

    * one row of values ``>= 0`` (a ReLU's output): histc over ``[0, R)`` with ``bins/2`` bins
      computes ``trunc(x * 2**(log2(bins/2) - e))`` with power-of-two scalings only (exact; a
      result that underflows is below 1 anyway), which is ``floor`` for ``x >= 0``.  One pass.
    * otherwise: ``v = floor(x * 2**shift)`` as in ``bin_indices`` (exact), plus ``r * bins`` for
      row r (exact integers), then histc with unit bins centred on the integers: ``v - left`` is
      a half-integer below ``2**21``, and the product's rounding moves it by far less than the
      0.5 that separates it from a bin edge.  Three passes.

    Other cases (very small ranges, very many rows) use ``bin_indices`` and ``bincount``.

    Args:
        rows: float32 [n_rows, k] with ``|x| < 2**exponent`` row-wise.
        exponent: int64 [n_rows].
        bins: even number of bins, a power of two.
        nonnegative: the caller knows every value is ``>= 0`` (``-0.0`` included).
    """
    n_rows = rows.shape[0]
    half = bins // 2
    total = n_rows * bins
    shift = (half.bit_length() - 1) - exponent
    if nonnegative and n_rows == 1 and -100 <= int(exponent[0]) <= 100:
        counts = torch.zeros(1, bins, dtype=torch.int64, device=rows.device)
        counts[0, half:] = _histc_counts(rows, half, 0.0, float(2.0 ** int(exponent[0])))
        return counts
    if total > _HISTC_MAX_BINS or not bool((shift >= 0).all()):
        idx = bin_indices(rows, exponent, bins)
        flat = (idx + torch.arange(n_rows, device=idx.device, dtype=idx.dtype)[:, None] * bins).flatten()
        return torch.bincount(flat, minlength=total).view(n_rows, bins)
    inv_width = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), shift)
    v = torch.mul(rows, inv_width[:, None]).floor_()  # integers in [-half, half), exact
    if n_rows > 1:
        v.add_(torch.arange(n_rows, device=v.device, dtype=torch.float32)[:, None] * bins)
    return _histc_counts(v, total, -half - 0.5, total - half - 0.5).view(n_rows, bins)


def discount_padding(counts: torch.Tensor, rows: torch.Tensor, exponent: torch.Tensor, bins: int,
                     ragged: tuple[torch.Tensor, int]) -> torch.Tensor:
    """``counts`` (of ``bin_counts(rows, exponent, bins)``) without the padding of a ragged last
    group: ``ragged`` = (row indices, copies), each such row ending with that many copies of
    its last element (``lowbit.numerics.ragged_rows``).  Exact: the copies sit in the bin
    ``bin_indices`` gives their value, the same bin ``bin_counts`` put them in.  In place."""
    index, copies = ragged
    index = index.to(rows.device)
    where = bin_indices(rows[index, -1:], exponent[index], bins).squeeze(1).to(torch.int64)
    counts[index, where] -= copies
    return counts


def coarsen(counts: torch.Tensor, exponent: torch.Tensor, new_exponent: torch.Tensor) -> torch.Tensor:
    """Counts of [n_rows, bins] at range ``2**exponent`` re-binned at ``2**new_exponent`` (exactly).

    Each row may grow by its own factor ``2**d``, ``d = new_exponent - exponent >= 0``.
    """
    d = new_exponent - exponent
    if not bool((d > 0).any()):
        return counts
    bins = counts.shape[1]
    half = bins // 2
    # Beyond log2(bins) every old bin lands in the two central ones anyway; capping
    # keeps 2**d inside int64.
    factor = torch.ones_like(d) << d.clamp_max(bins.bit_length())  # [n_rows]
    offsets = torch.arange(bins, device=counts.device) - half  # [bins]
    new_idx = torch.div(offsets[None, :], factor[:, None], rounding_mode="floor") + half
    return torch.zeros_like(counts).scatter_add_(1, new_idx, counts)


def histogram_quantile(
    counts: torch.Tensor, q: float, left_edge: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """The ``q``-quantile of each row's histogram, interpolating linearly inside a bin.

    Args:
        counts: [n_rows, n_bins] counts (any number type).
        q: fraction in [0, 1].
        left_edge: float64 [n_rows], the left edge of bin 0.
        width: float64 [n_rows], the bin width.

    Returns:
        float64 [n_rows]: the value below which a fraction ``q`` of the mass lies,
        assuming the values of a bin spread evenly over it.
    """
    c = counts.double()
    cum = torch.cumsum(c, dim=1)
    target = (q * cum[:, -1]).unsqueeze(1)  # [n_rows, 1]
    # First bin whose cumulative count reaches the target.
    j = torch.searchsorted(cum, target, side="left").clamp_max(c.shape[1] - 1)
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(target))
    in_bin = c.gather(1, j)
    frac = torch.where(in_bin > 0, (target - before) / in_bin.clamp_min(1e-300), torch.zeros_like(target))
    return (left_edge + (j.squeeze(1).double() + frac.squeeze(1).clamp(0.0, 1.0)) * width)


def row_chunks(n_rows: int, width: int) -> list[slice]:
    """Slices of rows whose float64 ``[rows, width]`` work arrays stay near 1 MiB.

    The range searches make dozens of elementwise passes per candidate; on chunks
    that fit in cache they run several times faster than over the whole histogram.
    """
    per_chunk = max(1, (1 << 17) // max(1, width))
    return [slice(start, min(start + per_chunk, n_rows)) for start in range(0, n_rows, per_chunk)]


class HistogramObserver(Observer):
    """Base of the histogram estimators (percentile, MSE, entropy); not used directly.

    State per row: ``counts`` [n_rows, bins] int64, ``exponent`` [n_rows] int64
    (the range is ``[-2**exponent, 2**exponent)``), and the exact ``min_val`` and
    ``max_val`` [n_rows] float32.  The state has the same size after every batch.

    Merging (``merge``, data-parallel synchronisation): MAX of the exponents and of the
    maxima, MIN of the minima, then the counts, each re-binned to the merged exponent
    (exact, see the module docstring), are summed: the counts of one observer that saw all
    the data, bit for bit.

    Args:
        spec: the grid (a ``QuantSpec`` or preset name).
        name: tensor name for error messages.
        bins: bins per row, a power of two >= 16 (2048 as TensorRT).
    """

    reductions = MappingProxyType({"counts": "sum", "exponent": "max", "min_val": "min", "max_val": "max"})

    def __init__(self, spec: QuantSpec | str, name: str = "tensor", *, bins: int = 2048) -> None:
        super().__init__(spec, name)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16 or bins & (bins - 1):
            raise ValueError(
                f"{name}: bins must be a power of two >= 16 (so ranges rescale exactly), got {bins!r}; "
                "2048 is the usual choice"
            )
        self.bins = bins
        self._add_state("counts", torch.int64, per_row=(bins,))
        self._add_state("exponent", torch.int64)
        self._add_state("min_val", torch.float32)
        self._add_state("max_val", torch.float32)

    def _options(self) -> dict[str, Any]:
        return {"bins": self.bins}

    def _update(self, rows: torch.Tensor, first: bool, lo: torch.Tensor, hi: torch.Tensor) -> None:
        # The batch is binned at its own range, then coarsened to the state's (exact: see the
        # module docstring), so observers of the same tensor share one binning (self._memo).
        memo = self._memo if self._memo is not None else {}
        key = ("bins", self.bins)
        if key not in memo:
            batch_exp = range_exponent(torch.maximum(-lo, hi))
            nonnegative = bool((lo >= 0).all())
            counts = bin_counts(rows, batch_exp, self.bins, nonnegative)
            if self._ragged is not None:  # a ragged last group: its padding is not data
                counts = discount_padding(counts, rows, batch_exp, self.bins, self._ragged)
            memo[key] = (batch_exp, counts)
        batch_exp, batch_counts = memo[key]
        if first:
            self.counts = batch_counts.clone()
            self.exponent, self.min_val, self.max_val = batch_exp.clone(), lo, hi
            return
        self._rescale(torch.maximum(self.exponent, batch_exp))
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)
        self.counts += coarsen(batch_counts, batch_exp, self.exponent)

    def _aligned_state(self, extremes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"counts": coarsen(self.counts, self.exponent, extremes["exponent"])}

    def _rescale(self, exponent: torch.Tensor) -> None:
        self.counts = coarsen(self.counts, self.exponent, exponent)
        self.exponent = exponent

    def expand_range(self, exponent: torch.Tensor) -> None:
        """Re-bin every row to the range ``[-2**exponent, 2**exponent)``, exactly.

        This is the step that makes the counts of different observers addable.  For
        data-parallel calibration without gathering whole states: all-reduce
        ``exponent`` with MAX, call ``expand_range`` with it on every rank, then
        all-reduce ``counts`` with SUM, ``min_val`` with MIN and ``max_val`` with MAX
        (and ``num_batches`` with SUM).

        Args:
            exponent: int64, [n_rows] or broadcastable to it; no smaller than the
                current ``exponent`` of any row.

        Raises:
            RuntimeError: the observer has seen no data (its rows are not known yet).
            ValueError: ``exponent`` would shrink a row's range.

        Example:
            >>> e = obs.exponent.clone()
            >>> torch.distributed.all_reduce(e, op=torch.distributed.ReduceOp.MAX)
            >>> obs.expand_range(e)
        """
        self._require_data()
        with _updating_state():
            exponent = torch.as_tensor(exponent, dtype=torch.int64, device=self.exponent.device)
            exponent = exponent.expand_as(self.exponent).clone()
            shrinking = int((exponent < self.exponent).sum())
            if shrinking:
                raise ValueError(
                    f"{self.name}: expand_range can only grow the histogram range, but {shrinking} row(s) "
                    "would shrink; all-reduce the exponents with MAX first"
                )
            self._rescale(exponent)

    # -- views of the histogram used by the estimators -------------------------------------
    def bin_width(self) -> torch.Tensor:
        """float64 [n_rows]: the current bin width of each row."""
        half = self.bins // 2
        return torch.ldexp(torch.ones_like(self.exponent, dtype=torch.float64), self.exponent) / half

    def folded_counts(self) -> torch.Tensor:
        """Histogram of ``|x|``: [n_rows, bins/2]; bin k covers ``|x|`` in ``[k*w, (k+1)*w]``."""
        half = self.bins // 2
        # Bin half+k holds [k*w, (k+1)*w); its mirror half-1-k holds [-(k+1)*w, -k*w).
        return self.counts[:, half:] + self.counts[:, :half].flip(1)

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The counts and bin edges, laid out by scale (for reports and plots).

        Returns:
            ``(counts, edges)``: int64 of shape ``param_shape + (bins,)`` and float64 of
            shape ``param_shape + (bins + 1,)``.

        Raises:
            RuntimeError: the observer has seen no data.
        """
        self._require_data()
        half = self.bins // 2
        steps = torch.arange(self.bins + 1, device=self.counts.device, dtype=torch.float64) - half
        edges = steps[None, :] * self.bin_width()[:, None]
        shape = self._param_shape()
        return self.counts.reshape(*shape, self.bins), edges.reshape(*shape, self.bins + 1)

    def _clip_to_data(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(lo, hi)`` clipped into the data's true ``[min, max]``."""
        lo = torch.clamp(lo.float(), self.min_val, self.max_val)
        hi = torch.clamp(hi.float(), self.min_val, self.max_val)
        return lo, hi

    def _abs_max(self) -> torch.Tensor:
        """float32 [n_rows]: the true ``max |x|``."""
        return torch.maximum(-self.min_val, self.max_val)
