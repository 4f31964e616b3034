"""Quantization-aware training: where PTQ fails and QAT recovers, and what a QAT step costs.

Four parts (``--only`` picks one or more); every number printed is measured by this run:

* ``cnn`` (alias ``digits``): a compact depthwise-separable CNN (9.8 k parameters) that tells which of
  the 17 bundled photos a 32x32 patch was cut from, test patches from a part of each photo never
  seen in training (``lowbit.zoo.photo_patches``).  (The digits alone proved too easy: 4-bit PTQ
  cost a well-trained digits CNN less than 3 points.)  Per seed: train FP32, then at
  W4A4 and W4A8 compare PTQ (``lowbit.quantize`` with the same config: its default, and the best
  of six PTQ recipes chosen on held-out training views) against QAT (``lowbit.prepare_qat``,
  learn = ``lsq`` / ``lsq+`` / None, fine-tuned in the plain loop below) and against FP32
  fine-tuned for the same extra epochs (a control: does QAT only win by training longer?).
  Each QAT model is converted (``lowbit.qat.convert``), exported to ONNX and run in ONNX
  Runtime on the same test set: top-1 agreement and max logit difference with the simulation.
* ``minilm``: all-MiniLM-L6-v2 + a linear head fine-tuned end to end to tell which part of the
  standard library a docstring sentence comes from (``lowbit.zoo.docstring_topics``, 6
  topics); PTQ vs QAT (LSQ, with distillation from the FP32 model) at W4A8 and W4A4.
* ``resnet``: ResNet-18 (``lowbit.zoo.resnet18``, 10 classes) trained briefly on the digits
  at 32x32, then W8A8 QAT; accuracy, ONNX size and ORT latency (``measure_latency``) of the
  FP32 and INT8 files.
* ``speed``: training-step time of ResNet-18 (batch 16, 112x112, SGD, train mode) under
  ``lowbit.prepare_qat`` (w8a8; learn None and lsq) and torch.ao's eager QAT (fbgemm qconfig,
  conv-bn-relu fused by ``fuse_modules_qat``), each over its FP32 step, interleaved in one
  process; ablations and a torch.profiler breakdown of where lowbit's extra time goes.

    python benchmarks/bench_qat.py                    # everything, 3 seeds, writes BENCHMARKS.md "## QAT"
    python benchmarks/bench_qat.py --quick            # smoke run (< 1 min), writes nothing
    python benchmarks/bench_qat.py --only cnn --seeds 0 1 2 [--json out.json] [--no-write]

The training loops here are plain PyTorch on purpose: QAT with lowbit is ``prepare_qat``, an
optimizer built afterwards (learned scales are Parameters), ``QATSchedule.step()`` after each
optimizer step, and ``convert`` / ``export_onnx`` at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import itertools
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import _machine
import numpy as np
import torch
import torch.nn.functional as F
from _selection import (
    TEXT_INPUTS,
    LastHidden,
    command,
    default_observer,
    log_to_stderr,
    parse,
    recipe,
    tokenize,
)
from torch import nn

import lowbit
from lowbit.qat import QATSchedule, convert, distillation_loss
from lowbit.runtime import OrtModel, measure_latency

log = logging.getLogger("bench_qat")
ROOT = Path(__file__).resolve().parents[1]
PARTS = ("cnn", "minilm", "resnet", "speed")
ALIASES = {"digits": "cnn"}


# -- shared helpers --------------------------------------------------------------------------------
def machine() -> dict:
    return _machine.machine(("torch", "onnxruntime", "onnx", "transformers", "scikit-learn"))


def machine_line(info: dict) -> str:
    shown = ("torch", "onnxruntime", "transformers", "scikit-learn", "lowbit")
    return _machine.machine_line(info, shown, threads=True)


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return "n/a"


def table(headers: Sequence[str], rows: Sequence[Sequence], right: Sequence[bool] | None = None) -> str:
    right = right or [i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    vals = [scale * v for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int, warmup: int = 0):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def file_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def quiet_export(model: nn.Module, path: Path, example, **kwargs) -> None:
    """export_onnx without the per-tensor advice for sub-8-bit activation grids (reported once
    in the tables' notes instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.export_onnx(model, path, example, **kwargs)


def kernel_share(path: Path) -> str:
    report = lowbit.inspect_onnx(path)
    text = str(report)
    m = re.search(r"(\d+)% of compute nodes in integers", text)
    return f"{m.group(1)}%" if m else "?"


# -- part 1: compact CNN, photo patches ------------------------------------------------------------------------------
def dscnn(widths: Sequence[int] = (16, 32, 64), num_classes: int = 17, in_channels: int = 3,
          stem_stride: int = 2) -> nn.Sequential:
    """Compact depthwise-separable CNN (MobileNet-v1 style): a 3x3 stem, one stride-2 depthwise-
    separable block per width step, one stride-1 block at the last width, global average pool,
    linear head.  Every conv is followed by BatchNorm and ReLU."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU()]
    for cin, cout in itertools.pairwise(widths):
        layers += block(cin, cout, 2)
    layers += block(widths[-1], widths[-1], 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
    return nn.Sequential(*layers)


@torch.no_grad()
def predict(model: Callable, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    if isinstance(model, nn.Module):
        model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


@dataclass
class CNNSettings:
    widths: tuple = (16, 32, 64)
    fp32_epochs: int = 30
    fp32_lr: float = 1e-2
    qat_epochs: int = 8
    qat_lr: float = 1e-3
    qparam_lr: float = 1e-4
    batch: int = 64
    n_calib: int = 256
    n_select: int = 1024
    learn: tuple = ("lsq", "lsq+", None)
    configs: tuple = ("w4a4", "w4a8")
    ptq_observers: tuple = ("mse", "percentile", "minmax")
    ptq_passes: tuple = ((False, False), (True, True))  # (equalize, bias_correction)
    distill: bool = False  # True adds a "lsq + distillation from FP32" QAT row


def train_step(model: nn.Module, inputs: tuple, y: torch.Tensor, opt, sched, qsched: QATSchedule | None,
               teacher: nn.Module | None) -> None:
    """One step of the user's loop: cross-entropy (mixed half and half with distillation from
    ``teacher`` when given), optimizer and lr-schedule step, then ``QATSchedule.step()``."""
    logits = model(*inputs)
    loss = F.cross_entropy(logits, y)
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(*inputs)
        loss = 0.5 * loss + 0.5 * distillation_loss(logits, t_logits, temperature=2.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if qsched is not None:
        qsched.step()


def train_images(model: nn.Module, task, epochs: int, lr: float, seed: int, *, batch: int,
                 qparam_lr: float | None = None, qat: bool = False, teacher: nn.Module | None = None) -> float:
    """The user's own loop: AdamW, cosine decay, fresh distortions every batch.  For a QAT model
    the BatchNorm statistics freeze for the last 30 % of the steps (QATSchedule).  Returns seconds."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(task.n_train / batch)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(lowbit.qat.param_groups(model, lr, weight_decay=1e-4, scale_lr=qparam_lr))
    sched = cosine_schedule(opt, total, warmup=0 if qat else steps_per_epoch)
    qsched = QATSchedule(model, freeze_bn_after=int(0.7 * total)) if qat else None
    if teacher is not None:
        teacher.eval()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(task.n_train, generator=gen).split(batch):
            x, y = task.train_batch(index, gen)
            train_step(model, (x,), y, opt, sched, qsched, teacher)
    model.eval()
    return time.perf_counter() - start


