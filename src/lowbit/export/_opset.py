"""Which ONNX opset an export is written at, and how a graph traced at 20 is stamped higher.

The TorchScript exporter stops at opset 20 (see ``onnx_export``'s docstring for why it is kept).
Export therefore traces at ``min(opset, 20)`` and, for a higher opset, stamps the finished graph:
the default domain's version and the IR version that opset needs.  That is exact because no op the
exporter writes changed behaviour after 20 (onnx 1.23 schemas, audited op by op): every op
revised in opsets 21..27 only gained element types (int4, bfloat16, float8 ...) or attributes
whose defaults keep the old behaviour -- QuantizeLinear / DequantizeLinear (``block_size``,
``output_dtype``, ``precision``), Cast (``round_mode``, and Inf -> float8 saturation), Range
(``stash_type``, float16 only) -- or had its text clarified (MaxPool / AveragePool 22, windows
starting in the right padding).  The one exception, GroupNormalization 21 (scale and bias per
channel instead of per group), is refused.

ONNX Runtime 1.32 (measured): opsets 21..27 load and give outputs identical to opset 20, with the
same fused integer kernels, on MobileNetV2 W8A8 and MiniLM W8A8; at 28 it has no
QuantizeLinear / DequantizeLinear kernel, so 27 is the highest opset export writes.
"""

from __future__ import annotations

import onnx
from onnx import helper

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
# 19: the oldest opset whose Q/DQ onnx.reference can evaluate (useful to check an export without
# ORT), supported by ONNX Runtime since 1.15; the int8 Q/DQ semantics equal opset 13's.  What export
# writes by default for every model that needs nothing newer, so existing files stay byte-identical.
DEFAULT_OPSET = 19
BLOCKED_OPSET = 21  # DequantizeLinear with block_size; INT4 / UINT4 tensors
TRACE_MAX_OPSET = 20  # the TorchScript exporter's ceiling in torch 2.x
MAX_OPSET = 27  # the highest ONNX Runtime 1.32 runs (see the module docstring)

# ai.onnx ops whose behaviour changed after opset 20, with the opset that changed it.
_CHANGED_AFTER_TRACE = {"GroupNormalization": 21}


def check_opset(opset) -> None:
    """Raise ValueError unless ``opset`` is None (automatic) or an int in ``MIN_OPSET..MAX_OPSET``."""
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET} (per-axis Q/DQ needs {MIN_OPSET}; ONNX Runtime "
            f"1.32 runs up to {MAX_OPSET}), or None to let export choose; got {opset!r}"
        )


def resolve_opset(opset: int | None, needs_blocked: bool) -> int:
    """The opset to write: ``opset`` itself, or for None the lowest that expresses the model
    (``DEFAULT_OPSET``, or ``BLOCKED_OPSET`` when some weight is group-wise)."""
    check_opset(opset)
    if opset is not None:
        return opset
    return BLOCKED_OPSET if needs_blocked else DEFAULT_OPSET


def trace_opset(opset: int) -> int:
    """The opset the TorchScript exporter traces at for a file written at ``opset``."""
    return min(opset, TRACE_MAX_OPSET)


def stamp_opset(model: onnx.ModelProto, opset: int) -> None:
    """Raise the default domain of ``model`` (traced at ``trace_opset(opset)``) to ``opset``, and its IR
    version to the one that opset needs; a no-op at the traced opset."""
    traced = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset == traced:
        return
    for node in model.graph.node:
        changed = _CHANGED_AFTER_TRACE.get(node.op_type)
        if node.domain in ("", "ai.onnx") and changed is not None and traced < changed <= opset:
            raise ValueError(f"{node.name or node.op_type}: ONNX {node.op_type} changed meaning in opset {changed}, "
                             f"so this graph (traced at {traced}) cannot be written at opset {opset}; "
                             f"export with opset={changed - 1} or lower")
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, needed)
