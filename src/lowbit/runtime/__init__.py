"""Layer 7 (runtime side): run and time exported models in ONNX Runtime, or emulate its integer kernels."""

from .emulate import EmulationError, OrtEmulation, emulate_ort
from .ort import LatencyStats, OrtModel, measure_latency

__all__ = ["EmulationError", "LatencyStats", "OrtEmulation", "OrtModel", "emulate_ort", "measure_latency"]
