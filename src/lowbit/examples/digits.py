"""Numerics-only example: quantize a small MLP trained here on scikit-learn's digits.

It uses the numerics and observers directly (no module swapping):
it trains a 3-layer MLP (FP32), then for each recipe calibrates activation ranges
on training images, fake-quantizes weights and activations, and measures test
accuracy, agreement with FP32 predictions and packed weight size.  Every figure
printed is measured in this run.

    python -m lowbit.examples.digits [--seed 0] [--epochs 40]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.numerics import (
    INT8_WEIGHT,
    UINT8_ACTIVATION,
    QuantSpec,
    compute_qparams,
    fake_quantize,
    tensor_minmax,
)
from lowbit.observers import make_observer

log = logging.getLogger("lowbit.demo")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str
    weight: QuantSpec
    activation: QuantSpec | None  # None: activations stay float
    calibrator: str = "minmax"


RECIPES = (
    Recipe(name="w8a8 min-max", weight=INT8_WEIGHT, activation=UINT8_ACTIVATION),
    Recipe(name="w8a8 percentile", weight=INT8_WEIGHT, activation=UINT8_ACTIVATION, calibrator="percentile"),
    Recipe(name="w8a8 mse", weight=INT8_WEIGHT, activation=UINT8_ACTIVATION, calibrator="mse"),
    Recipe(name="w8a8 entropy", weight=INT8_WEIGHT, activation=UINT8_ACTIVATION, calibrator="entropy"),
    Recipe(name="w4a16 per-channel", weight=QuantSpec(bits=4, granularity="channel", axis=0), activation=None),
    Recipe(name="w4a16 group-16", weight=QuantSpec(bits=4, granularity="group", axis=1, group_size=16),
           activation=None),
    Recipe(name="w2a16 per-channel", weight=QuantSpec(bits=2, granularity="channel", axis=0), activation=None),
    Recipe(name="w8a4 mse", weight=INT8_WEIGHT,
           activation=QuantSpec(bits=4, signed=False, symmetric=False), calibrator="mse"),
)


def load_digits(seed: int):
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # pixel intensities 0..16 -> 0..1
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.7 * len(x))
    train, test = perm[:n_train], perm[n_train:]
    return (x[train], y[train]), (x[test], y[test])


def train_mlp(x, y, epochs: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def calibrate(model: nn.Sequential, recipe: Recipe, batches) -> list:
    """Observe each Linear's input; return one (scale, zero_point) per Linear, or None."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    if recipe.activation is None:
        return [None] * len(linears)
    observers = [make_observer(recipe.calibrator, recipe.activation, name=f"linear{i}.input")
                 for i in range(len(linears))]
    def observe_input(obs):
        def hook(_module, args):
            obs(args[0])

        return hook

    hooks = [lin.register_forward_pre_hook(observe_input(obs)) for lin, obs in zip(linears, observers)]
    with torch.no_grad():
        for xb in batches:
            model(xb)
    for h in hooks:
        h.remove()
    return [obs.qparams() for obs in observers]


def quantized_forward(model: nn.Sequential, recipe: Recipe, act_qparams: list, x: torch.Tensor) -> torch.Tensor:
    linears = iter(zip((m for m in model if isinstance(m, nn.Linear)), act_qparams))
    for layer in model:
        if isinstance(layer, nn.Linear):
            lin, qp = next(linears)
            w = lin.weight
            ws, wz = compute_qparams(*tensor_minmax(w, recipe.weight), recipe.weight)
            w = fake_quantize(w, ws, wz, recipe.weight)
            if qp is not None:
                x = fake_quantize(x, qp[0], qp[1], recipe.activation)
            x = F.linear(x, w, lin.bias)
        else:
            x = layer(x)
    return x


def packed_weight_bytes(model: nn.Sequential, spec: QuantSpec | None) -> int:
    """Bytes to store the Linear weights: packed integers + float32 scales (+ zero-points)."""
    total = 0
    for lin in (m for m in model if isinstance(m, nn.Linear)):
        w = lin.weight
        if spec is None:
            total += w.numel() * 4
            continue
        n_params = math.prod(spec.param_shape(w.shape))
        total += math.ceil(w.numel() * spec.bits / 8) + n_params * 4 + (0 if spec.symmetric else n_params)
    return total


def run(seed: int, epochs: int) -> list[dict]:
    (xtr, ytr), (xte, yte) = load_digits(seed)
    start = time.perf_counter()
    model = train_mlp(xtr, ytr, epochs, seed)
    log.info("trained FP32 MLP in %.1f s", time.perf_counter() - start)
    calib = list(xtr[:512].split(64))  # 8 calibration batches of training images
    with torch.no_grad():
        ref = model(xte)
        rows = [{"recipe": "fp32", "accuracy": (ref.argmax(1) == yte).float().mean().item(), "agreement": 1.0,
                 "bytes": packed_weight_bytes(model, None), "calib_s": 0.0}]
        for recipe in RECIPES:
            start = time.perf_counter()
            act_qparams = calibrate(model, recipe, calib)
            calib_s = time.perf_counter() - start
            out = quantized_forward(model, recipe, act_qparams, xte)
            rows.append({
                "recipe": recipe.name,
                "accuracy": (out.argmax(1) == yte).float().mean().item(),
                "agreement": (out.argmax(1) == ref.argmax(1)).float().mean().item(),
                "bytes": packed_weight_bytes(model, recipe.weight),
                "calib_s": calib_s,
            })
    return rows


def format_table(rows: list[dict], n_test: int) -> str:
    fp32 = rows[0]
    lines = [
        f"MLP 64-256-128-10 on scikit-learn digits, {n_test} test images, fake-quant simulation in PyTorch",
        "| recipe | top-1 acc | drop vs fp32 | top-1 agreement with fp32 | weights (bytes) | size vs fp32 | calib s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {100 * r['accuracy']:.2f}% | {100 * (fp32['accuracy'] - r['accuracy']):+.2f} pt "
            f"| {100 * r['agreement']:.2f}% | {r['bytes']:,} | {r['bytes'] / fp32['bytes']:.3f}x | {r['calib_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="lowbit demo on scikit-learn digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = run(args.seed, args.epochs)
    n_test = len(load_digits(args.seed)[1][1])
    print(format_table(rows, n_test))


if __name__ == "__main__":
    main()
