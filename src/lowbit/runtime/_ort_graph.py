"""Which ONNX Runtime kernel each node of a quantized model's fx graph becomes.

``lowbit.export`` writes one QuantizeLinear -> DequantizeLinear pair per activation
quantizer; ONNX Runtime then (1) drops a Relu / Clip that sits right before a
QuantizeLinear whose range makes it redundant (``ReluQuantFusion``: zero point at the
bottom of the grid; ``ClipQuantFusion``: the grid's float range inside the clip's,
within float32 epsilon), and (2) fuses every ``DQ -> op -> Q`` group into an integer
kernel.  ``plan`` replays these rules on the fx graph of the PyTorch model and says,
for every value, whether it is float or integer codes on which grid, and for every
integer kernel, onto which grid it requantizes.  Where the rules leave an op in float
it raises ``EmulationError`` naming the node: float kernels cannot be reproduced bit
for bit, so nothing falls back silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn import registry
from ..nn.conv_bn import QuantConvBn2d
from ..nn.modules import QuantAdd, QuantStub, is_quantized
from ..nn.quantizer import Quantizer


class EmulationError(ValueError):
    """The model holds something ONNX Runtime would not run as an exact integer kernel."""


@dataclass(frozen=True, eq=False)
class Grid:
    """The qparams of one quantized activation, as its ONNX QuantizeLinear carries them."""

    name: str  # the quantizer's name, e.g. "features.3.conv.0.0.input"
    scale: torch.Tensor  # float32, shape ()
    zero_point: int
    qmin: int
    qmax: int

    def same_as(self, other: Grid) -> bool:
        return (bool(torch.equal(self.scale, other.scale)) and self.zero_point == other.zero_point
                and (self.qmin, self.qmax) == (other.qmin, other.qmax))

    def describe(self) -> str:
        return f"{self.name} (scale {float(self.scale):.6g}, zero point {self.zero_point})"


def activation_grid(q: Quantizer | None, where: str) -> Grid:
    """The grid of a static, per-tensor, full 8-bit activation quantizer; EmulationError otherwise."""
    if q is None or q.mode == "disabled":
        raise EmulationError(f"{where}: this input is not quantized, so ONNX Runtime runs the op in float; "
                             "quantize it (a static activation spec) or leave the layer out of the emulation")
    if q.mode != "static" or not q.is_frozen:
        raise EmulationError(f"{q.name}: mode {q.mode!r}; integer emulation needs a calibrated static scale "
                             "(dynamic activations run through ORT's DynamicQuantizeLinear, not modelled)")
    s = q.spec
    if s.signed:
        # QDQSelectorActionTransformer(QDQIsInt8Allowed()): false on x86-64 unless the session sets
        # "session.qdqisint8allowed" (meant for ARM), so int8-activation groups stay DQ -> float op -> Q.
        raise EmulationError(f"{q.name}: {s.describe()}; ORT's x86-64 CPU provider runs QDQ groups with int8 "
                             "activations in float by default. Use UINT8_ACTIVATION (lowbit's w8a8 default)")
    if s.bits != 8 or s.granularity != "tensor" or (s.qmin, s.qmax) != (0, 255):
        raise EmulationError(f"{q.name}: {s.describe()}; ORT's integer kernels take per-tensor activations on the "
                             "full uint8 grid (use UINT8_ACTIVATION)")
    return Grid(q.name, q.scale.detach().float().reshape(()).clone(), int(q.zero_point.reshape(-1)[0]), s.qmin, s.qmax)


# -- node kinds -------------------------------------------------------------------------------
FREE, RELU, CLIP, MOVE, SHAPE, OTHER = "free", "relu", "clip", "move", "shape", "other"
CONV, GEMM, ADD, STUB, GAP = "conv", "gemm", "add", "stub", "gap"
PRODUCERS = (CONV, GEMM, ADD, GAP)  # integer kernels that requantize onto the next grid

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# Data movement through which export copies a Q (``export._ort_layout._TRANSPARENT``).
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d)
_MOVE_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
                   F.max_pool1d, F.max_pool2d)
_MOVE_METHODS = ("flatten", "view", "reshape", "squeeze", "unsqueeze", "transpose", "permute")
_GAP_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)


def _is_one(size) -> bool:
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def _clip_bounds(lo, hi) -> tuple[float, float] | None:
    if not all(b is None or isinstance(b, (int, float)) for b in (lo, hi)):
        return None  # tensor bounds: not a constant Clip
    return (-float("inf") if lo is None else float(lo), float("inf") if hi is None else float(hi))


_LAYER_NODES = {registry.CONV: CONV, registry.GEMM: GEMM}  # registered kernel -> node kind


def _layer_node(m: nn.Module, where: str) -> str | None:
    """CONV / GEMM for a quantized layer of a registered conv / gemm kind (``lowbit.nn.registry``),
    None for other modules; EmulationError for one whose forward is more than its kernel."""
    kind = registry.kind_of(m) if is_quantized(m) else None
    if kind is None or kind.kernel not in _LAYER_NODES:
        return None
    if not kind.kernel_only:
        hint = " (a QAT model: lowbit.nn.convert it first)" if isinstance(m, QuantConvBn2d) else ""
        raise EmulationError(f"{where}: {type(m).__name__} is registered with kernel_only=False: its forward does "
                             f"more than the {kind.kernel} kernel (a gain, an activation ...), which ONNX Runtime "
                             f"runs as float ops after it, and float kernels cannot be reproduced bit for bit{hint}")
    return _LAYER_NODES[kind.kernel]


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, object]:
    """(kind, detail): detail is the module for layers, (lo, hi) for a Clip, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        layer = _layer_node(m, str(node.target))
        if layer is not None:
            return layer, m
        for types, kind in ((QuantAdd, ADD), (QuantStub, STUB), ((nn.Identity, *_DROPOUT), FREE), (nn.ReLU, RELU),
                            (_MOVE_MODULES, MOVE)):
            if isinstance(m, types):
                return kind, m
        if isinstance(m, nn.Hardtanh):  # ReLU6 included
            return CLIP, (float(m.min_val), float(m.max_val))
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) and _is_one(m.output_size):
            return GAP, m
        return OTHER, m
    args, kwargs = node.args, node.kwargs
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu):
            return RELU, None
        if node.target is F.relu6:
            return CLIP, (0.0, 6.0)
        if node.target is F.hardtanh:
            lo, hi = (list(args[1:3]) + [kwargs.get("min_val", -1.0), kwargs.get("max_val", 1.0)][len(args[1:3]):])
            bounds = _clip_bounds(lo, hi)
            return (CLIP, bounds) if bounds else (OTHER, None)
        if node.target in (torch.clamp, torch.clip):
            bounds = _clip_bounds(*(list(args[1:3]) + [kwargs.get("min"), kwargs.get("max")][len(args[1:3]):]))
            return (CLIP, bounds) if bounds else (OTHER, None)
        if node.target is F.dropout:
            return FREE, None
        if node.target in _MOVE_FUNCTIONS:
            return MOVE, None
        if node.target in _GAP_FUNCTIONS and _is_one(args[1] if len(args) > 1 else kwargs.get("output_size")):
            return GAP, None
        if node.target is getattr:
            return SHAPE, None
        return OTHER, None
    if node.op == "call_method":
        if node.target in _MOVE_METHODS:
            return MOVE, None
        if node.target == "contiguous":
            return FREE, None
        if node.target in ("size", "dim", "numel"):
            return SHAPE, None
        if node.target == "relu":
            return RELU, None
        if node.target in ("clamp", "clip"):
            bounds = _clip_bounds(*(list(args[1:3]) + [kwargs.get("min"), kwargs.get("max")][len(args[1:3]):]))
            return (CLIP, bounds) if bounds else (OTHER, None)
        return OTHER, None
    return node.op, None  # placeholder, get_attr, output


