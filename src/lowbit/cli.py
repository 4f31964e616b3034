"""``lowbit`` command line: quantize, qat, export, bench.

    lowbit quantize lowbit.zoo:mobilenet_v2 --data lowbit.zoo:photo_batches --config w8a8 --out runs/mnv2
    lowbit qat my.models:cnn --data my.data:digits --config w4a8 --epochs 3 --distill 0.5 --onnx --out runs/qat
    lowbit qat --recipe runs/qat/recipe.json --out runs/qat-again         # replay: the same weights
    lowbit export runs/mnv2/recipe.json --out runs/mnv2/again.onnx     # replay a recipe
    lowbit bench runs/mnv2/fp32.onnx runs/mnv2/model.int8.onnx --threads 1 2 --batch 1 8

A model is ``module:function`` (a Python factory returning an nn.Module) or a
Hugging Face model folder; data is ``module:function`` returning an iterable of
model inputs.  ``quantize`` writes the quantized ONNX file, the FP32 ONNX file,
``recipe.json`` (everything needed to reproduce the run) and ``report.md`` /
``report.json``.

For ``qat`` the data factory returns ``(train_batches, calib_batches[, eval_fn])`` (or a
dict with keys ``train``, ``calib``, ``eval``): ``(inputs, target)`` training batches,
model inputs for calibration (None: the first training inputs) and
``eval_fn(model) -> float``.  It writes ``qat_model.pt`` (the trained QAT state; loads with
``torch.load(weights_only=True)`` or ``lowbit.qat.load_checkpoint`` into the model prepared
the same way), ``recipe.json``, optionally ``model.onnx``, and keeps a resumable
checkpoint in ``checkpoints/``: run the same command again after a crash to continue.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tempfile
from collections.abc import Mapping
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


def _resolve_config(args):
    """``--config`` (a preset or a config .json) with ``--skip`` / ``--observer`` applied."""
    from .config import QuantConfig, get_config

    if args.config.endswith(".json"):
        config = QuantConfig.from_dict(json.loads(Path(args.config).read_text()))
    else:
        config = get_config(args.config)
    if args.skip:
        config = config.skip(*args.skip)
    if args.observer:
        config = config.with_observer(args.observer)
    return config


def _read_recipe(path: str) -> dict:
    recipe = json.loads(Path(path).read_text())
    if recipe.get("format") != RECIPE_FORMAT or recipe.get("version") != RECIPE_VERSION:
        raise SystemExit(f"error: {path} is not a lowbit recipe (format {RECIPE_FORMAT} v{RECIPE_VERSION})")
    return recipe


def cmd_quantize(args) -> int:
    from .export import export_onnx
    from .report import compare

    config = _resolve_config(args)
    options = {"progress": not args.quiet}
    if args.smoothquant is not None:
        options["smoothquant"] = args.smoothquant
    recipe = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "model": args.model, "data": args.data,
              "config": config.to_dict(), "options": options}
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


# -- qat ---------------------------------------------------------------------------------------
_LOSSES = {"cross_entropy": "torch.nn.functional:cross_entropy", "mse": "torch.nn.functional:mse_loss"}


def load_qat_data(ref: str):
    """``(train batches, calibration inputs, eval_fn or None)`` from a ``module:function`` factory."""
    got = load_factory(ref)()
    if isinstance(got, Mapping):
        train, calib, eval_fn = got.get("train"), got.get("calib"), got.get("eval")
    elif isinstance(got, tuple) and len(got) in (2, 3):
        train, calib, eval_fn = (*got, None)[:3]
    else:
        raise SystemExit(f"error: {ref} must return (train_batches, calib_batches[, eval_fn]) or a dict with keys "
                         f"train, calib, eval; it returned a {type(got).__name__}")
    if train is None:
        raise SystemExit(f"error: {ref} returned no training batches")
    if iter(train) is train:  # a generator: training iterates it once per epoch
        train = list(train)
    first = next(iter(train), None)
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise SystemExit(f"error: the training batches of {ref} must be (inputs, target) pairs, "
                         f"got {type(first).__name__}")
    if calib is None:
        calib = [batch[0] for _, batch in zip(range(8), train, strict=False)]
    return train, list(calib), eval_fn


def _qat_from_recipe(recipe: dict, *, checkpoint_dir, log_dir=None, resume=True, progress=True):
    """Prepare and train the model a QAT recipe describes; returns (fp32 model, qat model, train data, result)."""
    import torch

    from .config import QuantConfig
    from .qat import QATSchedule, fit, prepare_qat

    t, opts = recipe["training"], recipe["options"]
    torch.manual_seed(t["seed"])  # a factory that draws random weights builds the same model every time
    model = load_model(recipe["model"])
    train, calib, eval_fn = load_qat_data(recipe["data"])
    qmodel = prepare_qat(model, QuantConfig.from_dict(recipe["config"]), calib, learn=opts["learn"],
                         fold_bn=opts["fold_bn"], progress=progress)
    schedule = QATSchedule(qmodel, freeze_observers_after=t["freeze_observers_after"],
                           freeze_bn_after=t["freeze_bn_after"])
    result = fit(qmodel, train, load_factory(_LOSSES.get(t["loss"], t["loss"])), epochs=t["epochs"], lr=t["lr"],
                 weight_decay=t["weight_decay"], schedule=schedule, teacher=model if t["distill_weight"] else None,
                 distill_weight=t["distill_weight"], temperature=t["temperature"], eval_fn=eval_fn,
                 checkpoint_dir=checkpoint_dir, checkpoint_every=t["checkpoint_every"], resume=resume,
                 log_dir=log_dir, seed=t["seed"], shuffle=t["shuffle"], progress=progress,
                 max_grad_norm=t["max_grad_norm"])
    return model, qmodel, train, result


def _qat_recipe(args) -> dict:
    if args.recipe:
        recipe = _read_recipe(args.recipe)
        if recipe.get("command") != "qat":
            raise SystemExit(f"error: {args.recipe} is a {recipe.get('command', 'quantize')} recipe, not a qat one")
        return recipe
    if not args.model or not args.data:
        raise SystemExit("error: lowbit qat needs a model (module:function) and --data module:function, or --recipe")
    learn = None if args.learn == "none" else args.learn
    return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "command": "qat", "model": args.model,
            "data": args.data, "config": _resolve_config(args).to_dict(),
            "options": {"learn": learn, "fold_bn": not args.no_fold_bn},
            "training": {"epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay, "loss": args.loss,
                         "distill_weight": args.distill, "temperature": args.temperature,
                         "freeze_bn_after": args.freeze_bn_after, "freeze_observers_after": args.freeze_observers_after,
                         "max_grad_norm": args.max_grad_norm, "seed": args.seed, "shuffle": True,
                         "checkpoint_every": args.checkpoint_every}}


def _first_inputs(train):
    inputs = next(iter(train))[0]
    return tuple(inputs) if isinstance(inputs, list) else inputs


def cmd_qat(args) -> int:
    from .export import export_onnx
    from .qat import save_checkpoint

    recipe = _qat_recipe(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"
    _, qmodel, train, result = _qat_from_recipe(recipe, checkpoint_dir=checkpoint_dir, log_dir=args.log_dir,
                                                resume=not args.no_resume, progress=not args.quiet)
    save_checkpoint(out / "qat_model.pt", qmodel, step=result.steps, epoch=result.epochs)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    written = ["qat_model.pt", "recipe.json"]
    if args.onnx:
        export_onnx(qmodel, out / "model.onnx", _first_inputs(train))
        written.append("model.onnx")
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from} ({result.checkpoint})")
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4g}"
    metrics = ", ".join(f"{m:.4g}" for m in result.metrics) or "n/a"
    print(f"QAT {recipe['config'].get('name') or 'config'}: {result.steps} steps over {result.epochs} epochs, "
          f"final loss {loss}, metric per epoch: {metrics}")
    print(f"wrote {out}/{', '.join(written)}; checkpoint in {checkpoint_dir}")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx

    recipe = _read_recipe(args.recipe)
    if recipe.get("command") == "qat":  # train again (same recipe, same weights), then export
        with tempfile.TemporaryDirectory() as tmp:
            _, qmodel, train, _ = _qat_from_recipe(recipe, checkpoint_dir=tmp, progress=False)
        export_onnx(qmodel, args.out, _first_inputs(train))
    else:
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
    q.add_argument("--smoothquant", type=float, metavar="ALPHA",
                   help="SmoothQuant migration strength before calibration (BERT-style models: 0.8)")
    q.add_argument("--threads", nargs="*", type=int, default=[1])
    q.add_argument("--out", default="runs/quantize", help="output folder")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("qat", help="quantization-aware training: prepare, fine-tune (resumable), save, export")
    t.add_argument("model", nargs="?", help="module:function returning an nn.Module, or a Hugging Face folder")
    t.add_argument("--data", help="module:function returning (train_batches, calib_batches[, eval_fn])")
    t.add_argument("--recipe", help="replay a qat recipe.json (the training options below are then ignored)")
    t.add_argument("--config", default="w4a8", help="preset name (w4a8, w4a4, w8a8) or a recipe config .json")
    t.add_argument("--skip", nargs="*", default=[], help="module-name globs to keep in float")
    t.add_argument("--observer", help="activation range estimator for calibration")
    t.add_argument("--learn", choices=["lsq", "lsq+", "none"], default="lsq", help="learned scales (none: observed)")
    t.add_argument("--no-fold-bn", action="store_true", help="train Conv and BatchNorm as separate layers")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (fine-tuning: small)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="not applied to quantizer scales")
    t.add_argument("--loss", default="cross_entropy", help="cross_entropy, mse, or module:function(output, target)")
    t.add_argument("--distill", type=float, default=0.0, help="share of distillation from the FP32 model, 0..1")
    t.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    t.add_argument("--freeze-bn-after", type=int, help="optimizer steps before BatchNorm statistics freeze")
    t.add_argument("--freeze-observers-after", type=int, help="steps before observed ranges freeze (--learn none)")
    t.add_argument("--max-grad-norm", type=float, help="clip the gradient norm")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-dir", help="where the resumable checkpoint lives (default OUT/checkpoints)")
    t.add_argument("--checkpoint-every", type=int, default=200, help="optimizer steps between checkpoints")
    t.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    t.add_argument("--log-dir", help="TensorBoard folder")
    t.add_argument("--onnx", action="store_true", help="also export OUT/model.onnx")
    t.add_argument("--out", default="runs/qat", help="output folder")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_qat)

    e = sub.add_parser("export", help="replay a recipe.json (quantize or qat) and export the model to ONNX")
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
