"""The layers an analysis decides about, the choices it weighs for them, and switching their
quantizers on and off in a quantized model.

A *choice* is what one layer may get: a preset name (``"w4a8"``), a ``QuantConfig``, or None
(the layer stays float).  For one layer a choice means the config's own answer for that layer
with the position rules (``"@first"`` / ``"@last"``) dropped: the analysis decides where the
first and last layers go, so ``"w4a8"`` is the 4-bit layer everywhere.

The *decision layers* are the model's compute layers (instances of a registered gemm or conv
kind: Linear, Conv1d, Conv2d ...) in module order; embeddings, residual adds and pool inputs
follow a base config and are not decided.

    with quantized_only(qmodel, ["features.3.conv.0.0"]):   # every other quantizer disabled
        y = qmodel(x)
    with float_only(qmodel, ["classifier.1"]):             # that layer's quantizers disabled
        y = qmodel(x)
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence

from torch import nn

from ..config import LayerQuant, QuantConfig, Rule, get_config
from ..nn.modules import has_quantizers
from ..nn.registry import contraction_types
from ..nn.walk import quantizers_by_role
from ..targets import Target, resolve_target

Choice = str | QuantConfig | None
FLOAT_BITS = 32  # a float layer's weight bits, for sizes and average bits


def choice_name(choice: Choice) -> str:
    """``"float"`` for None, else the preset's or config's name."""
    if choice is None:
        return "float"
    return choice if isinstance(choice, str) else choice.name


def choice_config(choice: Choice, target: str | Target = "auto") -> QuantConfig | None:
    """The config ``choice`` stands for on every layer (position rules dropped, fitted to
    ``target``), or None for float."""
    if choice is None:
        return None
    return get_config(choice).without_positions().for_target(resolve_target(target))


def decision_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s compute layers (registered gemm / conv kinds), in module order."""
    compute = contraction_types()
    return [name for name, m in model.named_modules() if name and isinstance(m, compute)]


def layer_quant(config: QuantConfig | None, name: str, module: nn.Module) -> LayerQuant | None:
    """What ``config`` (None: float) gives the layer ``name``."""
    return None if config is None else config.resolve(name, module)[0]


def weight_bits(layer: LayerQuant | None) -> int:
    """The weight's bits under ``layer`` (``FLOAT_BITS`` when the weight stays float)."""
    return FLOAT_BITS if layer is None or layer.weight is None else layer.weight.spec.bits


def weight_count(module: nn.Module) -> int:
    """Elements of the layer's weight (what its bits multiply)."""
    weight = getattr(module, "weight", None)
    return 0 if weight is None else weight.numel()


def assignment_config(model: nn.Module, assignment: Mapping[str, Choice], base: Choice,
                      target: str | Target = "auto", name: str = "mixed") -> QuantConfig:
    """A config giving each layer in ``assignment`` its choice (an exact-name rule each) and
    every other layer what ``base`` gives it.  ``lowbit.quantize(model, calib, config=that)``
    builds the mixed model; the rules replay on any copy of the model."""
    target = resolve_target(target)
    base_config = choice_config(base, target)
    configs = {choice_name(c): choice_config(c, target) for c in assignment.values()}
    rules = []
    for layer_name, choice in assignment.items():
        module = model.get_submodule(layer_name)
        rules.append(Rule.exact(layer_name, layer_quant(configs[choice_name(choice)], layer_name, module)))
    if base_config is None:
        return QuantConfig(name=name, rules=tuple(rules), default=None)
    return QuantConfig(name=name, rules=(*rules, *base_config.rules), default=base_config.default,
                       max_weight_bits=base_config.max_weight_bits)


def layer_quantizers(qmodel: nn.Module, names: Collection[str]) -> set[int]:
    """ids of the quantizers of the layers called ``names``."""
    found = set()
    for name in names:
        module = qmodel.get_submodule(name)
        if has_quantizers(module):
            found.update(id(q) for _, q in module.quantizers())
    return found


@contextlib.contextmanager
def _disabled(qmodel: nn.Module, keep) -> Iterator[nn.Module]:
    """Every quantizer for which ``keep(q)`` is false disabled (tensor passes in float) inside."""
    saved = []
    try:
        for _, _, q in quantizers_by_role(qmodel):
            if not keep(q) and q.mode != "disabled":
                saved.append((q, q.mode))
                q.mode = "disabled"
        yield qmodel
    finally:
        for q, mode in saved:
            q.mode = mode  # back as it was


def quantized_only(qmodel: nn.Module, names: Sequence[str]):
    """Context: only the layers ``names`` quantized; every other quantizer (layers, residual
    adds, pool inputs) passes its tensor in float."""
    kept = layer_quantizers(qmodel, names)
    return _disabled(qmodel, lambda q: id(q) in kept)


def float_only(qmodel: nn.Module, names: Sequence[str]):
    """Context: the layers ``names`` in float, everything else quantized as it is."""
    dropped = layer_quantizers(qmodel, names)
    return _disabled(qmodel, lambda q: id(q) not in dropped)
