"""export_openvino: a quantized lowbit model -> OpenVINO IR (``.xml`` + ``.bin``).

The route is lowbit's own QDQ ONNX (``export_onnx``), converted by ``openvino.convert_model``:
OpenVINO's ONNX frontend turns each activation ``QuantizeLinear -> DequantizeLinear`` pair into
a ``FakeQuantize`` and each int8 weight into an ``i8`` constant -> ``Convert`` -> ``Multiply``
(the scale), and the CPU plugin's low-precision transformations fuse those around Convolution /
MatMul into oneDNN int8 kernels (u8 activations x i8 weights, int32 accumulation, the
dequantization, bias and the next FakeQuantize as post-ops).  What the compiled model runs is
read back with ``lowbit.runtime.openvino.OpenVINOModel.int8_report``.

Measured with OpenVINO 2026.4 on an Intel Xeon with AMX and AVX512-VNNI (BENCHMARKS.md,
"OpenVINO"): every Conv / Linear of MobileNetV2 and all-MiniLM-L6-v2 quantized with ``w8a8``
runs in int8 (``brgconv_avx512_amx_I8``, ``brgconv_avx512_dw_I8``, FullyConnected ``u8``);
MobileNetV2's residual Adds fuse into the convs; lowbit does not quantize MiniLM's attention
MatMuls (``Q @ K^T``, ``P @ V``), so those stay f32.  Files with uint8 weights (target
``x86-avx2-u8u8``) run their convs in f32 in OpenVINO: use ``x86-avx2-w7`` for CPUs without VNNI.

The IR keeps float constants (scales, float biases) in float32 (``compress_to_fp16=False``):
OpenVINO's default would round every scale to float16 and change the model's numbers.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .onnx_export import export_onnx

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lowbit[openvino]' (or: pip install openvino -c constraints.txt)"


def import_openvino():
    """The ``openvino`` package, or a ModuleNotFoundError that names the install command.

    Only a missing ``openvino`` itself becomes advice; a broken install (one of its own
    dependencies missing) raises as it is.
    """
    try:
        import openvino
    except ModuleNotFoundError as exc:
        if exc.name != "openvino":
            raise
        raise ModuleNotFoundError(f"lowbit's OpenVINO export and runtime need openvino: {INSTALL_HINT}",
                                  name="openvino") from exc
    return openvino


def _ir_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    xml = Path(path)
    if xml.suffix != ".xml":
        raise ValueError(f"export_openvino writes an OpenVINO IR: give a path ending in .xml (its weights go to "
                         f"the .bin beside it), got {os.fspath(path)!r}")
    return xml, xml.with_suffix(".bin")


def export_openvino(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    keep_onnx: bool = False,
    **onnx_options,
) -> Path:
    """Export a quantized model to OpenVINO IR, whose Conv / MatMul layers OpenVINO runs in int8.

    Args:
        qmodel: a model from ``lowbit.quantize`` or ``lowbit.prepare_qat`` (or a float model:
            the IR is then a float one).  ``w8a8`` gives OpenVINO's preferred grid: uint8
            affine activations per tensor, int8 symmetric weights per output channel.
        path: the ``.xml`` file to write; the weights go to the ``.bin`` of the same name.
            Both are written in a temporary folder beside it and moved into place (``.bin``
            first); on any error neither is touched.
        example_inputs: as for ``lowbit.export_onnx`` (a tensor, a tuple, or a dict of keyword
            tensors).
        keep_onnx: also keep the QDQ ONNX it was converted from, as ``<path stem>.onnx``.
        **onnx_options: passed to ``lowbit.export_onnx`` (``input_names``, ``output_names``,
            ``dynamic_batch``, ``dynamic_axes``, ``opset``, ``target``).  Dynamic axes stay
            dynamic in the IR; ``OpenVINOModel(..., shapes=...)`` fixes them at load time.

    Returns:
        The ``.xml`` path.  The lowbit target the model was made for travels in the IR's
        ``rt_info`` (``framework / lowbit.target``, from the ONNX metadata).

    Raises:
        ModuleNotFoundError: openvino is not installed (the message names the install command).
        ValueError: ``path`` does not end in ``.xml``, or what ``export_onnx`` rejects.

    Example:
        >>> qmodel = lowbit.quantize(model, calib, "w8a8")
        >>> xml = export_openvino(qmodel, "model.int8.xml", x[:1])
        >>> print(OpenVINOModel(xml).int8_report())         # which layers run in int8
    """
    xml, binary = _ir_paths(path)
    ov = import_openvino()
    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=f".{xml.stem}.") as tmp:
        onnx_path = Path(tmp, "model.onnx")
        export_onnx(qmodel, onnx_path, example_inputs, **onnx_options)
        ov_model = ov.convert_model(onnx_path)
        ov.save_model(ov_model, Path(tmp, "model.xml"), compress_to_fp16=False)
        if keep_onnx:
            if Path(tmp, "model.onnx.data").exists():
                raise ValueError("keep_onnx: this model's ONNX has external data (over 2 GiB); export it with "
                                 "lowbit.export_onnx to a path of your choice instead")
            os.replace(onnx_path, xml.with_suffix(".onnx"))
        os.replace(Path(tmp, "model.bin"), binary)
        os.replace(Path(tmp, "model.xml"), xml)
    log.info("exported OpenVINO IR %s (+ %s)", xml, binary.name)
    return xml
