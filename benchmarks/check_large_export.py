"""A real quantized model over 2 GiB: export it (ONNX external data) and run it in ONNX Runtime.

Builds a stack of ``--layers`` Linear(``--width``, ``--width``) layers (default 33 x 8192^2: 2.06 GiB
of int8 weights, 8.25 GiB of float32 ones), quantizes it weight-only per channel (``"w8"``),
exports it with ``lowbit.export_onnx`` (``model.onnx`` + ``model.onnx.data``), loads the file in
ONNX Runtime (its default optimization, and level "basic") and compares the output with the
simulation.  Prints the time and the peak resident
memory of each step (sampled from /proc every 20 ms) and the machine.

    python benchmarks/check_large_export.py [--layers 33] [--width 8192] [--out DIR] [--inspect]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import torch
from _machine import machine
from torch import nn

import lowbit
from lowbit.export import inspect_onnx
from lowbit.runtime.ort import OrtModel

GIB = 2**30


class PeakRSS:
    """Peak resident memory of this process within a ``with`` block (sampled every 20 ms)."""

    def __enter__(self) -> Self:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _step(results: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    with PeakRSS() as rss:
        value = fn(*args, **kwargs)
    results[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(rss.peak / GIB, 2)}
    print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    return value


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    stack = []
    for _ in range(layers):
        layer = nn.Linear(width, width, bias=False)
        nn.init.normal_(layer.weight, std=width**-0.5)  # keeps activations O(1) through the stack
        stack.append(layer)
    return nn.Sequential(*stack).eval()


def run(layers: int, width: int, out: Path, inspect: bool) -> dict:
    results: dict = {"machine": machine(["torch", "onnx", "onnxruntime"]), "layers": layers, "width": width,
                     "int8_weight_gib": round(layers * width * width / GIB, 3)}
    x = torch.randn(2, width)
    model = _step(results, "build float model", _model, layers, width)
    # in place: a copy would hold the float weights twice
    qmodel = _step(results, "quantize (w8)", lowbit.quantize, model, [x], "w8", progress=False, inplace=True)
    with torch.no_grad():
        simulated = _step(results, "simulate", qmodel, x)
    path = out / "model.onnx"
    _step(results, "export_onnx", lowbit.export_onnx, qmodel, path, x[:1])
    results["files_gib"] = {p.name: round(p.stat().st_size / GIB, 3) for p in sorted(out.iterdir())}
    del model, qmodel
    gc.collect()
    results["max_abs_output"] = float(simulated.abs().max())
    # ORT's default level turns DQ -> MatMul into MatMulNBits (int8 activations); "basic" keeps
    # DQ -> float MatMul, the simulation's arithmetic.
    for level in ("all", "basic"):
        ort_model = _step(results, f"ORT session ({level})", OrtModel, path, optimization=level)
        got = _step(results, f"ORT run ({level}, batch 2)", ort_model, x)
        results[f"max_abs_diff_vs_simulation ({level})"] = float((got - simulated).abs().max())
        del ort_model
        gc.collect()
    if inspect:
        report = _step(results, "inspect_onnx", inspect_onnx, path)
        results["ort_kernels"] = report.op_counts
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=33)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--out", type=Path, help="folder for the files (default: a temporary one, removed)")
    parser.add_argument("--inspect", action="store_true", help="also run inspect_onnx (ORT writes the graph again)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lowbit-large-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        results = run(args.layers, args.width, out, args.inspect)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
