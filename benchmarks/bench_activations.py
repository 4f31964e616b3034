"""Conv + SiLU / Hardswish / GELU / Sigmoid / Tanh / LeakyReLU in ONNX Runtime: how to quantize the block.

ONNX Runtime fuses ``DQ -> Conv -> Q`` into QLinearConv only when a QuantizeLinear follows the
conv; behind these activations none does, unless the conv gets an output quantizer.  Per
activation, on the same float model, calibration data and input, every number measured on
the exported file in ONNX Runtime's CPU provider (1 intra-op thread):

* FP32: the float model (``torch.onnx.export``, opset 19).
* conv float: ``lowbit.quantize`` with the convs' output quantizers removed again (what lowbit
  did before ``lowbit.passes.activations``): ``DQ -> float Conv -> activation -> Q``.
* output Q (lowbit): ``lowbit.quantize`` and ``export_onnx`` as they are: ``DQ -> Conv -> Q``
  (QLinearConv) ``-> DQ -> activation -> Q``.  ORT runs Sigmoid / LeakyRelu there as
  QLinearSigmoid / QLinearLeakyRelu by itself; export writes SiLU as ORT's ``QuickGelu`` and GELU
  as ``Gelu`` (``lowbit.export._activations``: the fusions ORT makes on float inputs, which the
  DQ in front stops).
* output Q, activation as traced: the same model and file without that rewrite (SiLU as
  ``Sigmoid -> Mul``, GELU as the Erf formula: five float ops).
* GELU, output Q, opset 20: exported at opset 20, where the exporter writes the ONNX ``Gelu`` op.
* SiLU, QLinearSigmoid + QLinearMul: ``x * sigmoid(x)`` with ``x`` and ``sigmoid(x)`` quantized
  (two QuantStubs): the whole block in integers, one more rounding (the sigmoid's).

Model: ``--blocks`` x [Conv2d(C, C, 3, padding=1) -> activation] at ``--size`` x ``--size``; its
output is the last activation's feature map.  Random weights (torch's default init), calibration
on 2 batches of 2 normal-noise inputs, evaluation on 4 others.

Fidelity, on the output feature map: SQNR against FP32 in dB (higher is better), for ORT and for
the simulation (``qmodel(x)``); the largest |ORT - simulation| relative to the largest |FP32 output|
(0 up to float rounding where the simulation models every rounding the file does); and the share
of output elements where ORT and the simulation differ by more than 1e-6 of that maximum.
Latency: median ms of one ``session.run``; the variants' timed runs are interleaved in rounds
(rotating order) so load from other processes falls on all alike; "x FP32" divides by the FP32
median of the same activation and batch.

    .venv/bin/python benchmarks/bench_activations.py [--channels 64] [--size 56] [--blocks 4]
        [--batches 1 8] [--rounds 7] [--activations SiLU Hardswish GELU Sigmoid Tanh LeakyReLU]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import _machine  # benchmarks/_machine.py (the script's folder is on sys.path)
import torch
from torch import nn

import lowbit
from lowbit.export import _activations
from lowbit.nn.modules import QuantStub, TensorQuant, is_quantized
from lowbit.numerics import UINT8_ACTIVATION
from lowbit.runtime.ort import OrtModel

log = logging.getLogger("bench_activations")

ACTIVATIONS = ("SiLU", "Hardswish", "GELU", "Sigmoid", "Tanh", "LeakyReLU")


class SplitSiLU(nn.Module):
    """SiLU as ``x * sigmoid(x)`` with both factors quantized: QLinearSigmoid + QLinearMul in ORT."""

    def __init__(self) -> None:
        super().__init__()
        tq = TensorQuant(spec=UINT8_ACTIVATION, observer="mse")  # as w8a8's activations
        self.x = QuantStub(tq, name="silu.x")
        self.gate = QuantStub(tq, name="silu.gate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.x(x)
        return x * self.gate(torch.sigmoid(x))


def stack(activation, channels: int, blocks: int) -> nn.Module:
    layers = []
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), activation()]
    return nn.Sequential(*layers).eval()


def strip_output_quantizers(qmodel: nn.Module) -> int:
    """Remove the output quantizers ``lowbit.passes.activations`` gave (the behaviour before it)."""
    stripped = 0
    for m in qmodel.modules():
        if is_quantized(m) and m.output_quantizer is not None:
            del m.output_quantizer
            m.output_quantizer = None
            stripped += 1
    return stripped


@contextlib.contextmanager
def unfused_activations():
    """Export without ``lowbit.export._activations`` (SiLU / GELU left as the exporter traced them)."""
    original = _activations.fuse_dq_activations
    _activations.fuse_dq_activations = lambda g: 0
    try:
        yield
    finally:
        _activations.fuse_dq_activations = original


@dataclass
class Variant:
    activation: str
    name: str
    path: str
    sim: torch.Tensor | None  # the simulation's logits on the evaluation input (None for FP32)
    kernels: str = ""
    ms: dict[int, list[float]] = field(default_factory=dict)  # batch -> per-round medians
    ort: torch.Tensor | None = None


def conv_kernels(path: str) -> str:
    """The ORT kernels that run the convs and the activations (data movement left out)."""
    counts = lowbit.inspect_onnx(path).op_counts
    shown = [f"{op} x{n}" for op, n in counts.items()
             if op not in ("QuantizeLinear", "DequantizeLinear", "Transpose", "Flatten", "ReorderInput",
                           "ReorderOutput", "QGemm", "Gemm", "QLinearGlobalAveragePool", "GlobalAveragePool")]
    return ", ".join(shown)


def build(activation: str, args, folder: str, calib, x_eval) -> list[Variant]:
    act = getattr(nn, activation)
    torch.manual_seed(0)
    model = stack(act, args.channels, args.blocks)
    example = x_eval[:1]
    out = []
    fp32 = os.path.join(folder, f"{activation}_fp32.onnx")
    torch.onnx.export(model, (example,), fp32, dynamo=False, opset_version=19, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    out.append(Variant(activation, "FP32", fp32, None))

    with torch.no_grad():
        qmodel = lowbit.quantize(model, calib, "w8a8", progress=False)
        path = os.path.join(folder, f"{activation}_outq.onnx")
        lowbit.export_onnx(qmodel, path, example)
        out.append(Variant(activation, "output Q (lowbit)", path, qmodel(x_eval)))
        if activation in ("SiLU", "GELU"):
            traced = os.path.join(folder, f"{activation}_outq_traced.onnx")
            with unfused_activations():
                lowbit.export_onnx(qmodel, traced, example)
            out.append(Variant(activation, "output Q, activation as traced", traced, qmodel(x_eval)))
        if activation == "GELU":
            path20 = os.path.join(folder, f"{activation}_outq20.onnx")
            lowbit.export_onnx(qmodel, path20, example, opset=20)
            out.append(Variant(activation, "output Q, opset 20", path20, qmodel(x_eval)))
        if activation == "SiLU":
            split_float = stack(SplitSiLU, args.channels, args.blocks)
            split_float.load_state_dict(model.state_dict(), strict=False)  # same weights; stubs uncalibrated
            split = lowbit.quantize(split_float, calib, "w8a8", progress=False)
            path_b = os.path.join(folder, f"{activation}_split.onnx")
            lowbit.export_onnx(split, path_b, example)
            out.append(Variant(activation, "QLinearSigmoid + QLinearMul", path_b, split(x_eval)))
        stripped = strip_output_quantizers(qmodel)
        if stripped != args.blocks:
            raise RuntimeError(f"{activation}: expected {args.blocks} output quantizers, found {stripped}")
        path_c = os.path.join(folder, f"{activation}_convfloat.onnx")
        lowbit.export_onnx(qmodel, path_c, example)
        out.append(Variant(activation, "conv float (before)", path_c, qmodel(x_eval)))
    for v in out:
        v.kernels = conv_kernels(v.path)
        v.ort = OrtModel(v.path, threads=1)(x_eval)
    return out, model(x_eval).detach()


def interleaved(variants: list[Variant], batches: list[int], rounds: int, seconds: float) -> None:
    """Per batch: ``rounds`` rounds, each running every variant for about ``seconds`` (rotating order)."""
    sessions = {v.path: OrtModel(v.path, threads=1) for v in variants}
    for batch in batches:
        feeds = {"input": torch.randn(batch, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(4)).numpy()}
        counts = {}
        for v in variants:  # warm-up, and how many runs fill ``seconds``
            s = sessions[v.path]
            s.run(feeds)
            start = time.perf_counter()
            s.run(feeds)
            counts[v.path] = max(1, round(seconds / max(time.perf_counter() - start, 1e-6)))
            v.ms[batch] = []
        for r in range(rounds):
            for k in range(len(variants)):
                v = variants[(k + r) % len(variants)]
                s, times = sessions[v.path], []
                for _ in range(counts[v.path]):
                    start = time.perf_counter()
                    s.run(feeds)
                    times.append((time.perf_counter() - start) * 1e3)
                v.ms[batch].append(statistics.median(times))


INPUT_SHAPE: tuple[int, ...] = ()


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    noise = (x.double() - ref.double()).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.double().pow(2).sum() / noise))


def table(groups: list[tuple[list[Variant], torch.Tensor]], batches: list[int]) -> str:
    head = ["activation", "variant", "ORT kernels (convs, activations)"]
    for b in batches:
        head += [f"batch {b} ms", f"batch {b} x FP32"]
    head += ["SQNR ORT vs FP32 (dB)", "SQNR sim vs FP32 (dB)", "max abs(ORT - sim) / max abs(FP32)",
             "share ORT != sim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for variants, ref in groups:
        base = {b: statistics.median(variants[0].ms[b]) for b in batches}
        for v in variants:
            row = [v.activation, v.name, v.kernels or "-"]
            for b in batches:
                ms = statistics.median(v.ms[b])
                row += [f"{ms:.2f}", f"{ms / base[b]:.2f}"]
            row.append(f"{sqnr(ref, v.ort):.1f}" if v.sim is not None else "-")
            row.append(f"{sqnr(ref, v.sim):.1f}" if v.sim is not None else "-")
            if v.sim is None:
                row += ["-", "-"]
            else:
                gap = (v.ort - v.sim).abs() / ref.abs().max()
                row += [f"{float(gap.max()):.1e}", f"{float((gap > 1e-6).double().mean()):.1e}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    global INPUT_SHAPE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=0.1, help="timed run time per variant and round")
    p.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=ACTIVATIONS)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.onnx's legacy-exporter notice
    torch.set_num_threads(1)
    INPUT_SHAPE = (1, args.channels, args.size, args.size)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, *INPUT_SHAPE[1:], generator=gen) for _ in range(2)]
    x_eval = torch.randn(4, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(3))
    groups = []
    with tempfile.TemporaryDirectory(prefix="bench-activations-") as folder:
        for activation in args.activations:
            variants, ref = build(activation, args, folder, calib, x_eval)
            groups.append((variants, ref))
        interleaved([v for vs, _ in groups for v in vs], args.batches, args.rounds, args.seconds)
    info = _machine.machine(("torch", "onnxruntime"))
    print(f"CPU: {info['cpu']} ({info['cores']} cores); torch {info['torch']}, onnxruntime {info['onnxruntime']}, "
          f"1 intra-op thread; model {args.blocks} x [Conv2d({args.channels}, {args.channels}, 3) -> activation] at "
          f"{args.size}x{args.size}, w8a8; median of {args.rounds} interleaved rounds\n")
    print(table(groups, args.batches))


if __name__ == "__main__":
    main()
