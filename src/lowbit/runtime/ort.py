"""ONNX Runtime as a callable on torch tensors, and a latency harness."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..targets import TARGET_METADATA, TargetMismatchWarning, running_mismatch


class OrtModel:
    """An ONNX file run by ONNX Runtime's CPU provider, called like the torch model.

    Args:
        path: the .onnx file.
        threads: intra-op threads (inter-op is 1: the graphs here are sequential).
        optimization: ORT graph optimization level name ("all", "extended", "basic", "disable").

    Example:
        >>> ort_model = OrtModel("model.int8.onnx", threads=1)
        >>> logits = ort_model(images)            # torch tensor in, torch tensor out
    """

    def __init__(self, path: str | Path, *, threads: int = 1, optimization: str = "all") -> None:
        import onnxruntime as ort

        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if optimization not in levels:
            raise ValueError(f"optimization must be one of {', '.join(levels)}; got {optimization!r}")
        opts.graph_optimization_level = levels[optimization]
        opts.log_severity_level = 3
        self.path = Path(path)
        self.threads = threads
        try:  # a model over 2 GiB: ORT reads its tensors from the .data file beside it
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception:
            from ..export._external import check_data_files

            check_data_files(path)  # a missing external-data file, named; else ORT's own error
            raise
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.target = self.session.get_modelmeta().custom_metadata_map.get(TARGET_METADATA)
        problem = running_mismatch(self.target)
        if problem is not None:
            warnings.warn(f"{self.path.name}: {problem}", TargetMismatchWarning, stacklevel=2)

    def feeds(self, *args, **kwargs) -> dict[str, np.ndarray]:
        """Map positional / keyword torch inputs to ORT's named numpy feeds."""
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            kwargs, args = dict(args[0]), ()
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: missing input(s) {missing}; the model takes {self.input_names}")
        return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in feeds.items()
                if k in self.input_names}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def __call__(self, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = [torch.from_numpy(np.asarray(o)) for o in self.run(self.feeds(*args, **kwargs))]
        return outs[0] if len(outs) == 1 else tuple(outs)


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one ORT ``run`` call, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    warmup: int
    threads: int
    batch: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_latency(
    model: OrtModel, feeds: dict[str, np.ndarray], *, warmup: int = 10, runs: int = 50, batch: int | None = None
) -> LatencyStats:
    """Time ``model.run(feeds)``: ``warmup`` untimed calls, then ``runs`` timed ones (ms).

    Any runner with ``run(feeds)`` and ``threads`` works (``OpenVINOModel``, ``TFLiteModel`` too);
    ``feeds`` a dict of arrays or a list of them, the batch read from the first unless given."""
    for _ in range(warmup):
        model.run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    if batch is None:
        first = np.asarray(next(iter(feeds.values())) if isinstance(feeds, Mapping) else feeds[0])
        batch = int(first.shape[0]) if first.ndim else 1
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    return LatencyStats(median_ms=statistics.median(times), p90_ms=p90, mean_ms=statistics.fmean(times),
                        runs=runs, warmup=warmup, threads=model.threads, batch=batch)
