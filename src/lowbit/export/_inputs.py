"""The example inputs of ``export_onnx``: positional tensors or a dict of keyword tensors.

The TorchScript exporter traces positional inputs.  A dict (what a Hugging Face tokenizer
returns: ``input_ids``, ``attention_mask``, ``token_type_ids``) is handed to it through a
small adapter module that takes the dict's values positionally and calls
``model(**dict(zip(keys, args)))``; the ONNX inputs are named after the keys, in the order of
the model's ``forward`` signature.  (Passing the dict to ``torch.onnx.export`` itself makes
the exporter fill every later parameter of ``forward`` with its default, positionally, which
transformers 5's BertModel rejects: "got multiple values for argument 'use_cache'".)

Dynamic axes by default: dimension 0 (``batch``) of every input, and dimension 1
(``sequence``) of every 2-D integer input -- token ids and masks -- so one file serves any
batch size and any sequence length.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]]


@dataclass(frozen=True, kw_only=True)
class ExportInputs:
    """What the exporter traces: a module, its positional example tensors and their ONNX names.

    Attributes:
        module: the model itself, or a ``KeywordAdapter`` around it (dict inputs).
        args: the example tensors, positionally.
        names: the ONNX graph input names, one per tensor of ``args``.
        axes: dynamic axes per input name (``{name: {axis: symbol}}``).
    """

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    names: list[str]
    axes: dict[str, Mapping[int, str] | Sequence[int]]


class KeywordAdapter(nn.Module):
    """Calls ``model`` with keyword tensors given positionally; mapping outputs become tuples.

    ``output_keys`` holds the keys of the last mapping output (a Hugging Face ``ModelOutput``:
    ``last_hidden_state``, ``pooler_output``), which name the ONNX outputs.
    """

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = tuple(keys)
        self.output_keys: list[str] | None = None

    def forward(self, *args: torch.Tensor):
        out = self.model(**dict(zip(self.keys, args, strict=True)))
        if isinstance(out, Mapping):
            items = [(k, v) for k, v in out.items() if v is not None]
            self.output_keys = [k for k, _ in items]
            return tuple(v for _, v in items)
        return out


def _forward_order(model: nn.Module, keys: Sequence[str]) -> list[str]:
    """``keys`` in the order of ``model.forward``'s parameters; error on a key it does not take."""
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in keys if k not in named]
    if unknown and not takes_any:
        raise ValueError(f"example_inputs: {type(model).__name__}.forward takes no argument(s) {unknown}; "
                         f"its parameters are {named} -- drop those keys from the dict")
    return [n for n in named if n in keys] + unknown


def _token_axes(tensor: torch.Tensor, dynamic_batch: bool) -> dict[int, str]:
    axes = {0: "batch"} if dynamic_batch else {}
    if tensor.dim() == 2 and not (tensor.is_floating_point() or tensor.is_complex()):
        axes[1] = "sequence"  # token ids / masks: (batch, sequence)
    return axes


def _check_names(given: Sequence[str] | None, names: list[str], what: str) -> list[str]:
    if given is None:
        return names
    given = list(given)
    if len(given) != len(names) or len(set(given)) != len(given):
        raise ValueError(f"input_names: expected {len(names)} distinct names for {what}, got {given}")
    return given


def prepare_inputs(
    model: nn.Module,
    example_inputs,
    *,
    input_names: Sequence[str] | None,
    dynamic_batch: bool,
    dynamic_axes: DynamicAxes | None,
) -> ExportInputs:
    """Resolve ``example_inputs`` (tensor, tuple / list of tensors, or dict of keyword tensors).

    ``dynamic_axes`` entries replace the default axes of the inputs they name (entries naming
    outputs are applied by the exporter).  Raises ValueError naming the offending input.
    """
    if isinstance(example_inputs, Mapping):
        given = {k: v for k, v in example_inputs.items() if v is not None}
        bad = [k for k, v in given.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad or not given:
            raise ValueError(f"example_inputs: a dict must map argument names to tensors; bad entries: {bad}")
        keys = _forward_order(model, list(given))
        if input_names is not None and set(input_names) != set(keys):
            raise ValueError(f"input_names {list(input_names)}: the ONNX inputs of a dict are named after its "
                             f"keys {keys}; leave input_names out")
        module, args, names = KeywordAdapter(model, keys), tuple(given[k] for k in keys), keys
    else:
        if isinstance(example_inputs, torch.Tensor):
            args = (example_inputs,)
        elif isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
            args = tuple(example_inputs)
        else:
            raise ValueError("example_inputs must be a tensor, a tuple of tensors (the model's positional inputs) "
                             f"or a dict of keyword tensors, got {type(example_inputs).__name__}")
        default = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
        module, names = model, _check_names(input_names, default, f"{len(args)} example input(s)")
    axes: dict = {name: _token_axes(t, dynamic_batch) for name, t in zip(names, args, strict=True)}
    axes.update({k: v for k, v in (dynamic_axes or {}).items() if k in names})
    return ExportInputs(module=module, args=args, names=names, axes={k: v for k, v in axes.items() if v})