def learned_zero_points(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LSQ+ zero-points of ``model`` as the forward pass uses them (rounded, on the grid)."""
    from lowbit.nn.quantizer import Quantizer

    return {q.name: torch.round(q.zero_point.detach()).clamp(q.spec.qmin, q.spec.qmax)
            for q in model.modules() if isinstance(q, Quantizer) and q.learn == "lsq+"}


def calibration_views(task, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` fresh training-region views of ``task`` for calibration, in batches of 64."""
    x, _ = task.train_views(n, seed=20_000 + seed)
    return list(x.split(64))


ACCURACY_COLUMNS = ("method", "accuracy", "Δ vs FP32 (pts)", "per seed", "ORT accuracy",
                    "sim/ORT top-1 agreement (min)", "sim/ORT max abs logit diff")


def accuracy_row(name: str, accs: Sequence[float], fp32: Sequence[float], ort: Sequence[dict] | None = None) -> list[str]:
    """One row of an accuracy table (``ACCURACY_COLUMNS``): mean ± std over seeds, the change vs FP32
    per seed, and, for an exported model, its ORT accuracy and parity with the simulation."""
    delta = [a - f for a, f in zip(accs, fp32, strict=True)]
    cells = [name, mean_std(accs), mean_std(delta), " / ".join(pct(a) for a in accs)]
    if ort is None:
        return [*cells, "", "", ""]
    return [*cells, mean_std([o["ort_acc"] for o in ort]), f"{min(o['agreement'] for o in ort):.4f}",
            f"{max(o['max_abs_diff'] for o in ort):.1e}"]


def accuracy_table(cfg: str, runs: list[dict], fp32_name: str, qat_epochs: int, rows: list[tuple]) -> str:
    """The accuracy table of one config over seeds: FP32, the FP32 control fine-tuned ``qat_epochs``
    more epochs, then ``rows`` of (name, accuracy per seed, ORT parity per seed or None)."""
    fp32 = [r["fp32"] for r in runs]
    rows = [(fp32_name, fp32, None),
            (f"FP32 fine-tuned {qat_epochs} more epochs (control)", [r["fp32_ft"] for r in runs], None), *rows]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    return (f"**{cfg.upper()}** (seeds {seeds}; test accuracy in %)\n\n"
            + table(ACCURACY_COLUMNS, [accuracy_row(name, accs, fp32, ort) for name, accs, ort in rows]))


def ort_parity(sim_logits: torch.Tensor, ort_logits: torch.Tensor, y: torch.Tensor) -> dict:
    return {"ort_acc": accuracy(ort_logits, y),
            "agreement": float((sim_logits.argmax(1) == ort_logits.argmax(1)).float().mean()),
            "max_abs_diff": float((sim_logits - ort_logits).abs().max())}


def cnn_ptq(fp32: nn.Module, cfg_name: str, calib: list, task, select: tuple, s: CNNSettings) -> dict:
    """PTQ at ``cfg_name``: the default recipe, and the best of ``s``'s recipes on the selection set
    (held-out training views); every recipe's test accuracy too (the oracle)."""
    sx, sy = select
    trials = []
    for obs in s.ptq_observers:
        for equalize, bias_corr in s.ptq_passes:
            cfg = recipe(cfg_name, observer=obs)
            label = obs + (" + CLE + bias corr." if equalize else "")
            try:
                q = lowbit.quantize(fp32, calib, cfg, equalize=equalize, bias_correction=bias_corr, progress=False)
            except Exception as e:  # noqa: BLE001  (a recipe that fails is reported, not fatal)
                log.warning("PTQ %s %s failed: %s", cfg_name, label, e)
                trials.append({"recipe": label, "error": str(e)})
                continue
            trials.append({"recipe": label, "select": accuracy(predict(q, sx), sy),
                           "test": accuracy(predict(q, task.test_x), task.test_y)})
    ok = [t for t in trials if "error" not in t]
    best = max(ok, key=lambda t: t["select"])
    return {"ptq_trials": trials, "ptq_default": next(t["test"] for t in ok if t["recipe"] == s.ptq_observers[0]),
            "ptq_selected": best["test"], "ptq_selected_recipe": best["recipe"],
            "ptq_oracle": max(t["test"] for t in ok)}


def cnn_qat(fp32: nn.Module, cfg_name: str, calib: list, task, variant: tuple, seed: int, s: CNNSettings,
            path: Path) -> dict:
    """One QAT run (``variant`` = (label, learn, distill)), converted, exported to ``path`` and run in ORT."""
    label, learn, kd = variant
    torch.manual_seed(seed)
    qmodel = lowbit.prepare_qat(fp32, cfg_name, calib, learn=learn, progress=False)
    zp_before = learned_zero_points(qmodel)
    secs = train_images(qmodel, task, s.qat_epochs, s.qat_lr, seed + 100, batch=s.batch,
                        qparam_lr=s.qparam_lr, qat=True, teacher=fp32 if kd else None)
    zp_after = learned_zero_points(qmodel)
    sim = convert(qmodel)
    sim_logits = predict(sim, task.test_x)
    quiet_export(sim, path, task.test_x[:1])
    ort_logits = OrtModel(path)(task.test_x)
    entry = {"acc": accuracy(sim_logits, task.test_y), "train_s": secs,
             **ort_parity(sim_logits, ort_logits, task.test_y)}
    if label == "lsq":
        entry["int_kernels"] = kernel_share(path)
    if zp_before:  # LSQ+: how many learned zero-points moved by a whole grid step
        entry["zero_points_moved"] = [sum(not torch.equal(zp_before[k], zp_after[k]) for k in zp_before),
                                      len(zp_before)]
    log.info("cnn seed %d %s QAT %s: %.1f%% (ORT %.1f%%, agreement %.4f; %.0f s)", seed, cfg_name,
             label, 100 * entry["acc"], 100 * entry["ort_acc"], entry["agreement"], secs)
    return entry


def cnn_seed(seed: int, s: CNNSettings, tmp: Path) -> dict:
    from lowbit.zoo.photo_patches import PhotoPatchTask

    t0 = time.perf_counter()
    task = PhotoPatchTask(size=32, seed=seed)
    torch.manual_seed(seed)
    fp32 = dscnn(s.widths)
    train_s = train_images(fp32, task, s.fp32_epochs, s.fp32_lr, seed, batch=s.batch)
    res: dict = {"seed": seed, "n_test": len(task.test_y), "n_train": task.n_train,
                 "params": sum(p.numel() for p in fp32.parameters()), "fp32_train_s": train_s}
    res["fp32"] = accuracy(predict(fp32, task.test_x), task.test_y)
    log.info("cnn seed %d: FP32 %.1f%% (%.0f s)", seed, 100 * res["fp32"], train_s)
    # Control: FP32 fine-tuned with the QAT recipe (same epochs, lr, seed), no quantization.
    ctrl = copy.deepcopy(fp32)
    train_images(ctrl, task, s.qat_epochs, s.qat_lr, seed + 100, batch=s.batch)
    res["fp32_ft"] = accuracy(predict(ctrl, task.test_x), task.test_y)

    calib = calibration_views(task, s.n_calib, seed)
    select = task.train_views(s.n_select, seed=30_000 + seed)
    variants = [(str(learn), learn, False) for learn in s.learn] + ([("lsq+KD", "lsq", True)] if s.distill else [])
    for cfg_name in s.configs:
        r = cnn_ptq(fp32, cfg_name, calib, task, select, s)
        r["qat"] = {v[0]: cnn_qat(fp32, cfg_name, calib, task, v, seed, s, tmp / f"cnn_{cfg_name}_{v[0]}_{seed}.onnx")
                    for v in variants}
        log.info("cnn seed %d %s: PTQ default %.1f%%, selected %.1f%% (%s)", seed, cfg_name,
                 100 * r["ptq_default"], 100 * r["ptq_selected"], r["ptq_selected_recipe"])
        res[cfg_name] = r
    res["wall_s"] = time.perf_counter() - t0
    return res


def cnn_markdown(runs: list[dict], s: CNNSettings) -> str:
    out = []
    for cfg in s.configs:
        rows = [(f"PTQ `lowbit.quantize(..., '{cfg}')` (default: mse)",
                 [r[cfg]["ptq_default"] for r in runs], None),
                ("PTQ, best of 6 recipes on held-out training views", [r[cfg]["ptq_selected"] for r in runs], None)]
        for label in runs[0][cfg]["qat"]:
            name = {"lsq+KD": "QAT learn='lsq' + distillation from FP32"}.get(label, f"QAT learn={label!r}"
                                                                           if label != "None" else "QAT learn=None")
            entries = [r[cfg]["qat"][label] for r in runs]
            rows.append((name, [e["acc"] for e in entries], entries))
        out.append(accuracy_table(cfg, runs, "FP32", s.qat_epochs, rows))
        moved = [r[cfg]["qat"].get("lsq+", {}).get("zero_points_moved") for r in runs]
        if all(moved):
            out.append("LSQ+ zero-points that moved by at least one grid step during QAT: "
                       + "; ".join(f"seed {r['seed']}: {m[0]} of {m[1]}" for r, m in zip(runs, moved, strict=True))
                       + " (after a ReLU a range starts at 0 and only clipping at its top pulls the offset; "
                       "LSQ+ is meant for activations that go negative, such as Swish or GELU outputs).")
        picks = "; ".join(f"seed {r['seed']}: {r[cfg]['ptq_selected_recipe']} (oracle best on test "
                          f"{pct(r[cfg]['ptq_oracle'])})" for r in runs)
        out.append(f"PTQ recipe chosen on the selection set: {picks}.")
    return "\n\n".join(out)


def cnn_targets(runs: list[dict], s: CNNSettings) -> str:
    lines = []
    fp32 = statistics.fmean(r["fp32"] for r in runs)
    for cfg in s.configs:
        ptq = statistics.fmean(r[cfg]["ptq_selected"] for r in runs)
        ptq_d = statistics.fmean(r[cfg]["ptq_default"] for r in runs)
        def verdict(drop: float) -> str:
            return "> 3 pts, as expected" if drop > 0.03 else "NOT > 3 pts"

        lines.append(f"- {cfg.upper()}: PTQ drop {100 * (fp32 - ptq_d):.1f} pts with the default recipe "
                     f"({verdict(fp32 - ptq_d)}), {100 * (fp32 - ptq):.1f} pts with the best recipe selected on "
                     f"held-out training views ({verdict(fp32 - ptq)}).")
        for label in runs[0][cfg]["qat"]:
            q = statistics.fmean(r[cfg]["qat"][label]["acc"] for r in runs)
            agree = min(r[cfg]["qat"][label]["agreement"] for r in runs)
            ok = "met" if fp32 - q <= 0.01 else "missed"
            lines.append(f"  - QAT {label}: {100 * (q - fp32):+.1f} pts vs FP32 (target within 1 pt: {ok}); "
                         f"ORT vs simulation top-1 agreement {agree:.4f}")
    return "\n".join(lines)


def run_cnn(args, tmp: Path) -> tuple[str, dict]:
    s = CNNSettings()
    if args.quick:
        s = CNNSettings(fp32_epochs=2, qat_epochs=1, n_select=256, learn=("lsq",), configs=("w4a4",),
                           ptq_observers=("mse",), ptq_passes=((False, False),), distill=False)
    runs = []
    for seed in args.seeds:
        runs.append(cnn_seed(seed, s, tmp))
    t = runs[0]
    kernels = "; ".join(f"{c.upper()} {t[c]['qat']['lsq'].get('int_kernels', '?')}" for c in s.configs
                        if "lsq" in t[c]["qat"])
    md = [
        "### Compact depthwise-separable CNN (photo patches), W4A4 and W4A8",
        "",
        f"`{args.command}` ({args.date}; load average at the start {args.load_start})",
        "",
        args.machine_line,
        "",
        (f"Task (`lowbit.zoo.photo_patches`): which of the 17 photos bundled with scikit-image / scikit-learn "
        f"a square patch (32-96 px, resized to 32x32) was cut from; training patches (a bank of "
        f"{t['n_train']}, random flips) come from the left 70 % of each photo, the {t['n_test']} test "
        f"patches from the right 30 %, so no test pixel is seen in training. Model: `dscnn({s.widths})` in this "
        f"file, {t['params']} parameters (3x3 stride-2 stem, depthwise-separable blocks "
        f"{'→'.join(map(str, (*s.widths, s.widths[-1])))}, "
        f"BatchNorm + ReLU after every conv, linear head). Configs are lowbit's presets: 4-bit weights "
        f"(and, for W4A4, activations) in every layer but the first and the last, which stay W8A8 "
        f"(rules `@first` / `@last`). FP32: {s.fp32_epochs} epochs AdamW (lr "
        f"{s.fp32_lr}, cosine). PTQ calibrates on {s.n_calib} fresh training-region patches; the 'best of "
        f"6' row picks among activation observers {'/'.join(s.ptq_observers)} × (plain, cross-layer "
        f"equalization + bias correction) by accuracy on {s.n_select} other training-region patches "
        f"(never the test set). QAT starts from the FP32 model, activation ranges calibrated on the same "
        f"{s.n_calib} patches, conv-BN trained folded, {s.qat_epochs} epochs AdamW (lr {s.qat_lr}; "
        f"learned quantizer scales lr {s.qparam_lr}, no weight decay; cosine), BatchNorm frozen after "
        f"70 % of the steps (`QATSchedule`). Seeds change the training bank, test patches, "
        f"initialisation and batch order. ORT columns: the QAT model after `lowbit.qat.convert`, "
        f"exported with `lowbit.export_onnx`, run by ONNX Runtime on the same test set, compared with the "
        f"converted model's PyTorch forward."),
        "",
        cnn_markdown(runs, s),
        "",
        "Targets:",
        cnn_targets(runs, s),
        "",
        ("- W4A4 files: ONNX Runtime has no 4-bit activation kernels; export clips each 4-bit activation "
        "before its QuantizeLinear, so the numbers are exact but those convs run in float there "
        f"(integer share of ORT compute nodes, QAT lsq: {kernels})."),
        "- wall time: " + ", ".join(f"seed {r['seed']} {r['wall_s']:.0f} s" for r in runs)
        + " (FP32 training " + ", ".join(f"{r['fp32_train_s']:.0f}" for r in runs) + " s; one QAT run "
        + f"{statistics.median(e['train_s'] for r in runs for c in s.configs for e in r[c]['qat'].values()):.0f}"
        + " s median).",
    ]
    return "\n".join(md) + "\n", {"settings": s.__dict__ | {"learn": [str(v) for v in s.learn]}, "runs": runs}



# -- part 2: MiniLM topic classifier ------------------------------------------------------------
class TopicClassifier(LastHidden):
    """all-MiniLM-L6-v2 (positional inputs, as bench_ptq runs it), mean pooling over the attention
    mask, a linear head."""

    def __init__(self, bert: nn.Module, num_classes: int):
        super().__init__(bert)
        self.head = nn.Linear(bert.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask, token_type_ids):
        from lowbit.zoo.minilm import mean_pool

        return self.head(mean_pool(super().forward(input_ids, attention_mask, token_type_ids), attention_mask))


@dataclass
class MiniLMSettings:
    train_per_topic: int = 80
    test_per_topic: int = 50
    seq_len: int = 48  # evaluation batches are padded / truncated to this many word pieces
    batch: int = 16
    fp32_epochs: int = 4
    fp32_lr: float = 5e-5
    head_lr: float = 1e-3
    qat_epochs: int = 4
    qat_lr: float = 3e-5
    qat_head_lr: float = 1e-4
    qparam_lr: float = 1e-3
    n_calib: int = 64
    configs: tuple = ("w4a8", "w4a4")
    ptq_observers: tuple = ("mse",)
    weight_observer: str | None = None  # None: the preset's (mse for int4); --quick uses minmax (fast)
    distill: bool = True

    def config(self, name: str, observer: str | None = None):
        return recipe(name, observer=observer, weight_observer=self.weight_observer)


def _tokenize(tokenizer, texts: list[str], seq_len: int, fixed: bool) -> tuple[torch.Tensor, ...]:
    return tuple(tokenize(tokenizer, texts, seq_len, fixed).values())


def train_text(model: nn.Module, tokenizer, texts: list[str], labels: torch.Tensor, s: MiniLMSettings, *,
               epochs: int, lr: float, head_lr: float, seed: int, qparam_lr: float | None = None,
               qat: bool = False, teacher: nn.Module | None = None) -> float:
    """AdamW (higher lr for the new head), linear warm-up then cosine; batches padded to their
    longest sentence.  Returns seconds."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    steps_per_epoch = math.ceil(len(texts) / s.batch)
    total = epochs * steps_per_epoch
    # lowbit's groups (no decay on learned ranges), each split so the new head trains at its own lr
    head = {id(p) for name, p in model.head.named_parameters() if "_quantizer." not in name}
    groups = []
    for g in lowbit.qat.param_groups(model, lr, weight_decay=0.01, scale_lr=qparam_lr):
        body = [p for p in g["params"] if id(p) not in head]
        mine = [p for p in g["params"] if id(p) in head]
        groups += [{**g, "params": body}] if body else []
        groups += [{**g, "params": mine, "lr": head_lr}] if mine else []
    opt = torch.optim.AdamW(groups)
    sched = cosine_schedule(opt, total, warmup=max(1, total // 10))
    qsched = QATSchedule(model) if qat else None
    if teacher is not None:
        teacher.eval()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(texts), generator=gen).split(s.batch):
            inputs = _tokenize(tokenizer, [texts[i] for i in index], s.seq_len, fixed=False)
            train_step(model, inputs, labels[index], opt, sched, qsched, teacher)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def predict_text(model: Callable, batches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    if isinstance(model, nn.Module):
        model.eval()
    return torch.cat([model(*b) for b in batches])


def minilm_seed(seed: int, s: MiniLMSettings, bert0: nn.Module, tokenizer, tmp: Path) -> dict:
    from lowbit.zoo.docstring_topics import topic_sentences

    t0 = time.perf_counter()
    texts, labels = topic_sentences(per_topic=s.train_per_topic + s.test_per_topic, seed=seed)
    seen: dict[int, int] = {}
    train_i, test_i = [], []
    for i, label in enumerate(labels):  # stratified: the first train_per_topic of each topic train
        seen[label] = seen.get(label, 0) + 1
        (train_i if seen[label] <= s.train_per_topic else test_i).append(i)
    tr_texts, tr_y = [texts[i] for i in train_i], torch.tensor([labels[i] for i in train_i])
    te_texts, te_y = [texts[i] for i in test_i], torch.tensor([labels[i] for i in test_i])
    test_batches = [_tokenize(tokenizer, te_texts[i:i + 32], s.seq_len, fixed=True)
                    for i in range(0, len(te_texts), 32)]
    calib = [_tokenize(tokenizer, tr_texts[i:i + s.batch], s.seq_len, fixed=True)
             for i in range(0, min(s.n_calib, len(tr_texts)), s.batch)]
    torch.manual_seed(seed)
    fp32 = TopicClassifier(copy.deepcopy(bert0), 6)
    res: dict = {"seed": seed, "n_train": len(tr_texts), "n_test": len(te_texts)}
    res["fp32_train_s"] = train_text(fp32, tokenizer, tr_texts, tr_y, s, epochs=s.fp32_epochs, lr=s.fp32_lr,
                                     head_lr=s.head_lr, seed=seed)
    res["fp32"] = accuracy(predict_text(fp32, test_batches), te_y)
    log.info("minilm seed %d: FP32 %.1f%% (%.0f s)", seed, 100 * res["fp32"], res["fp32_train_s"])
    ctrl = copy.deepcopy(fp32)
    train_text(ctrl, tokenizer, tr_texts, tr_y, s, epochs=s.qat_epochs, lr=s.qat_lr, head_lr=s.qat_head_lr,
               seed=seed + 100)
    res["fp32_ft"] = accuracy(predict_text(ctrl, test_batches), te_y)
    del ctrl
    for cfg_name in s.configs:
        r: dict = {"ptq": {}}
        for obs in s.ptq_observers:
            q = lowbit.quantize(fp32, calib, s.config(cfg_name, obs), progress=False)
            r["ptq"][obs] = accuracy(predict_text(q, test_batches), te_y)
            del q
        torch.manual_seed(seed)
        qmodel = lowbit.prepare_qat(fp32, s.config(cfg_name), calib, learn="lsq", progress=False)
        secs = train_text(qmodel, tokenizer, tr_texts, tr_y, s, epochs=s.qat_epochs, lr=s.qat_lr,
                          head_lr=s.qat_head_lr, qparam_lr=s.qparam_lr, seed=seed + 100, qat=True,
                          teacher=fp32 if s.distill else None)
        sim = convert(qmodel)
        del qmodel
        sim_logits = predict_text(sim, test_batches)
        path = tmp / f"minilm_{cfg_name}_{seed}.onnx"
        quiet_export(sim, path, test_batches[0], input_names=list(TEXT_INPUTS), output_names=["logits"])
        ort = OrtModel(path, threads=torch.get_num_threads())
        ort_logits = torch.cat([ort(*b) for b in test_batches])
        r["qat"] = {"acc": accuracy(sim_logits, te_y), "train_s": secs, "mb": file_mb(path),
                    **ort_parity(sim_logits, ort_logits, te_y)}
        path.unlink()
        log.info("minilm seed %d %s: PTQ %s, QAT %.1f%% (ORT %.1f%%, agreement %.4f; %.0f s)", seed, cfg_name,
                 ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["ptq"].items()), 100 * r["qat"]["acc"],
                 100 * r["qat"]["ort_acc"], r["qat"]["agreement"], secs)
        res[cfg_name] = r
    res["wall_s"] = time.perf_counter() - t0
    return res


def minilm_tables(runs: list[dict], s: MiniLMSettings) -> list[str]:
    """Per config: the accuracy table and the verdict against the 1-point target."""
    out = []
    for cfg in s.configs:
        rows = [(f"PTQ `lowbit.quantize(..., '{cfg}')`" + (f" (default: {obs})" if obs == default_observer(cfg) else
                                                           f" with {obs} activation ranges"),
                 [r[cfg]["ptq"][obs] for r in runs], None) for obs in s.ptq_observers]
        qat = [r[cfg]["qat"] for r in runs]
        rows.append(("QAT learn='lsq'" + (" + distillation from FP32" if s.distill else ""), [q["acc"] for q in qat],
                     qat))
        out.append(accuracy_table(cfg, runs, "FP32 (fine-tuned end to end)", s.qat_epochs, rows))
        f = statistics.fmean(r["fp32"] for r in runs)
        p = max(statistics.fmean(r[cfg]["ptq"][o] for r in runs) for o in s.ptq_observers)
        q = statistics.fmean(x["acc"] for x in qat)
        out.append(f"{cfg.upper()}: best PTQ {100 * (p - f):+.1f} pts, QAT {100 * (q - f):+.1f} pts vs FP32 "
                   f"(target within 1 pt: {'met' if f - q <= 0.01 else 'missed'}).")
    return out


def run_minilm(args, tmp: Path) -> tuple[str, dict]:
    from lowbit.zoo import minilm
    from lowbit.zoo.docstring_topics import TOPICS

    s = MiniLMSettings()
    if args.quick:
        s = MiniLMSettings(train_per_topic=8, test_per_topic=4, fp32_epochs=1, qat_epochs=1, n_calib=16,
                           configs=("w4a8",), ptq_observers=("mse",), weight_observer="minmax", distill=False)
    if args.minilm_configs:
        s.configs = tuple(args.minilm_configs)
    bert0, tokenizer = minilm()
    seeds = args.seeds[: args.minilm_seeds] if args.minilm_seeds else args.seeds
    runs = [minilm_seed(seed, s, bert0, tokenizer, tmp) for seed in seeds]
    out = minilm_tables(runs, s)
    r0 = runs[0]
    md = [
        "### MiniLM (all-MiniLM-L6-v2) topic classifier, fine-tuned end to end",
        "",
        f"`{args.command}` ({args.date}; load average at the start {args.load_start})",
        "",
        args.machine_line,
        "",
        f"Task: which part of the standard library a docstring sentence comes from "
        f"(`lowbit.zoo.docstring_topics`: {', '.join(TOPICS)}; {s.train_per_topic} training and "
        f"{s.test_per_topic} test sentences per topic, a seeded draw per seed: {r0['n_train']} / "
        f"{r0['n_test']}). Model: all-MiniLM-L6-v2 (`lowbit.zoo.minilm`) + mean pooling + a linear head, "
        f"every parameter trained. FP32: {s.fp32_epochs} epochs AdamW, batch {s.batch}, lr {s.fp32_lr} "
        f"(head {s.head_lr}), warm-up + cosine, batches padded to their longest sentence. Evaluation: "
        f"sentences padded / truncated to {s.seq_len} word pieces. PTQ: `lowbit.quantize` with the config, "
        f"{s.n_calib} training sentences for calibration. QAT: `prepare_qat(fp32, cfg, calib, learn='lsq')` "
        f"(same calibration sentences), {s.qat_epochs} epochs, lr {s.qat_lr} (head {s.qat_head_lr}, "
        f"quantizer scales {s.qparam_lr})"
        + (", loss = ½ cross-entropy + ½ distillation from the FP32 model (T = 2)" if s.distill else "")
        + ". ORT: the converted QAT model exported and run by ONNX Runtime on the same padded test batches."
        + (f" Weight ranges here: {s.weight_observer} (not the preset's mse), for speed." if s.weight_observer else ""),
        "",
        "\n\n".join(out),
        "",
        "- wall time per seed: " + ", ".join(
            f"seed {r['seed']} {r['wall_s']:.0f} s (FP32 training {r['fp32_train_s']:.0f} s, QAT "
            + ", ".join(f"{c.upper()} {r[c]['qat']['train_s']:.0f} s" for c in s.configs) + ")" for r in runs) + ".",
        "- QAT ONNX file size: " + ", ".join(f"{c.upper()} {r0[c]['qat']['mb']:.1f} MB" for c in s.configs)
        + " (int4 weights are stored in int8 containers).",
        (f"- Read the Δ column with the control row: the FP32 model gains "
         f"{100 * statistics.fmean(r['fp32_ft'] - r['fp32'] for r in runs):+.1f} pts from the same extra epochs "
         f"without quantization (it is not fully converged on {r0['n_train']} sentences), and QAT's recovery "
         f"includes that extra training. Test sets are small ({r0['n_test']} sentences: one sentence is "
         f"{100 / r0['n_test']:.2f} pts)."),
    ]
    return "\n".join(md) + "\n", {"settings": s.__dict__, "runs": runs}



# -- part 3: ResNet-18 W8A8 QAT, exported -------------------------------------------------------
@dataclass
class ResNetSettings:
    size: int = 32  # digits upscaled to size x size
    batch: int = 64
    n_calib: int = 256
    fp32_epochs: int = 4
    fp32_lr: float = 2e-3
    learn: str | None = "lsq"
    qat_epochs: int = 1
    qat_lr: float = 1e-4
    qparam_lr: float = 1e-4
    latency_sizes: tuple = (32, 224)
    latency_batches: tuple = (1, 8)
    threads: tuple = (1, 2)
    rounds: int = 5
    runs_per_round: int = 10


class RGB(nn.Module):
    """Grayscale (N, 1, H, W) -> (N, 3, H, W) for models built for RGB input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


class _RGBTask:
    """A DigitsTask whose images are repeated to 3 channels (ResNet-18's stem takes RGB)."""

    def __init__(self, task):
        self.task = task
        self.n_train = task.n_train
        self.test_x = task.test_x.repeat(1, 3, 1, 1)
        self.test_y = task.test_y

    def train_batch(self, index, generator):
        x, y = self.task.train_batch(index, generator)
        return x.repeat(1, 3, 1, 1), y

    def train_views(self, n, seed):
        x, y = self.task.train_views(n, seed)
        return x.repeat(1, 3, 1, 1), y


def interleaved_latency(models: dict[str, OrtModel], feeds: dict[str, np.ndarray], rounds: int,
                        runs: int) -> dict[str, dict]:
    """``measure_latency`` in ``rounds`` blocks of ``runs``, alternating the models' order per round;
    per model the median of the block medians and the largest block p90."""
    stats: dict[str, list] = {k: [] for k in models}
    names = list(models)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            stats[k].append(measure_latency(models[k], feeds, warmup=3 if r else 10, runs=runs))
    return {k: {"median_ms": statistics.median(x.median_ms for x in v), "p90_ms": max(x.p90_ms for x in v)}
            for k, v in stats.items()}


def resnet_accuracy(models: dict[str, nn.Module], paths: dict[str, Path], task, s, res: dict) -> list[list]:
    """PyTorch and ORT accuracy, parity, size and integer share of each exported model (rows; ``res["models"]``)."""
    torch_logits = {name: predict(model, task.test_x, 256) for name, model in models.items()}
    rows_acc = []
    res["models"] = {}
    for name, path in paths.items():
        ort = OrtModel(path, threads=max(s.threads))
        ort_logits = torch.cat([ort(x) for x in task.test_x.split(256)])
        m = {"torch_acc": accuracy(torch_logits[name], task.test_y), "mb": file_mb(path),
             "int_kernels": kernel_share(path), **ort_parity(torch_logits[name], ort_logits, task.test_y)}
        res["models"][name] = m
        rows_acc.append([name, pct(m["torch_acc"]), pct(m["ort_acc"]), f"{m['agreement']:.4f}", f"{m['mb']:.2f}",
                         f"{m['mb'] / file_mb(paths['FP32']):.2f}x", m["int_kernels"]])
    return rows_acc


def resnet_latency(fp32: nn.Module, sim: nn.Module, paths: dict[str, Path], s, tmp: Path, res: dict) -> list[list]:
    """FP32 vs QAT INT8 latency in ORT per input size, threads and batch (rows; ``res["latency"]``)."""
    lat_rows = []
    res["latency"] = []
    for size in s.latency_sizes:
        files = {"FP32": paths["FP32"], "QAT W8A8": paths["QAT W8A8"]}
        if size != s.size:  # lowbit exports a fixed spatial size (dynamic batch only): export again
            files = {"FP32": tmp / f"resnet_fp32_{size}.onnx", "QAT W8A8": tmp / f"resnet_qat_{size}.onnx"}
            quiet_export(fp32.eval(), files["FP32"], torch.randn(1, 3, size, size))
            quiet_export(sim, files["QAT W8A8"], torch.randn(1, 3, size, size))
        for threads in s.threads:
            sessions = {k: OrtModel(files[k], threads=threads) for k in ("FP32", "QAT W8A8")}
            for b in s.latency_batches:
                x = torch.randn(b, 3, size, size).numpy()
                feeds = {sessions["FP32"].input_names[0]: x}
                lat = interleaved_latency(sessions, feeds, s.rounds, s.runs_per_round)
                ratio = lat["QAT W8A8"]["median_ms"] / lat["FP32"]["median_ms"]
                res["latency"].append({"size": size, "threads": threads, "batch": b, **{k: v for k, v in lat.items()},
                                       "ratio": ratio})
                lat_rows.append([f"{size}x{size}", threads, b, f"{lat['FP32']['median_ms']:.2f} / {lat['FP32']['p90_ms']:.2f}",
                                 f"{lat['QAT W8A8']['median_ms']:.2f} / {lat['QAT W8A8']['p90_ms']:.2f}", f"{ratio:.2f}x"])
    return lat_rows


def run_resnet(args, tmp: Path) -> tuple[str, dict]:
    from lowbit.zoo import resnet18
    from lowbit.zoo.digits import DigitsTask

    s = ResNetSettings()
    if args.quick:
        s = ResNetSettings(fp32_epochs=1, qat_epochs=1, n_calib=64, latency_sizes=(32,), latency_batches=(1,),
                           threads=(1,), rounds=2, runs_per_round=5)
    seed = args.seeds[0]
    task = _RGBTask(DigitsTask(size=s.size, seed=seed))
    if args.quick:
        task.n_train = 256
        task.test_x, task.test_y = task.test_x[:256], task.test_y[:256]
    fp32 = resnet18(num_classes=10, seed=seed).train()
    res: dict = {"seed": seed, "n_test": len(task.test_y), "params": sum(p.numel() for p in fp32.parameters())}
    res["fp32_train_s"] = train_images(fp32, task, s.fp32_epochs, s.fp32_lr, seed, batch=s.batch)
    calib = calibration_views(task, s.n_calib, seed)
    ptq = lowbit.quantize(fp32, calib, "w8a8", progress=False)
    qmodel = lowbit.prepare_qat(fp32, "w8a8", calib, learn=s.learn, progress=False)
    res["qat_train_s"] = train_images(qmodel, task, s.qat_epochs, s.qat_lr, seed + 100, batch=s.batch,
                                      qparam_lr=s.qparam_lr, qat=True)
    sim = convert(qmodel)
    paths = {"FP32": tmp / "resnet_fp32.onnx", "PTQ W8A8": tmp / "resnet_ptq.onnx",
             "QAT W8A8": tmp / "resnet_qat.onnx"}
    for model, path in zip((fp32.eval(), ptq, sim), paths.values(), strict=True):
        quiet_export(model, path, task.test_x[:1])
    rows_acc = resnet_accuracy({"FP32": fp32, "PTQ W8A8": ptq, "QAT W8A8": sim}, paths, task, s, res)
    lat_rows = resnet_latency(fp32, sim, paths, s, tmp, res)
    md = [
        "### ResNet-18, W8A8 QAT, exported: accuracy, size, ONNX Runtime latency",
        "",
        f"`{args.command}` ({args.date}; load average at the start {args.load_start})",
        "",
        args.machine_line,
        "",
        (f"`lowbit.zoo.resnet18(num_classes=10, seed={seed})` ({res['params']:,} parameters, torchvision's "
        f"layout) trained from scratch on the distorted digits at {s.size}x{s.size} (grey repeated to RGB; "
        f"split seed {seed}): FP32 {s.fp32_epochs} epochs AdamW lr {s.fp32_lr} ({res['fp32_train_s']:.0f} s); "
        f"QAT: `prepare_qat(fp32, 'w8a8', calib, learn={s.learn!r})`, {s.qat_epochs} epoch(s) lr {s.qat_lr} "
        f"({res['qat_train_s']:.0f} s), converted and exported with `lowbit.export_onnx`; PTQ W8A8 "
        f"(`lowbit.quantize`, {s.n_calib} calibration views) for reference. Accuracy on the "
        f"{res['n_test']} test views; 'agreement' = top-1 agreement of ORT with the PyTorch model it was "
        f"exported from."),
        "",
        table(["model", "PyTorch accuracy %", "ORT accuracy %", "PyTorch/ORT agreement", "ONNX MB", "vs FP32",
               "integer compute nodes in ORT"], rows_acc),
        "",
        (f"ORT latency (`lowbit.runtime.measure_latency`, CPU provider, median / worst-block p90 ms over "
        f"{s.rounds} interleaved blocks of {s.runs_per_round} runs; the network is fully convolutional, so "
        f"the {max(s.latency_sizes)}x{max(s.latency_sizes)} rows run the same two models exported again at "
        f"the usual ImageNet resolution):"),
        "",
        table(["input", "threads", "batch", "FP32 ms", "QAT INT8 ms", "INT8 / FP32"], lat_rows),
    ]
    return "\n".join(md) + "\n", res


# -- part 4: training-step speed ----------------------------------------------------------------
def _torch_ao_qat(model: nn.Module) -> nn.Module:
    """torch.ao eager QAT: conv-bn(-relu) fused with fuse_modules_qat, fbgemm default QAT qconfig."""
    import torch.ao.quantization as tq

    model = copy.deepcopy(model).train()
    groups = [["conv1", "bn1", "relu"]]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage)):
            p = f"{stage}.{i}"
            groups += [[f"{p}.conv1", f"{p}.bn1", f"{p}.relu1"], [f"{p}.conv2", f"{p}.bn2"]]
            if block.downsample is not None:
                groups.append([f"{p}.downsample.0", f"{p}.downsample.1"])
    model = tq.fuse_modules_qat(model, groups)
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tq.prepare_qat(model)


