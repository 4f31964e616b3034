"""Layer 7 (runtime side): run and time exported models in ONNX Runtime, or emulate its integer kernels
(``emulate_ort`` for QDQ models; ``matmulnbits_inputs`` for MatMulNBits' int8 activations), and
run OpenVINO IR (``OpenVINOModel``; openvino is imported only when one is built)."""

from .emulate import EmulationError, OrtEmulation, emulate_ort
from .matmulnbits import int8_blocks, matmulnbits_inputs
from .openvino import OpenVINOModel, OpenVINOPrecisionReport
from .ort import LatencyStats, OrtModel, measure_latency

__all__ = ["EmulationError", "LatencyStats", "OpenVINOModel", "OpenVINOPrecisionReport", "OrtEmulation", "OrtModel",
           "emulate_ort", "int8_blocks", "matmulnbits_inputs", "measure_latency"]
