"""inspect_onnx: which kernels ONNX Runtime actually runs for an exported model.

A QDQ file says what *should* run in integers; only ORT's graph optimizer decides
what does.  ``inspect_onnx`` opens a CPU session with
``SessionOptions.optimized_model_filepath`` set, so ORT writes the graph it will
execute, and classifies that graph's nodes:

* integer kernels: QLinearConv, QLinearMatMul, QGemm, MatMulIntegerToFloat,
  DynamicQuantizeMatMul, ... (ORT's contrib quantized ops, see ``INTEGER_OPS``);
* float compute: Conv, MatMul, Gemm, their Fused* forms, Add/Mul, attention ...
  (ops that have an integer counterpart and so *could* have been fused);
* data movement: Q / DQ, Reshape, Transpose, MaxPool, layout reorders ...;
* other: float activations and normalisations (Relu, Softmax, LayerNorm ...).

The default level is ORT_ENABLE_ALL, what an ``InferenceSession`` uses when given
no options.  At that level the saved graph may hold CPU-specific nodes (NCHWc
``ReorderInput``, NHWC ``QLinearConv`` between Transposes): it describes this
machine's execution, which is the point.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field

import onnx

from ._external import check_data_files

# Ops that compute on quantized operands: ONNX's *Integer ops and ORT's contrib ops
# (com.microsoft schemas in onnxruntime.capi); ``_is_integer`` adds every QLinear*,
# QOrdered* and MatMulNBits* name.  A test checks this against ORT's schema list.
INTEGER_OPS = frozenset({
    "ConvInteger", "MatMulInteger", "MatMulInteger16", "MatMulIntegerToFloat", "MulInteger",
    "ReduceSumInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QGemm", "QAttention",
    "QEmbedLayerNormalization", "QMoE", "MatMulNBits", "MatMulBnb4", "MatMulFpQ4", "GatherBlockQuantized",
})

FLOAT_COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul", "Einsum",
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "LSTM", "GRU", "RNN",
    "Add", "Sub", "Mul", "Div", "AveragePool", "GlobalAveragePool", "ReduceMean",
})

DATA_MOVEMENT_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Reshape", "Flatten", "Transpose",
    "Squeeze", "Unsqueeze", "Gather", "GatherElements", "GatherND", "Slice", "Split", "Concat", "Expand",
    "Tile", "Pad", "Identity", "Cast", "Shape", "Size", "ConstantOfShape", "Range", "MaxPool",
    "NhwcMaxPool", "GlobalMaxPool", "ReorderInput", "ReorderOutput", "DepthToSpace", "SpaceToDepth",
    "Resize", "Upsample", "Constant",
})

_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _is_integer(op_type: str) -> bool:
    return op_type in INTEGER_OPS or op_type.startswith(("QLinear", "QOrdered", "MatMulNBits"))


def classify(op_type: str) -> str:
    """``"integer"``, ``"float_compute"``, ``"data_movement"`` or ``"other"`` for an ORT op type."""
    if _is_integer(op_type):
        return "integer"
    if op_type in FLOAT_COMPUTE_OPS:
        return "float_compute"
    if op_type in DATA_MOVEMENT_OPS:
        return "data_movement"
    return "other"


@dataclass
class OnnxKernelReport:
    """What ONNX Runtime runs for one model, measured from its optimized graph.

    Attributes:
        path: the model inspected.
        level: ORT graph optimization level used (``"all"`` = ORT's default).
        op_counts: op type -> number of nodes in the optimized graph.
        integer_nodes: names of integer-kernel nodes (``"name (OpType)"``).
        float_compute_nodes: names of float compute nodes -- the ones to look at.
        onnxruntime_version: the ORT that produced the graph.
    """

    path: str
    level: str
    op_counts: dict[str, int] = field(default_factory=dict)
    integer_nodes: list[str] = field(default_factory=list)
    float_compute_nodes: list[str] = field(default_factory=list)
    onnxruntime_version: str = ""

    def count(self, kind: str) -> int:
        """Nodes of one kind (see ``classify``)."""
        return sum(n for op, n in self.op_counts.items() if classify(op) == kind)

    @property
    def integer_fraction(self) -> float | None:
        """Integer kernels / (integer + float compute nodes); None if there are no compute nodes."""
        total = self.count("integer") + self.count("float_compute")
        return None if total == 0 else self.count("integer") / total

    def to_dict(self) -> dict:
        """JSON-ready dict (adds per-kind totals and ``integer_fraction``)."""
        data = dataclasses.asdict(self)
        data["kinds"] = {k: self.count(k) for k in ("integer", "float_compute", "data_movement", "other")}
        data["integer_fraction"] = self.integer_fraction
        return data

    def __str__(self) -> str:
        fraction = "n/a" if self.integer_fraction is None else f"{self.integer_fraction:.0%}"
        title = (f"ONNX Runtime {self.onnxruntime_version} kernels for `{os.path.basename(self.path)}` "
                 f"(level {self.level}): {fraction} of compute nodes in integers")
        lines = [
            title,
            "",
            "| op | kind | count |",
            "|---|---|---:|",
        ]
        order = {"integer": 0, "float_compute": 1, "data_movement": 2, "other": 3}
        for op, n in sorted(self.op_counts.items(), key=lambda kv: (order[classify(kv[0])], kv[0])):
            lines.append(f"| {op} | {classify(op).replace('_', ' ')} | {n} |")
        if self.float_compute_nodes:
            lines += ["", "float compute nodes: " + ", ".join(self.float_compute_nodes)]
        return "\n".join(lines)


def _walk(graph: onnx.GraphProto):
    """Every node, including those inside If / Loop / Scan bodies."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _walk(sub)


def _optimized_graph(path: str, level: str, threads: int) -> tuple[onnx.ModelProto, str]:
    try:
        import onnxruntime as ort
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        raise ModuleNotFoundError("inspect_onnx needs onnxruntime: pip install onnxruntime",
                                  name="onnxruntime") from exc

    with tempfile.TemporaryDirectory(prefix="lowbit-inspect-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        # The optimized graph keeps its tensors in a file of its own (a model over 2 GiB needs it);
        # only its nodes are read back.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the "hardware specific" note on saving at level ALL is expected
        try:
            ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception:
            check_data_files(path)  # a missing .data file, named; else ORT's own error
            raise
        return onnx.load(options.optimized_model_filepath, load_external_data=False), ort.__version__


def inspect_onnx(path: str | os.PathLike, *, threads: int = 1, level: str = "all") -> OnnxKernelReport:
    """Classify the nodes ONNX Runtime's CPU provider runs for the model at ``path``.

    Args:
        path: an ONNX file.
        threads: intra-op threads of the inspection session (does not change the graph).
        level: ``"all"`` (ORT's default), ``"extended"`` or ``"basic"`` graph optimization.

    Returns:
        An ``OnnxKernelReport``; ``print`` it for a markdown table, ``to_dict()`` for JSON.

    Example:
        >>> report = inspect_onnx("model.int8.onnx")
        >>> report.float_compute_nodes          # what stayed float
        []
    """
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {sorted(_LEVELS)}, got {level!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"inspect_onnx: no ONNX file at {path!r}")
    model, version = _optimized_graph(path, level, threads)
    report = OnnxKernelReport(path=path, level=level, onnxruntime_version=version)
    for node in _walk(model.graph):
        report.op_counts[node.op_type] = report.op_counts.get(node.op_type, 0) + 1
        label = f"{node.name or node.output[0]} ({node.op_type})"
        kind = classify(node.op_type)
        if kind == "integer":
            report.integer_nodes.append(label)
        elif kind == "float_compute":
            report.float_compute_nodes.append(label)
    report.op_counts = dict(sorted(report.op_counts.items()))
    return report
