"""export_qnn: a quantized lowbit model -> float ONNX + AIMET encodings for Qualcomm QNN / SNPE.

Qualcomm's tool chain (``qairt-converter --quantization_overrides``, ``snpe-onnx-to-dlc``, AIMET's
``QuantizationSimModel``) takes a *float* ONNX model and a JSON of quantization encodings keyed
by the ONNX tensor names, and quantizes each named tensor exactly on that grid.  This module
writes that pair from a lowbit model, so the deployed integers are lowbit's:

    model.onnx        float graph: lowbit's export for the ``qnn`` target with every Q/DQ removed
    model.encodings   AIMET's encodings, format version 1.0.0 (``ENCODING_VERSION``)

How the pair is made.  lowbit's own QDQ export (``export_onnx(..., target="qnn")``: standard ops,
BatchNorm folded, Q copied in front of MaxPool / Flatten, one Q per tensor) is rewritten:

* ``Q -> DQ`` on an activation is removed; the tensor it quantized gets an activation encoding.
  QNN quantizes a tensor once, where it is produced: a tensor that lowbit's quantizers read with
  different ranges (after QAT or a range search) keeps the finest, and each other range reads an
  ``Identity`` copy with its own encoding, which QNN requantizes (warned: not bit-exact there).
* ``DQ(int8 W)`` becomes a float initializer holding the *dequantized* weight, ``q * s``, named
  after the quantizer (``conv1.weight``), with a per-channel param encoding.  Writing the values
  already on the grid (not the float weight before rounding) makes any tool that re-quantizes
  them with these scales get lowbit's integers back whatever its rounding rule: AdaRound's and
  GPTQ's choices survive, as AIMET's own AdaRound export does it.
* ``DQ(int32 bias)`` (the simulation's bias on the grid ``s_in * s_w``) becomes the float bias
  it dequantizes to, with a 32-bit param encoding of that scale (``int32_bias``), as AIMET
  writes it with ``export_int32_bias=True``.

The encoding arithmetic (AIMET ``aimet_onnx._encoding.AffineEncoding``, format 1.0.0):
``q = clamp(round(x / scale - offset), 0, 2**bw - 1)``, ``x' = (q + offset) * scale``, with the
offset of the *unsigned* grid: ``offset = -zero_point`` for a uint8 activation, ``-2**(bw-1)``
for a signed symmetric weight (``is_sym: true``, dtype int).  AIMET reads ``min = offset * scale``
and ``max = (offset + 2**bw - 1) * scale`` from them; they are not written (1.0.0 has no such
fields).  A signed affine activation (``s8-affine``) is written as the uint8 grid it equals
(zero point + 128), as AIMET's exporter does by default.

What the encodings cannot say stays float, logged: per-row embedding tables (AIMET and QNN give a
Gather no channel axis; the table is written dequantized, on lowbit's grid, without an encoding),
tensors lowbit leaves float (QNN's own calibration then decides them, e.g. the logits).
Refused with a message: dynamic activations (QNN has no run-time ranges), group-wise weights,
narrow-range activations (1.0.0 has no field for them).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from .._files import atomic_path
from ..nn import has_quantizers
from ..numerics import QuantSpec
from ..targets import TARGET_METADATA
from . import _external
from ._graph import Graph, attr
from .onnx_export import export_onnx

log = logging.getLogger(__name__)

__all__ = ["ENCODING_VERSION", "encodings_as_qdq", "encodings_path", "export_qnn"]

ENCODING_VERSION = "1.0.0"
"""The AIMET encodings format written: AIMET's default export (aimet-onnx 2.x) and what QNN's
``--quantization_overrides`` reads."""

_BIAS_BITS = 32  # integer biases: int32 on the grid s_in * s_w (QuantSpec stops at 16 bits)


def encodings_path(path: str | os.PathLike) -> Path:
    """The encodings file beside the float ONNX file ``path``: ``model.onnx`` -> ``model.encodings``."""
    return Path(path).with_suffix(".encodings")


def encodings_as_qdq(path: str | os.PathLike) -> onnx.ModelProto:
    """The float file ``path`` with its activation encodings inserted as ONNX
    ``QuantizeLinear -> DequantizeLinear`` (uint8, zero point ``-offset``): the arithmetic the
    1.0.0 format documents, runnable in ONNX Runtime without Qualcomm's tools.  Weights and
    biases are on their grids in the float file already, so they stay.  Each quantized tensor
    ``t`` keeps its float value under its own name; its consumers read ``t@dq``.

    What differs from AIMET / QNN: ONNX rounds half to even, AIMET half away from zero (only an
    exact tie lands on the other code).

    Raises:
        ValueError: an activation encoding other than 8-bit per tensor.
    """
    model = onnx.load(path)
    doc = json.loads(encodings_path(path).read_text())
    renamed, qdq = {}, []
    for e in doc["activation_encodings"]:
        if e["bw"] != 8 or e["enc_type"] != "PER_TENSOR":
            raise ValueError(f"encodings_as_qdq: {e['name']} has a {e['bw']}-bit {e['enc_type']} encoding; "
                             "only 8-bit per-tensor activations are written as ONNX Q/DQ here")
        n = e["name"]
        model.graph.initializer.extend([numpy_helper.from_array(np.float32(e["scale"][0]), f"{n}@s"),
                                        numpy_helper.from_array(np.uint8(-e["offset"][0]), f"{n}@z")])
        qdq += [helper.make_node("QuantizeLinear", [n, f"{n}@s", f"{n}@z"], [f"{n}@q"]),
                helper.make_node("DequantizeLinear", [f"{n}@q", f"{n}@s", f"{n}@z"], [f"{n}@dq"])]
        renamed[n] = f"{n}@dq"
    for node in model.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    for out in model.graph.output:  # a quantized graph output: the quantized value is the output
        if out.name in renamed:
            qdq.append(helper.make_node("Identity", [renamed[out.name]], [f"{out.name}@out"]))
            out.name = f"{out.name}@out"
    nodes = [*qdq, *model.graph.node]
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    del model.graph.node[:]
    while nodes:  # topological order
        ready = [n for n in nodes if all(i in known for i in n.input if i)]
        if not ready:
            raise ValueError(f"encodings_as_qdq: {path} has nodes whose inputs are never produced")
        model.graph.node.extend(ready)
        known.update(o for n in ready for o in n.output)
        nodes = [n for n in nodes if n not in ready]
    return model


def export_qnn(qmodel: nn.Module, path: str | os.PathLike, example_inputs, *, int32_bias: bool = True,
               input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
               dynamic_batch: bool = True, dynamic_axes: Mapping | None = None,
               opset: int | None = None) -> Path:
    """Write the float ONNX model and its AIMET encodings for Qualcomm's tool chain.

    Args:
        qmodel: a model from ``lowbit.quantize`` or ``lowbit.prepare_qat`` with static activation
            ranges (``"w8a8"``, ideally ``target="qnn"``: uint8 affine activations, int8
            per-channel weights).
        path: the float ``.onnx`` file; the encodings go to ``encodings_path(path)`` (same stem,
            ``.encodings``).  Both written atomically; a model over 2 GiB keeps its tensors in
            ``<path>.data``.
        example_inputs: as for ``lowbit.export_onnx``.
        int32_bias: also write each integer bias's 32-bit encoding (scale ``s_in * s_w``); QNN
            derives the same grid itself when it is absent.
        input_names, output_names, dynamic_batch, dynamic_axes, opset: as for ``export_onnx``.

    Returns:
        The path of the float ONNX file.

    Raises:
        ValueError: a quantizer the encodings cannot express (dynamic, group-wise, narrow-range
            activation); the message names it and the fix.

    Example:
        >>> qmodel = lowbit.quantize(model, calib, "w8a8", target="qnn")
        >>> export_qnn(qmodel, "model.onnx", x)     # model.onnx + model.encodings
        # qairt-converter -i model.onnx --quantization_overrides model.encodings ...
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"export_qnn: {path} should end in .onnx (the encodings go beside it, "
                         f"as {path.stem}.encodings)")
    specs = _quantizer_specs(qmodel)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".qdq", dir=path.parent) as folder:
        qdq_path = Path(folder) / "model.qdq.onnx"
        export_onnx(qmodel, qdq_path, example_inputs, input_names=input_names, output_names=output_names,
                    dynamic_batch=dynamic_batch, dynamic_axes=dynamic_axes, opset=opset, target="qnn")
        model = onnx.load(qdq_path, load_external_data=False)
        encodings = _qdq_to_float(model, specs, int32_bias=int32_bias, base_dir=folder)
        onnx.helper.set_model_props(model, {TARGET_METADATA: "qnn"})
        with atomic_path(encodings_path(path)) as tmp:  # renamed after the model, only if it was written
            tmp.write_text(_dumps(encodings))
            _external.save(model, path, base_dir=folder)
    log.info("exported %s and %s (%d activation, %d param encodings)", path, encodings_path(path).name,
             len(encodings["activation_encodings"]), len(encodings["param_encodings"]))
    return path


