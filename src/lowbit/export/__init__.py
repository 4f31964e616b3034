"""Layer 7: export quantized models to ONNX (QDQ) and check which kernels ONNX Runtime runs.

    export_onnx(qmodel, "model.int8.onnx", example_inputs)   # write the QDQ model
    print(inspect_onnx("model.int8.onnx"))                    # integer vs float kernels in ORT

Needs the ``onnx`` package (and ``onnxruntime`` for ``inspect_onnx``).
"""

try:
    import onnx  # noqa: F401
except ModuleNotFoundError as exc:  # only onnx itself missing is turned into advice
    if exc.name != "onnx":
        raise
    raise ModuleNotFoundError("lowbit.export needs the onnx package: pip install onnx onnxruntime",
                              name="onnx") from exc

from .llm import export_llm
from .onnx_export import export_onnx
from .onnx_inspect import OnnxKernelReport, inspect_onnx

__all__ = ["OnnxKernelReport", "export_llm", "export_onnx", "inspect_onnx"]
