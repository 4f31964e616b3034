"""Quantize the outputs a runtime's integer kernels write but no lowbit quantizer reads (TFLite).

lowbit quantizes layer *inputs*: a Linear's output stays float unless the next layer's input
quantizer reads it.  Some runtimes cannot leave it float: a TFLite int8 CONV_2D / FULLY_CONNECTED
always writes an int8 tensor, so a classifier's logits, a Linear before a float LayerNorm or
residual add, and Q / K / V before float attention are rounded to int8 in the file.  If the
simulation does not make that rounding, its numbers are not the file's (all-MiniLM-L6-v2:
mean cosine 0.993 simulated, 0.955 in LiteRT).  For such a target (``Target.quantized_outputs``,
``QuantConfig.quantized_outputs``) ``quantize`` and ``prepare_qat`` give every quantized
Conv / Linear with a static input an output quantizer where anything but a quantizer reads its
output, with the layer's own input spec and observer, calibrated with the rest.

Which outputs those are is read from one eager forward pass, not from a graph trace, so it
works on models torch.fx cannot trace (Hugging Face encoders): a ``TorchFunctionMode`` follows
each layer's output through data movement and the activations TFLite fuses into the kernel
(``view``, ``transpose``, ``flatten``, ``relu``, ``relu6`` ...) to the first other op that reads it;
reads inside lowbit quantizers do not count, nor do ops that return no tensor (``size``,
``shape``).  A module's output that reaches the model output counts as read.  The names found are
recorded in ``lowbit_summary.options["quantized_outputs"]``, so ``lowbit.load`` rebuilds the same
quantizers without data (``add_output_quantizers``).

    names = find_float_read_outputs(qmodel, batch)      # {"classifier.1": "the model output"}
    add_output_quantizers(qmodel, config, names)        # (lowbit.ptq.read_output_quantizers does both)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import QuantConfig
from ..nn.modules import is_quantized
from ..nn.quantizer import Quantizer
from ..nn.registry import CONV, GEMM, kind_of
from ..nn.swap import SwapReport
from ..nn.walk import quantizers_disabled, run_model

log = logging.getLogger(__name__)

# Functions and Tensor methods (by name) that pass a layer's output on to the file's next quantized
# tensor unchanged: data movement (TFLite's int8 RESHAPE / TRANSPOSE / MAX_POOL keep the grid) and
# the activations fused into the kernel before its output (the same ops ``lowbit.export._tflite_graph``
# copies a quantizer over or fuses).
PASS_THROUGH = frozenset({
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "clone",
    "max_pool1d", "max_pool2d", "_max_pool1d", "_max_pool2d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "dropout", "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "clamp", "clamp_", "clip", "clip_",
})


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized Conv / Linear layers (any registered kind) with a static input and no output quantizer."""
    found = {}
    for name, m in model.named_modules():
        if not is_quantized(m) or getattr(kind_of(m), "kernel", None) not in (CONV, GEMM):
            continue
        iq = getattr(m, "input_quantizer", None)
        if m.output_quantizer is None and iq is not None and iq.mode not in ("dynamic", "disabled"):
            found[name] = m
    return found


def _tensors(value) -> Iterator[torch.Tensor]:
    """The tensors in a nested output (tuples, lists, dicts, Hugging Face ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


class _Follow(TorchFunctionMode):
    """Follows tracked tensors (by identity) through pass-through ops; records the first other reader
    of each origin layer.  Ops inside a quantizer (``depth`` > 0) are not reads."""

    def __init__(self) -> None:
        super().__init__()
        self.origins: dict[int, tuple[str, ...]] = {}  # id(tensor) -> layer names whose output it carries
        self.alive: list[torch.Tensor] = []  # keeps tracked tensors alive, so their ids stay theirs
        self.readers: dict[str, str] = {}
        self.depth = 0

    def track(self, tensor: torch.Tensor, names: tuple[str, ...]) -> None:
        self.origins[id(tensor)] = tuple(dict.fromkeys((*self.origins.get(id(tensor), ()), *names)))
        self.alive.append(tensor)

    def read(self, names: tuple[str, ...], where: str) -> None:
        for name in names:
            self.readers.setdefault(name, where)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth:
            return result
        names = tuple(dict.fromkeys(n for t in _tensors((args, kwargs)) for n in self.origins.get(id(t), ())))
        outputs = list(_tensors(result))
        if not names or not outputs:  # untracked inputs, or a query (size, shape, dim ...)
            return result
        name = getattr(func, "__name__", str(func))
        if name in PASS_THROUGH or any(o is t for o in outputs for t in _tensors((args, kwargs))):
            for out in outputs:
                self.track(out, names)
        else:
            self.read(names, f"{name}()")
        return result


def find_float_read_outputs(model: nn.Module, batch) -> dict[str, str]:
    """``{layer name: its first reader}`` for each quantized Conv / Linear (static input, no output
    quantizer) whose output something other than a lowbit quantizer reads, on one forward pass of
    ``batch`` (a tensor, a tuple of positional tensors or a dict of keyword tensors, as calibration
    batches are).  Quantizers observe nothing during the pass."""
    candidates = _candidates(model)
    if not candidates:
        return {}
    follow = _Follow()

    def layer_output(name):
        def hook(module, args, output):
            for t in _tensors(output):
                follow.track(t, (name,))
        return hook

    def enter(module, args):
        follow.depth += 1

    def leave(module, args, output):
        fresh = output.clone() if isinstance(output, torch.Tensor) else output  # (a disabled quantizer returns x)
        follow.depth -= 1
        return fresh

    handles = [m.register_forward_hook(layer_output(name)) for name, m in candidates.items()]
    for q in model.modules():
        if isinstance(q, Quantizer):
            handles += [q.register_forward_pre_hook(enter), q.register_forward_hook(leave)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), quantizers_disabled(model), follow:
            out = run_model(model, batch)
        for t in _tensors(out):
            follow.read(follow.origins.get(id(t), ()), "the model output")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: follow.readers[name] for name in candidates if name in follow.readers}


def add_output_quantizers(model: nn.Module, config: QuantConfig, names, report: SwapReport | None = None) -> list[str]:
    """Give each layer in ``names`` an output quantizer: its own input activation (spec and observer, as
    ``config`` resolves it); ``names`` may map each name to what reads the output (for the log).
    Returns the names that got one (layers whose input is not a static 8-bit grid keep a float output)."""
    from .activations import _output_spec

    config = config.bind(model)
    readers = names if isinstance(names, Mapping) else dict.fromkeys(names, "")
    added = []
    for name, reader in readers.items():
        module = model.get_submodule(name)
        if getattr(module, "output_quantizer", None) is not None:
            continue
        tq = _output_spec(config, name, module)
        if tq is None:
            continue
        module.output_quantizer = tq.make(f"{name}.output")
        added.append(name)
        log.info("%s: output quantized (%s), as the target's integer kernel writes it%s", name, tq.spec.describe(),
                 f"; read by {reader}" if reader else "")
        if report is not None and name in report.quantized:
            report.quantized[name] += f"; output {tq.spec.describe()} (the target's kernel writes it quantized)"
    return added


__all__ = ["PASS_THROUGH", "add_output_quantizers", "find_float_read_outputs"]