# -- the ORT removal rules ----------------------------------------------------------------------
def relu_removable(grid: Grid) -> bool:
    """ReluQuantFusion: a Relu before Q goes when Q's zero point is the grid's lowest code."""
    return grid.zero_point == grid.qmin


def clip_removable(bounds: tuple[float, float], grid: Grid) -> bool:
    """ClipQuantFusion: a Clip before Q goes when Q's float range lies inside it, within float32 epsilon."""
    lower = grid.scale * torch.tensor(float(grid.qmin - grid.zero_point))
    upper = grid.scale * torch.tensor(float(grid.qmax - grid.zero_point))
    lo, hi = (torch.tensor(b, dtype=torch.float32) for b in bounds)
    eps = torch.finfo(torch.float32).eps
    return not (eps < float(lo - lower) or eps < float(upper - hi))


# -- the plan ------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What the emulator runs for each node (keyed by node name)."""

    kinds: dict[str, tuple[str, object]] = field(default_factory=dict)
    values: dict[str, Grid | str] = field(default_factory=dict)  # a Grid (codes), "float" or "python"
    out_grid: dict[str, Grid | None] = field(default_factory=dict)  # producers: requantize onto / None: float
    skipped: set[str] = field(default_factory=set)  # Relu / Clip nodes ORT removes
    kernels: list[tuple[str, str]] = field(default_factory=list)  # (where, ORT kernel), in graph order
    quantized_floats: list[tuple[str, Grid]] = field(default_factory=list)  # (float node, grid) with a Q


