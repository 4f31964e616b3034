"""MSE observer: the clipping range that minimises the expected quantization error."""

from __future__ import annotations

from typing import Any

import torch

from ..numerics import QuantSpec, compute_qparams
from .histogram import HistogramObserver, row_chunks

# float64 elements per work array of the candidate search: candidates are scored in slices of
# this size, so the ~20 elementwise passes of each run in cache (256 KiB), and on one thread
# (torch parallelises elementwise ops above 32768 elements; on arrays this small, waking
# threads costs more than it saves, and far more on a busy machine).
_WORK_ELEMENTS = 1 << 15


def _floor(y: torch.Tensor) -> torch.Tensor:
    """``torch.floor(y)``, exactly, from ``frac`` (``y - trunc(y)``, exact in floating point).

    torch runs floor / round across threads from 2049 elements on, other elementwise ops from
    32769: on the search's small arrays that is a thread wake-up per call (a scheduler time
    slice, when the machine is busy) for no gain.
    """
    f = torch.frac(y)
    return torch.sub(y, f).sub_((f < 0).to(y.dtype))  # trunc(y), minus 1 where y < trunc(y)


def _sq_error_antiderivative(t: torch.Tensor, lo_code: torch.Tensor, hi_code: torch.Tensor) -> torch.Tensor:
    """``G(t) = integral of (s - clamp(round(s), lo_code, hi_code))**2 ds``, up to a constant.

    ``t`` is in grid units (``x / scale``) and is overwritten; ``lo_code`` / ``hi_code``
    are the lowest and highest codes minus the zero-point, so the dequantized grid
    is ``[lo_code, hi_code]`` in steps.  Inside the grid the error is periodic (each
    period adds 1/12); beyond half a step outside it is the saturation error
    ``(t - hi_code)**2`` (or ``(t - lo_code)**2``).  In-place arithmetic: this runs
    ~20 elementwise passes per candidate over the whole histogram.
    """
    inside = torch.clamp(t, lo_code - 0.5, hi_code + 0.5)
    excess = t.sub_(inside)  # > 0 above the grid, < 0 below it, 0 inside
    inside.add_(0.5)
    periods = _floor(inside)
    offset = inside.sub_(periods).sub_(0.5)  # distance to the nearest code, in [-0.5, 0.5)
    g = periods.div_(12.0).add_(offset.pow_(3).div_(3.0))
    # Integral of (s - hi_code)**2 from hi_code + 0.5 up to t (mirrored below the grid).
    saturated = excess.abs().add_(0.5).pow_(3).sub_(0.125).div_(3.0).mul_(excess.sign())
    return g.add_(saturated)


