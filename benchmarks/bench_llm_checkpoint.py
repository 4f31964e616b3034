"""SmolLM2-135M-Instruct quantized W4 (round to nearest, ``w4a16-g128``) saved by ``lowbit.save``
unpacked and ``packed=True``, against the FP32 model's own safetensors file: file sizes, save and
load times, and whether the loaded models' logits equal the saved model's bit for bit.

FP32 file: ``safetensors.torch.save_model`` of the float model (the tied embedding / lm_head
stored once).  Times are wall seconds and CPU seconds (``time.process_time``, all threads) of one
call each; a load includes what ``lowbit.load`` does besides reading: a copy of the float model
and the replay of the quantization's structure.  Logits: one window of ``--window`` tokens of
``lowbit.zoo.english_text("eval")``.

    python benchmarks/bench_llm_checkpoint.py [--out /tmp/lowbit-checkpoints] [--threads 1] [--window 256]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import _machine
import torch
from _selection import command, log_to_stderr, parse

import lowbit

log = logging.getLogger("bench_llm_checkpoint")
MB = 1e6


def _timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its wall seconds and its CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - wall, time.process_time() - cpu


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _row(name: str, size: int, fp32: int, save: tuple[float, float], load: tuple[float, float] | None,
         same: str) -> str:
    load_text = f"{load[0]:.2f} / {load[1]:.2f}" if load else ""
    return (f"| {name} | {size / MB:.1f} | {size / fp32:.3f} | {save[0]:.2f} / {save[1]:.2f} | {load_text} | "
            f"{same} |")


def _breakdown(path: Path, tied: set[str]) -> str:
    """What the packed tensors file holds, in MB: codes, the tensors written once for several
    names (``tied``: the embedding table lm_head shares), and the rest."""
    from safetensors import safe_open

    codes = table = rest = 0
    with safe_open(path, "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(key)
            size = t.numel() * t.element_size()
            if key.endswith(".packed"):
                codes += size
            elif key in tied:
                table += size
            else:
                rest += size
    return (f"Packed file: {codes / MB:.1f} MB of int4 codes, {table / MB:.1f} MB for the float32 table shared by "
            f"the embedding and lm_head, {rest / MB:.1f} MB of other tensors (scales, int32 zero-points, the weight observers' "
            "statistics, norms).")


def _expected_saving(entries: dict) -> int:
    """Bytes packing should save by the shapes alone: 4 a float32 value, less ceil(n / 2) for its codes."""
    total = 0
    for entry in entries.values():
        n = 1
        for size in entry["shape"]:
            n *= size
        total += 4 * n - (n + 1) // 2
    return total


def main(argv: Sequence[str] | None = None) -> None:
    from safetensors.torch import save_model

    from lowbit.zoo import english_text, smollm2, token_windows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/lowbit-checkpoints", help="folder for the saved files")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--window", type=int, default=256, help="tokens of the window whose logits are compared")
    args, argv = parse(parser, argv)
    log_to_stderr(log)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = smollm2()
    ids = token_windows(tokenizer, english_text("eval"), window=args.window, count=1)
    qmodel = lowbit.quantize(model, None, "w4a16-g128", progress=False)
    reference = _logits(qmodel, ids)
    _, *fp32_save = _timed(save_model, model, str(out / "fp32.safetensors"))
    fp32 = (out / "fp32.safetensors").stat().st_size
    rows = [_row("FP32 state_dict (safetensors.torch.save_model)", fp32, fp32, tuple(fp32_save), None, "")]
    for name, packed in (("lowbit.save (unpacked)", False), ("lowbit.save(packed=True)", True)):
        folder, *save_s = _timed(lowbit.save, qmodel, out / ("w4-packed" if packed else "w4"), packed=packed)
        loaded, *load_s = _timed(lowbit.load, model, folder)
        same = torch.equal(_logits(loaded, ids), reference)
        log.info("%s: %.1f MB, logits identical: %s", name, _folder_bytes(folder) / MB, same)
        rows.append(_row(name, _folder_bytes(folder), fp32, tuple(save_s), tuple(load_s), "yes" if same else "NO"))
        del loaded
    manifest = json.loads((out / "w4-packed" / "manifest.json").read_text())
    entries = manifest["packed"]
    saved = _folder_bytes(out / "w4") - _folder_bytes(out / "w4-packed")
    info = _machine.machine(("torch", "transformers", "safetensors"))
    print("\n".join([
        "### SmolLM2-135M W4 checkpoints: packed vs unpacked vs FP32", "",
        f"`{command('bench_llm_checkpoint.py', argv)}`", "",
        _machine.machine_line(info, ("torch", "transformers", "safetensors", "lowbit"), threads=True), "",
        (f"`lowbit.quantize(smollm2, None, \"w4a16-g128\")` (round to nearest). Packed: {len(entries)} Linear weights "
         f"as int4 codes two a byte; the embedding table tied to lm_head stays float32 (each quantizes it on its "
         f"own grid). Logits compared on one window of {ids.shape[1]} tokens of `english_text(\"eval\")`; "
         f"size includes manifest.json."), "",
        "| file | MB | x FP32 | save s (wall / CPU) | load s (wall / CPU) | logits identical |",
        "|---|---:|---:|---:|---:|---|",
        *rows, "",
        _breakdown(out / "w4-packed" / "model.safetensors", set(manifest["aliases"].values())),
        (f"Packing saved {saved / MB:.2f} MB; the shapes predict {_expected_saving(entries) / MB:.2f} MB of tensor "
         f"data; the {(_expected_saving(entries) - saved) / MB:.2f} MB between them is the longer safetensors header "
         "and manifest (names, the packed entries)."),
    ]))


if __name__ == "__main__":
    main()
