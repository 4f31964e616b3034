"""OpenVINO as a callable on torch tensors, what its CPU plugin runs in int8, and a latency harness.

Mirrors ``lowbit.runtime.ort``: ``OpenVINOModel(path)(x)`` runs an IR (``.xml``, from
``lowbit.export.openvino.export_openvino``) or an ONNX file, ``measure_latency`` times it.
``OpenVINOModel.int8_report()`` reads the *compiled* model's execution graph
(``compiled_model.get_runtime_model()``): each executed node carries ``layerType``,
``runtimePrecision`` (the precision its kernel computes in: ``u8`` / ``i8`` for oneDNN's int8
kernels), ``primitiveType`` (the kernel, e.g. ``brgconv_avx512_amx_I8``) and
``originalLayersNames`` (the model's nodes fused into it).  A QDQ file says what *should* run
in int8; this says what does, as ``lowbit.inspect_onnx`` does for ONNX Runtime.

Inference precision: OpenVINO's CPU plugin runs the float layers of any model in bf16 by
default on CPUs with AVX512-BF16 or AMX (f32 elsewhere).  ``OpenVINOModel`` asks for f32 unless
told otherwise, so the layers lowbit left in float compute as in lowbit's simulation;
``precision=None`` keeps OpenVINO's default, ``"bf16"`` asks for it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..export.openvino import import_openvino
from ..targets import TARGET_METADATA, TargetMismatchWarning, cpu_info, running_mismatch
from .ort import LatencyStats, measure_latency  # noqa: F401  (re-exported: times any runner)

PRECISIONS = ("f32", "bf16", "f16")

# Layers that multiply-accumulate: the ones that can run in int8 (u8/i8 runtime precision).
# MobileNetV2's residual Adds fuse into its convs as post-ops; a standalone Eltwise is "other".
COMPUTE_LAYERS = frozenset({
    "Convolution", "Deconvolution", "FullyConnected", "MatMul", "RNNCell", "RNNSeq",
    "ScaledDotProductAttention", "ScaledDotProductAttentionWithKVCache", "PagedAttention", "LLMMLP",
    "QKVProjection", "Interaction",
})
INT8_PRECISIONS = frozenset({"u8", "i8"})
# Executed nodes that only move, reorder or convert data (FakeQuantize is the runtime's Q / DQ).
DATA_MOVEMENT_LAYERS = frozenset({
    "Reorder", "Reshape", "Transpose", "Gather", "GatherND", "GatherElements", "Concatenation", "Convert",
    "Broadcast", "ShapeOf", "Range", "Split", "StridedSlice", "Pad", "Tile", "Squeeze", "Unsqueeze",
    "FakeQuantize", "DepthToSpace", "SpaceToDepth", "Interpolate", "Select",
})
_NOT_EXECUTED = frozenset({"Input", "Output", "Const"})


def classify(layer_type: str, precision: str) -> str:
    """``"integer"`` (an int8 compute layer), ``"float_compute"``, ``"data_movement"`` or ``"other"``."""
    if layer_type in COMPUTE_LAYERS:
        return "integer" if precision in INT8_PRECISIONS else "float_compute"
    if layer_type in DATA_MOVEMENT_LAYERS:
        return "data_movement"
    return "other"


@dataclass(frozen=True)
class OpenVINOLayer:
    """One node of the compiled model's execution graph."""

    name: str
    layer_type: str
    precision: str  # runtimePrecision: what its kernel computes in
    output_precision: str
    primitive: str  # the kernel, e.g. "brgconv_avx512_amx_I8"
    fused: tuple[str, ...]  # the model's nodes fused into it (originalLayersNames)

    @property
    def kind(self) -> str:
        return classify(self.layer_type, self.precision)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.layer_type}, {self.precision})"


