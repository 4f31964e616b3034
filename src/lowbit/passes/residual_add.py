"""Quantize residual adds: every tensor + tensor in the graph becomes a ``QuantAdd``.

Module replacement quantizes the inputs of Conv / Linear layers, but a residual
``x + f(x)`` is a Python operator, not a module, so both of its operands would stay
float and an integer runtime would have to dequantize around it.  This pass traces
the model with ``torch.fx`` and routes each such add through a ``QuantAdd``
submodule, which fake-quantizes both operands (ONNX Runtime then fuses
``DQ -> Add -> Q`` into QLinearAdd).

The result is an ``fx.GraphModule`` whose Conv / Linear layers keep their original
qualified names (``features.3.conv.0.0``), so config rules by name still apply, and
whose new adds are named after the module they sit in (``features.3.add``).  ``lowbit.quantize``
gives each add the quantization a config rule picks for that name (or for ``type:QuantAdd``),
as for any layer: ``Rule(pattern="layer1.0.add", layer=None)`` keeps one add float.

Example::

    gm, names = quantize_residual_adds(model, UINT8_ACTIVATION)
    qmodel = lowbit.ptq.quantize(gm, calib, "w8a8")     # the adds are calibrated too
"""

from __future__ import annotations

import fnmatch
import logging
import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from ..nn.modules import QuantAdd, TensorQuant
from ..nn.trace import try_trace
from ..numerics import QuantSpec, get_spec

log = logging.getLogger(__name__)

_ADD_FUNCTIONS = (operator.add, torch.add, operator.iadd)
# Nodes of these kinds hold Python numbers, shapes, dtypes ... not tensors.
_NON_TENSOR_METHODS = frozenset(
    {"size", "dim", "numel", "item", "tolist", "stride", "element_size", "nelement"}
)
_NON_TENSOR_FUNCTIONS = (getattr, len)


def _tensor_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that look like tensors computed from the model's inputs, judged by node kinds.

    Parameters and buffers (``get_attr``) and values computed only from them are
    constants, not activations; ``x.shape``, ``x.size(0)`` and arithmetic on them are
    Python values.  One sweep in graph order (an fx graph lists inputs before users).
    """
    tensors: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("get_attr", "output"):
            continue
        if node.op in ("placeholder", "call_module"):
            is_tensor = True
        elif node.op == "call_method":
            is_tensor = node.target not in _NON_TENSOR_METHODS and node.args[0] in tensors
        elif node.target in _NON_TENSOR_FUNCTIONS:
            is_tensor = False
        elif node.target is operator.getitem:
            is_tensor = node.args[0] in tensors
        else:
            is_tensor = any(n in tensors for n in node.all_input_nodes)
        if is_tensor:
            tensors.add(node)
    return tensors


def _residual_operands(node: fx.Node, tensors: set[fx.Node], shapes_known: bool) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of an add node, or None if ``node`` is not a tensor + tensor add."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add"
    )
    if not is_add or len(node.args) != 2:
        return None
    if set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
        return None  # out=..., or a scaled add (a + alpha * b), which QuantAdd does not compute
    a, b = node.args
    if not (a in tensors and b in tensors):
        return None
    if shapes_known and not ("tensor_meta" in a.meta and "tensor_meta" in b.meta):
        return None  # ShapeProp saw a Python value here
    if node.target is operator.iadd and len(a.users) > 1:
        return None  # `a += b` mutates a tensor used again later; an out-of-place add would change that
    return a, b


def _scope(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created ``node`` ("" at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def _free_name(gm: nn.Module, base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2`` ... : the first name no module or attribute uses."""
    name, k = base, 0
    while name in taken or _exists(gm, name):
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _exists(root: nn.Module, name: str) -> bool:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        return False
    return hasattr(parent, child)


def _propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)


