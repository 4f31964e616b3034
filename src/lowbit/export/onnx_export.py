"""export_onnx: a quantized lowbit model -> an ONNX file in QDQ format.

Where the nodes go, and why (ONNX Runtime's CPU provider fuses "DQ -> op -> Q"
groups into integer kernels):

* each static activation quantizer becomes ``QuantizeLinear -> DequantizeLinear``
  exactly where the simulation fake-quantizes: on a layer's *input* (so every
  Conv / Linear / QuantAdd reads a DQ), which also puts a Q after the op that
  produced the tensor -- directly, behind a Relu / Clip that ORT drops, or behind
  MaxPool / Flatten / Reshape, in front of which export copies the Q (exact);
* each weight becomes an int8 initializer -> ``DequantizeLinear`` (per output
  channel: ``axis=0`` for Conv / Gemm, ``axis=1`` after folding the transpose of
  a MatMul weight);
* the bias of a layer whose input (per tensor) and weight are statically quantized
  becomes an int32 initializer -> ``DequantizeLinear`` with scale ``x_scale * w_scale``
  (per output channel: ``axis=0``), exactly the value the simulation adds (see
  ``_QuantMixin._quant_bias``) and the layout ORT's own ``quantize_static`` writes;
  ORT fuses it into QLinearConv / QGemm (a Gemm without an output Q fuses only with
  such a bias).  Other biases (dynamic inputs, weight-only layers) stay float, as
  in the simulation;
* dynamic activations become ``DynamicQuantizeLinear``; where they feed a Linear,
  export writes ORT's ``quantize_dynamic`` form, ``MatMulInteger -> Cast -> Mul
  [-> Add bias]``, which ORT fuses into DynamicQuantizeMatMul for any input rank;
* weight-only layers are ``DQ(int8 W) -> float op``; disabled quantizers emit nothing;
* an embedding gathers rows of its int8 table, then dequantizes only those rows
  (the table stays int8 in memory and only ``batch x tokens`` rows are converted,
  instead of the whole ``vocab x dim`` table on every run);
* a BatchNorm left after a quantized Conv is folded into the weight scale;
* a conv with an output quantizer (one that feeds SiLU, GELU ...: ``lowbit.passes.activations``)
  ends in its own Q -> DQ, so ORT runs it as QLinearConv; SiLU / GELU on that DQ are written
  as ORT's ``QuickGelu`` / ``Gelu`` (com.microsoft), the fusions ORT cannot make behind a DQ
  (``_activations``);
* a group-wise weight is a blocked ``DequantizeLinear`` (``block_size``, opset 21) on INT4 / INT8
  integers feeding the float op (``_blocked``); export then writes opset 21 (``_opset``);
* a model over 2 GiB gets its large tensors in one ``<file>.data`` beside it (``_external``).

The TorchScript exporter (``dynamo=False``) is used because an autograd
Function's ``symbolic`` maps each quantizer to Q/DQ directly and leaves the
float layers' export untouched.  Measured against the dynamo exporter (torch 2.13, onnxscript
0.7.2, ORT 1.32, Intel Xeon with AVX512-VNNI): ``torch.export`` cannot trace the Functions as they
are (their forwards branch on tensor values); with the quantizers rewritten as ``torch.library``
custom ops plus onnxscript translations it exports MobileNetV2 and MiniLM W8A8 with the same
outputs and the same integer kernels otherwise, but takes 2.5-3x as long, writes MobileNetV2's
pooling as a float ReduceMean (ORT loses one QLinearGlobalAveragePool), and runs no faster in ORT
(within the +-7% run-to-run noise); onnxscript is not a dependency.
The TorchScript exporter caps the opset at 20; higher opsets are stamped on the traced graph.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence

import onnx
import torch
from torch import nn

from ..nn import convert, is_qat_model
from ..targets import TARGET_METADATA, Target, resolve_target
from . import _activations, _blocked, _bn_fold, _external, _opset, _ort_layout, _passes, _tensorrt_layout
from ._graph import Graph
from ._inputs import DynamicAxes, ExportInputs, prepare_inputs
from ._opset import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET  # noqa: F401 (re-exported)
from ._patch import export_mode

log = logging.getLogger(__name__)


def _io_names(given: Sequence[str] | None, count: int, stem: str) -> list[str]:
    if given is None:
        return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
    names = list(given)
    if len(names) != count or len(set(names)) != count:
        raise ValueError(f"{stem}_names: expected {count} distinct names, got {names}")
    return names


def _trace(inputs: ExportInputs, output_names, dynamic_batch, dynamic_axes, opset,
           folder: str | None = None) -> onnx.ModelProto:
    """Run the TorchScript exporter (the model already in export mode); returns the raw ModelProto.

    With ``folder``, the exporter writes the model there (over 2 GiB it must: each large constant
    goes to a file of its own, which the ModelProto returned refers to, unread).

    ``output_names`` may be None (default names: ``output``..., or the keys of a mapping output
    under a ``KeywordAdapter``): the outputs are counted on the traced forward itself (a forward
    hook fills the name list and the dynamic axes before the exporter reads them, after
    tracing), so export runs the model once.  Outputs get axis 0 ``batch`` when
    ``dynamic_batch``, or what ``dynamic_axes`` gives for their name.
    """
    given, model = output_names, inputs.module
    # The exporter uses this list only after the trace has filled it in (before, it only checks
    # the dynamic axes' keys against it, and looks for a TorchScript graph when it is empty).
    names: list[str] = ["output"]
    axes = dict(inputs.axes)

    def name_outputs(module, args, out) -> None:
        names[:] = _io_names(given or getattr(module, "output_keys", None), _count_outputs(out), "output")
        axes.update({name: {0: "batch"} for name in names if dynamic_batch})
        axes.update({name: v for name, v in (dynamic_axes or {}).items() if name in names})
        unknown = set(dynamic_axes or {}) - set(names) - set(inputs.names)
        if unknown:
            raise ValueError(f"dynamic_axes names {sorted(unknown)}, which are neither inputs {inputs.names} "
                             f"nor outputs {names}")

    buffer = io.BytesIO() if folder is None else os.path.join(folder, "model.onnx")
    hook = model.register_forward_hook(name_outputs)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen deliberately (see the module docstring); its
            # deprecation notices (raised at our call and inside torch.onnx) are not the user's concern.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            # lowbit's own checks on traced tensors (a quantizer asking whether its range is set, for a
            # bias left float) only feed Python branches the trace takes once; the user's code still warns.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"lowbit\.")
            torch.onnx.export(
                model, inputs.args, buffer, dynamo=False, opset_version=opset, input_names=inputs.names,
                output_names=names, dynamic_axes=axes or None, do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
    finally:
        hook.remove()
    if folder is None:
        return onnx.load_from_string(buffer.getvalue())
    return onnx.load(buffer, load_external_data=False)


def _postprocess(model: onnx.ModelProto, opset: int, target: Target | None = None,
                 base_dir: str | None = None) -> onnx.ModelProto:
    """Apply the graph passes (``_passes``, ``_bn_fold``, ``_ort_layout``, ``_blocked``) in place on a
    graph traced at ``opset``, its external-data constants (if any) in ``base_dir``; returns ``model``."""
    g = Graph(model, base_dir)
    _passes.lift_constants(g)
    runtime = target.runtime if target is not None else "onnxruntime"
    trt = runtime == "tensorrt"  # TensorRT's explicit quantization (``_tensorrt_layout``)
    counts = {
        "folded constants": _passes.fold_constants(g, opset),
        # TensorRT: weights stay [out, in] with their channels on axis 0, transposed after the DQ
        "folded weight transposes": 0 if trt else _passes.fold_dq_transpose(g),
        "folded batchnorms": _bn_fold.fold_batchnorm(g),
        "merged duplicate Q/DQ": _passes.dedupe_qdq(g),
        "Q copied before data movement": _ort_layout.propagate_q_backward(g),
        "merged duplicate Q/DQ (after copies)": _passes.dedupe_qdq(g),
        # ONNX Runtime's contrib ops: only in a file for ONNX Runtime
        "SiLU / GELU after a DQ -> QuickGelu / Gelu":
            _activations.fuse_dq_activations(g) if runtime == "onnxruntime" else 0,
        "dynamic matmuls -> MatMulInteger": 0 if trt else _ort_layout.dynamic_to_matmul_integer(g),
        "uint8 weights": _ort_layout.weights_to_uint8(g) if target and target.weight_layout == "u8" else 0,
        "blocked (group-wise) weight DQs": _blocked.lower(g),
        "int32 biases -> float (TensorRT)": _tensorrt_layout.float_biases(g) if trt else 0,
    }
    g.prune()
    g.commit()
    _passes.clear_value_info(g)
    log.debug("export passes: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return model


def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: DynamicAxes | None = None,
    opset: int | None = None,
    target: str | Target | None = None,
) -> onnx.ModelProto:
    """Export a quantized model to ONNX in QDQ format, runnable by ONNX Runtime's integer kernels.

    Args:
        qmodel: a model from ``lowbit.quantize`` or ``lowbit.prepare_qat`` (a QAT model is
            exported as ``lowbit.qat.convert`` makes it: BatchNorm folded, ranges fixed).
            Exported in eval mode; its training flag is restored afterwards.
        path: the ``.onnx`` file to write.  Written atomically (temporary file in the
            same folder, then renamed); on any error no file and no temporary remain.  A model
            over 2 GiB keeps its large tensors in ``<path>.data`` beside it (ONNX external data).
        example_inputs: a tensor or tuple of tensors, the model's positional inputs; or a
            dict of keyword tensors (a tokenizer's output), passed as ``qmodel(**inputs)``:
            the ONNX inputs are then named after its keys, in ``forward``'s order, and a
            mapping output (Hugging Face ``ModelOutput``) gives the output names.
        input_names, output_names: graph input / output names (default ``input``,
            ``output``, or ``input_0``... for several; a dict's keys).
        dynamic_batch: make dimension 0 of every input and output symbolic (``batch``).
            Dimension 1 of a 2-D integer input (token ids, masks) is symbolic too
            (``sequence``), so the file takes any sequence length.
        dynamic_axes: ``{input or output name: {axis: symbol}}`` (or a list of axes), as
            ``torch.onnx.export`` takes it; replaces the default axes of the names given.
        opset: ONNX opset, 13..27 (``MIN_OPSET..MAX_OPSET``), or None (the default): the lowest
            that expresses the model, 19 unless a weight is group-wise (then 21, the first with
            blocked DequantizeLinear and int4).  Above 20 the traced graph is stamped with the
            higher opset (``_opset``); ONNX Runtime computes the same outputs.
        target: the integer target (``lowbit.targets``) whose weight layout to write; None (the
            default) follows the model (``qmodel.lowbit_summary.target``, set by ``quantize``
            and ``prepare_qat``).  Recorded in the file's metadata as ``lowbit.target``, so
            runtimes can warn when the file meets a CPU it was not made for.  A target of
            another runtime changes the layout: ``"tensorrt"`` writes TensorRT's explicit
            quantization (``lowbit.export.tensorrt``); any runtime but ONNX Runtime gets
            standard ONNX ops only (no ORT contrib ops).  ``lowbit.export`` picks the
            exporter from the target and refuses one the model was not quantized for.

    Returns:
        The ModelProto that was written (checked with ``onnx.checker``); with external data, its
        large tensors refer to the ``.data`` file instead of holding their bytes.

    Raises:
        ValueError: a spec export cannot express yet (16-bit, group-wise activations or
            embeddings, group-wise weights at an opset below 21), a quantizer still
            calibrating, bad inputs or opset.  Messages name the tensor.

    Example:
        >>> qmodel = lowbit.ptq.quantize(model, [x], "w8a8", progress=False)
        >>> export_onnx(qmodel, "model.int8.onnx", x)
        >>> print(inspect_onnx("model.int8.onnx"))   # which kernels ORT runs
    """
    _opset.check_opset(opset)
    target = model_target(qmodel) if target is None else resolve_target(target)
    if is_qat_model(qmodel):  # fold BatchNorms, fix learned / observed ranges: on a copy
        qmodel = convert(qmodel)
    opset = _opset.resolve_opset(opset, _blocked.uses_blocked(qmodel))
    inputs = prepare_inputs(qmodel, example_inputs, input_names=input_names, dynamic_batch=dynamic_batch,
                            dynamic_axes=dynamic_axes)
    with contextlib.ExitStack() as stack:
        trace = functools.partial(_traced, qmodel, inputs, output_names, dynamic_batch, dynamic_axes, opset)
        model, folder = _trace_sized(trace, qmodel, path, stack)
        _postprocess(model, _opset.trace_opset(opset), target, base_dir=folder)
        onnx.helper.set_model_props(model, {TARGET_METADATA: target.name})
        _opset.stamp_opset(model, opset)
        _external.save(model, path, base_dir=folder)
    log.info("exported %s (opset %d, %d nodes, %d initializers)", os.fspath(path), opset, len(model.graph.node),
             len(model.graph.initializer))
    return model


def _trace_sized(trace, qmodel: nn.Module, path, stack: contextlib.ExitStack) -> tuple[onnx.ModelProto, str | None]:
    """``trace(folder)`` into memory, or, for a model that may pass 2 GiB, into a temporary folder
    beside ``path`` (kept open on ``stack``) whose files the ModelProto refers to; returns both."""
    folder = None
    if _external.estimated_bytes(qmodel) > _external.EXTERNAL_DATA_THRESHOLD:
        folder = stack.enter_context(_external.trace_folder(path))
    try:
        return trace(folder), folder
    except RuntimeError as exc:  # constants made while tracing took it past 2 GiB after all
        if folder is not None or "2GiB" not in str(exc):
            raise
    folder = stack.enter_context(_external.trace_folder(path))
    return trace(folder), folder


def _traced(qmodel: nn.Module, inputs: ExportInputs, output_names, dynamic_batch, dynamic_axes, opset: int,
            folder: str | None) -> onnx.ModelProto:
    """``qmodel`` traced in eval mode and export mode (its training flag restored afterwards)."""
    was_training = qmodel.training
    qmodel.eval()
    try:
        # Export mode first: it validates every quantizer before anything runs (a forward
        # with a quantizer still calibrating would change its observer).
        with torch.no_grad(), export_mode(qmodel, opset=opset):
            return _trace(inputs, output_names, dynamic_batch, dynamic_axes, _opset.trace_opset(opset), folder)
    finally:
        qmodel.train(was_training)


def model_target(qmodel: nn.Module) -> Target:
    """The target a lowbit model was quantized for; for a model without one (quantizers set up
    by hand), this machine's (``lowbit.targets.resolve_target("auto")``)."""
    summary = getattr(qmodel, "lowbit_summary", None)
    return resolve_target(getattr(summary, "target", None) or "auto")


def _count_outputs(out) -> int:
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return len(out)
    raise ValueError(f"the model must return a tensor or a tuple of tensors to export, got {type(out).__name__}")