def _where(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def consumer_quantizers(node: fx.Node, user: fx.Node, kind: str, module) -> list[Quantizer | None] | None:
    """The quantizers through which ``user`` reads ``node`` (None when it reads it some other way)."""
    if kind in (CONV, GEMM, STUB):
        return [module.input_quantizer] if user.args[:1] == (node,) and node not in user.args[1:] else None
    if kind == ADD:
        pairs = [(a, q) for a, q in zip(user.args, (module.a_quantizer, module.b_quantizer))]
        if any(n is node for n in user.kwargs.values()):
            return None
        return [q for a, q in pairs if a is node]
    return None


def _walk(node: fx.Node, plan: Plan, path: tuple[fx.Node, ...], out: list) -> None:
    """Follow ``node``'s users through free / Relu / Clip / data-movement nodes to what consumes it."""
    for user in node.users:
        kind, detail = plan.kinds[user.name]
        if kind in (FREE, RELU, CLIP, MOVE):
            _walk(user, plan, (*path, user), out)
        elif kind == "output":
            out.append(("output", None, path, user))
        else:
            qs = consumer_quantizers(node, user, kind, detail)
            for q in qs or [None]:
                out.append(("quantizer" if qs else "other", q, path, user))


def _check_chain(producer: fx.Node, grid: Grid, records: list, plan: Plan) -> None:
    """One Q after ``producer``, Relu / Clip removable.

    Export merges identical Qs that read one tensor, so quantizers reached through free nodes
    only (Identity, Dropout) from one node share a single Q; a Relu / Clip / data-movement node
    with several users is fine as long as they all meet at that one Q."""
    where = _where(producer)
    q_inputs = {([n for n in path if plan.kinds[n.name][0] != FREE] or [producer])[-1] for _, _, path, _ in records}
    if len(q_inputs) > 1:
        raise EmulationError(f"{where}: its output reaches quantizers through different ops "
                             f"({', '.join(sorted(_where(n) for n in q_inputs))}), so the ONNX graph has several "
                             "QuantizeLinear nodes after it and ORT runs it in float")
    for _, _, path, _ in records:
        moved = False
        for n in path:
            kind, detail = plan.kinds[n.name]
            if kind == MOVE:
                moved = True
            if kind in (RELU, CLIP) and moved:
                raise EmulationError(f"{_where(n)}: a Relu / Clip after a data-movement op between {where} and its "
                                     "quantizer is not a pattern ORT is known to fuse; apply the activation first")
            if kind == RELU and not relu_removable(grid):
                raise EmulationError(f"{_where(n)}: ORT keeps this Relu (the next grid {grid.describe()} has its zero "
                                     f"point above the lowest code), so {where} runs in float")
            if kind == CLIP and not clip_removable(detail, grid):
                raise EmulationError(f"{_where(n)}: ORT keeps this Clip{detail} (the next grid {grid.describe()} "
                                     f"reaches outside it), so {where} runs in float")
            if kind in (RELU, CLIP):
                plan.skipped.add(n.name)


def _plan_producer(node: fx.Node, plan: Plan) -> None:
    """Decide the grid a producer requantizes onto (or float output for a final Gemm)."""
    kind, module = plan.kinds[node.name]
    where = _where(node)
    own = getattr(module, "output_quantizer", None) if kind in (CONV, GEMM) else None
    if own is not None:  # the layer's own output quantizer is the Q right after it
        plan.out_grid[node.name] = activation_grid(own, where)
        return
    records: list = []
    _walk(node, plan, (), records)
    for what, _, path, user in records:
        if what == "other":
            hint = ""
            if isinstance(plan.kinds[user.name][1], nn.modules.batchnorm._BatchNorm):
                hint = ". Fold BatchNorm into the conv before quantizing (lowbit.quantize(fold_bn=True))"
            raise EmulationError(f"{where}: its output feeds {_where(user)}, which does not quantize it, so ORT has "
                                 f"no QuantizeLinear after {where} and runs it in float{hint}")
    quantized = [r for r in records if r[0] == "quantizer"]
    if not quantized:
        if kind == GEMM and records:
            plan.out_grid[node.name] = None  # QGemm with a float output
            return
        raise EmulationError(f"{where}: its output is not quantized (it is a model output), so ORT runs this "
                             f"{'op' if kind != CONV else 'Conv'} in float; only a final Linear (QGemm) may return "
                             "float. Add a quantizer after it (lowbit.nn.modules.QuantStub)")
    if len(quantized) != len(records):
        raise EmulationError(f"{where}: its output is both quantized and returned as a model output; ORT then runs "
                             "it in float")
    grids = [activation_grid(q, f"{_where(user)} (reading {where})") for _, q, _, user in quantized]
    if not all(g.same_as(grids[0]) for g in grids):
        raise EmulationError(f"{where}: its output is quantized with different grids "
                             f"({'; '.join(g.describe() for g in grids)}); ORT runs it in float. Give its "
                             "consumers one shared range")
    _check_chain(node, grids[0], quantized, plan)
    plan.out_grid[node.name] = grids[0]


def _removed_before_q(node: fx.Node, plan: Plan) -> bool:
    """Whether ORT drops this float Relu / Clip because a single QuantizeLinear reads it (exactly like the
    ones after integer kernels: the input then reaches the Q unclipped, which can differ in the last code)."""
    records: list = []
    _walk(node, plan, (), records)
    if not records or any(what != "quantizer" or any(plan.kinds[n.name][0] != FREE for n in path)
                          for what, _, path, _ in records):
        return False
    try:
        grids = [activation_grid(q, node.name) for _, q, _, _ in records]
    except EmulationError:
        return False  # the consumer refuses on its own, naming itself
    if not all(g.same_as(grids[0]) for g in grids):
        return False
    kind, bounds = plan.kinds[node.name]
    return relu_removable(grids[0]) if kind == RELU else clip_removable(bounds, grids[0])


_KERNEL = {CONV: "QLinearConv", GEMM: "QGemm", ADD: "QLinearAdd", GAP: "QLinearGlobalAveragePool"}


def _value(node: fx.Node, plan: Plan) -> Grid | str:
    """The plan-time value of ``node``: its grid, "float" or "python"; refuses float ops on tensors."""
    kind, module = plan.kinds[node.name]
    ins = [plan.values[n.name] for n in node.all_input_nodes]
    where = _where(node)
    if kind in ("placeholder", "get_attr"):
        return "float"
    if kind in (CONV, GEMM, ADD, STUB):
        readers = {CONV: ("input_quantizer",), GEMM: ("input_quantizer",), STUB: ("input_quantizer",),
                   ADD: ("a_quantizer", "b_quantizer")}[kind]
        for arg, attr in zip(node.args, readers):
            grid = activation_grid(getattr(module, attr), where)
            seen = plan.values.get(arg.name) if isinstance(arg, fx.Node) else None
            if isinstance(seen, Grid) and not seen.same_as(grid):
                raise EmulationError(f"{where}: re-quantizes {seen.describe()} onto {grid.describe()}; ORT merges or "
                                     "runs such Q/DQ pairs in float. Give both quantizers one range")
            if seen == "float" and not any(n == arg.name and g.same_as(grid) for n, g in plan.quantized_floats):
                plan.quantized_floats.append((arg.name, grid))  # export merges equal Qs of one tensor
                plan.kernels.append((grid.name, "QuantizeLinear"))
        if kind == STUB:
            return activation_grid(module.input_quantizer, where)
    if kind == GAP and not isinstance(ins[0], Grid):
        raise EmulationError(f"{where}: average pool of a float tensor runs in float in ORT; quantize its input "
                             "(lowbit.quantize does, with quantize_adds=True)")
    if kind in PRODUCERS:
        _plan_producer(node, plan)
        grid = plan.out_grid[node.name]
        plan.kernels.append((where, _KERNEL[kind] + ("" if grid is not None else " (float output)")))
        return "float" if grid is None else grid
    if kind in (FREE, MOVE):
        return ins[0] if ins else "python"
    if kind in (RELU, CLIP):
        if isinstance(ins[0], Grid) and node.name not in plan.skipped:
            raise EmulationError(f"{where}: Relu / Clip on a dequantized tensor runs in float in ORT; put it before "
                                 "the quantizer (right after the layer that computes the tensor)")
        if ins[0] == "float" and _removed_before_q(node, plan):
            plan.skipped.add(node.name)
        return ins[0]
    if kind == SHAPE:
        if any(isinstance(v, Grid) for v in ins):
            raise EmulationError(f"{where}: reads the shape of a quantized tensor (an ONNX Shape node), which keeps "
                                 "the op producing it out of ORT's integer kernels; use flatten(1) or fixed shapes")
        return "python"
    if kind == "output":
        plan.kernels += [(v.name, "DequantizeLinear") for v in ins if isinstance(v, Grid)]
        return "python"
    layer_kind = registry.kind_of(module) if is_quantized(module) else None
    if layer_kind is not None and layer_kind.kernel == registry.LOOKUP:
        raise EmulationError(f"{where}: quantized lookups such as embeddings (Gather of int8 rows) are not emulated")
    if any(v != "python" for v in ins):
        what = type(module).__name__ if module is not None else getattr(node.target, "__name__", node.target)
        if isinstance(ins[0], Grid) and isinstance(module, (nn.Sigmoid, nn.LeakyReLU)):
            raise EmulationError(f"{where}: ORT runs this {what} on integer codes as QLinear{what.replace('ReLU', 'Relu')}, "
                                 "a lookup table it fills with its own float function, which is not emulated")
        raise EmulationError(f"{where}: {what} runs in float in ORT (no integer kernel for it here), and float "
                             "kernels cannot be reproduced bit for bit")
    return "python"


def plan(graph: fx.Graph, modules: dict[str, nn.Module]) -> Plan:
    """Walk ``graph`` once in order; raises EmulationError at the first op ORT would leave in float."""
    p = Plan()
    for node in graph.nodes:
        p.kinds[node.name] = classify(node, modules)
    for node in graph.nodes:
        p.values[node.name] = _value(node, p)
    return p


