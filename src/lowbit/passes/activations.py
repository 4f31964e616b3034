"""Quantize the output of a Conv that feeds a float activation, so ONNX Runtime runs the conv in integers.

ONNX Runtime fuses ``DQ -> Conv -> Q`` into QLinearConv only when a QuantizeLinear follows
the conv: directly, behind a Relu / Clip it drops, or behind data movement
(``lowbit.export._ort_layout``).  lowbit quantizes layer *inputs*, so in
``Conv -> SiLU -> Conv`` the first conv's Q comes only after the SiLU and ORT runs
``DQ -> float Conv -> SiLU -> Q``: slower than the FP32 model itself.  The same holds for
Hardswish, GELU, Sigmoid, Tanh, LeakyReLU and the other activations ORT has no
Relu-like rule for.  This pass gives each such conv an output quantizer (the layer's own
input activation spec and observer), so the file reads
``DQ -> Conv -> Q -> DQ -> SiLU -> Q -> DQ -> Conv``: QLinearConv, the activation on the
dequantized values (ORT fuses ``DQ -> Sigmoid / LeakyRelu -> Q`` into QLinearSigmoid /
QLinearLeakyRelu by itself).  The output quantizer is a real extra rounding, and the
simulation makes it exactly where the file does.

Measured with ``benchmarks/bench_activations.py`` (Intel Xeon with AVX512-VNNI, ORT 1.32, 1 thread,
4 x [Conv 3x3 64 -> 64 + activation] at 56x56, batch 8): 0.35-0.52x FP32 latency this way (by
activation), 1.7-1.8x FP32 with the conv left float.  The extra rounding costs about 3 dB of
SQNR on the output map of that random-weight stack (36 against 39 dB); ORT and the simulation
still differ on 0.1-0.2 % of the outputs only, by one code (requantization ties, as in ReLU nets).
Writing SiLU as ``x * Q(sigmoid(x))`` (QLinearSigmoid + QLinearMul) was no faster than the
float activation between (0.41x against 0.43x), for one more rounding.

Linear layers need nothing: ORT runs ``DQ -> Gemm`` / ``DQ -> MatMul`` without a Q after
them as QGemm / MatMulIntegerToFloat with a float output.  A quantized conv whose output
reaches no quantizer for another reason (a model output, a float op such as ``torch.cat``,
an activation behind other ops or beside other readers) keeps its float kernel in ORT; the
pass reports it in ``SwapReport.float_kernels`` so the summary says so.  Export writes SiLU and
GELU on the dequantized conv output as ORT's fused ops (``lowbit.export._activations``).

The graph is read with torch.fx where the model traces; elsewhere plain ``nn.Sequential``
containers are scanned (``Conv -> [Identity / Dropout] -> activation``), and what neither
covers is left as it is, logged.

``lowbit.ptq.swap_layers`` runs the pass (so ``quantize``, ``prepare_qat`` and ``lowbit.load`` do);
by hand, on a model whose layers are swapped but not calibrated yet::

    report = swap_modules(model, W8A8.resolve)
    model, names = quantize_activation_inputs(model, W8A8, report)     # ['0', '2']
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..config import QuantConfig
from ..nn.modules import QuantAdd, TensorQuant, has_quantizers, is_quantized
from ..nn.registry import CONV, kind_of
from ..nn.swap import SwapReport
from ..nn.trace import try_trace
from ._graph import _flat_layers, _is_plain_sequential, _join

log = logging.getLogger(__name__)

# Elementwise activations with no Relu / Clip rule in ORT: a Q after them does not reach back
# over them to the conv.  (ORT has integer kernels for Sigmoid and LeakyRelu only, used by itself.)
ACTIVATION_MODULES = (nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.CELU,
                      nn.SELU, nn.Mish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.PReLU)
_ACTIVATION_FUNCTIONS = frozenset({F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid, F.tanh,
                                   torch.tanh, F.leaky_relu, F.elu, F.celu, F.selu, torch.selu, F.mish,
                                   F.softplus, F.softsign, F.prelu})
_ACTIVATION_METHODS = frozenset({"sigmoid", "tanh"})

# Links that pass the tensor on unchanged (export writes nothing for them).
_FREE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_FREE_FUNCTIONS = frozenset({F.dropout})
# Links a Q reaches back over to the conv: Relu / Clip (ORT drops them), data movement (export
# copies the Q in front of them) and an unfolded BatchNorm (export folds it into the conv's weight
# scale); ``lowbit.runtime._ort_graph`` holds the exact rules.
_THROUGH_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d,
                    nn.BatchNorm1d, nn.BatchNorm2d)
_THROUGH_FUNCTIONS = frozenset({F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp, torch.clip, torch.flatten,
                                torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
                                F.max_pool1d, F.max_pool2d})
_THROUGH_METHODS = frozenset({"relu", "clamp", "clip", "flatten", "view", "reshape", "squeeze", "unsqueeze",
                              "transpose", "permute"})


@dataclass(frozen=True)
class _End:
    """Where a conv's output ends up: read by a quantizer, by a float activation, or by float compute."""

    kind: str  # "quantized", "activation", "float", or "unknown" (the output of a traced submodule)
    where: str  # the consumer, for messages
    direct: bool  # reached through free links only


