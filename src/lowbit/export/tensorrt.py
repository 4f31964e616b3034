"""export_tensorrt: a lowbit model -> an ONNX file in TensorRT's explicit-quantization layout.

    qmodel = lowbit.quantize(model, calib, "w8a8", target="tensorrt")   # int8 symmetric activations
    lowbit.export(qmodel, "model.trt.onnx", example_inputs)              # -> export_tensorrt
    # on a machine with an NVIDIA GPU:  trtexec --onnx=model.trt.onnx --stronglyTyped

The file holds what TensorRT's developer guide asks of a Q/DQ network (rules R1-R6 in
``lowbit.export._tensorrt_layout``): symmetric int8 activations with zero point 0, per-tensor;
int8 weights per output channel on axis 0 as DequantizeLinear of int8 initializers; Q/DQ on
both inputs of every quantized Conv / Gemm / MatMul; float biases (the value the simulation
adds, bit for bit); residual adds with Q/DQ on their inputs and a requantized output (lowbit's
``QuantAdd``), so TensorRT fuses ``DQ -> Add -> Q``; opset >= 13; standard ONNX ops only.

ONNX Runtime runs the same file (its CPU provider computes the Q/DQ arithmetic exactly), which
is how the tests compare it with the simulation on a machine without a GPU.  What stays in float
in TensorRT (layers the config left float, adds whose output nobody requantizes) is logged and
returned by ``check_tensorrt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from ..nn.walk import quantizers_by_role
from ..targets import TENSORRT
from ._tensorrt_layout import TensorRTLayout, check_layout
from .onnx_export import export_onnx

log = logging.getLogger(__name__)

_REQUANTIZE = ("quantize it for TensorRT: lowbit.quantize(model, calib, 'w8a8', target='tensorrt') "
               "(or lowbit.prepare_qat(..., target='tensorrt'))")


def _spec_problem(role: str, q) -> str | None:
    """Why TensorRT cannot run this quantizer as the simulation does, or None."""
    s = q.spec
    if role == "weight":
        if s.signed and s.symmetric and s.bits <= 8 and s.granularity in ("tensor", "channel") \
                and (s.granularity == "tensor" or s.axis in (0, None)):
            return None  # int8 containers hold narrower grids exactly (int4 per channel of w4a8)
        return f"{q.name}: weight {s.describe()}; TensorRT takes int8 symmetric weights per tensor or per " \
               "output channel (axis 0)"
    if q.mode == "dynamic":
        return f"{q.name}: dynamic activation; TensorRT has no int8 dynamic quantization (no " \
               "DynamicQuantizeLinear): use a static config such as 'w8a8'"
    if s.signed and s.symmetric and s.bits == 8 and s.granularity == "tensor":
        return None
    return f"{q.name}: activation {s.describe()}; TensorRT takes int8 symmetric per tensor (zero point 0)"


def check_model(qmodel: nn.Module) -> None:
    """Raise ValueError naming every quantizer TensorRT cannot run as the simulation does
    (and how to fix it); disabled quantizers (float tensors) are fine."""
    problems = [p for _, role, q in quantizers_by_role(qmodel) if q.mode != "disabled"
                and (p := _spec_problem(role, q)) is not None]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)" if len(problems) > 4 else "")
        raise ValueError(f"this model cannot be exported for TensorRT: {shown}. To fix, {_REQUANTIZE}")


def check_tensorrt(model: onnx.ModelProto | str | os.PathLike) -> TensorRTLayout:
    """Check an ONNX file (or ModelProto) against TensorRT's explicit-quantization rules.

    Returns:
        A ``TensorRTLayout``: ``violations`` (empty for a file ``export_tensorrt`` wrote),
        ``int8_layers``, ``float_layers`` (weighted ops without Q/DQ: float in TensorRT) and
        ``float_adds`` (adds with int8 inputs whose output is not requantized).

    Example:
        >>> layout = check_tensorrt("model.trt.onnx")
        >>> print(len(layout.int8_layers), layout.float_layers)
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    return check_layout(model)


def _discard(path: Path) -> None:
    for file in (path, path.with_name(path.name + ".data")):
        file.unlink(missing_ok=True)


def export_tensorrt(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    **options,
) -> Path:
    """Export a model quantized for TensorRT as explicit-quantization ONNX (module docstring).

    Args:
        qmodel: a model from ``lowbit.quantize(..., target="tensorrt")`` or
            ``lowbit.prepare_qat(..., target="tensorrt")``: activations int8 symmetric per
            tensor, weights int8 symmetric per output channel (or per tensor).
        path: the ``.onnx`` file to write (atomically; see ``lowbit.export_onnx``).
        example_inputs: the model's inputs, as for ``lowbit.export_onnx``.
        **options: ``export_onnx``'s keyword options (``input_names``, ``output_names``,
            ``dynamic_batch``, ``dynamic_axes``, ``opset`` >= 13); not ``target``.

    Returns:
        The path of the file written.

    Raises:
        ValueError: a quantizer TensorRT cannot run as simulated (asymmetric or dynamic
            activations, 4-bit activations, group-wise weights), named with the fix; or an
            option ``export_onnx`` refuses.

    Example:
        >>> qmodel = lowbit.quantize(model, calib, "w8a8", target="tensorrt")
        >>> export_tensorrt(qmodel, "model.trt.onnx", calib[0])
    """
    if "target" in options:
        raise TypeError("export_tensorrt writes target 'tensorrt'; leave out target= (or call lowbit.export)")
    check_model(qmodel)
    path = Path(path)
    proto = export_onnx(qmodel, path, example_inputs, target=TENSORRT, **options)
    layout = check_layout(proto, base_dir=str(path.parent))  # (a model over 2 GiB: its .data file is there)
    if layout.violations:  # the model checks above make this a lowbit bug, not the user's
        _discard(path)
        raise RuntimeError(f"{path.name}: the TensorRT layout breaks its rules (a lowbit bug): "
                           + "; ".join(layout.violations[:5]))
    log.info("exported %s for TensorRT: %d int8 layers, %d float layers%s%s", path, len(layout.int8_layers),
             len(layout.float_layers), f" ({', '.join(layout.float_layers[:5])})" if layout.float_layers else "",
             f"; adds left float (output not requantized): {', '.join(layout.float_adds[:5])}"
             if layout.float_adds else "")
    return path


__all__ = ["TensorRTLayout", "check_model", "check_tensorrt", "export_tensorrt"]
