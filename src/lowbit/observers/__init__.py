"""Layer 2: range estimators (observers).

Every observer is a ``torch.nn.Module`` that watches one tensor: calling it updates
streaming statistics (constant memory in the number of batches) and returns its
input unchanged; ``qparams()`` turns them into ``(scale, zero_point)`` for its
``QuantSpec``.  Observers save and load through ``state_dict``, and merge
themselves: ``a.merge([b, c])`` gives what one observer that saw the data of all
three computes (bit for bit for min-max and the histogram observers; the mean for
the moving average), by the reductions each class declares (``reductions``, see
``lowbit.observers.reduction``), which ``lowbit.qat.distributed`` runs as collectives.

Kinds (``OBSERVERS``): ``minmax``, ``moving_average``, ``percentile``, ``mse``,
``entropy``.

Example:
    >>> obs = make_observer("percentile", "uint8-activation", name="fc1.input", percentile=99.9)
    >>> for batch in calibration_batches:
    ...     _ = obs(batch)
    >>> scale, zero_point = obs.qparams()

Sharded calibration, without torch.distributed:
    >>> a, b = (make_observer("entropy", "int8-activation", name="fc1.input") for _ in range(2))
    >>> for x in shard_1: _ = a(x)
    >>> for x in shard_2: _ = b(x)
    >>> scale, zero_point = a.merge([b]).qparams()  # as if one observer saw both shards
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..numerics import QuantSpec
from .base import Observer
from .entropy import EntropyObserver
from .histogram import HistogramObserver
from .minmax import MinMaxObserver, MovingAverageMinMaxObserver
from .mse import MSEObserver
from .percentile import PercentileObserver

_CLASSES = (MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver, EntropyObserver)

OBSERVERS: Mapping[str, type[Observer]] = MappingProxyType({cls.kind: cls for cls in _CLASSES})
"""Observer classes by their ``kind``."""


def make_observer(kind: str, spec: QuantSpec | str, name: str = "tensor", **options: Any) -> Observer:
    """Build the observer registered as ``kind``.

    Args:
        kind: one of ``OBSERVERS`` (``"minmax"``, ``"moving_average"``, ``"percentile"``,
            ``"mse"``, ``"entropy"``).
        spec: the grid, a ``QuantSpec`` or a preset name.
        name: tensor name for error messages.
        **options: the class's keyword options (e.g. ``percentile=99.9``, ``bins=2048``).

    Returns:
        A new, empty observer.

    Raises:
        ValueError: unknown kind or option.

    Example:
        >>> obs = make_observer("mse", INT8_WEIGHT, name="fc.weight", num_candidates=50)
    """
    cls = OBSERVERS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown observer kind {kind!r}; valid kinds: {', '.join(OBSERVERS)}")
    accepted = [
        p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"{name}: observer kind {kind!r} has no option(s) {unknown}; "
            f"its options are: {', '.join(accepted) or 'none'}"
        )
    return cls(spec, name, **options)


__all__ = [
    "OBSERVERS",
    "EntropyObserver",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]
