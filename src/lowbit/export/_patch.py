"""Export mode: point every quantizer of a model at the Q/DQ-emitting Functions.

``export_mode(model)`` is a context manager that, for the duration of one trace,
sets an instance-level ``forward`` on each ``Quantizer`` (and on each
``QuantEmbedding`` with a quantized table), and an instance-level ``_quant_bias``
on each layer whose simulation rounds its bias to the int32 grid, and removes
them afterwards.  Instance attributes, not class patches: another model being
run or exported in another thread is untouched, and nothing in ``lowbit.nn``
needs an export switch.

Every check that can fail runs *before* tracing, so an unsupported spec is
reported with the quantizer's name and the fix, not as a tracer stack trace.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..nn.integer import IntegerParams, IntegerTensor, static_integers
from ..nn.modules import QuantEmbedding, has_quantizers, is_quantized
from ..nn.quantizer import Quantizer
from ..numerics import QuantSpec
from . import _blocked, _symbolic
from ._symbolic import BiasParams, QParams

log = logging.getLogger(__name__)


def check_exportable(spec: QuantSpec, name: str, *, opset: int | None = None, role: str = "weight") -> None:
    """Raise ValueError (naming the tensor and the fix) for specs Q/DQ export cannot express.

    ``opset``: the file's opset; None checks against the per-tensor / per-channel layout of ONNX
    Runtime's integer kernels (group-wise weights need a blocked DequantizeLinear, opset 21).
    ``role``: ``"weight"``, ``"embedding"`` or ``"activation"`` (group-wise: weights only)."""
    if spec.bits > 8:
        raise ValueError(
            f"{name}: {spec.describe()} needs 16-bit QuantizeLinear, which export does not write yet; "
            "use an 8-bit spec for this tensor (or keep it float)"
        )
    _blocked.check_group(spec, name, opset=opset, role=role)


def _qparams(t: IntegerTensor) -> QParams:
    """Export's constants for one tensor of a layer's integer view (``lowbit.nn.integer``)."""
    return QParams(name=t.name, spec=t.spec, scale=t.scale, zero_point=t.zero_point, quantized=t.values)


# ``layer -> layer.integer_params()``, computed once per layer for one export (the weight and
# the bias of a layer are patched separately and both read it).
IntegerView = Callable[[nn.Module], IntegerParams]


def _static_params(q: Quantizer) -> QParams:
    return _qparams(static_integers(q))


def _check_dynamic_activation(q: Quantizer) -> None:
    s = q.spec
    if not (s.bits == 8 and not s.signed and not s.symmetric and s.granularity == "tensor"):
        raise ValueError(
            f"{q.name}: dynamic activation quantization exports as ONNX DynamicQuantizeLinear, which is "
            f"uint8 affine per tensor only; this quantizer is {s.describe()}. Use "
            "lowbit.numerics.UINT8_ACTIVATION for dynamic activations, or calibrate a static scale"
        )


def _quantizer_forward(q: Quantizer, weight_of: dict[int, nn.Module], opset: int | None, view: IntegerView):
    """The export-time forward of one quantizer, or None to keep its own (identity) forward."""
    if q.mode == "disabled":
        return None
    if q.mode == "calibrating":
        raise ValueError(f"{q.name}: quantizer is still calibrating; freeze it (lowbit.quantize does) "
                         "or set mode='disabled' before exporting")
    owner = weight_of.get(id(q))
    if isinstance(owner, QuantEmbedding):
        return None  # the embedding's own export forward reads the integer table
    check_exportable(q.spec, q.name, opset=opset, role="activation" if owner is None else "weight")
    weight_params = None if owner is None else _qparams(view(owner).weight)
    if q.mode == "dynamic" and owner is None:
        _check_dynamic_activation(q)
        return lambda x: _symbolic.dynamic_qdq(x, q, q.name)
    static_params = None if q.mode == "dynamic" else _static_params(q)
    if static_params is not None and owner is None and static_params.narrower_than_container:
        log.warning("%s: %s is narrower than its 8-bit container, so export clips before QuantizeLinear; "
                    "ONNX Runtime cannot fuse the layer producing this tensor into an integer kernel. "
                    "A full 8-bit activation grid (e.g. UINT8_ACTIVATION) avoids this", q.name, q.spec.describe())

    def forward(x: torch.Tensor) -> torch.Tensor:
        if weight_params is not None and x is owner.weight:
            return _symbolic.weight_dq(x, weight_params)
        if static_params is None:  # a dynamic weight quantizer fed something other than its weight
            raise ValueError(f"{q.name}: dynamic weight quantizer applied to a tensor other than the "
                             "layer's weight; export cannot fold it into an integer constant")
        return _symbolic.qdq(x, static_params)

    return forward


def _embedding_forward(m: QuantEmbedding, opset: int | None, view: IntegerView):
    q = m.weight_quantizer
    if q is None or q.mode == "disabled":
        return None
    if m.max_norm is not None:
        raise ValueError(f"{q.name}: Embedding(max_norm=...) renormalises the table at run time, which an "
                         "integer table cannot do; drop max_norm or keep this embedding in float")
    check_exportable(q.spec, q.name, opset=opset, role="embedding")
    params = _qparams(view(m).weight)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        out = _symbolic.embedding_dq(ids, params)
        return out if m.output_quantizer is None else m.output_quantizer(out)

    return forward


def _bias_forward(layer: nn.Module, view: IntegerView):
    """The export-time ``_quant_bias`` of one layer (an int32 constant and its DequantizeLinear),
    or None to keep its own float bias: where, and only where, ``layer.integer_params()`` puts
    the bias on the int32 grid, as the simulation does."""
    ints = view(layer).bias if is_quantized(layer) else None
    if ints is None:
        return None
    params = BiasParams(name=ints.name, quantized=ints.values, scale=ints.scale)
    return lambda: _symbolic.bias_dq(layer.bias, params)


def _weight_owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(weight quantizer) -> the layer whose ``weight`` it quantizes."""
    owners = {}
    for module in model.modules():
        if has_quantizers(module):
            for role, q in module.quantizers():
                if role == "weight":
                    owners[id(q)] = module
    return owners


