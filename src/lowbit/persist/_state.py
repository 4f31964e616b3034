"""A model's ``state_dict`` split into what safetensors can hold and what the manifest holds.

safetensors stores named tensors, each with storage of its own.  A quantized model's state has
three things it cannot take as they are:

* non-tensor entries: every module's ``get_extra_state()`` (a Quantizer's mode / learn /
  needs_init, an observer's kind / spec / options, a conv-BN layer's ``bn_frozen``): plain
  JSON values, written to the manifest;
* one tensor under several names (tied learned scales of the quantizers of one tensor, a
  SmoothQuant ``inv_scale`` shared by q/k/v, tied embeddings): written once, the other names
  recorded as aliases of it, so loading ties them again;
* views into another tensor's storage: written as copies of their own.
"""

from __future__ import annotations

import json

import torch
from torch import nn

EXTRA = "_extra_state"  # the key suffix nn.Module gives get_extra_state()


def _is_extra(key: str) -> bool:
    return key == EXTRA or key.endswith("." + EXTRA)


def _own_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.is_contiguous()


def split_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, object], dict[str, str]]:
    """``(tensors, extra, aliases)``: the tensors to write (CPU, contiguous, no shared storage),
    the extra states (JSON values), and ``{name: name of the written tensor it is}``.

    Raises:
        TypeError: an extra state that is not a JSON value (named by its key).
    """
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, object] = {}
    aliases: dict[str, str] = {}
    same: dict[tuple, str] = {}  # (storage, offset, shape, stride, dtype) -> first name
    storages: set[int] = set()
    for key, value in state.items():
        if _is_extra(key) and not isinstance(value, torch.Tensor):
            try:
                json.dumps(value, allow_nan=True)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"cannot save {key}: the module's get_extra_state() returned a "
                                f"{type(value).__name__} that is not a JSON value ({exc}); lowbit.save writes "
                                "tensors and JSON values only") from None
            extra[key] = value
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot save {key}: the state_dict holds a {type(value).__name__}, not a tensor")
        t = value.detach()
        if t.numel() > 0:  # (empty tensors share the null pointer; each is written as itself)
            ptr = t.untyped_storage().data_ptr()
            ident = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident in same:
                aliases[key] = same[ident]
                continue
            same[ident] = key
            if ptr in storages or not _own_storage(t):
                t = t.clone(memory_format=torch.contiguous_format)  # a view: safetensors wants its own copy
            storages.add(ptr)
        tensors[key] = t.cpu()
    return tensors, extra, aliases


def _native(saved: object, current: object) -> object:
    """``current`` when it equals ``saved`` up to JSON's types (tuples read back as lists), so
    modules comparing their extra state see their own types; else ``saved``."""
    if current is None:
        return saved
    try:
        same = json.loads(json.dumps(current)) == saved
    except (TypeError, ValueError):
        same = False
    return current if same else saved


def merge_state(model: nn.Module, tensors: dict[str, torch.Tensor], extra: dict[str, object],
                aliases: dict[str, str]) -> dict[str, object]:
    """The full ``state_dict`` to load into ``model``: tensors, aliases and extra states."""
    current = model.state_dict(keep_vars=True)
    state: dict[str, object] = dict(tensors)
    state.update({key: tensors[src] for key, src in aliases.items()})
    state.update({key: _native(value, current.get(key)) for key, value in extra.items()})
    return state


def tie_aliases(model: nn.Module, aliases: dict[str, str]) -> int:
    """Make each alias the very tensor it was when saved: a Parameter or buffer registered under
    both names (as ``lowbit.qat`` ties the learned scales of quantizers of one tensor).  Names
    that are already one tensor, or that ``model`` lacks, are left (loading reports those).
    Returns how many were tied."""
    tied = 0
    for key, src in aliases.items():
        owner_name, _, leaf = key.rpartition(".")
        src_owner, _, src_leaf = src.rpartition(".")
        try:
            owner, src_module = model.get_submodule(owner_name), model.get_submodule(src_owner)
        except AttributeError:
            continue
        source = src_module._parameters.get(src_leaf, src_module._buffers.get(src_leaf))
        if source is None or getattr(owner, leaf, None) is source:
            continue
        if leaf in owner._parameters and isinstance(source, nn.Parameter):
            owner._parameters[leaf] = source
        elif leaf in owner._buffers and not isinstance(source, nn.Parameter):
            owner._buffers[leaf] = source
        else:
            continue
        tied += 1
    return tied
