"""Entropy observer: TensorRT-style KL-divergence calibration on the ``|x|`` histogram.

For each candidate threshold (a number ``i`` of ``|x|`` bins kept, from the number
of quantization levels up to the last bin in use):

* reference ``P`` = the first ``i`` bins, with the mass beyond them (the clipped
  tail) added to bin ``i - 1``;
* candidate ``Q`` = the first ``i`` bins *without* the tail, merged into
  ``levels`` groups of ``i // levels`` bins (the last group takes the remainder),
  each group's mass spread evenly over the bins where ``P`` is nonzero;
* both smoothed as MXNet / ONNX Runtime do (empty bins get ``1e-4`` counts, taken
  from the nonzero ones) and normalised; score ``KL(P || Q)``.

The threshold with the lowest score (the first one on ties) wins.  This is the
algorithm of Migacz, "8-bit Inference with TensorRT" (GTC 2017), as MXNet and
ONNX Runtime's ``calibrate.py`` implement it, applied to the folded histogram of
the streaming ``HistogramObserver``.
"""

from __future__ import annotations

import torch

from ..numerics import QuantSpec
from .histogram import HistogramObserver, row_chunks

# Counts given to empty bins before taking logarithms (MXNet / ONNX Runtime value).
SMOOTHING_EPS = 1e-4