def _quantizer_specs(qmodel: nn.Module) -> dict[str, QuantSpec]:
    """Every quantizer's spec by its name (``"conv1.input"``), the names export gives its nodes."""
    specs = {}
    for module in qmodel.modules():
        if has_quantizers(module):
            for _, q in module.quantizers():
                if q.mode == "dynamic":
                    raise ValueError(f"{q.name}: a dynamic activation quantizer; QNN runs fixed ranges only. "
                                     "Quantize with a static config (\"w8a8\", target=\"qnn\") and calibration data")
                specs[q.name] = q.spec
    return specs


def _qdq_to_float(model: onnx.ModelProto, specs: Mapping[str, QuantSpec], *, int32_bias: bool = True,
                 base_dir: str | None = None) -> dict:
    """Rewrite lowbit's QDQ ``model`` in place into the float graph; returns its encodings (1.0.0).

    Args:
        model: a ``export_onnx(..., target="qnn")`` ModelProto (its external data in ``base_dir``).
        specs: the quantizers' specs by name (export names each Q / DQ node ``<quantizer>/<op>``).
        int32_bias: write the encodings of int32 biases too.
    """
    g = Graph(model, base_dir)
    for node in g.nodes():
        if node.op_type in ("DynamicQuantizeLinear", "MatMulInteger"):
            raise ValueError(f"{node.name}: dynamic quantization has no QNN encoding; quantize with static "
                             "activation ranges (\"w8a8\" and calibration data)")
    params = _float_embeddings(g, specs) + _float_params(g, specs, int32_bias)
    activations = _remove_activation_qdq(g, specs)
    g.prune()
    leftover = [n.name for n in g.nodes() if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if leftover:
        raise ValueError(f"export_qnn: Q/DQ nodes this exporter cannot turn into encodings: {leftover}")
    g.commit()
    del model.graph.value_info[:]
    return {"version": ENCODING_VERSION, "producer": {"package": "lowbit", "version": _lowbit_version()},
            "activation_encodings": activations, "param_encodings": params}


def _dumps(encodings: dict) -> str:
    """``encodings`` as JSON text with one entry per line (a per-channel list stays on its line)."""
    parts = []
    for key, value in encodings.items():
        if isinstance(value, list) and value:
            entries = ",\n".join(f"  {json.dumps(entry)}" for entry in value)
            parts.append(f" {json.dumps(key)}: [\n{entries}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _lowbit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


# -- the encodings ---------------------------------------------------------------------------------
def _encoding(name: str, spec: QuantSpec, scale: np.ndarray, zero_point: np.ndarray | None = None) -> dict:
    """One AIMET 1.0.0 encoding entry for tensor ``name`` quantized on ``spec``'s grid.

    ``scale`` / ``zero_point`` in ONNX layout (``()`` per tensor, ``(C,)`` per channel; the
    zero-point in ``spec``'s own container, None for 0).  Signed symmetric grids keep their sign
    (``is_sym``, offset ``-2**(bits-1)``); affine grids are written on the unsigned grid they equal.

    Example:
        >>> _encoding("x", UINT8_ACTIVATION, np.float32(0.02), np.uint8(3))["offset"]
        [-3]
    """
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.zeros(scale.shape, np.int64) if zero_point is None else np.asarray(zero_point).astype(np.int64)
    if spec.granularity == "group":
        raise ValueError(f"{name}: group-wise ({spec.describe()}) encodings are not written yet; "
                         "use per-channel weights (\"w8a8\", \"w4a8\") for QNN")
    if spec.symmetric:
        if np.any(zp != 0):
            raise ValueError(f"{name}: a symmetric grid with a nonzero zero-point")
        offset = np.full(scale.shape, -(2 ** (spec.bits - 1)), np.int64)
    else:
        offset = -(zp + (2 ** (spec.bits - 1) if spec.signed else 0))
    return _entry(name, spec.bits, spec.symmetric, scale, offset)


def _bias_encoding(name: str, scale: np.ndarray) -> dict:
    """The 32-bit symmetric encoding of a bias on the grid ``scale`` (= ``s_in * s_w``)."""
    scale = np.asarray(scale, dtype=np.float32)
    return _entry(name, _BIAS_BITS, True, scale, np.full(scale.shape, -(2 ** (_BIAS_BITS - 1)), np.int64))


def _entry(name: str, bits: int, symmetric: bool, scale: np.ndarray, offset: np.ndarray) -> dict:
    # float(np.float32) is the exact value as a Python float: JSON keeps all of its bits.
    return {"name": name, "dtype": "INT", "bw": int(bits), "is_sym": bool(symmetric),
            "enc_type": "PER_TENSOR" if scale.ndim == 0 else "PER_CHANNEL",
            "scale": [float(s) for s in scale.reshape(-1)], "offset": [int(o) for o in offset.reshape(-1)]}


# -- the graph rewrite -----------------------------------------------------------------------------
def _quantizer(node: onnx.NodeProto, specs: Mapping[str, QuantSpec]) -> tuple[str, QuantSpec]:
    """The quantizer a Q / DQ node stands for: export names it ``<quantizer>/<op>[@<copy>]``
    (``<quantizer>.dequantize/Mul`` for a per-row embedding table)."""
    name = node.name.split("/", 1)[0].removesuffix(".dequantize")
    if name not in specs:
        raise RuntimeError(f"{node.name}: no quantizer {name!r} in the model for this node (a lowbit bug)")
    return name, specs[name]


def _dequantized(g: Graph, dq: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(float values, scale, zero_point)`` of a DQ on a constant, computed as DequantizeLinear
    does (float32 ``(q - zp) * scale``, the simulation's arithmetic bit for bit)."""
    q = g.const(dq.input[0])
    scale = g.const(dq.input[1]).astype(np.float32)
    zp = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(scale.shape, q.dtype)
    shape = scale.shape
    if scale.ndim == 1:
        view = [1] * q.ndim
        view[attr(dq, "axis", 1) % q.ndim] = -1
        scale, zp = scale.reshape(view), zp.reshape(view)
    values = (q.astype(np.int64) - zp.astype(np.int64)).astype(np.float32) * scale
    return values.astype(np.float32), scale.reshape(shape), zp.reshape(shape)


def _float_params(g: Graph, specs: Mapping[str, QuantSpec], int32_bias: bool) -> list[dict]:
    """``DQ(int W)`` -> float initializer on the grid + param encoding, for every weight and bias."""
    entries = []
    for dq in g.nodes("DequantizeLinear"):
        if not all(g.is_const(i) for i in dq.input if i):
            continue
        if attr(dq, "block_size"):
            raise ValueError(f"{dq.name}: a group-wise weight; QNN encodings are written per channel only: "
                             "quantize with per-channel weights (\"w8a8\", \"w4a8\")")
        values, scale, zp = _dequantized(g, dq)
        is_bias = zp.dtype == np.int32  # export's int32 bias on the grid s_in * s_w (``_symbolic._BiasDQ``)
        name, spec = (dq.name.split("/", 1)[0], None) if is_bias else _quantizer(dq, specs)
        float_name = g.add_const(name, values)
        g.replace_uses(dq.output[0], float_name)
        g.remove_nodes([dq])
        if not is_bias:
            entries.append(_encoding(float_name, spec, scale, zp))
        elif int32_bias:
            entries.append(_bias_encoding(float_name, scale))
    return entries


def _float_embeddings(g: Graph, specs: Mapping[str, QuantSpec]) -> list[dict]:
    """``Gather(int8 table) -> DQ`` and ``Gather(int8 table) -> Cast -> [Sub] -> Mul(Gather(scales))``
    (``_symbolic._EmbeddingDQ``) -> ``Gather(float table on the grid)``.  A table with one scale
    gets a param encoding; a per-row table none (see the module docstring)."""
    entries = []
    for gather in g.nodes("Gather"):
        table = g.const(gather.input[0])
        if table is None or table.dtype not in (np.int8, np.uint8):
            continue
        end, scale, zp = _embedding_dequantize(g, gather)
        qname, spec = _quantizer(end, specs)
        values = ((table.astype(np.float32) - zp.astype(np.float32)) * scale).astype(np.float32)
        name = g.add_const(qname, values)
        g.replace_node(end, [helper.make_node("Gather", [name, gather.input[1]], [end.output[0]], axis=0,
                                              name=g.unique_name(f"{qname}/Gather"))])
        if scale.ndim == 0:
            entries.append(_encoding(name, spec, scale, zp))
        else:
            log.warning("%s: a per-row or per-column embedding table has no QNN encoding (AIMET and QNN give a "
                        "Gather no channel axis); written on lowbit's grid in float, for QNN to quantize", qname)
    return entries


def _embedding_dequantize(g: Graph, gather: onnx.NodeProto) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray]:
    """The node ending the dequantization of gathered rows, and the table's scale / zero-point
    (scalars, or per row as ``(rows, 1)``)."""
    users = g.consumers(gather.output[0])
    if len(users) == 1 and users[0].op_type == "DequantizeLinear":
        dq = users[0]
        scale = g.const(dq.input[1]).astype(np.float32)
        zp = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(scale.shape, np.int64)
        return dq, scale, zp
    node, zp = gather, np.zeros((), np.int64)
    while len(users) == 1 and users[0].op_type in ("Cast", "Sub"):
        node = users[0]
        if node.op_type == "Sub":
            zp = g.const(g.producer(node.input[1]).input[0])
        users = g.consumers(node.output[0])
    if len(users) != 1 or users[0].op_type != "Mul":
        raise ValueError(f"{gather.name}: an integer Gather export_qnn does not recognise (a lowbit bug)")
    mul = users[0]
    scale_rows = g.producer(mul.input[1] if mul.input[0] == node.output[0] else mul.input[0])
    return mul, g.const(scale_rows.input[0]).astype(np.float32), zp


def _remove_activation_qdq(g: Graph, specs: Mapping[str, QuantSpec]) -> list[dict]:
    """``x -> [Clip] -> Q -> DQ -> users`` => ``x -> users``, one activation encoding per tensor.

    A tensor that several quantizers read with different ranges keeps the finest grid (smallest
    scale); each other grid reads an ``Identity`` copy with its own encoding.  QNN quantizes a
    tensor once, at its producer, so the copy is a requantization of the fine codes (rounded
    twice: at most half a fine step more error than the simulation's direct rounding).

    A tensor that is also read in float (a residual add the simulation leaves float, a graph
    output) keeps no encoding: its quantized readers read an ``Identity`` copy that carries it.
    QNN quantizes a tensor for every reader, so encoding the tensor itself would quantize the
    float readers' input too (MiniLM: the residual branch around each attention block)."""
    groups: dict[str, list[tuple[onnx.NodeProto, dict]]] = {}
    for q in g.nodes("QuantizeLinear"):
        name, spec = _quantizer(q, specs)
        _check_activation(name, spec)
        source = _source(g, q, spec)
        zp = g.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        groups.setdefault(source, []).append((q, _encoding(source, spec, g.const(q.input[1]), zp)))
    entries = []
    for source, qs in groups.items():
        grids = sorted({_grid(e): e for _, e in qs}.values(), key=lambda e: e["scale"])
        tensors = {_grid(grids[0]): source}
        floats = _float_readers(g, source, [q for q, _ in qs])
        if floats:
            copy = g.unique_name(f"{source}/quantized")
            _insert_after(g, source, helper.make_node("Identity", [source], [copy], name=copy))
            tensors[_grid(grids[0])] = copy
            log.info("tensor %r is also read in float (by %s): its quantized readers read the Identity copy %r, "
                     "which carries the encoding", source, ", ".join(floats), copy)
        for extra in grids[1:]:
            copy = g.unique_name(f"{source}/requantized")
            _insert_after(g, source, helper.make_node("Identity", [source], [copy], name=copy))
            tensors[_grid(extra)] = copy
            log.warning("tensor %r is quantized with %d ranges; QNN quantizes it once (scale %.6g) and requantizes "
                        "the Identity copy %r (scale %.6g) for its other readers: give them one range for an "
                        "exact match", source, len(grids), grids[0]["scale"][0], copy, extra["scale"][0])
        for q, entry in qs:
            for dq in g.consumers(q.output[0]):
                if dq.op_type != "DequantizeLinear":
                    raise ValueError(f"{q.name}: read by a {dq.op_type}, not a DequantizeLinear (a lowbit bug)")
                _connect(g, dq.output[0], tensors[_grid(entry)])
            g.remove_nodes([q, *g.consumers(q.output[0])])
        entries += [{**e, "name": tensors[_grid(e)]} for e in grids]
    return entries


def _float_readers(g: Graph, source: str, quantizers: list[onnx.NodeProto]) -> list[str]:
    """What reads ``source`` other than its ``quantizers`` (directly, or through the Clip export puts
    in front of a narrow grid): node names, and "the graph output"."""
    def quantizes(node: onnx.NodeProto) -> bool:
        if any(node is q for q in quantizers):
            return True
        users = g.consumers(node.output[0]) if node.op_type == "Clip" else []
        return bool(users) and all(any(u is q for q in quantizers) for u in users)

    readers = [node.name or node.op_type for node in g.consumers(source) if not quantizes(node)]
    return readers + (["the graph output"] if g.is_graph_output(source) else [])


def _insert_after(g: Graph, tensor: str, node: onnx.NodeProto) -> None:
    """Put ``node`` right after the producer of ``tensor`` (first, for a graph input)."""
    producer = g.producer(tensor)
    if producer is None:
        first = g.nodes()[0]
        g.replace_node(first, [node, first])
    else:
        g.replace_node(producer, [producer, node])


def _check_activation(name: str, spec: QuantSpec) -> None:
    if spec.narrow_range:
        raise ValueError(f"{name}: a narrow-range activation ({spec.describe()}); AIMET / QNN encodings "
                         "have no narrow range: quantize activations with narrow_range=False")
    if spec.granularity != "tensor":
        raise ValueError(f"{name}: a per-channel activation ({spec.describe()}); QNN takes per-tensor ones")


def _grid(entry: dict) -> tuple:
    return entry["bw"], entry["is_sym"], tuple(entry["scale"]), tuple(entry["offset"])


def _source(g: Graph, q: onnx.NodeProto, spec: QuantSpec) -> str:
    """The float tensor ``q`` quantizes, behind the Clip export puts before a grid narrower than
    its 8-bit container (the encoding's own bit width saturates there)."""
    clip = g.producer(q.input[0])
    narrower = (spec.qmin, spec.qmax) != ((-128, 127) if spec.signed else (0, 255))
    if narrower and clip is not None and clip.op_type == "Clip" and all(g.is_const(i) for i in clip.input[1:]):
        return clip.input[0]
    return q.input[0]


def _connect(g: Graph, dq_out: str, source: str) -> None:
    """Make readers of ``dq_out`` read ``source``; a graph output ``dq_out`` keeps its name as an
    ``Identity`` of ``source`` (which carries the encoding)."""
    if g.is_graph_output(dq_out):
        g.replace_node(g.producer(dq_out), [helper.make_node("Identity", [source], [dq_out],
                                                               name=g.unique_name(f"{dq_out}/Identity"))])
    else:
        g.replace_uses(dq_out, source)
