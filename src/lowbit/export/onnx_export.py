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
  (``_activations``).

The TorchScript exporter (``dynamo=False``) is used because an autograd
Function's ``symbolic`` maps each quantizer to Q/DQ directly and leaves the
float layers' export untouched; the dynamo exporter needs onnxscript (not
installed, not a dependency) and custom translations for the same result.  It
caps the opset at 20: enough for per-axis Q/DQ (13+), not for int4 / blocked
quantization (21), which is not supported yet.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence

import onnx
import torch
from torch import nn

from .._files import write_atomic
from ..nn.convert import convert, is_qat_model
from ..targets import TARGET_METADATA, Target, resolve_target
from . import _activations, _bn_fold, _ort_layout, _passes
from ._graph import Graph
from ._inputs import DynamicAxes, ExportInputs, prepare_inputs
from ._patch import export_mode

log = logging.getLogger(__name__)

# 19: the oldest opset whose Q/DQ onnx.reference can evaluate (useful to check an export
# without ORT), supported by ONNX Runtime since 1.15; the int8 Q/DQ semantics equal opset 13's.
DEFAULT_OPSET = 19
MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
MAX_OPSET = 20  # the TorchScript exporter's ceiling in torch 2.x
_PROTOBUF_LIMIT = 2**31  # bytes: a ModelProto larger than this cannot be serialized


def _io_names(given: Sequence[str] | None, count: int, stem: str) -> list[str]:
    if given is None:
        return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
    names = list(given)
    if len(names) != count or len(set(names)) != count:
        raise ValueError(f"{stem}_names: expected {count} distinct names, got {names}")
    return names


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET} (per-axis Q/DQ needs {MIN_OPSET}; the "
            f"TorchScript exporter stops at {MAX_OPSET}), got {opset!r}"
        )


def _trace(inputs: ExportInputs, output_names, dynamic_batch, dynamic_axes, opset) -> onnx.ModelProto:
    """Run the TorchScript exporter (the model already in export mode); returns the raw ModelProto.

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

    buffer = io.BytesIO()
    hook = model.register_forward_hook(name_outputs)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen deliberately (see the module docstring); its
            # deprecation notices (raised at our call and inside torch.onnx) are not the user's concern.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(
                model, inputs.args, buffer, dynamo=False, opset_version=opset, input_names=inputs.names,
                output_names=names, dynamic_axes=axes or None, do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
    finally:
        hook.remove()
    return onnx.load_from_string(buffer.getvalue())


def _postprocess(model: onnx.ModelProto, opset: int, target: Target | None = None) -> onnx.ModelProto:
    """Apply the graph passes (``_passes``, ``_bn_fold``, ``_ort_layout``) in place; returns ``model``."""
    g = Graph(model)
    _passes.lift_constants(g)
    counts = {
        "folded constants": _passes.fold_constants(g, opset),
        "folded weight transposes": _passes.fold_dq_transpose(g),
        "folded batchnorms": _bn_fold.fold_batchnorm(g),
        "merged duplicate Q/DQ": _passes.dedupe_qdq(g),
        "Q copied before data movement": _ort_layout.propagate_q_backward(g),
        "merged duplicate Q/DQ (after copies)": _passes.dedupe_qdq(g),
        "SiLU / GELU after a DQ -> QuickGelu / Gelu": _activations.fuse_dq_activations(g),
        "dynamic matmuls -> MatMulInteger": _ort_layout.dynamic_to_matmul_integer(g),
        "uint8 weights": _ort_layout.weights_to_uint8(g) if target and target.weight_layout == "u8" else 0,
    }
    g.prune()
    g.commit()
    _passes.clear_value_info(g)
    log.debug("export passes: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return model


def _write_atomic(data: bytes, path: str) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place (its folder
    created, the umask's permissions: ``lowbit._files.write_atomic``)."""
    write_atomic(path, data)


def export_onnx(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: DynamicAxes | None = None,
    opset: int = DEFAULT_OPSET,
    target: str | Target | None = None,
) -> onnx.ModelProto:
    """Export a quantized model to ONNX in QDQ format, runnable by ONNX Runtime's integer kernels.

    Args:
        qmodel: a model from ``lowbit.quantize`` or ``lowbit.prepare_qat`` (a QAT model is
            exported as ``lowbit.qat.convert`` makes it: BatchNorm folded, ranges fixed).
            Exported in eval mode; its training flag is restored afterwards.
        path: the ``.onnx`` file to write.  Written atomically (temporary file in the
            same folder, then renamed); on any error no file and no temporary remain.
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
        opset: ONNX opset, 13..20.
        target: the integer target (``lowbit.targets``) whose weight layout to write; None (the
            default) follows the model (``qmodel.lowbit_summary.target``, set by ``quantize``
            and ``prepare_qat``).  Recorded in the file's metadata as ``lowbit.target``, so
            runtimes can warn when the file meets a CPU it was not made for.

    Returns:
        The ModelProto that was written (checked with ``onnx.checker``).

    Raises:
        ValueError: a spec export cannot express yet (16-bit, group-wise / int4), a
            quantizer still calibrating, bad inputs or opset.  Messages name the tensor.

    Example:
        >>> qmodel = lowbit.ptq.quantize(model, [x], "w8a8", progress=False)
        >>> export_onnx(qmodel, "model.int8.onnx", x)
        >>> print(inspect_onnx("model.int8.onnx"))   # which kernels ORT runs
    """
    _check_opset(opset)
    target = model_target(qmodel) if target is None else resolve_target(target)
    if is_qat_model(qmodel):  # fold BatchNorms, fix learned / observed ranges: on a copy
        qmodel = convert(qmodel)
    inputs = prepare_inputs(qmodel, example_inputs, input_names=input_names, dynamic_batch=dynamic_batch,
                            dynamic_axes=dynamic_axes)
    was_training = qmodel.training
    qmodel.eval()
    try:
        # Export mode first: it validates every quantizer before anything runs (a forward
        # with a quantizer still calibrating would change its observer).
        with torch.no_grad(), export_mode(qmodel):
            model = _trace(inputs, output_names, dynamic_batch, dynamic_axes, opset)
    finally:
        qmodel.train(was_training)
    _postprocess(model, opset, target)
    onnx.helper.set_model_props(model, {TARGET_METADATA: target.name})
    if model.ByteSize() >= _PROTOBUF_LIMIT:
        raise ValueError(f"the exported model is {model.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB limit; "
                         "external-data export is not supported yet -- export a smaller model or submodule")
    onnx.checker.check_model(model, full_check=True)
    _write_atomic(model.SerializeToString(deterministic=True), os.fspath(path))
    log.info("exported %s (%d nodes, %d initializers)", os.fspath(path), len(model.graph.node),
             len(model.graph.initializer))
    return model


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
