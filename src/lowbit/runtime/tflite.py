"""TFLite / LiteRT as a callable on torch tensors, which kernels run in int8, and a latency harness.

    model = TFLiteModel("model.int8.tflite", threads=1)   # LiteRT's interpreter (ai-edge-litert)
    logits = model(images)                                # NCHW float tensor in, float tensor out
    print(inspect_tflite("model.int8.tflite"))            # int8 vs float kernels, read from the file
    stats = measure_latency(model, model.feeds(images))

A fully-integer file takes and returns int8 tensors; ``TFLiteModel`` quantizes float inputs with the
input tensor's own scale / zero point (round half to even, as lowbit's simulation rounds) and
dequantizes the outputs, so it is called like the torch model.  By default the interpreter applies
the XNNPACK delegate, LiteRT's CPU default and its fastest path for int8 and float alike;
``xnnpack=False`` runs LiteRT's builtin reference-optimized kernels instead.

Needs ``ai-edge-litert`` (``pip install ai-edge-litert``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .ort import LatencyStats, measure_latency  # noqa: F401  (re-exported: times any runner)

# TFLite builtin ops that do the arithmetic (the ones worth running in integers).
COMPUTE_OPS = frozenset({
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONV_3D",
    "ADD", "SUB", "MUL", "DIV", "MEAN", "SUM", "AVERAGE_POOL_2D", "SOFTMAX", "LOGISTIC", "TANH", "GELU",
    "HARD_SWISH", "RSQRT", "SQUARED_DIFFERENCE", "EMBEDDING_LOOKUP",
})
INTEGER_TYPES = frozenset({"int8", "uint8", "int16"})


def _interpreter_module():
    try:
        from ai_edge_litert import interpreter
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("ai_edge_litert"):
            raise
        raise ModuleNotFoundError("running a .tflite needs LiteRT's interpreter: pip install ai-edge-litert "
                                  "(or lowbit[tflite])", name="ai_edge_litert") from exc
    return interpreter


def _open(path: str | Path, threads: int, xnnpack: bool):
    interpreter = _interpreter_module()
    resolver = (interpreter.OpResolverType.AUTO if xnnpack
                else interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such .tflite file")
    it = interpreter.Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    return it


def _arg_order(name: str) -> tuple[int, str]:
    """Sort key of litert-torch's signature names (``args_0``, ``args_1`` ... ``output_0`` ...)."""
    digits = re.findall(r"\d+", name)
    return (int(digits[-1]) if digits else 0, name)


class TFLiteModel:
    """A ``.tflite`` file run by LiteRT's interpreter, called like the torch model.

    Args:
        path: the ``.tflite`` file (``lowbit.export.tflite.export_tflite`` writes one).
        threads: interpreter threads.
        xnnpack: apply the XNNPACK delegate (LiteRT's CPU default).

    Example:
        >>> model = TFLiteModel("model.int8.tflite")
        >>> logits = model(images)
    """

    def __init__(self, path: str | Path, *, threads: int = 1, xnnpack: bool = True) -> None:
        self.path, self.threads = Path(path), threads
        self.interpreter = _open(path, threads, xnnpack)
        signature = self.interpreter.get_signature_runner()
        ins, outs = signature.get_input_details(), signature.get_output_details()
        self.input_names = sorted(ins, key=_arg_order)
        self.inputs = [ins[n] for n in self.input_names]
        self.outputs = [outs[n] for n in sorted(outs, key=_arg_order)]

    def feeds(self, *args) -> list[np.ndarray]:
        """Positional torch / numpy inputs (or a dict in the export's key order) as the file's arrays:
        float inputs of an int8 tensor are quantized with its scale and zero point."""
        if len(args) == 1 and isinstance(args[0], Mapping):
            args = tuple(args[0].values())
        if len(args) != len(self.inputs):
            raise ValueError(f"{self.path.name}: takes {len(self.inputs)} input(s) {self.input_names}, got {len(args)}")
        arrays = []
        for value, detail in zip(args, self.inputs, strict=True):
            x = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if tuple(x.shape) != tuple(detail["shape"]):
                raise ValueError(f"{self.path.name}: input {detail['name']} has the static shape "
                                 f"{tuple(detail['shape'])}, got {tuple(x.shape)}; export again with such example inputs")
            arrays.append(_to_file_type(x, detail))
        return arrays

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        """One ``invoke`` on prepared arrays; returns the outputs as stored (int8 for an integer file)."""
        for array, detail in zip(feeds, self.inputs, strict=True):
            self.interpreter.set_tensor(detail["index"], array)
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(d["index"]) for d in self.outputs]

    def __call__(self, *args) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = [torch.from_numpy(_from_file_type(o, d)) for o, d in zip(self.run(self.feeds(*args)), self.outputs,
                                                                          strict=True)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _to_file_type(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating) and scale:
        info = np.iinfo(dtype)
        q = np.rint(x.astype(np.float32) / np.float32(scale)) + zero_point  # rint: half to even
        return np.clip(q, info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def _from_file_type(y: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.issubdtype(y.dtype, np.integer) and scale:
        return ((y.astype(np.int32) - zero_point) * np.float32(scale)).astype(np.float32)
    return np.array(y)


@dataclass
class TFLiteKernelReport:
    """The ops of a ``.tflite`` file and the types they compute in, read from the flatbuffer.

    Attributes:
        path: the file.
        ops: ``(op name, input types, output types)`` per op, in execution order.
        integer_ops / float_ops: op name -> count, for compute ops (``COMPUTE_OPS``) whose first input is
            integer / float.
    """

    path: str
    ops: list[tuple[str, tuple[str, ...], tuple[str, ...]]]
    integer_ops: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)

    @property
    def fully_integer(self) -> bool:
        """True when every compute op runs on integer tensors."""
        return not self.float_ops and bool(self.integer_ops)

    def __str__(self) -> str:
        fmt = lambda c: ", ".join(f"{k} x{v}" for k, v in sorted(c.items())) or "none"
        return f"{Path(self.path).name}: integer {fmt(self.integer_ops)}; float {fmt(self.float_ops)}"


def inspect_tflite(path: str | Path) -> TFLiteKernelReport:
    """Which ops of ``path`` compute in int8 and which in float (types read from the file, before any
    delegate replaces ops), e.g. to check a fully-integer export.

    Example:
        >>> report = inspect_tflite("model.int8.tflite")
        >>> assert report.fully_integer, report
    """
    it = _open(path, 1, xnnpack=False)
    tensors = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    ops, integer, floating = [], Counter(), Counter()
    for op in it._get_ops_details():  # (LiteRT's only op listing; public since TF 2.x, still underscored)
        ins = tuple(tensors.get(i, "none") for i in op["inputs"] if i >= 0)
        outs = tuple(tensors.get(i, "none") for i in op["outputs"])
        ops.append((op["op_name"], ins, outs))
        if op["op_name"] in COMPUTE_OPS and ins:
            (integer if ins[0] in INTEGER_TYPES else floating)[op["op_name"]] += 1
    return TFLiteKernelReport(path=str(path), ops=ops, integer_ops=dict(integer), float_ops=dict(floating))
