"""Walking a model: run it on one input item, find its quantizers, replace a submodule, run it in
float (``quantizers_disabled``), and fake-quantize its frozen weights once for a pass of many
batches (``fixed_weights``).

The lowest-level helpers every layer above uses (calibration, the passes, QAT, reports), so
they live here, next to the modules they walk, and nothing above has to import an algorithm
to run a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .modules import has_quantizers
from .quantizer import Quantizer


def run_model(model: nn.Module, batch) -> object:
    """Call ``model`` on one calibration item: a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Every Quantizer of ``model`` in mode "disabled" inside the block (the model runs in float and
    observes nothing), each back in its own mode after."""
    saved = [(q, q.mode) for q in model.modules() if isinstance(q, Quantizer)]
    for q, _ in saved:
        q.mode = "disabled"
    try:
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


def first_tensor(output) -> torch.Tensor:
    """The tensor a model's output leads with: itself, or the first tensor of a tuple / list /
    dict (an HF ModelOutput's ``logits`` or ``last_hidden_state``)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"the model returned {type(output).__name__}, not a tensor or a tuple / dict holding one; "
                    "wrap the model so that it returns its output tensor")


def quantizers_by_role(model: nn.Module) -> Iterator[tuple[nn.Module, str, Quantizer]]:
    """(module, role, Quantizer) for every quantizer in ``model``, in module order."""
    for _, module in model.named_modules():
        if has_quantizers(module):
            for role, q in module.quantizers():
                yield module, role, q


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(name, quantizer) for every quantizer in ``model``."""
    for _, _, q in quantizers_by_role(model):
        yield q.name, q


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def frozen_weights(model: nn.Module) -> list[tuple[nn.Module, Quantizer]]:
    """(layer, weight quantizer) pairs of ``model`` whose weight quantizer is frozen (static)."""
    return [(module, q) for module, role, q in quantizers_by_role(model) if role == "weight" and q.mode == "static"]


@contextlib.contextmanager
def fixed_weights(pairs: Sequence[tuple[nn.Module, Quantizer]] | nn.Module) -> Iterator[None]:
    """Inside, each frozen weight quantizer of ``pairs`` (or of every layer of a model:
    ``frozen_weights``) returns its layer's fake-quantized weight computed once, instead of
    fake-quantizing the same constant weight again on every call: for passes over many batches
    (calibration, evaluation, sensitivity, GPTQ's block passes).  Costs one float copy of each
    weight while inside.

    Instance-level ``forward`` (as export mode patches it), removed afterwards.  A quantizer fed
    anything else than its layer's weight, a weight changed since (its version counter), a
    quantizer switched out of static mode since, or a weight that needs a gradient runs its own
    forward.
    """
    if isinstance(pairs, nn.Module):
        pairs = frozen_weights(pairs)
    patched = []
    try:
        with torch.no_grad():
            for module, q in pairs:
                weight = module.weight
                if not isinstance(weight, torch.Tensor) or q.mode != "static" or weight.is_inference():
                    continue  # (an inference tensor has no version counter to check)
                previous = q.__dict__.get("forward")
                own = previous if previous is not None else q.forward
                value = own(weight)

                def forward(x, _w=weight, _version=weight._version, _value=value, _own=own, _q=q):
                    if (x is _w and x._version == _version and _q.mode == "static"
                            and not (x.requires_grad and torch.is_grad_enabled())):
                        return _value
                    return _own(x)

                patched.append((q, previous))
                q.forward = forward
        yield
    finally:
        for q, previous in reversed(patched):
            if previous is None:
                q.__dict__.pop("forward", None)
            else:
                q.forward = previous