def _set_quantizers(model: nn.Module, *, weight: bool, activation: bool) -> None:
    """Ablation: switch a prepared lowbit model's weight / activation quantizers off (mode 'disabled')."""
    from lowbit.qat.prepare import quantizers_by_role

    for _, role, q in quantizers_by_role(model):
        if (role == "weight" and not weight) or (role != "weight" and not activation):
            q.mode = "disabled"


@dataclass
class SpeedSettings:
    reps: int = 24  # timed rounds
    warmup: int = 2  # untimed steps per model first
    size: int = 112
    batch: int = 16
    n_prof: int = 4  # profiled steps per model


AO_NAME = "torch.ao fbgemm (fused conv-bn-relu)"
STEP_COLUMNS = ["model", "step ms (median)", "step / FP32 step (median of rounds)", "range over rounds"]


class StepTimer:
    """Training steps of several models on one batch (forward, backward, SGD step), timed in
    interleaved rounds."""

    def __init__(self, models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, reps: int, warmup: int):
        self.models, self.x, self.y, self.reps, self.warmup = {}, x, y, reps, warmup
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.add(models)

    def add(self, models: dict[str, nn.Module]) -> None:
        self.models.update(models)
        self.opts.update({k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models.items()})

    def drop(self, names) -> None:
        for k in names:
            del self.models[k], self.opts[k]

    def step(self, k: str) -> float:
        m, o = self.models[k], self.opts[k]
        start = time.perf_counter()
        loss = F.cross_entropy(m(self.x), self.y)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()
        return time.perf_counter() - start

    def timed_rounds(self, names: list[str]) -> dict[str, list[float]]:
        for k in names:  # warm-up (observers, allocator, mkldnn primitives)
            for _ in range(self.warmup):
                self.step(k)
        out: dict[str, list[float]] = {k: [] for k in names}
        for r in range(self.reps):
            for k in names if r % 2 == 0 else names[::-1]:
                out[k].append(self.step(k))
        return out


