"""lowbit: quantize PyTorch models to deployable low-bit models, and measure what it cost.

    import lowbit
    qmodel = lowbit.quantize(model, calib_batches, config="w8a8")        # PTQ (fake-quant simulation)
    qmodel = lowbit.quantize(model, calib_batches, "w8a8", algorithms="cle,bias_correction")  # lowbit.ptq.steps
    qmodel = lowbit.prepare_qat(model, "w4a8", calib_batches)            # QAT: train it in your own loop
    lowbit.export_onnx(qmodel, "model.int8.onnx", example_inputs)        # Q/DQ ONNX for ONNX Runtime
    lowbit.export(qmodel, "model.onnx", example_inputs)                  # for the model's target runtime
    print(lowbit.inspect_onnx("model.int8.onnx"))                        # which kernels run in integers
    print(lowbit.compare(model, qmodel, inputs=batch, onnx="model.int8.onnx"))   # accuracy / size / latency
    lowbit.save(qmodel, "runs/w8a8"); qmodel = lowbit.load(model, "runs/w8a8")   # rebuild on a fresh model
    print(lowbit.sensitivity(model, calib_batches, "w4a8").to_markdown())       # which layers lose the most
    mixed = lowbit.mixed_precision(model, calib_batches, ("w4a8", "w8a8"), {"avg_weight_bits": 5.0})
    result = lowbit.autoquant(model, calib_batches, eval_fn, max_drop=0.01)     # the ladder, with its reason
"""

from . import analysis, export, numerics, observers, ptq, qat
from .analysis import autoquant, mixed_precision, sensitivity
from .config import CONFIGS, LayerQuant, QuantConfig, Rule
from .export import export_onnx, inspect_onnx
from .nn.modules import TensorQuant
from .numerics import QuantSpec
from .persist import load, save
from .ptq import quantize
from .qat import prepare_qat
from .report import compare

__version__ = "0.1.0"

__all__ = [
    "CONFIGS",
    "LayerQuant",
    "QuantConfig",
    "QuantSpec",
    "Rule",
    "TensorQuant",
    "analysis",
    "autoquant",
    "compare",
    "export",
    "export_onnx",
    "inspect_onnx",
    "load",
    "mixed_precision",
    "numerics",
    "observers",
    "prepare_qat",
    "ptq",
    "qat",
    "quantize",
    "save",
    "sensitivity",
]
