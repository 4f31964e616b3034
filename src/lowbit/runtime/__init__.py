"""Layer 7 (runtime side): run and time exported models in ONNX Runtime, or emulate its integer kernels
(``emulate_ort`` for QDQ models, ``emulate_tflite`` for LiteRT's XNNPACK kernels; ``matmulnbits_inputs``
for MatMulNBits' int8 activations), and
run OpenVINO IR (``OpenVINOModel``) and .tflite files (``TFLiteModel``); each runtime's package is
imported only when its model is built."""

from .emulate import EmulationError, OrtEmulation, TFLiteEmulation, emulate_ort, emulate_tflite
from .matmulnbits import int8_blocks, matmulnbits_inputs
from .openvino import OpenVINOModel, OpenVINOPrecisionReport
from .ort import LatencyStats, OrtModel, measure_latency
from .tflite import TFLiteModel, inspect_tflite

__all__ = ["EmulationError", "LatencyStats", "OpenVINOModel", "OpenVINOPrecisionReport", "OrtEmulation", "OrtModel",
           "TFLiteEmulation", "TFLiteModel", "emulate_ort", "emulate_tflite", "inspect_tflite", "int8_blocks",
           "matmulnbits_inputs", "measure_latency"]