def _smooth(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give empty bins ``eps`` counts, taken evenly from the nonzero ones.

    Returns ``(smoothed, valid)``; a row is invalid (its KL is infinite) when it has
    no mass or smoothing would drive a bin to zero or below.
    """
    zero = h == 0
    n_zero = zero.sum(1, keepdim=True).double()
    n_nonzero = h.shape[1] - n_zero
    eps1 = SMOOTHING_EPS * n_zero / n_nonzero.clamp_min(1.0)
    out = torch.where(zero, torch.full_like(h, SMOOTHING_EPS), h - eps1)
    valid = (n_nonzero.squeeze(1) > 0) & (out > 0).all(1)
    return out, valid


def _kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise ``KL(P || Q)`` of count vectors [n_rows, n] after smoothing; inf if undefined."""
    p, p_ok = _smooth(p)
    q, q_ok = _smooth(q)
    p = p / p.sum(1, keepdim=True)
    q = q / q.sum(1, keepdim=True)
    kl = (p * torch.log(p / q)).sum(1)
    return torch.where(p_ok & q_ok, kl, torch.full_like(kl, float("inf")))


def _candidate_kl(hist: torch.Tensor, tail: torch.Tensor, i: int, levels: int) -> torch.Tensor:
    """KL score per row of keeping the first ``i`` bins of ``hist`` [n_rows, n_bins] (float64).

    ``tail`` [n_rows] is the mass in bins ``i`` and beyond.
    """
    kept = hist[:, :i]
    p = kept.clone()
    p[:, -1] += tail
    nonzero = (p > 0).to(hist.dtype)
    # Bin b of the i kept ones belongs to level min(b // (i // levels), levels - 1).
    level = (torch.arange(i, device=hist.device) // (i // levels)).clamp_max(levels - 1)
    level_mass = torch.zeros(hist.shape[0], levels, dtype=hist.dtype, device=hist.device)
    level_mass.index_add_(1, level, kept)
    level_nonzero = torch.zeros_like(level_mass).index_add_(1, level, nonzero)
    q = (level_mass / level_nonzero.clamp_min(1.0))[:, level] * nonzero
    return _kl_divergence(p, q)


def kl_threshold_bins(folded: torch.Tensor, levels: int) -> torch.Tensor:
    """Number of ``|x|`` bins to keep per row: the threshold is that many bin widths.

    Args:
        folded: [n_rows, n_bins] counts of ``|x|`` (see ``HistogramObserver.folded_counts``).
        levels: quantization levels on one side of zero (128 for int8 symmetric).

    Returns:
        int64 [n_rows].  Rows that use ``levels`` bins or fewer keep all of them.
    """
    hist = folded.double()
    n_rows, n_bins = hist.shape
    positions = torch.arange(1, n_bins + 1, device=hist.device)
    used = torch.where(hist > 0, positions, torch.zeros_like(positions)).amax(1)  # last used bin + 1
    # tail[:, i] = mass in bins i and beyond, for i = 0..n_bins.
    tail = torch.cat([hist.flip(1).cumsum(1).flip(1), torch.zeros_like(hist[:, :1])], dim=1)
    best_i = used.clone()
    best_kl = torch.full((n_rows,), float("inf"), dtype=torch.float64, device=hist.device)
    for i in range(levels, int(used.max()) + 1):
        kl = _candidate_kl(hist, tail[:, i], i, levels)
        better = (kl < best_kl) & (i <= used)
        best_kl = torch.where(better, kl, best_kl)
        best_i = torch.where(better, torch.full_like(best_i, i), best_i)
    return best_i


class EntropyObserver(HistogramObserver):
    """Range from the threshold that minimises the KL divergence (TensorRT's calibration).

    Works on the histogram of ``|x|`` (``bins / 2`` bins per row).  Levels on one side
    of zero: ``2**(bits - 1)``, except for an affine spec on a row whose data does not
    change sign, where the whole grid covers one side and all ``2**bits`` levels
    count.  The result is ``[-T, T]`` for symmetric specs and ``[max(min, -T),
    min(max, T)]`` for affine ones, with ``T`` at most the true ``max |x|``.

    Cost: every threshold is scored over every kept bin, so ``compute_range`` takes
    O(rows * (bins/2)**2): about 0.1 s per tensor at the default 2048 bins, but tens
    of seconds for per-channel ranges of a weight with hundreds of channels (use
    fewer bins, or the MSE observer, there).

    Args:
        spec: the grid (a ``QuantSpec`` or preset name); needs ``2**bits <= bins / 2``
            levels to fit the histogram.
        name: tensor name for error messages.
        bins: histogram bins per row (a power of two; 2048 as TensorRT).

    Example:
        >>> obs = EntropyObserver(INT8_ACTIVATION, name="relu1.output")
        >>> _ = obs(torch.randn(4096))
        >>> lo, hi = obs.compute_range()
    """

    kind = "entropy"

    def __init__(self, spec: QuantSpec | str, name: str = "tensor", *, bins: int = 2048) -> None:
        super().__init__(spec, name, bins=bins)
        most_levels = 2 ** (self.spec.bits - (1 if self.spec.symmetric else 0))
        if most_levels > bins // 2:
            raise ValueError(
                f"{name}: entropy calibration of {self.spec.describe()} needs {most_levels} levels but a "
                f"histogram of {bins} bins has only {bins // 2} per side; use bins >= {2 * most_levels}"
            )

    def levels(self) -> torch.Tensor:
        """int64 [n_rows]: quantization levels on the ``|x|`` axis for each row."""
        half_grid = 2 ** (self.spec.bits - 1)
        one_sided = (self.min_val >= 0) | (self.max_val <= 0)
        whole = torch.full_like(self.exponent, 2**self.spec.bits)
        if self.spec.symmetric:
            return torch.full_like(self.exponent, half_grid)
        return torch.where(one_sided, whole, torch.full_like(whole, half_grid))

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        folded = self.folded_counts()
        levels = self.levels()
        kept = torch.zeros_like(levels)
        for n in levels.unique().tolist():
            group = torch.nonzero(levels == n).flatten()
            for chunk in row_chunks(len(group), folded.shape[1]):
                rows = group[chunk]
                kept[rows] = kl_threshold_bins(folded[rows], int(n))
        threshold = (kept.double() * self.bin_width()).float()
        threshold = torch.minimum(threshold, self._abs_max())
        if self.spec.symmetric:
            return -threshold, threshold
        return torch.maximum(self.min_val, -threshold), torch.minimum(self.max_val, threshold)
