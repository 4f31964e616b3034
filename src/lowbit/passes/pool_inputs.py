"""Quantize the input of average pooling, so ONNX Runtime keeps the pool in integers.

A global average pool between the last conv and the classifier (MobileNetV2, ResNet)
has no layer of its own, so module replacement gives it no input quantizer: the conv
before it then ends in float and both stay float in ONNX Runtime.  This pass puts a
``QuantStub`` in front of every average pool it finds with torch.fx; ONNX Runtime
then fuses ``DQ -> GlobalAveragePool -> Q`` into QLinearGlobalAveragePool and the
conv before it into QLinearConv.  ``lowbit.quantize`` gives each stub the quantization a config
rule picks for its name (``avgpool_input``) or for ``type:QuantStub``; None keeps the pool float.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.nn.functional as F
from torch import fx, nn

from ..nn.modules import QuantStub, TensorQuant
from ..nn.trace import try_trace
from ..numerics import QuantSpec
from .residual_add import _free_name, _scope

log = logging.getLogger(__name__)

_POOL_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d)
_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)


def _is_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _POOL_FUNCTIONS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _POOL_MODULES)
    return False


def _every(spec: QuantSpec | None, observer: str) -> Callable[[str], TensorQuant]:
    """``choose`` that gives every pool input the same quantization."""
    if spec is None:
        raise ValueError("quantize_pool_inputs: give spec (the pool input's grid) or choose")
    tq = TensorQuant(spec=spec, observer=observer)
    return lambda name: tq


def quantize_pool_inputs(model: nn.Module, spec: QuantSpec | None = None, observer: str = "minmax", *,
                         choose: Callable[[str], TensorQuant | None] | None = None) -> tuple[nn.Module, list[str]]:
    """Insert a ``QuantStub`` before each average pool of ``model``.

    Args:
        model: float model (its layers are shared with the result, not copied).
        spec: grid of the pool input, e.g. ``UINT8_ACTIVATION``.
        observer: its range estimator.
        choose: instead of ``spec`` / ``observer``: called with each stub's name, returns its
            TensorQuant, or None to leave that pool's input float (``lowbit.ptq`` resolves the
            config's rules here).

    Returns:
        ``(gm, names)``: an ``fx.GraphModule`` with the same layer names plus one
        stub per pool (``<pool module>_input``, or ``<scope>.pool_input`` for a functional
        pool), and those names.  When ``model`` cannot be
        traced or has no average pool: ``(model, [])``, the reason logged.

    Example:
        >>> gm, names = quantize_pool_inputs(mobilenet_v2(), UINT8_ACTIVATION)   # ['pool_input']
    """
    pick = choose if choose is not None else _every(spec, observer)
    gm, why = (model, "") if isinstance(model, fx.GraphModule) else try_trace(model)
    if gm is None:
        # info, not warning: the residual-add pass already warned that this model cannot be traced
        log.info("average pools stay float: %s cannot be traced (%s)", type(model).__name__, why)
        return model, []
    names: list[str] = []
    taken: set[str] = set()
    for node in list(gm.graph.nodes):
        if not _is_pool(gm, node) or not isinstance(node.args[0], fx.Node):
            continue
        if node.op == "call_module":  # next to the pool module: `avgpool` -> `avgpool_input`
            base = f"{node.target}_input"
        else:
            scope = _scope(node)
            base = f"{scope}.pool_input" if scope else "pool_input"
        name = _free_name(gm, base, taken)
        tq = pick(name)
        if tq is None:
            log.info("quantize_pool_inputs: %s kept float (choose)", name)
            continue
        gm.add_submodule(name, QuantStub(tq, name=name))
        with gm.graph.inserting_before(node):
            stub = gm.graph.call_module(name, (node.args[0],))
        node.replace_input_with(node.args[0], stub)
        names.append(name)
    if not names:
        return model, []
    gm.graph.lint()
    gm.recompile()
    return gm, names


__all__ = ["quantize_pool_inputs"]
