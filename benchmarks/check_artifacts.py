"""Byte-identity of lowbit's artifacts across a refactor.

Quantizes a fixed set of models with the presets and options users run (seeded, on bundled
data), writes what lowbit writes for each (the ONNX file, ``lowbit.save``'s folder) and prints
one SHA-256 per artifact.  ``--record FILE`` stores them; ``--check FILE`` compares and exits 1
on any difference, naming the artifact.  Hashes depend on the torch / onnx versions and on the
integer target (pass ``--target``; the default, ``x86-vnni``, is the same on every CPU), so
record and check on one installation.

    python benchmarks/check_artifacts.py --record /tmp/before.json   # on the old commit
    python benchmarks/check_artifacts.py --check /tmp/before.json    # on the new one
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.zoo.digits import load_digits
from lowbit.zoo.photos import imagenet_photos


def _digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def _cases(target: str):
    """(name, build) pairs; build() -> (quantized model, example input)."""
    x_digits = load_digits()[0][:64].reshape(-1, 1, 8, 8)
    photos = imagenet_photos(16, seed=0, size=96)

    def digits(config, **options):
        return lambda: (lowbit.quantize(_digits_cnn(), [x_digits[:32], x_digits[32:]], config,
                                        target=target, progress=False, **options), x_digits[:2])

    def mobilenet(**options):
        from lowbit.zoo.mobilenet_v2 import mobilenet_v2
        x = photos
        return lambda: (lowbit.quantize(mobilenet_v2(), [x[:8], x[8:]], "w8a8", target=target,
                                        progress=False, **options), x[:1])

    def resnet():
        from lowbit.zoo.resnet import resnet18
        return (lowbit.quantize(resnet18(num_classes=10).eval(), [photos[:8]], "w8a8", target=target,
                                progress=False), photos[:1])

    def qat():
        return lowbit.prepare_qat(_digits_cnn().train(), "w4a8", [x_digits[:32]], target=target,
                                  progress=False), x_digits[:2]

    yield "digits-w8a8", digits("w8a8")
    yield "digits-w8a8-dynamic", digits("w8a8-dynamic")
    yield "digits-w8", digits("w8")
    yield "digits-w4a8", digits("w4a8")
    yield "digits-w8a8-cle-bc", digits("w8a8", equalize=True, bias_correction=True)
    yield "mobilenet_v2-w8a8", mobilenet()
    yield "mobilenet_v2-w8a8-cle", mobilenet(equalize=True, equalize_relu6=True)
    yield "resnet18-w8a8", resnet
    yield "digits-qat-w4a8", qat
    yield from _minilm_cases(target)


def _minilm_cases(target: str):
    try:
        from lowbit.zoo.minilm import minilm
    except ImportError:
        return
    sentences = ["Quantization maps floats to integers.", "The model runs on a CPU.",
                 "Scales and zero points define the grid.", "Calibration picks the ranges."]

    def build(config, **options):
        def run():
            model, tokenizer = minilm()
            batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
            return lowbit.quantize(model, [batch], config, target=target, progress=False, **options), batch
        return run

    yield "minilm-w8a8", build("w8a8")
    yield "minilm-w8a8-smoothquant", build("w8a8", smoothquant=0.8)
    yield "minilm-w8a8-dynamic", build("w8a8-dynamic")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifact_hashes(target: str) -> dict[str, str]:
    hashes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in _cases(target):
            torch.manual_seed(0)
            qmodel, example = build()
            onnx_path = Path(tmp, f"{name}.onnx")
            lowbit.export_onnx(qmodel, onnx_path, example)
            hashes[f"{name}.onnx"] = _sha(onnx_path)
            saved = lowbit.save(qmodel, Path(tmp, name))
            for file in sorted(saved.iterdir()):
                hashes[f"{name}/{file.name}"] = _sha(file)
            print(f"{name}: {hashes[f'{name}.onnx'][:16]}", file=sys.stderr)
    return hashes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path, help="write the hashes to this JSON file")
    group.add_argument("--check", type=Path, help="compare with the hashes in this JSON file")
    parser.add_argument("--target", default="x86-vnni")
    args = parser.parse_args(argv)
    hashes = artifact_hashes(args.target)
    if args.record:
        args.record.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(hashes)} artifacts in {args.record}")
        return 0
    before = json.loads(args.check.read_text())
    changed = sorted(k for k in before.keys() | hashes.keys() if before.get(k) != hashes.get(k))
    for key in changed:
        print(f"CHANGED {key}: {before.get(key, 'absent')[:16]} -> {hashes.get(key, 'absent')[:16]}")
    print(f"{len(hashes) - len(changed)} of {len(before.keys() | hashes.keys())} artifacts byte-identical")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
