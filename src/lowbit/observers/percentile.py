"""Percentile observer: clip the range at a quantile of the observed values."""

from __future__ import annotations

from typing import Any

import torch

from ..numerics import QuantSpec
from .histogram import HistogramObserver, histogram_quantile


class PercentileObserver(HistogramObserver):
    """Range = the ``percentile``-th percentile of the data, read off the streaming histogram.

    Symmetric specs: ``amax`` = the percentile of ``|x|`` (the histogram folded around
    zero), range ``[-amax, amax]``.  Affine specs: ``(lo, hi)`` = the ``100 - p`` and
    ``p`` percentiles of ``x``.  Inside a bin the values are taken as evenly spread
    (linear interpolation), so the estimate is within about one bin width
    (``2 * max|x| / bins`` or less) of the exact percentile of the raw data; it is
    clipped to the data's true min / max.

    Args:
        spec: the grid (a ``QuantSpec`` or preset name).
        name: tensor name for error messages.
        percentile: in (50, 100]; 100 gives the min-max range.
        bins: histogram bins per row (a power of two).

    Example:
        >>> obs = PercentileObserver(UINT8_ACTIVATION, percentile=99.9)
        >>> _ = obs(torch.randn(1024, 64))
        >>> lo, hi = obs.compute_range()
    """

    kind = "percentile"

    def __init__(
        self, spec: QuantSpec | str, name: str = "tensor", *, percentile: float = 99.99, bins: int = 2048
    ) -> None:
        super().__init__(spec, name, bins=bins)
        is_number = isinstance(percentile, (int, float)) and not isinstance(percentile, bool)
        if not is_number or not 50 < percentile <= 100:
            raise ValueError(
                f"{name}: percentile must be a number in (50, 100] (in percent, e.g. 99.99), "
                f"got {percentile!r}"
            )
        self.percentile = float(percentile)

    def _options(self) -> dict[str, Any]:
        return {"bins": self.bins, "percentile": self.percentile}

    def _range_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        width = self.bin_width()
        if self.spec.symmetric:
            amax = histogram_quantile(self.folded_counts(), q, torch.zeros_like(width), width)
            amax = torch.minimum(amax.float(), self._abs_max())
            return -amax, amax
        left = -width * (self.bins // 2)
        lo = histogram_quantile(self.counts, 1.0 - q, left, width)
        hi = histogram_quantile(self.counts, q, left, width)
        return self._clip_to_data(lo, hi)