@dataclass
class OpenVINOPrecisionReport:
    """What OpenVINO's CPU plugin runs for one model, read from its compiled execution graph.

    Attributes:
        path: the model inspected.
        device: the OpenVINO device ("CPU").
        inference_precision: the compiled model's INFERENCE_PRECISION_HINT (its float layers' precision).
        openvino_version: the OpenVINO that compiled it.
        layers: every executed node (constants, inputs and outputs left out).
    """

    path: str
    device: str
    inference_precision: str
    openvino_version: str
    layers: list[OpenVINOLayer] = field(default_factory=list)

    def count(self, kind: str) -> int:
        """Executed nodes of one kind (see ``classify``)."""
        return sum(1 for layer in self.layers if layer.kind == kind)

    @property
    def integer_layers(self) -> list[str]:
        """Compute layers running in int8 (``"name (type, precision)"``)."""
        return [layer.label for layer in self.layers if layer.kind == "integer"]

    @property
    def float_compute_layers(self) -> list[str]:
        """Compute layers that stayed in float: the ones to look at."""
        return [layer.label for layer in self.layers if layer.kind == "float_compute"]

    @property
    def float_other(self) -> dict[str, int]:
        """Other executed layers in float (Eltwise, MVN, Softmax ...), counted by type."""
        counts = collections.Counter(layer.layer_type for layer in self.layers
                                     if layer.kind == "other" and layer.precision not in INT8_PRECISIONS)
        return dict(sorted(counts.items()))

    @property
    def integer_fraction(self) -> float | None:
        """int8 compute layers / all compute layers; None when there are none."""
        total = self.count("integer") + self.count("float_compute")
        return None if total == 0 else self.count("integer") / total

    def counts(self) -> dict[tuple[str, str], int]:
        """(layer type, runtime precision) -> number of executed nodes."""
        return dict(sorted(collections.Counter((la.layer_type, la.precision) for la in self.layers).items()))

    def to_dict(self) -> dict:
        """JSON-ready dict (adds per-kind totals, ``integer_fraction`` and ``float_other``)."""
        data = dataclasses.asdict(self)
        data["kinds"] = {k: self.count(k) for k in ("integer", "float_compute", "data_movement", "other")}
        data["integer_fraction"] = self.integer_fraction
        data["float_other"] = self.float_other
        return data

    def __str__(self) -> str:
        fraction = "n/a" if self.integer_fraction is None else f"{self.integer_fraction:.0%}"
        version = self.openvino_version.split("-")[0]
        title = (f"OpenVINO {version} {self.device} layers for `{os.path.basename(self.path)}` "
                 f"(inference precision {self.inference_precision}): {fraction} of compute layers in int8")
        lines = [title, "", "| layer type | runtime precision | kind | count |", "|---|---|---|---:|"]
        order = {"integer": 0, "float_compute": 1, "data_movement": 2, "other": 3}
        rows = sorted(self.counts().items(), key=lambda kv: (order[classify(*kv[0])], kv[0]))
        lines += [f"| {t} | {p} | {classify(t, p).replace('_', ' ')} | {n} |" for (t, p), n in rows]
        if self.float_compute_layers:
            lines += ["", "float compute layers: " + ", ".join(self.float_compute_layers)]
        return "\n".join(lines)


def _rt(info, key: str) -> str:
    return info[key].astype(str) if key in info else ""


