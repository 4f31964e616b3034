"""``lowbit`` command line: quantize, export, bench.

    lowbit quantize lowbit.zoo:mobilenet_v2 --data lowbit.zoo:photo_batches --config w8a8 --out runs/mnv2
    lowbit export runs/mnv2/recipe.json --out runs/mnv2/again.onnx     # replay a recipe
    lowbit bench runs/mnv2/fp32.onnx runs/mnv2/model.int8.onnx --threads 1 2 --batch 1 8

A model is ``module:function`` (a Python factory returning an nn.Module) or a
Hugging Face model folder; data is ``module:function`` returning an iterable of
model inputs.  ``quantize`` writes the quantized ONNX file, the FP32 ONNX file,
``recipe.json`` (everything needed to reproduce the run) and ``report.md`` /
``report.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("lowbit.cli")

RECIPE_FORMAT = "lowbit.recipe"
RECIPE_VERSION = 1


def load_factory(ref: str):
    """Import ``module:attr`` and return the attribute."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"error: {ref!r} is not of the form module:function")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"error: cannot load {ref!r}: {exc}") from None


def load_model(ref: str):
    """A model from ``module:function`` or a Hugging Face folder (loaded offline)."""
    path = Path(ref)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SystemExit(f"error: {ref} is a folder without config.json; expected a Hugging Face model folder")
        from transformers import AutoModel

        return AutoModel.from_pretrained(path, local_files_only=True).eval()
    return load_factory(ref)().eval()


def load_data(ref: str | None, model_ref: str):
    """Calibration batches: a ``module:function`` factory, or the bundled default for the model."""
    if ref is not None:
        return list(load_factory(ref)())
    if Path(model_ref).is_dir():
        from transformers import AutoTokenizer

        from .zoo.sentences import english_sentences

        tok = AutoTokenizer.from_pretrained(model_ref, local_files_only=True)
        sentences = english_sentences(128)
        return [dict(tok(sentences[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(sentences), 16)]
    raise SystemExit("error: --data module:function is required for a Python model factory")


def _quantize_from_recipe(recipe: dict):
    from .config import QuantConfig
    from .ptq import quantize

    model = load_model(recipe["model"])
    batches = load_data(recipe.get("data"), recipe["model"])
    config = QuantConfig.from_dict(recipe["config"])
    qmodel = quantize(model, batches, config, **recipe.get("options", {}))
    return model, qmodel, batches


def _first_batch(batches):
    first = batches[0]
    return tuple(first) if isinstance(first, list) else first


def cmd_quantize(args) -> int:
    from .config import get_config
    from .export import export_onnx
    from .report import compare

    config = get_config(args.config) if not args.config.endswith(".json") else None
    if config is None:
        from .config import QuantConfig

        config = QuantConfig.from_dict(json.loads(Path(args.config).read_text()))
    if args.skip:
        config = config.skip(*args.skip)
    if args.observer:
        config = config.with_observer(args.observer)
    recipe = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "model": args.model, "data": args.data,
              "config": config.to_dict(), "options": {"progress": not args.quiet}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, qmodel, batches = _quantize_from_recipe(recipe)
    example = _first_batch(batches)
    export_onnx(model, out / "fp32.onnx", example)
    export_onnx(qmodel, out / "model.int8.onnx", example)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    report = compare(model, qmodel, inputs=example, onnx=out / "model.int8.onnx", fp32_onnx=out / "fp32.onnx",
                     threads=args.threads, batch_sizes=[1])
    (out / "report.md").write_text(str(report) + "\n")
    report.save_json(out / "report.json")
    print(report)
    print(f"\nwrote {out}/model.int8.onnx, fp32.onnx, recipe.json, report.md, report.json")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx

    recipe = json.loads(Path(args.recipe).read_text())
    if recipe.get("format") != RECIPE_FORMAT or recipe.get("version") != RECIPE_VERSION:
        raise SystemExit(f"error: {args.recipe} is not a lowbit recipe (format {RECIPE_FORMAT} v{RECIPE_VERSION})")
    _, qmodel, batches = _quantize_from_recipe(recipe)
    export_onnx(qmodel, args.out, _first_batch(batches))
    print(f"wrote {args.out}")
    return 0


def cmd_bench(args) -> int:
    import numpy as np

    from .runtime.ort import OrtModel, measure_latency

    print("| model | threads | batch | median ms | p90 ms |\n|---|---:|---:|---:|---:|")
    for path in args.models:
        for threads in args.threads:
            model = OrtModel(path, threads=threads)
            for batch in args.batch:
                feeds = {}
                for inp in model.session.get_inputs():
                    shape = [batch if not isinstance(d, int) or i == 0 else d for i, d in enumerate(inp.shape)]
                    shape = [d if isinstance(d, int) else args.seq_len for d in shape]
                    dtype = np.int64 if "int64" in inp.type else np.float32
                    feeds[inp.name] = (np.ones(shape, dtype) if dtype == np.int64
                                       else np.random.default_rng(0).standard_normal(shape).astype(dtype))
                stats = measure_latency(model, feeds, runs=args.runs, batch=batch)
                print(f"| {path} | {threads} | {batch} | {stats.median_ms:.3f} | {stats.p90_ms:.3f} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each layer got")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="PTQ a model, export it and report accuracy / size / latency")
    q.add_argument("model", help="module:function returning an nn.Module, or a Hugging Face folder")
    q.add_argument("--data", help="module:function returning an iterable of calibration inputs")
    q.add_argument("--config", default="w8a8", help="preset name (w8a8, w8a8-dynamic, w8) or a recipe config .json")
    q.add_argument("--skip", nargs="*", default=[], help="module-name globs to keep in float")
    q.add_argument("--observer", help="activation calibrator: minmax, moving_average, percentile, mse, entropy")
    q.add_argument("--threads", nargs="*", type=int, default=[1])
    q.add_argument("--out", default="runs/quantize", help="output folder")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("export", help="replay a recipe.json and export the quantized model to ONNX")
    e.add_argument("recipe")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="ONNX Runtime latency of one or more .onnx files")
    b.add_argument("models", nargs="+")
    b.add_argument("--threads", nargs="*", type=int, default=[1])
    b.add_argument("--batch", nargs="*", type=int, default=[1])
    b.add_argument("--seq-len", type=int, default=128, help="for symbolic non-batch dimensions")
    b.add_argument("--runs", type=int, default=50)
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