def step_stats(times: list[float], fp: list[float], of_medians: bool = False) -> tuple[dict, list[str]]:
    """A model's step times against the FP32 step of the same rounds: its stats and its table row cells."""
    ratios = [a / b for a, b in zip(times, fp, strict=True)]
    m = {"median_ms": 1e3 * statistics.median(times), "ratio_median": statistics.median(ratios)}
    if of_medians:
        m["ratio_of_medians"] = statistics.median(times) / statistics.median(fp)
    m |= {"ratio_min": min(ratios), "ratio_max": max(ratios), "times_ms": [1e3 * t for t in times]}
    return m, [f"{m['median_ms']:.0f}", f"{m['ratio_median']:.2f}x", f"{m['ratio_min']:.2f}-{m['ratio_max']:.2f}"]


def speed_profile(timer: StepTimer, n_prof: int) -> dict:
    """Self CPU time per op and step (torch.profiler), one profiled step at a time, the models
    interleaved: FP32, lowbit learn=None, torch.ao."""
    from torch.profiler import ProfilerActivity, profile

    prof_names = ("FP32", "lowbit w8a8 learn=None", AO_NAME)
    acc: dict[str, dict[str, list[float]]] = {k: {} for k in prof_names}
    for i in range(n_prof):
        for k in prof_names if i % 2 == 0 else prof_names[::-1]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                timer.step(k)
            for e in prof.key_averages():
                slot = acc[k].setdefault(e.key, [0.0, 0])
                slot[0] += e.self_cpu_time_total / 1e3 / n_prof
                slot[1] += e.count / n_prof
    return dict(zip(("fp", "lb", "ao"), (acc[k] for k in prof_names), strict=True))


