"""Per-layer latency in ONNX Runtime, read from its profiles, for the mixed-precision solver.

For each choice the model is exported as if every decision layer had that choice (float: the
float model, exported as ``lowbit.report.compare`` exports its FP32 baseline), run in ONNX
Runtime's CPU provider with profiling on, and each node's kernel time (the ``dur`` of its
``Node`` ``*_kernel_time`` event) is given to the decision layer it came from:

* the node's name is read as the module path it was traced in: torch writes scope names
  (``/features/features.0/features.0.0/Conv``, ``/encoder/layer.0/attention/self/query/MatMul``;
  a traced quantized model ``/features.0.0/Conv``), lowbit names its Q/DQ nodes after the
  quantizer (``features.0.0.input/QuantizeLinear``: a layer's input quantization is part of
  what quantizing it costs), and ORT keeps the name of the node it fuses into (``QLinearConv``
  ``/features.0.0/Conv_token_1``); the longest decision layer the path lies in wins;
* ORT names a conv or matmul fused with its activation after the activation's output
  (``/features/features.0/features.0.2/Relu_output_0_nchwc``): a Conv / Gemm / MatMul node whose
  path is a module outside every decision layer goes to the last decision layer before that
  module, in module order;
* the rest (layout transposes, pools, the model's own input quantizer ...) and the executor's
  time between kernels is ``other``.

The predicted latency of an assignment is ``other[base] + sum per_layer[layer][choice]``: it
ignores what mixing adds (a Transpose or a float Q/DQ pair where an integer layer meets a float
one), which ``tests/analysis/test_latency.py`` measures against real mixed files.  ``w4a8``
exports int8 containers, so its layers run on the same kernels as ``w8a8`` and cost the same.

Timings are medians over ``runs`` runs after ``warmup`` runs, one intra-op thread by default;
the files of all choices are run in rounds (one run each, in turn) so load from other processes
falls on all of them alike.
"""

from __future__ import annotations

import bisect
import json
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..export import export_onnx
from ..ptq import quantize
from ._layers import Choice, assignment_config, choice_name, decision_layers

CONTRACTIONS = ("Conv", "Gemm", "MatMul")  # op types (ORT's fused ones included) that hold a layer's work


@dataclass
class LatencyTable:
    """Milliseconds per run: ``per_layer[layer][choice]``, ``other[choice]`` (unattributed
    kernels and executor time), ``total[choice]`` (the measured run of the uniform file)."""

    per_layer: dict[str, dict[str, float]]
    other: dict[str, float]
    total: dict[str, float]
    settings: dict = field(default_factory=dict)  # threads, runs, warmup, input shapes

    def predict(self, assignment: Mapping[str, str], base: str) -> float:
        """Predicted ms of the file where each layer has ``assignment[layer]`` (choice names) and
        everything else follows ``base``."""
        return self.other[base] + sum(self.per_layer[layer][c] for layer, c in assignment.items())

    def uniform(self, choice: str) -> float:
        """Predicted ms with every decision layer at ``choice`` (and ``choice`` as the base)."""
        return self.predict({layer: choice for layer in self.per_layer}, choice)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> LatencyTable:
        return cls(**data)


# -- attribution --------------------------------------------------------------------------------
def _join(head: str, tail: str) -> str:
    return f"{head}.{tail}" if head else tail


def _extend(path: str, segment: str, modules: set[str]) -> tuple[str, bool]:
    """``path`` extended by one scope ``segment``, and whether the segment was a module.

    A scope segment is a child's name relative to a parent, and may repeat the parent's tail
    (``features`` -> ``features.1``; ``conv.0`` -> ``conv.0.0``); a segment that only starts with
    a module (``features.0.0.input``: a quantizer) ends the path at that module."""
    head, parts = path.split(".") if path else [], segment.split(".")
    options = [_join(path, segment)]
    options += [_join(".".join(head[:-k]), segment) for k in range(1, min(len(head), len(parts)) + 1)
                if head[-k:] == parts[:k]]
    for option in options:
        if option in modules:
            return option, True
    for option in options:  # the longest module the segment starts with
        bits = option.split(".")
        for n in range(len(bits) - 1, len(head), -1):
            if ".".join(bits[:n]) in modules:
                return ".".join(bits[:n]), False
    return path, False


def module_path(node_name: str, modules: set[str]) -> str:
    """The module an ONNX / ORT node name was traced in ("" when none)."""
    path = ""
    for segment in node_name.split("/"):
        if segment:
            path, whole = _extend(path, segment, modules)
            if not whole:
                break
    return path


def attribute(node_name: str, op_type: str, layers: Sequence[str], order: Sequence[str]) -> str | None:
    """The decision layer (of ``layers``) a node's time belongs to, or None (other).  ``order``:
    every module name of the float model, in module order."""
    path = module_path(node_name, set(order))
    if not path:
        return None
    inside = [layer for layer in layers if path == layer or path.startswith(layer + ".")]
    if inside:
        return max(inside, key=len)
    if not any(k in op_type for k in CONTRACTIONS):
        return None
    position = {name: i for i, name in enumerate(order)}
    before = [layer for layer in layers if position[layer] < position[path]]
    return max(before, key=position.__getitem__) if before else None