def _type_name(value) -> str:
    """The short name of an ``openvino.Type`` property value (``f32``, ``bf16``), else ``str(value)``."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def precision_report(compiled, path: str, device: str = "CPU") -> OpenVINOPrecisionReport:
    """An ``OpenVINOPrecisionReport`` of an ``openvino.CompiledModel`` (see ``OpenVINOModel.int8_report``)."""
    ov = import_openvino()
    precision = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    report = OpenVINOPrecisionReport(path=path, device=device, openvino_version=ov.__version__,
                                     inference_precision=precision)
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = _rt(info, "layerType")
        if layer_type in _NOT_EXECUTED:
            continue
        fused = tuple(n for n in _rt(info, "originalLayersNames").split(",") if n)
        report.layers.append(OpenVINOLayer(name=op.get_friendly_name(), layer_type=layer_type,
                                           precision=_rt(info, "runtimePrecision"),
                                           output_precision=_rt(info, "outputPrecisions"),
                                           primitive=_rt(info, "primitiveType"), fused=fused))
    return report


def _mismatch_warning(name: str, target: str | None) -> None:
    """Warn when a model made for int8 weights on 8 bits meets an x86 CPU without VNNI."""
    if running_mismatch(target) is None:
        return
    warnings.warn(
        f"{name}: this model was quantized for target {target!r} (8-bit int8 weights), but this CPU "
        f"({cpu_info().describe()}) has no VNNI: int8 kernels there add pairs of u8 x s8 products in a saturating "
        "int16 (OpenVINO documents this as the 'saturation issue'), so outputs can differ from the simulation. "
        "Quantize again with target='x86-avx2-w7' (7-bit weights; uint8-weight files run their convs in float "
        "in OpenVINO) and export again", TargetMismatchWarning, stacklevel=3)


class OpenVINOModel:
    """An OpenVINO IR (or ONNX file) compiled for OpenVINO's CPU plugin, called like the torch model.

    Args:
        path: the ``.xml`` (its ``.bin`` beside it) or an ``.onnx`` file.
        threads: INFERENCE_NUM_THREADS (one stream, PERFORMANCE_HINT LATENCY).
        precision: INFERENCE_PRECISION_HINT for the float layers: ``"f32"`` (default: as lowbit's
            simulation), ``"bf16"``, ``"f16"``, or None for OpenVINO's default (bf16 on CPUs with
            AVX512-BF16 or AMX).
        shapes: ``{input name: shape}`` to fix dynamic dimensions before compiling (OpenVINO
            runs static shapes faster); None keeps the file's shapes.
        device: the OpenVINO device; only "CPU" is tested.
        config: more compile properties, passed as they are (they override the above).

    Example:
        >>> ov_model = OpenVINOModel("model.int8.xml", threads=1)
        >>> logits = ov_model(images)              # torch tensor in, torch tensor out
        >>> print(ov_model.int8_report())          # which layers run in int8
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 1, precision: str | None = "f32",
                 shapes: Mapping[str, Sequence[int]] | None = None, device: str = "CPU",
                 config: Mapping[str, object] | None = None) -> None:
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or None (OpenVINO's default); "
                             f"got {precision!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"OpenVINOModel: no model file at {os.fspath(path)!r} (an .xml IR or .onnx)")
        if self.path.suffix == ".xml" and not self.path.with_suffix(".bin").is_file():
            raise FileNotFoundError(f"OpenVINOModel: {self.path.name} needs its weights file "
                                    f"{self.path.with_suffix('.bin').name} beside it")
        ov = import_openvino()
        self.threads, self.device = threads, device
        core = ov.Core()
        model = core.read_model(self.path)
        self.target = (model.get_rt_info(["framework", TARGET_METADATA]).astype(str)
                       if model.has_rt_info(["framework", TARGET_METADATA]) else None)
        if shapes:
            unknown = set(shapes) - {i.get_any_name() for i in model.inputs}
            if unknown:
                raise ValueError(f"shapes names {sorted(unknown)}, which are not inputs of {self.path.name}")
            model.reshape({name: list(shape) for name, shape in shapes.items()})
        properties = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if precision is not None:
            properties["INFERENCE_PRECISION_HINT"] = precision
        properties.update(config or {})
        self.compiled = core.compile_model(model, device, properties)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        _mismatch_warning(self.path.name, self.target)

    def feeds(self, *args, **kwargs) -> dict[str, np.ndarray]:
        """Map positional / keyword torch inputs to the model's named numpy inputs."""
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            kwargs, args = dict(args[0]), ()
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: missing input(s) {missing}; the model takes {self.input_names}")
        return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                for k, v in feeds.items() if k in self.input_names}

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One synchronous inference; the outputs are copies (the request's buffers are reused)."""
        result = self.request.infer(dict(feeds), share_inputs=True)
        return [np.asarray(result[out]) for out in self.compiled.outputs]

    def __call__(self, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = [torch.from_numpy(o) for o in self.run(self.feeds(*args, **kwargs))]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def int8_report(self) -> OpenVINOPrecisionReport:
        """Per executed layer: its runtime precision; which compute layers run in int8, which in float."""
        return precision_report(self.compiled, os.fspath(self.path), self.device)