def _drop_extra_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # The tracer calls .detach() on every state_dict value; a quantizer's extra state
    # (its mode, a dict) is not a tensor and would crash it.  Hidden for the trace only.
    state_dict.pop(prefix + "_extra_state", None)


def _has_extra_state(module: nn.Module) -> bool:
    return type(module).get_extra_state is not nn.Module.get_extra_state


@contextlib.contextmanager
def export_mode(model: nn.Module, *, opset: int | None = None) -> Iterator[int]:
    """Within the block, ``model``'s quantizers trace to Q/DQ nodes; yields how many were patched.
    ``opset``: the opset of the file being written (group-wise weights need 21; None: as 20).

    Example:
        >>> with export_mode(qmodel):
        ...     torch.onnx.export(qmodel, (x,), f, dynamo=False)
    """
    weight_of = _weight_owners(model)
    view: IntegerView = functools.cache(lambda layer: layer.integer_params())
    patches: list[tuple[nn.Module, str, object]] = []  # (module, attribute, its previous instance value)
    hooks = []

    def patch(module: nn.Module, attribute: str, value) -> None:
        if value is not None:
            patches.append((module, attribute, module.__dict__.get(attribute)))
            setattr(module, attribute, value)

    try:
        for module in model.modules():
            if _has_extra_state(module):
                hooks.append(module.register_state_dict_post_hook(_drop_extra_state))
        for module in model.modules():
            if isinstance(module, Quantizer):
                patch(module, "forward", _quantizer_forward(module, weight_of, opset, view))
            elif isinstance(module, QuantEmbedding):
                patch(module, "forward", _embedding_forward(module, opset, view))
            elif is_quantized(module):
                patch(module, "_quant_bias", _bias_forward(module, view))
        log.debug("export mode: %d quantizers / embeddings / biases emit Q/DQ", len(patches))
        yield len(patches)
    finally:
        for hook in hooks:
            hook.remove()
        for module, attribute, previous in reversed(patches):
            if previous is None:
                module.__dict__.pop(attribute, None)
            else:
                setattr(module, attribute, previous)
