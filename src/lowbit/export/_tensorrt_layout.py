"""The Q/DQ layout TensorRT's explicit quantization takes, written and checked on an ONNX graph.

TensorRT builds an int8 engine from an ONNX file whose QuantizeLinear / DequantizeLinear
nodes say exactly where values are int8 ("explicit quantization").  Its rules, as NVIDIA's
TensorRT developer guide ("Explicit Quantization", "Q/DQ Layer-Placement Recommendations")
states them, and what lowbit writes for each:

  R1  INT8 is symmetric: every Q/DQ zero point is int8 and 0 (TensorRT's IQuantizeLayer has
      no zero-point shift).  lowbit's ``tensorrt`` target puts activations on that grid.
  R2  Activations are quantized per tensor; weights per tensor or per output channel, the
      axis of the output channels (axis 0 of a Conv weight [K, C, R, S] and of a Linear
      weight [out, in]).  A Linear on 3-D inputs is ``DQ(W) -> Transpose -> MatMul``: the
      weight stays [out, in] with axis 0 (the transpose is not folded as it is for ORT).
  R3  Q/DQ on every input of a weighted op (Conv, Gemm, MatMul): the activation through
      Q -> DQ, the weight as DQ of an int8 initializer.
  R4  No Q/DQ on biases: TensorRT adds a float bias after the int32 accumulation.  lowbit's
      simulation adds the bias rounded to the int32 grid ``s_in * s_w``; ``float_biases``
      writes exactly that value as a float32 initializer, so the file adds what the
      simulation adds.
  R5  A non-weighted op with int8 inputs (a residual Add) runs in int8 only when its output
      is quantized too (DQ -> Add -> Q fuses); otherwise it runs in float (not an error).
  R6  Opset >= 13 (per-channel DequantizeLinear); only standard ONNX ops (no ONNX Runtime
      contrib ops), and no DynamicQuantizeLinear / MatMulInteger / QLinear* (TensorRT
      imports Q/DQ pairs only).

``float_biases`` is an export pass; ``check_layout`` reads a finished graph and reports
rule violations, the weighted ops that stay in float and the adds that cannot run in int8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ._graph import Graph, attr

WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
MIN_OPSET = 13
# Ops TensorRT does not import from a Q/DQ file (ONNX Runtime's integer operator forms).
_INTEGER_FORMS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
                            "QLinearMatMul", "QGemm", "QLinearAdd", "MatMulNBits"})
# Ops between an Add and the Q that requantizes its output, which TensorRT fuses in.
_PASS_THROUGH = frozenset({"Relu", "Clip"})


def float_biases(g: Graph) -> int:
    """``DQ(int32 bias) -> op``  =>  a float32 initializer with the dequantized value (R4).

    The value is computed as ONNX DequantizeLinear defines it, ``(x - zero_point) * scale``
    in float32: the same IEEE products the simulation adds (``QuantLayer._round_bias``) and
    ONNX Runtime computes for the DQ.  Returns the number of biases rewritten."""
    done = 0
    for dq in g.nodes("DequantizeLinear"):
        x = g.const(dq.input[0])
        if x is None or x.dtype != np.int32 or any(g.is_graph_output(o) for o in dq.output):
            continue
        scale = g.const(dq.input[1])
        zero = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if scale is None or (len(dq.input) > 2 and dq.input[2] and zero is None):
            continue  # scale computed in the graph: not a bias lowbit wrote
        shape = [1] * x.ndim
        if scale.ndim == 1 and x.ndim > 0:
            shape[attr(dq, "axis", 1) % x.ndim] = -1
        centred = x if zero is None else x - zero.astype(np.int32).reshape(shape if zero.ndim else ())
        value = centred.astype(np.float32) * scale.astype(np.float32).reshape(shape if scale.ndim else ())
        g.replace_uses(dq.output[0], g.add_const(f"{dq.input[0]}_float", value.astype(np.float32)))
        g.remove_nodes([dq])
        done += 1
    return done


@dataclass
class TensorRTLayout:
    """What ``check_layout`` found in a file written for TensorRT.

    Attributes:
        violations: rule breaks (R1-R6 in the module docstring) TensorRT rejects or runs
            differently from the simulation; an export for TensorRT has none.
        int8_layers: weighted ops (node names) with Q/DQ on their input and weight: int8 in TensorRT.
        float_layers: weighted ops without them (left in float by the config): float in TensorRT.
        float_adds: Adds with int8 inputs whose output is not requantized (R5): float in TensorRT.
    """

    violations: list[str] = field(default_factory=list)
    int8_layers: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    float_adds: list[str] = field(default_factory=list)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_qdq(g: Graph, node: onnx.NodeProto, out: list[str]) -> None:
    """R1 (symmetric int8, zero point 0) and the per-tensor half of R2 for one Q or DQ."""
    scale = g.const(node.input[1])
    zero = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or zero is None:
        out.append(f"{node.name}: scale and zero point must be initializers (R1; an omitted zero point "
                   "means uint8)")
        return
    if zero.dtype != np.int8 or zero.any():
        out.append(f"{node.name}: zero point {zero.dtype} {zero.ravel()[:4].tolist()}, TensorRT needs int8 0 (R1)")
    if not (scale > 0).all():
        out.append(f"{node.name}: scales must be positive (R1)")
    if scale.ndim and not g.is_const(node.input[0]):
        out.append(f"{node.name}: an activation quantized per channel; TensorRT takes per tensor (R2)")


def _output_axis(g: Graph, op: onnx.NodeProto, via_transpose: bool) -> int:
    """The output-channel axis of the weight of ``op`` as stored (R2)."""
    if op.op_type == "ConvTranspose":
        return 1
    if op.op_type == "Gemm":
        return 0 if attr(op, "transB", 0) else 1
    if op.op_type == "MatMul":
        return 0 if via_transpose else 1
    return 0


def _weight_dq(g: Graph, name: str) -> tuple[onnx.NodeProto | None, bool]:
    """The DQ of an int8 initializer feeding ``name`` (directly, or through one 2-D Transpose)."""
    node = g.producer(name)
    via_transpose = node is not None and node.op_type == "Transpose"
    if via_transpose:
        node = g.producer(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or not g.is_const(node.input[0]):
        return None, via_transpose
    return node, via_transpose


def _from_activation_dq(g: Graph, name: str) -> bool:
    source = g.producer(name)
    return source is not None and source.op_type == "DequantizeLinear" and not g.is_const(source.input[0])


def _from_constant(g: Graph, name: str) -> bool:
    """``name`` is an initializer, or computed from initializers only (a weight, however written)."""
    if g.is_const(name):
        return True
    node = g.producer(name)
    return node is not None and bool(node.input) and all(_from_constant(g, i) for i in node.input if i)


def _check_weighted(g: Graph, op: onnx.NodeProto, report: TensorRTLayout) -> None:
    """R2 (weight axis), R3 (Q/DQ on both inputs) and R4 (float bias) for one weighted op."""
    act_q = _from_activation_dq(g, op.input[0])
    w_dq, via_transpose = _weight_dq(g, op.input[1])
    if op.op_type == "MatMul" and w_dq is None and not _from_constant(g, op.input[1]):
        # activation x activation (attention scores): int8 when both inputs are Q/DQ'd, else float
        both = act_q and _from_activation_dq(g, op.input[1])
        (report.int8_layers if both else report.float_layers).append(op.name)
        return
    if not act_q and w_dq is None:
        report.float_layers.append(op.name)
        return
    if not act_q or w_dq is None:
        which = "input" if not act_q else "weight"
        report.violations.append(f"{op.name}: {op.op_type} with Q/DQ on one input only (its {which} is float); "
                                 "TensorRT runs it in int8 only with both (R3)")
        return
    weight = g.const(w_dq.input[0])
    if weight.dtype != np.int8:
        report.violations.append(f"{op.name}: weight stored as {weight.dtype}, TensorRT takes int8 (R1)")
    if g.const(w_dq.input[1]).ndim == 1:
        want = _output_axis(g, op, via_transpose)
        if attr(w_dq, "axis", 1) % weight.ndim != want:
            report.violations.append(f"{op.name}: per-channel weight on axis {attr(w_dq, 'axis', 1)}, "
                                     f"not the output channels (axis {want}) (R2)")
    if len(op.input) > 2 and op.input[2]:
        bias = g.producer(op.input[2])
        if bias is not None and bias.op_type == "DequantizeLinear":
            report.violations.append(f"{op.name}: bias through DequantizeLinear; TensorRT takes a float bias (R4)")
    report.int8_layers.append(op.name)


def _requantized(g: Graph, name: str) -> bool:
    """Every reader of ``name`` (through Relu / Clip) is a QuantizeLinear (R5)."""
    users = g.consumers(name)
    if not users or g.is_graph_output(name):
        return False
    return all(u.op_type == "QuantizeLinear" or (u.op_type in _PASS_THROUGH and _requantized(g, u.output[0]))
               for u in users)


def check_layout(model: onnx.ModelProto, base_dir: str | None = None) -> TensorRTLayout:
    """Check an ONNX graph against TensorRT's explicit-quantization rules (module docstring);
    ``base_dir``: the folder of its external-data file, if it has one.

    Example:
        >>> report = check_layout(onnx.load("model.trt.onnx"))
        >>> assert not report.violations, report.violations
    """
    g, report = Graph(model, base_dir), TensorRTLayout()
    if _opset(model) < MIN_OPSET:
        report.violations.append(f"opset {_opset(model)}: TensorRT's per-channel Q/DQ needs opset >= {MIN_OPSET} (R6)")
    for node in g.nodes():
        if node.domain not in ("", "ai.onnx"):
            report.violations.append(f"{node.name}: {node.domain}.{node.op_type} is not a standard ONNX op (R6)")
        elif node.op_type in _INTEGER_FORMS:
            report.violations.append(f"{node.name}: {node.op_type}; TensorRT imports QuantizeLinear / "
                                     "DequantizeLinear only (R6)")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if node.op_type == "DequantizeLinear" and (g.const(node.input[0]) is not None
                                                       and g.const(node.input[0]).dtype == np.int32):
                report.violations.append(f"{node.name}: int32 DequantizeLinear (a quantized bias); "
                                         "TensorRT takes float biases (R4)")
                continue
            _check_qdq(g, node, report.violations)
        elif node.op_type in WEIGHTED and len(node.input) > 1:
            _check_weighted(g, node, report)
        elif node.op_type == "Add" and all(_from_activation_dq(g, i) for i in node.input) \
                and not _requantized(g, node.output[0]):
            report.float_adds.append(node.name)
    return report