def _bin_weights(counts: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``counts / (bin width * total count)`` per bin: float64 [n_rows, n_bins]."""
    widths = edges[:, 1:] - edges[:, :-1]
    return counts / widths / counts.sum(1, keepdim=True).clamp_min(1.0)


def _mean_sq_error(
    weights: torch.Tensor, edges, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, name: str
) -> torch.Tensor:
    """``expected_sq_error`` with the candidate-independent ``_bin_weights`` precomputed.

    ``edges`` is [n_rows, n_bins + 1] (contiguous bins) or a pair ``(left, right)`` of
    [n_rows, n_bins] edges (a row's occupied bins only: ``_occupied_bins``).  ``lo`` / ``hi``
    are [n_rows] (one range per row) or [n_rows, k] (``k`` candidate ranges per row, scored at
    once); the result has their shape.  Each candidate's error is computed by the same
    elementwise operations and the same per-row sum whichever way it is batched.
    """
    scale, zero_point = compute_qparams(lo.float(), hi.float(), spec, name)
    step = scale.double().unsqueeze(-1)  # [n_rows, (k,) 1]
    z = zero_point.double().unsqueeze(-1)
    pairs = isinstance(edges, tuple)
    if lo.dim() == 2:
        edges = tuple(e.unsqueeze(1) for e in edges) if pairs else edges.unsqueeze(1)
        weights = weights.unsqueeze(1)
    lo_code, hi_code = spec.qmin - z, spec.qmax - z
    # Mean error over bin [a, b] = step**2 * (G(b/step) - G(a/step)) / ((b - a) / step).
    if pairs:
        diff = _sq_error_antiderivative(edges[1] / step, lo_code, hi_code).sub_(
            _sq_error_antiderivative(edges[0] / step, lo_code, hi_code))
    else:
        g = _sq_error_antiderivative(edges / step, lo_code, hi_code)
        diff = g[..., 1:] - g[..., :-1]
    return step.squeeze(-1) ** 3 * (diff * weights).sum(-1)


def _occupied_bins(weights: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Each row's bins with data, left-aligned and padded with empty bins (weight 0, so they add
    exactly 0): ``(weights, (left edges, right edges))``, [n_rows, most occupied bins of a row].
    A weight row holds a few hundred values in 2048 bins: scoring only those is several times
    (a depthwise 3x3 kernel: 200 times) less work for the same sum of nonzero terms."""
    width = int((weights > 0).sum(1).max())
    order = torch.argsort((weights == 0).to(torch.int8), dim=1, stable=True)[:, :max(1, width)]
    return weights.gather(1, order), (edges[:, :-1].gather(1, order), edges[:, 1:].gather(1, order))


def expected_sq_error(
    counts: torch.Tensor,
    edges: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    spec: QuantSpec,
    name: str = "tensor",
) -> torch.Tensor:
    """Mean squared quantization error per row if the range were ``[lo, hi]``.

    The grid is the one ``compute_qparams(lo, hi, spec)`` gives (float32 scale,
    integer zero-point, saturation at qmin / qmax), so the error is that of the real
    quantize/dequantize arithmetic.  The approximation is in the data: the values
    of a bin are taken as spread uniformly over the bin, and the error is integrated
    exactly over it (round-to-nearest ties have measure zero).  Unlike evaluating
    bin centres, this stays right when a quantization step is smaller than a bin,
    which is the common case once a heavy-tailed range is clipped.

    Args:
        counts: float64 [n_rows, n_bins].
        edges: float64 [n_rows, n_bins + 1], increasing.
        lo, hi: float64 [n_rows], the candidate range (``lo <= hi``).
        spec: the grid.
        name: tensor name for error messages.

    Returns:
        float64 [n_rows], in squared units of the data.

    Example:
        >>> edges = torch.linspace(-1, 1, 5, dtype=torch.float64)[None]
        >>> lo, hi = torch.tensor([-0.5], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
        >>> expected_sq_error(torch.ones(1, 4, dtype=torch.float64), edges, lo, hi, QuantSpec(bits=4))
    """
    return _mean_sq_error(_bin_weights(counts, edges), edges, lo, hi, spec, name)


class MSEObserver(HistogramObserver):
    """Range that minimises the mean squared quantization error over a grid of clippings.

    Symmetric specs try ``amax = r * max|x|`` for ``r = k / num_candidates``,
    ``k = 1..num_candidates``.  Affine specs first try ``(r * lo, r * hi)`` (the
    data's range widened to include 0, shrunk by the same ratio at both ends), then
    refine each end alone on the same grid of ratios with the other end fixed.  The
    joint pass handles the common case cheaply; the two refinement passes let a
    skewed range (e.g. a GELU output: a short negative side, a long positive tail)
    keep one end and clip the other, at ``3 * num_candidates`` evaluations rather
    than ``num_candidates**2`` for a full 2-D grid.  See ``expected_sq_error`` for
    how a candidate is scored.  Each pass scores all its candidates at once (rows and candidates
    vectorised); the choice is the one a loop over the candidates in order would make.

    Args:
        spec: the grid (a ``QuantSpec`` or preset name).
        name: tensor name for error messages.
        bins: histogram bins per row (a power of two).
        num_candidates: ratios tried per pass.

    Example:
        >>> obs = MSEObserver(INT8_WEIGHT, name="fc.weight")
        >>> _ = obs(torch.distributions.StudentT(2.0).sample((64, 256)))
        >>> scale, _ = obs.qparams()
    """

    kind = "mse"

    def __init__(
        self, spec: QuantSpec | str, name: str = "tensor", *, bins: int = 2048, num_candidates: int = 100
    ) -> None:
        super().__init__(spec, name, bins=bins)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"{name}: num_candidates must be a positive integer, got {num_candidates!r}")
        self.num_candidates = num_candidates

    def _options(self) -> dict[str, Any]:
        return {"bins": self.bins, "num_candidates": self.num_candidates}

    def ratios(self) -> list[float]:
        """The shrink ratios tried in each pass: ``k / num_candidates``, ``k = 1..num_candidates``."""
        return [k / self.num_candidates for k in range(1, self.num_candidates + 1)]

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The range compute_qparams would use anyway: widened to include 0.
        lo = self.min_val.double().clamp_max(0.0)
        hi = self.max_val.double().clamp_min(0.0)
        if self.spec.symmetric:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        best_lo, best_hi = torch.empty_like(lo), torch.empty_like(hi)
        for rows in row_chunks(lo.shape[0], self.bins):
            best_lo[rows], best_hi[rows] = self._search_rows(rows, lo[rows], hi[rows])
        return best_lo.float(), best_hi.float()

    def _search_rows(
        self, rows: slice, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``(lo, hi)`` (float64) for a chunk of rows, starting from the full range ``(lo, hi)``."""
        counts, edges = self._occupied_histogram(rows)
        weights = _bin_weights(counts, edges)
        if 4 * int((counts > 0).sum(1).max()) < counts.shape[1]:  # sparse rows (weights): their bins only
            weights, edges = _occupied_bins(weights, edges)
        ratios = torch.tensor(self.ratios(), dtype=torch.float64, device=lo.device)

        def error(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
            """Errors [n, k] of the candidates ``(a, b)`` ([n, k]); rows not in ``keep`` are skipped (inf)."""
            if keep is None:
                return self._candidate_errors(weights, edges, a, b)
            err = torch.full(a.shape, float("inf"), dtype=torch.float64, device=a.device)
            kept = tuple(e[keep] for e in edges) if isinstance(edges, tuple) else edges[keep]
            err[keep] = self._candidate_errors(weights[keep], kept, a[keep], b[keep])
            return err

        best = (lo, hi, torch.full_like(lo, float("inf")))
        scaled_lo, scaled_hi = lo[:, None] * ratios, hi[:, None] * ratios  # [n, k]: the same products as lo * r
        best = self._pick(error(scaled_lo, scaled_hi), scaled_lo, scaled_hi, best)
        if not self.spec.symmetric:
            # A row with lo == 0 (e.g. a ReLU output) gets nothing new from either refinement: pass 2
            # would retry its current best k times, pass 3 the candidates of pass 1 (same errors, so
            # never strictly better).  Likewise pass 3 for hi == 0.  Skipping them is exact.
            two_sided = (lo != 0) & (hi != 0)
            if bool(two_sided.any()):
                keep = None if bool(two_sided.all()) else two_sided
                fixed_hi = best[1][:, None].expand_as(scaled_lo)
                best = self._pick(error(scaled_lo, fixed_hi, keep), scaled_lo, fixed_hi, best)
                fixed_lo = best[0][:, None].expand_as(scaled_hi)
                best = self._pick(error(fixed_lo, scaled_hi, keep), fixed_lo, scaled_hi, best)
        return best[0], best[1]

    def _candidate_errors(self, weights: torch.Tensor, edges, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``_mean_sq_error`` of [n, k] candidate ranges, in slices of candidates that fit in cache."""
        n, k = lo.shape
        per_slice = max(1, _WORK_ELEMENTS // max(1, n * weights.shape[1]))
        if per_slice >= k:
            return _mean_sq_error(weights, edges, lo, hi, self.spec, self.name)
        return torch.cat(
            [
                _mean_sq_error(weights, edges, lo[:, i : i + per_slice], hi[:, i : i + per_slice], self.spec, self.name)
                for i in range(0, k, per_slice)
            ],
            dim=1,
        )

    @staticmethod
    def _pick(
        err: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        best: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass over the candidates [n, k]: per row, the first one with the lowest error replaces
        ``best`` if strictly better (what a loop over the candidates in order would keep)."""
        best_lo, best_hi, best_err = best
        err = torch.nan_to_num(err, nan=float("inf"))  # a NaN error never wins, as `<` would say
        k = err.argmin(1, keepdim=True)  # the first minimum
        pass_err = err.gather(1, k).squeeze(1)
        better = pass_err < best_err
        best_lo = torch.where(better, lo.gather(1, k).squeeze(1), best_lo)
        best_hi = torch.where(better, hi.gather(1, k).squeeze(1), best_hi)
        best_err = torch.where(better, pass_err, best_err)
        return best_lo, best_hi, best_err

    def _occupied_histogram(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 counts [n, m] and edges [n, m + 1] of ``rows``, cut to the bins any of them uses."""
        used = torch.nonzero(self.counts[rows].sum(0)).flatten()
        first, last = int(used[0]), int(used[-1]) + 1
        steps = torch.arange(first, last + 1, device=self.counts.device, dtype=torch.float64)
        edges = (steps - self.bins // 2)[None, :] * self.bin_width()[rows, None]
        return self.counts[rows, first:last].double(), edges
