"""Module replacement: float layers -> quantized layers by config, and back.

Which float types are swapped, and for what, is the registry's (``lowbit.nn.registry``):
exact types, so a subclass that changes ``forward`` is left alone unless it is registered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from .modules import is_quantized
from .registry import registered
from .walk import set_submodule

log = logging.getLogger(__name__)


@dataclass
class SwapReport:
    """What happened to each layer: quantized (with the rule that chose it) or left in float."""

    quantized: dict[str, str] = field(default_factory=dict)  # name -> "Linear: w int8 ... (rule ...)"
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stayed float
    unsupported: dict[str, str] = field(default_factory=dict)  # name -> type of a layer with weights we cannot quantize
    # quantized layers ONNX Runtime still runs as float kernels (name -> why), e.g. a Conv whose
    # output reaches no QuantizeLinear (lowbit.passes.activations)
    float_kernels: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"quantized {name}: {what}" + (f" -- float kernel in ONNX Runtime: {self.float_kernels[name]}"
                                              if name in self.float_kernels else "")
               for name, what in self.quantized.items()]
        out += [f"float     {name}: {why}" for name, why in self.skipped.items()]
        out += [f"float     {name}: {kind} is not supported (left in float)" for name, kind in self.unsupported.items()]
        return out


def swap_modules(model: nn.Module, resolve) -> SwapReport:
    """Replace, in place, every layer whose exact type is registered (``lowbit.nn.registered()``).

    ``resolve(name, module) -> (LayerQuant | None, reason)`` decides each layer.
    Layers of other types that own parameters directly (LayerNorm, BatchNorm ...)
    are reported as unsupported and stay float.
    """
    report = SwapReport()
    swapped: dict[int, tuple[str, nn.Module]] = {}  # id(float layer) -> (first name, quantized layer)
    inside: list[str] = []  # prefixes of quantized layers: their children (a ConvBn2d's bn) go with them
    # remove_duplicate=False: a layer registered under two names is swapped under both.
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if is_quantized(module):
            inside.append(name + ".")
            continue
        if id(module) in swapped:
            first, qmod = swapped[id(module)]
            set_submodule(model, name, qmod)
            report.quantized[name] = f"same layer as {first}"
            continue
        kind = registered().get(type(module))
        if kind is None:
            if any(True for _ in module.parameters(recurse=False)):
                report.unsupported[name] = type(module).__name__
            continue
        layer, reason = resolve(name, module)
        if layer is None:
            report.skipped[name] = f"{type(module).__name__} kept in float by {reason}"
            continue
        qmod = kind.quant_cls.from_float(module, name=name, weight=layer.weight, input=layer.input,
                                         output=layer.output)
        set_submodule(model, name, qmod)
        swapped[id(module)] = (name, qmod)
        inside.append(name + ".")
        roles = ", ".join(f"{role} {q.spec.describe()}{' dynamic' if q.mode == 'dynamic' else ''}"
                          for role, q in qmod.quantizers())
        report.quantized[name] = f"{type(module).__name__}: {roles} ({reason})"
    for line in report.lines():
        log.info(line)
    return report


def swap_root(model: nn.Module, resolve) -> tuple[nn.Module, SwapReport | None]:
    """When ``model`` itself is a quantizable layer (``quantize(nn.Linear(...))``), its
    quantized version and a report; otherwise ``(model, None)``."""
    kind = registered().get(type(model))
    if kind is None:
        return model, None
    report = SwapReport()
    layer, reason = resolve("", model)
    if layer is None:
        report.skipped[""] = f"{type(model).__name__} kept in float by {reason}"
        return model, report
    qmod = kind.quant_cls.from_float(model, name="model", weight=layer.weight, input=layer.input,
                                     output=layer.output)
    report.quantized["model"] = f"{type(model).__name__} ({reason})"
    return qmod, report


def unswap_modules(model: nn.Module) -> nn.Module:
    """Inverse of ``swap_modules``: every quantized layer back to its float layer, in place."""
    restored: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and is_quantized(module):
            if id(module) not in restored:
                restored[id(module)] = module.to_float()
            set_submodule(model, name, restored[id(module)])
    return model