def _describe(node: fx.Node, modules: dict[str, nn.Module], prefix: str) -> str:
    if node.op == "call_module":
        return f"{_join(prefix, node.target)} ({type(modules[node.target]).__name__})"
    if node.op == "output":
        return "the model output"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def _link(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """"free", "through", "activation" for the nodes the walk knows; None for anything else."""
    if node.op == "call_module":
        m = modules[node.target]
        for types, kind in ((_FREE_MODULES, "free"), (ACTIVATION_MODULES, "activation"),
                            (_THROUGH_MODULES, "through")):
            if isinstance(m, types):
                return kind
        return None
    if node.op == "call_function":
        target = node.target
        return ("free" if target in _FREE_FUNCTIONS else "activation" if target in _ACTIVATION_FUNCTIONS
                else "through" if target in _THROUGH_FUNCTIONS else None)
    if node.op == "call_method":
        target = node.target
        return ("free" if target == "contiguous" else "activation" if target in _ACTIVATION_METHODS
                else "through" if target in _THROUGH_METHODS else None)
    return None


def _reads_quantized(user: fx.Node, node: fx.Node, module: nn.Module) -> bool:
    """``user`` (a lowbit module) reads ``node`` only through static quantizers."""
    if any(v is node for v in user.kwargs.values()):
        return False
    if isinstance(module, QuantAdd):
        slots = [q for a, q in zip(user.args, (module.a_quantizer, module.b_quantizer)) if a is node]
    else:
        if node in user.args[1:]:
            return False
        slots = [getattr(module, "input_quantizer", None)]
    return bool(slots) and all(q is not None and q.mode != "dynamic" for q in slots)


def _ends(node: fx.Node, modules: dict[str, nn.Module], prefix: str, direct: bool = True) -> list[_End]:
    """Follow ``node``'s users through free / Relu / Clip / data-movement links to what consumes it.
    ``prefix``: the traced module's name ("" for the whole model, whose output is the model's)."""
    ends = []
    for user in node.users:
        m = modules.get(user.target) if user.op == "call_module" else None
        kind = _link(user, modules)
        where = _describe(user, modules, prefix)
        if m is not None and has_quantizers(m):
            ends.append(_End("quantized" if _reads_quantized(user, node, m) else "float", where, direct))
        elif kind in ("free", "through"):
            ends += _ends(user, modules, prefix, direct and kind == "free")
        elif user.op == "output" and prefix:
            ends.append(_End("unknown", where, direct))  # a submodule's output: its reader is not in this graph
        else:
            ends.append(_End(kind or "float", where, direct))
    return ends


@dataclass
class _Findings:
    """What the search found: convs to quantize (name -> activation), convs that stay float (name -> why)."""

    feeds_activation: dict[str, str]
    float_kernels: dict[str, str]
    untraced: list[str]


def _eligible(module: nn.Module) -> bool:
    """A quantized conv (any registered conv kind) with a static input quantizer and no output
    quantizer (an integer kernel candidate)."""
    if not is_quantized(module) or getattr(kind_of(module), "kernel", None) != CONV:
        return False
    iq = module.input_quantizer
    return (module.output_quantizer is None and module.weight_quantizer is not None
            and iq is not None and iq.mode != "dynamic")


def _search_graph(gm: fx.GraphModule, prefix: str, found: _Findings) -> None:
    modules = dict(gm.named_modules())
    calls = Counter(id(modules[n.target]) for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _eligible(modules[node.target]):
            continue
        name = _join(prefix, node.target)
        if calls[id(modules[node.target])] > 1:
            log.info("%s is called at %d places; its output stays as it is", name, calls[id(modules[node.target])])
            continue
        ends = _ends(node, modules, prefix)
        if ends and all(e.kind == "activation" and e.direct for e in ends):
            found.feeds_activation[name] = ", ".join(dict.fromkeys(e.where for e in ends))
            continue
        why = _float_reason(ends)
        if why:
            found.float_kernels[name] = f"{why}, so no QuantizeLinear follows the conv"


def _float_reason(ends: list[_End]) -> str:
    """Why ORT runs the conv with these ``ends`` in float; "" when it fuses it, when the graph seen
    does not tell (a submodule's output read outside it), or when nothing reads it (export drops it)."""
    bad = next((e for e in ends if e.kind == "float"), None)
    if bad is not None:
        return "its output is a model output" if bad.where == "the model output" else \
            f"its output feeds {bad.where}, which does not quantize it"
    act = next((e for e in ends if e.kind == "activation"), None)
    if act is not None:
        return f"its output reaches {act.where} through other ops or alongside other readers"
    return ""


def _search_sequential(seq: nn.Sequential, prefix: str, found: _Findings) -> None:
    layers = _flat_layers(seq, prefix)
    for i, (name, module) in enumerate(layers):
        if not _eligible(module):
            continue
        j = i + 1
        while j < len(layers) and isinstance(layers[j][1], _FREE_MODULES):
            j += 1
        if j < len(layers) and isinstance(layers[j][1], ACTIVATION_MODULES):
            found.feeds_activation[name] = f"{layers[j][0]} ({type(layers[j][1]).__name__})"


def _search(module: nn.Module, prefix: str, found: _Findings) -> None:
    if not any(_eligible(m) for m in module.modules()):  # no conv to look after here (an LLM): no tracing
        return
    gm, why = try_trace(module)
    if gm is not None:
        _search_graph(gm, prefix, found)
        return
    found.untraced.append(f"{prefix or '<model>'}: {why}")
    if _is_plain_sequential(module):
        _search_sequential(module, prefix, found)
    for child_name, child in module.named_children():
        _search(child, _join(prefix, child_name), found)


def _output_spec(config: QuantConfig, name: str, module: nn.Module) -> TensorQuant | None:
    """The layer's static input activation (its spec and observer), which its output gets too;
    None unless it is a full 8-bit grid: ORT's integer kernels take no narrower one (export clips
    a 4-bit grid in float), so an output quantizer would only add a rounding."""
    layer, _ = config.resolve(name, module)
    tq = None if layer is None else layer.input
    return None if tq is None or tq.dynamic or tq.spec.bits != 8 else tq


def quantize_activation_inputs(model: nn.Module, config: QuantConfig,
                               report: SwapReport | None = None) -> tuple[nn.Module, list[str]]:
    """Give each quantized Conv whose output feeds a float activation an output quantizer.

    Run after the layers are swapped and before calibration (``lowbit.quantize`` and
    ``lowbit.prepare_qat`` do), so the new quantizers are calibrated with the rest.

    Args:
        model: a model whose layers ``swap_layers`` quantized; edited in place.
        config: the config the layers were quantized with: each conv's output gets the
            activation spec and observer its input has (static activations only).
        report: the ``SwapReport`` of the swap, updated in place: the conv's line names
            its output quantizer, and ``float_kernels`` lists the quantized convs that
            ONNX Runtime will still run in float, and why.

    Returns:
        ``(model, names)``: the same model and the convs that got an output quantizer.

    Example:
        >>> report = swap_modules(model, W8A8.resolve)          # (swap_layers runs this pass itself)
        >>> _, names = quantize_activation_inputs(model, W8A8, report)   # ['0', '2']
    """
    config = config.bind(model)
    found = _Findings({}, {}, [])
    _search(model, "", found)
    if found.untraced:
        log.info("quantize_activation_inputs: torch.fx could not trace %s; only their nn.Sequential "
                 "containers were searched for Conv -> activation", "; ".join(found.untraced))
    names = []
    for name, activation in found.feeds_activation.items():
        module = model.get_submodule(name)
        tq = _output_spec(config, name, module)
        if tq is None:
            continue
        module.output_quantizer = tq.make(f"{name}.output")
        names.append(name)
        log.info("%s: output quantized (%s) before %s, so ONNX Runtime runs the conv in integers",
                 name, tq.spec.describe(), activation)
        if report is not None and name in report.quantized:
            report.quantized[name] += f"; output {tq.spec.describe()} before {activation}"
    if report is not None:
        report.float_kernels.update(found.float_kernels)
    for name, why in found.float_kernels.items():
        log.warning("%s: ONNX Runtime will run this quantized conv in float: %s", name, why)
    return model, names


__all__ = ["ACTIVATION_MODULES", "quantize_activation_inputs"]