def _replace_adds(gm: fx.GraphModule, pick: Callable[[str], tuple[TensorQuant, TensorQuant] | None],
                 shapes_known: bool) -> list[str]:
    """Swap each tensor + tensor add node of ``gm`` for a call to a new QuantAdd (operands quantized
    as ``pick(name)`` says; None keeps that add float); return their names."""
    tensors = _tensor_nodes(gm.graph)
    taken: set[str] = set()
    names: list[str] = []
    top_level = 0
    for node in list(gm.graph.nodes):
        operands = _residual_operands(node, tensors, shapes_known)
        if operands is None:
            continue
        scope = _scope(node)
        if scope:
            name = _free_name(gm, f"{scope}.add", taken)
        else:
            name = _free_name(gm, f"add_{top_level}", taken)
            top_level += 1
        quants = pick(name)
        if quants is None:
            continue
        gm.add_submodule(name, QuantAdd(*quants, name=name))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, args=operands)
        new.meta = dict(node.meta)  # shapes and scope carry over: later adds may use this one
        tensors.add(new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        names.append(name)
    return names


def _picker(spec_a, spec_b, observer: str, skip: Sequence[str],
            choose: Callable[[str], TensorQuant | None] | None) -> Callable[[str], tuple | None]:
    """``name -> (TensorQuant of a, TensorQuant of b)``, or None to keep that add float."""
    if choose is None:
        if spec_a is None:
            raise ValueError("quantize_residual_adds: give spec_a (the operands' grid) or choose")
        spec_a = get_spec(spec_a)
        spec_b = spec_a if spec_b is None else get_spec(spec_b)
        pair = (TensorQuant(spec=spec_a, observer=observer), TensorQuant(spec=spec_b, observer=observer))

    def pick(name: str) -> tuple[TensorQuant, TensorQuant] | None:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            log.info("quantize_residual_adds: %s kept float (skip)", name)
            return None
        if choose is None:
            return pair
        tq = choose(name)
        if tq is None:
            log.info("quantize_residual_adds: %s kept float (choose)", name)
        return None if tq is None else (tq, tq)

    return pick


def quantize_residual_adds(
    model: nn.Module,
    spec_a: QuantSpec | str | None = None,
    spec_b: QuantSpec | str | None = None,
    observer: str = "minmax",
    *,
    example_inputs=None,
    skip: Sequence[str] = (),
    choose: Callable[[str], TensorQuant | None] | None = None,
) -> tuple[nn.Module, list[str]]:
    """Replace each ``tensor + tensor`` in ``model``'s graph by a ``QuantAdd`` submodule.

    An add is replaced when both operands are tensors computed in the graph (inputs,
    layer outputs, results of tensor ops): not Python numbers, not shapes, not
    parameters or buffers.  ``a + b``, ``torch.add(a, b)``, ``a.add(b)`` and
    ``a += b`` (when ``a`` is not used afterwards) all count.

    Args:
        model: float model (its layers are shared with the result, not copied).
        spec_a: grid of the first operand, e.g. ``UINT8_ACTIVATION``, or a preset name.
        spec_b: grid of the second operand; defaults to ``spec_a``.
        observer: range estimator of both operands (see ``lowbit.observers.OBSERVERS``).
        example_inputs: optional model input(s); when given, shapes are propagated and an
            operand must also have been a tensor in that run (not only look like one).
        skip: globs on the add names (``"encoder.*.add"``) to leave as float adds, e.g.
            an attention-mask add in a traceable transformer.
        choose: instead of ``spec_a`` / ``spec_b`` / ``observer``: called with each add's name,
            returns the TensorQuant of both operands, or None to leave that add float
            (``lowbit.ptq`` resolves the config's rules here).

    Returns:
        ``(gm, names)``: an ``fx.GraphModule`` with the same qualified names for every
        layer plus one ``QuantAdd`` per add, named ``<module>.add`` (``add_<k>`` at the
        top level, ``_1`` ... suffixes on repeats); and those names in graph order.
        When ``model`` cannot be traced, or has no such add: ``(model, [])`` unchanged,
        with the reason logged as a warning.

    Example:
        >>> gm, names = quantize_residual_adds(mobilenet_v2(), UINT8_ACTIVATION)
        >>> names[:2]
        ['features.3.add', 'features.5.add']
    """
    pick = _picker(spec_a, spec_b, observer, skip, choose)
    gm, reason = try_trace(model)
    if gm is None:
        log.warning("quantize_residual_adds: %s cannot be traced by torch.fx (%s); its adds stay float",
                    type(model).__name__, reason)
        return model, []
    if example_inputs is not None:
        _propagate_shapes(gm, example_inputs)

    names = _replace_adds(gm, pick, example_inputs is not None)
    if not names:
        log.info("quantize_residual_adds: no tensor + tensor add found in %s; model returned unchanged",
                 type(model).__name__)
        return model, []
    gm.graph.lint()
    gm.recompile()
    log.info("quantize_residual_adds: %d add(s) quantized: %s", len(names), ", ".join(names))
    return gm, names
