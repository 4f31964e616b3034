"""``lowbit.export``: one verb for every runtime; the target picks the exporter.

    qmodel = lowbit.quantize(model, calib, "w8a8", target="tensorrt")
    lowbit.export(qmodel, "model.onnx", example_inputs)                 # follows the model: TensorRT
    lowbit.export(qmodel, "model.onnx", example_inputs, target="ort")   # refused: quantized for TensorRT

    target                          exporter (imported when used)              extra
    "ort", "auto", CPU targets      lowbit.export.onnx_export.export_onnx      (core)
    "openvino"                      lowbit.export.openvino.export_openvino     lowbit[openvino]
    "tflite"                        lowbit.export.tflite.export_tflite         lowbit[tflite]
    "qnn"                           lowbit.export.qnn.export_qnn               lowbit[qnn]
    "tensorrt"                      lowbit.export.tensorrt.export_tensorrt     (core: ONNX only)

A model is exported for the runtime it was quantized for: the simulation quantized its
activations on that runtime's grid (``lowbit.targets``), so another runtime would run other
numbers.  A different runtime is refused with the fix (quantize again with ``target=``); among
the ONNX Runtime CPU targets the weight layout may change where the numbers stay the same
(``x86-vnni`` <-> ``x86-avx2-u8u8``), as ``export_onnx(target=...)`` allows.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..targets import Target, resolve_target

log = logging.getLogger(__name__)

# runtime -> (module, function, pip extra or None, top-level packages the exporter imports)
EXPORTERS: Mapping[str, tuple[str, str, str | None, tuple[str, ...]]] = {
    "onnxruntime": ("lowbit.export.onnx_export", "export_onnx", None, ("onnx",)),
    "openvino": ("lowbit.export.openvino", "export_openvino", "openvino", ("openvino", "nncf")),
    "tflite": ("lowbit.export.tflite", "export_tflite", "tflite",
               ("ai_edge_litert", "litert_torch", "ai_edge_quantizer", "ai_edge_torch", "tensorflow")),
    "qnn": ("lowbit.export.qnn", "export_qnn", "qnn", ("aimet_onnx", "aimet_common", "aimet_torch")),
    "tensorrt": ("lowbit.export.tensorrt", "export_tensorrt", None, ("onnx",)),
}


def recorded_target(qmodel: nn.Module) -> Target | None:
    """The target ``qmodel`` was quantized for (``lowbit_summary.target``), or None for a model
    whose quantizers were set up by hand."""
    name = getattr(getattr(qmodel, "lowbit_summary", None), "target", None)
    return None if name is None else resolve_target(name)


def requested_target(target: str | Target | None, recorded: Target | None) -> Target:
    """The target to export for: ``target`` resolved; None follows the model (this machine's CPU
    for a model without one); ``"ort"`` is the model's own CPU target when it has one."""
    if target is None:
        return recorded or resolve_target("auto")
    if target == "ort" and recorded is not None and recorded.is_cpu:
        return recorded
    return resolve_target(target)


def check_compatible(recorded: Target | None, wanted: Target) -> None:
    """ValueError when a model quantized for ``recorded`` cannot be exported for ``wanted``."""
    if recorded is None or recorded == wanted:
        return
    fix = (f"Quantize again for it: lowbit.quantize(model, calib, config, target={wanted.name!r}) "
           f"(or lowbit.prepare_qat(..., target={wanted.name!r})), then export")
    if recorded.runtime != wanted.runtime:
        raise ValueError(f"this model was quantized for target {recorded.name!r} ({recorded.runtime}); exporting "
                         f"it for {wanted.name!r} ({wanted.runtime}) would deploy other numbers than the "
                         f"simulation's. {fix}; or export with target={recorded.name!r}")
    if wanted.max_weight_bits < recorded.max_weight_bits:
        raise ValueError(f"this model was quantized for target {recorded.name!r} with {recorded.max_weight_bits}-bit "
                         f"weights; target {wanted.name!r} runs at most {wanted.max_weight_bits} bits exactly. {fix}")


def load_exporter(runtime: str):
    """The exporter function of ``runtime``, imported now (see the module docstring).

    Raises:
        ImportError: the exporter module is missing from this installation, or a package it
            needs is not installed (the message names ``pip install 'lowbit[<extra>]'``).
    """
    module_name, function, extra, packages = EXPORTERS[runtime]
    install = f"pip install 'lowbit[{extra}]'" if extra else "pip install onnx"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ImportError(f"this lowbit installation has no exporter for {runtime} ({module_name} is missing); "
                              "export for ONNX Runtime with target='ort', or install a lowbit with "
                              f"{module_name}") from exc
        if (exc.name or "").split(".")[0] in packages:
            raise ImportError(f"exporting for {runtime} needs the {exc.name!r} package: {install}") from exc
        raise
    try:
        return getattr(module, function)
    except AttributeError:
        raise ImportError(f"{module_name} has no {function}; this lowbit installation is incomplete") from None


def export(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    target: str | Target | None = None,
    **options,
) -> Path:
    """Export ``qmodel`` for the runtime of ``target`` (module docstring); returns the main
    artifact's path.

    Args:
        qmodel: a model from ``lowbit.quantize`` / ``lowbit.prepare_qat``.
        path: the file to write (``.onnx``; ``.tflite`` for TFLite ...), written atomically.
        example_inputs: the model's inputs, as ``lowbit.export_onnx`` takes them.
        target: ``"ort"`` (ONNX Runtime), a CPU target (``"x86-vnni"`` ...), ``"openvino"``,
            ``"tflite"``, ``"qnn"``, ``"tensorrt"``, a ``Target``, or None (default): the
            target the model was quantized for.
        **options: the exporter's own options (``export_onnx``: ``input_names``, ``opset`` ...).

    Raises:
        ValueError: ``target`` differs from the one the model was quantized for (the message
            says to quantize again with ``target=``), or an unknown target name.
        ImportError: the runtime's exporter or its packages are not installed (names the extra).

    Example:
        >>> qmodel = lowbit.quantize(model, calib, "w8a8", target="tensorrt")
        >>> lowbit.export(qmodel, "model.trt.onnx", calib[0])
        PosixPath('model.trt.onnx')
    """
    recorded = recorded_target(qmodel)
    wanted = requested_target(target, recorded)
    check_compatible(recorded, wanted)
    exporter = load_exporter(wanted.runtime)
    log.info("export for %s (target %s) with %s", wanted.runtime, wanted.name, exporter.__qualname__)
    if wanted.is_cpu:
        exporter(qmodel, path, example_inputs, target=wanted, **options)
        return Path(path)
    return Path(exporter(qmodel, path, example_inputs, **options))


__all__ = ["EXPORTERS", "check_compatible", "export", "load_exporter", "recorded_target", "requested_target"]
