"""Process-group helpers shared by the observer and BatchNorm synchronisation."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("lowbit.qat.distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group (torchrun sets the environment) first")
    return dist.get_world_size(group)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where a collective's payload must live for this group's backend."""
    backend = str(dist.get_backend(group))
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device()) if device.type != "cuda" else device
    return device  # mixed backends ("cpu:gloo,cuda:nccl") dispatch on the tensor's device


class _GroupRef:
    """Holds a process group for a hook stored on a module.

    Deep copies share it (a copy of a model in the same process lives in the same group, and
    process groups cannot be copied: ``convert`` and export deep-copy the model), and pickling
    drops it (the unpickled attribute is None: the module computes locally again)."""

    def __init__(self, group) -> None:
        self.group = group

    def __deepcopy__(self, memo) -> _GroupRef:
        return self

    def __reduce__(self):
        return (_none, ())


def _none() -> None:
    return None
