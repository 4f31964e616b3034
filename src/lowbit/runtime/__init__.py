"""Layer 7 (runtime side): run and time exported models in ONNX Runtime."""

from .ort import LatencyStats, OrtModel, measure_latency

__all__ = ["LatencyStats", "OrtModel", "measure_latency"]