# -- profiling ----------------------------------------------------------------------------------
@dataclass
class Profile:
    """One file's timing: medians over the runs, in ms."""

    per_layer: dict[str, float]
    other: float
    total: float  # wall clock of session.run
    kernels: float  # the sum of every node's kernel time


def _session(path: Path, threads: int, prefix: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as OrtModel runs it
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(session, example_inputs) -> dict:
    names = [i.name for i in session.get_inputs()]
    if isinstance(example_inputs, Mapping):
        return {n: example_inputs[n].detach().cpu().numpy() for n in names}
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return {n: a.detach().cpu().numpy() for n, a in zip(names, args)}


def _read_profile(events: list[dict], runs: int, attribute_node) -> tuple[list[dict], list[float], list[float]]:
    """Per timed run: {layer or None: µs}, the run's ``model_run`` µs and its kernels' µs."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    starts = [a for a, _ in spans]
    per_run = [{} for _ in spans]
    kernels = [0.0 for _ in spans]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > spans[i][1]:
            continue  # a warm-up run
        owner = attribute_node(e["name"].removesuffix("_kernel_time"), e.get("args", {}).get("op_name", ""))
        per_run[i][owner] = per_run[i].get(owner, 0.0) + e["dur"]
        kernels[i] += e["dur"]
    return per_run, [b - a for a, b in spans], kernels


def profile_files(paths: Mapping[str, str | Path], example_inputs, model: nn.Module, *,
                  layers: Sequence[str] | None = None, threads: int = 1, warmup: int = 3,
                  runs: int = 20) -> dict[str, Profile]:
    """Run each ONNX file of ``paths`` (name -> file) ``warmup`` + ``runs`` times in rounds and
    split its kernel time over ``layers`` (default: ``model``'s decision layers)."""
    layers = decision_layers(model) if layers is None else list(layers)
    order = [name for name, _ in model.named_modules() if name]
    with tempfile.TemporaryDirectory() as folder:
        sessions = {k: _session(Path(p), threads, Path(folder) / f"profile{i}") for i, (k, p) in enumerate(paths.items())}
        feeds = {k: _feeds(s, example_inputs) for k, s in sessions.items()}
        walls = {k: [] for k in sessions}
        for r in range(warmup + runs):
            for k, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feeds[k])
                if r >= warmup:
                    walls[k].append((time.perf_counter() - start) * 1e3)
        files = {k: s.end_profiling() for k, s in sessions.items()}
        events = {k: json.loads(Path(f).read_text()) for k, f in files.items()}
    out = {}
    for k in sessions:
        per_run, run_us, kernel_us = _read_profile(events[k], runs, lambda n, op: attribute(n, op, layers, order))
        out[k] = Profile(
            per_layer={layer: statistics.median(r.get(layer, 0.0) for r in per_run) / 1e3 for layer in layers},
            other=statistics.median(t - sum(v for o, v in r.items() if o is not None)
                                    for r, t in zip(per_run, run_us)) / 1e3,
            total=statistics.median(walls[k]), kernels=statistics.median(kernel_us) / 1e3)
    return out


# -- the table ----------------------------------------------------------------------------------
def export_uniform(model: nn.Module, calib_data, choice: Choice, path: str | Path, example_inputs, *,
                   target="auto", **quantize_options) -> Path:
    """Export ``model`` with every decision layer at ``choice`` (also the base; None: the float
    model) to ``path``."""
    if choice is None:
        export_onnx(model, path, example_inputs, target=target)
        return Path(path)
    config = assignment_config(model, {layer: choice for layer in decision_layers(model)}, base=choice,
                               target=target, name=f"uniform-{choice_name(choice)}")
    qmodel = quantize(model, calib_data, config, target=target, progress=False, **quantize_options)
    export_onnx(qmodel, path, example_inputs)
    return Path(path)


def latency_table(model: nn.Module, calib_data, choices: Sequence[Choice], example_inputs, *,
                  target="auto", threads: int = 1, warmup: int = 3, runs: int = 20,
                  **quantize_options) -> LatencyTable:
    """Measure each choice's uniform file (see the module docstring) and build the table.

    Example:
        >>> table = latency_table(model, calib, ["w8a8", None], x[:1])
        >>> table.predict({"features.0.0": "w8a8", "features.1.0": "float"}, base="w8a8")
    """
    model.eval()
    layers = decision_layers(model)
    with tempfile.TemporaryDirectory() as folder:
        paths = {choice_name(c): export_uniform(model, calib_data, c, Path(folder) / f"{choice_name(c)}.onnx",
                                                example_inputs, target=target, **quantize_options)
                 for c in choices}
        profiles = profile_files(paths, example_inputs, model, layers=layers, threads=threads, warmup=warmup,
                                 runs=runs)
    shapes = [list(t.shape) for t in (example_inputs.values() if isinstance(example_inputs, Mapping) else
                                      [example_inputs] if isinstance(example_inputs, torch.Tensor) else example_inputs)]
    return LatencyTable(per_layer={layer: {c: p.per_layer[layer] for c, p in profiles.items()} for layer in layers},
                        other={c: p.other for c, p in profiles.items()},
                        total={c: p.total for c, p in profiles.items()},
                        settings={"threads": threads, "runs": runs, "warmup": warmup, "input_shapes": shapes})