def profile_rows(ops: dict, n_prof: int) -> tuple[dict, list[list[str]], list]:
    """The profile's JSON, the table of lowbit's largest extra ops over FP32, torch.ao's largest extras."""
    fp_ops, lb_ops, ao_ops = ops["fp"], ops["lb"], ops["ao"]
    zero = (0.0, 0)
    total_fp, total_lb, total_ao = (sum(v[0] for v in t.values()) for t in (fp_ops, lb_ops, ao_ops))
    extra = sorted(((op, lb_ops[op][0] - fp_ops.get(op, zero)[0]) for op in lb_ops), key=lambda t: -t[1])
    rows = [[f"`{op}`", f"{d:.0f}", f"{lb_ops[op][0]:.0f}", f"{fp_ops.get(op, zero)[0]:.0f}",
             f"{ao_ops.get(op, zero)[0]:.0f}",
             f"{lb_ops[op][1]:.0f} / {fp_ops.get(op, zero)[1]:.0f} / {ao_ops.get(op, zero)[1]:.0f}"]
            for op, d in extra[:16]]
    ao_extra = sorted(((op, ao_ops[op][0] - fp_ops.get(op, zero)[0]) for op in ao_ops), key=lambda t: -t[1])
    profile_json = {"steps": n_prof, "total_ms": {"FP32": total_fp, "lowbit": total_lb, "torch.ao": total_ao},
                    "ops": {op: {"lowbit_ms": lb_ops[op][0], "fp32_ms": fp_ops.get(op, zero)[0],
                                 "torch_ao_ms": ao_ops.get(op, zero)[0], "lowbit_calls": lb_ops[op][1],
                                 "fp32_calls": fp_ops.get(op, zero)[1], "torch_ao_calls": ao_ops.get(op, zero)[1]}
                            for op, _ in extra[:40]},
                    "torch_ao_top_extra": [(op, d) for op, d in ao_extra[:12]]}
    return profile_json, rows, ao_extra


