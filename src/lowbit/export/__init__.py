"""Layer 7: export quantized models (ONNX Q/DQ for ONNX Runtime and TensorRT; other runtimes
through their own exporters) and check which kernels ONNX Runtime runs.

    lowbit.export(qmodel, "model.onnx", example_inputs)       # the exporter of the model's target
    export_onnx(qmodel, "model.int8.onnx", example_inputs)    # ONNX Runtime's QDQ model
    print(inspect_onnx("model.int8.onnx"))                     # integer vs float kernels in ORT

``lowbit.export`` is this package and, called, the export verb (``dispatch.export``): the
package is a module whose class has a ``__call__``, so ``lowbit.export(...)`` exports while
``lowbit.export.export_onnx``, ``from lowbit.export import ...`` and ``import
lowbit.export.tensorrt`` keep working.  (A function bound to the name ``lowbit.export``
would hide the package from attribute access, and a submodule import re-binds the name.)

Needs the ``onnx`` package (and ``onnxruntime`` for ``inspect_onnx``).
"""

import sys
import types

try:
    import onnx  # noqa: F401
except ModuleNotFoundError as exc:  # only onnx itself missing is turned into advice
    if exc.name != "onnx":
        raise
    raise ModuleNotFoundError("lowbit.export needs the onnx package: pip install onnx onnxruntime",
                              name="onnx") from exc

from .dispatch import export
from .llm import export_llm
from .onnx_export import export_onnx
from .onnx_inspect import OnnxKernelReport, inspect_onnx


class _ExportPackage(types.ModuleType):
    """The ``lowbit.export`` package, callable as ``lowbit.export.dispatch.export``."""

    def __call__(self, qmodel, path, example_inputs, target=None, **options):
        """Export ``qmodel`` for ``target`` (None: the model's own); see ``lowbit.export.dispatch.export``."""
        return export(qmodel, path, example_inputs, target=target, **options)


sys.modules[__name__].__class__ = _ExportPackage

__all__ = ["OnnxKernelReport", "export", "export_llm", "export_onnx", "inspect_onnx"]
