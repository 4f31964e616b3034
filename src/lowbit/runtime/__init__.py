"""Layer 7 (runtime side): run and time exported models in ONNX Runtime, or emulate its integer kernels
(``emulate_ort`` for QDQ models; ``matmulnbits_inputs`` for MatMulNBits' int8 activations)."""

from .emulate import EmulationError, OrtEmulation, emulate_ort
from .matmulnbits import int8_blocks, matmulnbits_inputs
from .ort import LatencyStats, OrtModel, measure_latency

__all__ = ["EmulationError", "LatencyStats", "OrtEmulation", "OrtModel", "emulate_ort", "int8_blocks",
           "matmulnbits_inputs", "measure_latency"]