def speed_ablations(timer: StepTimer, base: nn.Module, calib: list, res: dict) -> list[list[str]]:
    """lowbit learn=None with parts switched off, timed in their own rounds against FP32 (rows;
    ``res["ablations"]``).  The main models are freed first: every model held in memory slows
    the others (allocator and cache pressure)."""
    timer.drop([k for k in timer.models if k != "FP32"])
    ablations = {}
    a = lowbit.prepare_qat(base, "w8a8", calib, learn=None, progress=False)
    _set_quantizers(a, weight=True, activation=False)
    ablations["lowbit learn=None, activation quantizers off"] = a
    a = lowbit.prepare_qat(base, "w8a8", calib, learn=None, progress=False)
    _set_quantizers(a, weight=False, activation=False)
    ablations["lowbit learn=None, all quantizers off (conv-BN training path only)"] = a
    ablations["lowbit learn=None, fold_bn=False"] = lowbit.prepare_qat(base, "w8a8", calib, learn=None,
                                                                      fold_bn=False, progress=False)
    timer.add(ablations)
    ab_times = timer.timed_rounds(["FP32", *ablations])
    res["ablations"], rows = {}, []
    for k in ablations:
        res["ablations"][k], cells = step_stats(ab_times[k], ab_times["FP32"])
        rows.append([k, *cells])
    return rows


