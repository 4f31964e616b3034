"""Walking a model: run it on one input item, find its quantizers, replace a submodule.

The lowest-level helpers every layer above uses (calibration, the passes, QAT, reports), so
they live here, next to the modules they walk, and nothing above has to import an algorithm
to run a model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

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
