"""``lowbit qat``: prepare, fine-tune (resumable), save, optionally export; ``--recipe`` replays a run."""

from __future__ import annotations

from collections.abc import Mapping

from ..report import layers
from ._common import (
    RECIPE_FORMAT,
    RECIPE_VERSION,
    UserError,
    check_fields,
    config_from_dict,
    load_factory,
    load_model,
    output_folder,
    read_recipe,
    write_json,
)
from ._ptq import LEGACY_TARGET, resolve_config

LOSSES = {"cross_entropy": "torch.nn.functional:cross_entropy", "mse": "torch.nn.functional:mse_loss"}
QAT_OPTIONS = ("learn", "fold_bn")
TRAINING_FIELDS = ("epochs", "lr", "weight_decay", "loss", "distill_weight", "temperature", "freeze_bn_after",
                   "freeze_observers_after", "max_grad_norm", "seed", "shuffle", "checkpoint_every")


def load_qat_data(ref: str):
    """``(train batches, calibration inputs, eval_fn or None)`` from a ``module:function`` factory."""
    got = load_factory(ref, "--data")()
    if isinstance(got, Mapping):
        train, calib, eval_fn = got.get("train"), got.get("calib"), got.get("eval")
    elif isinstance(got, tuple) and len(got) in (2, 3):
        train, calib, eval_fn = (*got, None)[:3]
    else:
        raise UserError(f"--data {ref} must return (train_batches, calib_batches[, eval_fn]) or a dict with keys "
                        f"train, calib, eval; it returned a {type(got).__name__}")
    if train is None:
        raise UserError(f"--data {ref} returned no training batches")
    if iter(train) is train:  # a generator: training iterates it once per epoch
        train = list(train)
    first = next(iter(train), None)
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise UserError(f"--data {ref}: the training batches must be (inputs, target) pairs, "
                        f"got {type(first).__name__}")
    if calib is None:
        calib = [batch[0] for _, batch in zip(range(8), train, strict=False)]
    return train, list(calib), eval_fn


def qat_from_recipe(recipe: dict, *, checkpoint_dir, log_dir=None, resume=True, progress=True, where="recipe"):
    """Prepare and train the model a QAT recipe describes; returns (fp32 model, qat model, train data, result)."""
    import torch

    from ..qat import QATSchedule, fit, prepare_qat

    t, opts = recipe["training"], recipe["options"]
    check_fields(opts, QAT_OPTIONS, f"{where}: options", QAT_OPTIONS)
    check_fields(t, TRAINING_FIELDS, f"{where}: training", TRAINING_FIELDS)
    config = config_from_dict(recipe["config"], f"{where}: config")
    loss = load_factory(LOSSES.get(t["loss"], t["loss"]), "--loss")
    torch.manual_seed(t["seed"])  # a factory that draws random weights builds the same model every time
    model = load_model(recipe["model"])
    train, calib, eval_fn = load_qat_data(recipe["data"])
    qmodel = prepare_qat(model, config, calib, learn=opts["learn"], fold_bn=opts["fold_bn"], progress=progress,
                         target=recipe.get("target", LEGACY_TARGET))
    schedule = QATSchedule(qmodel, freeze_observers_after=t["freeze_observers_after"],
                           freeze_bn_after=t["freeze_bn_after"])
    result = fit(qmodel, train, loss, epochs=t["epochs"], lr=t["lr"],
                 weight_decay=t["weight_decay"], schedule=schedule, teacher=model if t["distill_weight"] else None,
                 distill_weight=t["distill_weight"], temperature=t["temperature"], eval_fn=eval_fn,
                 checkpoint_dir=checkpoint_dir, checkpoint_every=t["checkpoint_every"], resume=resume,
                 log_dir=log_dir, figures=layers if log_dir else None, seed=t["seed"], shuffle=t["shuffle"],
                 progress=progress,
                 max_grad_norm=t["max_grad_norm"])
    return model, qmodel, train, result


def _qat_recipe(args) -> dict:
    from ..targets import resolve_target

    if args.recipe:
        return read_recipe(args.recipe, "qat")
    if not args.model or not args.data:
        raise UserError("lowbit qat needs a model (module:function) and --data module:function, or --recipe")
    learn = None if args.learn == "none" else args.learn
    return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "command": "qat", "model": args.model,
            "data": args.data, "config": resolve_config(args).to_dict(), "target": resolve_target(args.target).name,
            "options": {"learn": learn, "fold_bn": not args.no_fold_bn},
            "training": {"epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay, "loss": args.loss,
                         "distill_weight": args.distill, "temperature": args.temperature,
                         "freeze_bn_after": args.freeze_bn_after, "freeze_observers_after": args.freeze_observers_after,
                         "max_grad_norm": args.max_grad_norm, "seed": args.seed, "shuffle": True,
                         "checkpoint_every": args.checkpoint_every}}


def first_inputs(train):
    """The model inputs of the first training batch, as ``export_onnx`` takes them."""
    inputs = next(iter(train))[0]
    return tuple(inputs) if isinstance(inputs, list) else inputs


def cmd_qat(args) -> int:
    """Train (resuming from OUT/checkpoints), save the QAT state and the recipe, export with ``--onnx``."""
    from pathlib import Path

    from ..export import export_onnx
    from ..qat import save_checkpoint

    recipe = _qat_recipe(args)
    out = output_folder(args.out)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"
    _, qmodel, train, result = qat_from_recipe(recipe, checkpoint_dir=checkpoint_dir, log_dir=args.log_dir,
                                               resume=not args.no_resume, progress=not args.quiet,
                                               where=args.recipe or "recipe")
    save_checkpoint(out / "qat_model.pt", qmodel, step=result.steps, epoch=result.epochs)
    write_json(out / "recipe.json", recipe)
    written = ["qat_model.pt", "recipe.json"]
    if args.onnx:
        export_onnx(qmodel, out / "model.onnx", first_inputs(train))
        written.append("model.onnx")
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from} ({result.checkpoint})")
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4g}"
    metrics = ", ".join(f"{m:.4g}" for m in result.metrics) or "n/a"
    print(f"QAT {recipe['config'].get('name') or 'config'}: {result.steps} steps over {result.epochs} epochs, "
          f"final loss {loss}, metric per epoch: {metrics}")
    print(f"wrote {out}/{', '.join(written)}; checkpoint in {checkpoint_dir}")
    return 0
