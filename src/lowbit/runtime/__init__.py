"""Layer 7 (runtime side): run and time exported models in ONNX Runtime."""

from .ort import OrtModel, LatencyStats, measure_latency

__all__ = ["OrtModel", "LatencyStats", "measure_latency"]