def run_speed(args, tmp: Path) -> tuple[str, dict]:
    from lowbit.zoo import resnet18

    s = SpeedSettings(reps=2, warmup=1, size=64, batch=4, n_prof=1) if args.quick else SpeedSettings()
    torch.manual_seed(0)
    x, y = torch.randn(s.batch, 3, s.size, s.size), torch.randint(0, 1000, (s.batch,))
    base = resnet18(seed=0).train()
    calib = [x]
    timer = StepTimer({
        "FP32": copy.deepcopy(base).train(),
        "lowbit w8a8 learn=None": lowbit.prepare_qat(base, "w8a8", calib, learn=None, progress=False),
        "lowbit w8a8 learn='lsq'": lowbit.prepare_qat(base, "w8a8", calib, learn="lsq", progress=False),
        AO_NAME: _torch_ao_qat(base),
    }, x, y, s.reps, s.warmup)
    load = loadavg()
    names = list(timer.models)
    times = timer.timed_rounds(names)
    res = {"batch": s.batch, "size": s.size, "reps": s.reps, "loadavg_before": load, "loadavg_after": loadavg(),
           "threads": torch.get_num_threads(), "models": {}}
    main_rows = []
    for k in names:
        res["models"][k], cells = step_stats(times[k], times["FP32"], of_medians=True)
        main_rows.append([k, *cells])
    res["profile"], prof_rows, ao_extra = profile_rows(speed_profile(timer, s.n_prof), s.n_prof)
    ab_rows = [] if args.quick else speed_ablations(timer, base, calib, res)
    return speed_markdown(args, s, res, (main_rows, ab_rows, prof_rows), ao_extra), res


