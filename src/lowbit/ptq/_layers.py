"""Which tensors get quantizers: residual adds and average-pool inputs (torch.fx), then the layers.

Residual adds and pool inputs are resolved through the config's rules like any layer, first
match wins: by the name the graph pass gives them, or by type.

    residual add    ``<module>.add`` (``layer1.0.add``), ``add_<k>`` at the top level    ``type:QuantAdd``
    pool input      ``<pool module>_input`` (``avgpool_input``), ``<scope>.pool_input``   ``type:QuantStub``

Both operands of an add, or the pool input, get the matched ``LayerQuant``'s ``input``; a rule
with ``layer=None``, or whose ``input`` is None or dynamic, keeps that add or pool float::

    cfg = W8A8.with_rules(Rule(pattern="layer2.0.add", layer=None),          # this add stays float
                          Rule(pattern="type:QuantStub", layer=percentile))  # pool inputs: another observer
"""

from __future__ import annotations

import logging

from torch import nn

from ..config import QuantConfig
from ..nn.modules import QuantAdd, QuantStub, TensorQuant
from ..nn.swap import SwapReport, swap_modules, swap_root
from ..numerics import UINT8_ACTIVATION

log = logging.getLogger(__name__)


def _static_input(config: QuantConfig) -> bool:
    """Whether the default or a rule gives some tensor a static (calibrated) activation grid."""
    layers = [config.default, *(rule.layer for rule in config.rules)]
    return any(layer is not None and layer.input is not None and not layer.input.dynamic for layer in layers)


def _chooser(config: QuantConfig, probe: nn.Module):
    """``name -> TensorQuant or None`` for the graph passes: the config's rules resolved for a
    module of ``probe``'s type called ``name`` (its ``input``; None keeps it float)."""

    def choose(name: str) -> TensorQuant | None:
        layer, why = config.resolve(name, probe)
        tq = None if layer is None else layer.input
        if tq is not None and tq.dynamic:
            tq = None  # no calibrated grid: an integer add / pool needs a fixed one
        log.debug("%s (%s): %s by %s", name, type(probe).__name__, "float" if tq is None else "quantized", why)
        return tq

    return choose


def insert_graph_quantizers(model: nn.Module, config: QuantConfig, *, inplace: bool = False) -> nn.Module:
    """Route residual ``tensor + tensor`` adds through ``QuantAdd`` and quantize average-pool
    inputs (torch.fx; models it cannot trace stay as they are, logged), each as the config's
    rules say (module docstring).  Only when the default or a rule has static activations;
    returns the (new) model."""
    from .. import passes

    if not _static_input(config):
        return model
    probe = TensorQuant(spec=UINT8_ACTIVATION)  # the probes are matched by type only
    traced, adds = passes.quantize_residual_adds(model, choose=_chooser(config, QuantAdd(probe, probe, name="")))
    if adds and inplace:
        raise ValueError(
            f"inplace=True cannot quantize the residual adds {adds[:3]}...: torch.fx rewrites the model "
            "into a new module. Pass quantize_adds=False to keep them float, or inplace=False"
        )
    pooled, stubs = passes.quantize_pool_inputs(traced, choose=_chooser(config, QuantStub(probe, name="")))
    if stubs and inplace and pooled is not traced:
        raise ValueError("inplace=True cannot quantize average-pool inputs: torch.fx rewrites the model "
                         "into a new module. Pass quantize_adds=False, or inplace=False")
    return pooled


def swap_layers(model: nn.Module, config: QuantConfig) -> tuple[nn.Module, SwapReport]:
    """Swap every layer the config quantizes (the model itself, if it is one layer), and give each
    quantized Conv that feeds a float activation (SiLU, GELU ...) an output quantizer, so ONNX
    Runtime runs it in integers (``lowbit.passes.activations``; ``report.float_kernels`` lists
    the quantized convs it will still run in float)."""
    from ..passes.activations import quantize_activation_inputs

    config = config.bind(model)  # "@first" / "@last" -> this model's layer names
    model, report = swap_root(model, config.resolve)
    if report is None:
        report = swap_modules(model, config.resolve)
        quantize_activation_inputs(model, config, report)
    if not report.quantized:
        log.warning("no layer was quantized: the config matched none of the model's Linear/Conv/Embedding layers")
    return model, report