def speed_markdown(args, s: SpeedSettings, res: dict, rows: tuple[list, list, list], ao_extra: list) -> str:
    main_rows, ab_rows, prof_rows = rows
    lb_none = res["models"]["lowbit w8a8 learn=None"]["ratio_median"]
    lb_lsq = res["models"]["lowbit w8a8 learn='lsq'"]["ratio_median"]
    ao = res["models"][AO_NAME]["ratio_median"]
    batch, size, reps, warmup, n_prof, load = s.batch, s.size, s.reps, s.warmup, s.n_prof, res["loadavg_before"]
    total_fp, total_lb, total_ao = (res["profile"]["total_ms"][k] for k in ("FP32", "lowbit", "torch.ao"))
    md = [
        "### QAT training-step time vs FP32 (ResNet-18)",
        "",
        (f"`{args.command}` ({args.date}; load average before / after the timed steps: {load} / "
        f"{res['loadavg_after']})"),
        "",
        args.machine_line,
        "",
        (f"`lowbit.zoo.resnet18(seed=0)` in train mode, batch {batch}, {size}x{size}, cross-entropy, "
        f"SGD (momentum 0.9): one step = forward + backward + optimizer step. Every model is timed in the "
        f"same process, {reps} rounds in alternating order after {warmup} warm-up steps each; the ratio is "
        f"taken per round (this model's step / the FP32 step of the same round), then the median. "
        f"lowbit: `prepare_qat(model, 'w8a8', calib_data=[x], learn=...)` (conv-BN trained folded, residual "
        f"adds and the pool input quantized too). torch.ao: `fuse_modules_qat` on every conv-bn(-relu), "
        f"`get_default_qat_qconfig('fbgemm')`, `prepare_qat` (eager mode: its residual adds stay float)."),
        "",
        table(STEP_COLUMNS, main_rows),
        "",
        (f"Target: <= 1.3x FP32 and below torch.ao's ratio. Like for like (observed ranges, straight-through "
         f"fake quantization: torch.ao's default QAT): lowbit learn=None {lb_none:.2f}x vs torch.ao {ao:.2f}x: "
         f"{'met' if lb_none <= 1.3 and lb_none < ao else 'MISSED'}. Learned scales (LSQ: a gradient for every "
         f"scale, which torch.ao's default does not compute): {lb_lsq:.2f}x, "
         f"{'within' if lb_lsq <= 1.3 else 'above'} 1.3x, {'below' if lb_lsq < ao else 'above'} torch.ao's "
         f"plain QAT."),
    ]
    if ab_rows:
        md += ["", ("Ablations (timed afterwards, in their own interleaved rounds against FP32, with the models "
                     "above freed; lowbit learn=None with parts switched off, for attribution only):"), "",
               table(STEP_COLUMNS, ab_rows)]
    md += [
        "",
        (f"torch.profiler, self CPU time per op and step (ms; mean of {n_prof} profiled steps per model, "
         f"interleaved; totals: FP32 {total_fp:.0f}, lowbit learn=None {total_lb:.0f}, torch.ao {total_ao:.0f}); "
         f"the ops where lowbit learn=None spends the most time beyond FP32:"),
        "",
        table(["op", "lowbit - FP32 ms", "lowbit ms", "FP32 ms", "torch.ao ms", "calls lowbit / FP32 / torch.ao"],
              prof_rows),
        "",
        "torch.ao's largest extra ops for comparison: " + ", ".join(f"`{op}` {d:.0f} ms" for op, d in ao_extra[:8])
        + ".",
    ]
    return "\n".join(md) + "\n"


# -- BENCHMARKS.md ---------------------------------------------------------------------------------
SECTION = "## QAT"
INTRO = (
    "Quantization-aware training measured by `benchmarks/bench_qat.py` (each subsection names the "
    "command that produced it; `--only PART` reruns and replaces one subsection). Training loops are "
    "plain PyTorch written in the benchmark, as a user would write them."
)


def write_benchmarks_md(path: Path, parts: dict[str, str]) -> None:
    """Replace (or append) the "## QAT" section of ``path``; inside it, replace only the
    subsections of the parts that ran (``### ...`` blocks, keyed by PARTS order), keep the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        before, after, old = text.rstrip("\n") + "\n\n", "", ""
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        before, old, after = "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])
    existing: dict[str, str] = {}
    for block in re.split(r"(?m)^(?=### )", old)[1:]:
        key = block.split("<!-- part: ", 1)[1].split(" ", 1)[0] if "<!-- part: " in block else None
        if key in PARTS:
            existing[key] = block.rstrip("\n") + "\n"
    existing.update({k: f"{v.rstrip()}\n<!-- part: {k} -->\n" for k, v in parts.items()})
    body = f"{SECTION}\n\n{INTRO}\n\n" + "\n".join(existing[k] for k in PARTS if k in existing)
    path.write_text(before + body + ("\n" + after if after else ""))


# -- main ----------------------------------------------------------------------------------------
RUNNERS: dict[str, Callable] = {"cnn": run_cnn, "minilm": run_minilm, "resnet": run_resnet,
                                 "speed": run_speed}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny epochs, one seed, writes nothing")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--only", nargs="+", choices=[*PARTS, *ALIASES], default=list(PARTS))
    parser.add_argument("--minilm-seeds", type=int, default=None,
                        help="run MiniLM on only the first N seeds (CPU time)")
    parser.add_argument("--minilm-configs", nargs="+", choices=("w4a8", "w4a4", "w8a8"), default=None)
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md", help="file whose '## QAT' section is written")
    return parser


def main(argv: list[str] | None = None) -> None:
    args, argv = parse(_parser(), argv)
    args.only = [ALIASES.get(p, p) for p in args.only]
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    log_to_stderr(log)
    logging.getLogger("lowbit").setLevel(logging.ERROR)  # per-tensor advice (4-bit activations) is summarised
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    info = machine()
    args.machine_line = machine_line(info)
    args.command = command("bench_qat.py", argv)
    args.date = datetime.date.today().isoformat()
    args.load_start = loadavg()
    print(args.command + "\n\n" + args.machine_line + "\n", flush=True)
    parts, results = {}, {"argv": argv, "machine": info}
    with tempfile.TemporaryDirectory(prefix="bench_qat_") as tmp:
        for part in PARTS:
            if part not in args.only:
                continue
            start = time.perf_counter()
            md, data = RUNNERS[part](args, Path(tmp))
            wall = time.perf_counter() - start
            md = md.rstrip() + f"\n- whole part: {wall:.0f} s.\n"
            print(md, flush=True)
            parts[part] = md
            results[part] = data | {"wall_s": wall}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if not args.quick and not args.no_write:
        write_benchmarks_md(args.md, parts)
        print(f"wrote the '{SECTION}' section of {args.md}")


if __name__ == "__main__":
    main()
