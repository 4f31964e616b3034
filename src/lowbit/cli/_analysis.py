"""``lowbit sensitivity``, ``lowbit autoquant`` and ``lowbit report``.

Each writes a recipe that replays its result: sensitivity's recipe reruns the analysis
(``lowbit sensitivity --recipe``); autoquant's is the chosen model's quantize (or qat) recipe,
which ``lowbit export`` (and ``lowbit quantize --config``) replay.
"""

from __future__ import annotations

import json
from pathlib import Path

from ._common import (
    RECIPE_FORMAT,
    RECIPE_VERSION,
    UserError,
    check_fields,
    config_from_dict,
    first_batch,
    load_data,
    load_factory,
    load_model,
    output_folder,
    read_json,
    read_recipe,
    write_json,
)
from ._ptq import resolve_config

SENSITIVITY_OPTIONS = ("batches", "probes", "seed")


def _held_out(batches: list) -> tuple[list, list, str]:
    """(calibration, evaluation, note): the last quarter of the batches is held out for evaluation."""
    if len(batches) < 2:
        return batches, batches, "evaluated on the calibration data (only one --data batch; give more to hold some out)"
    n_eval = max(1, len(batches) // 4)
    return batches[:-n_eval], batches[-n_eval:], f"evaluated on the last {n_eval} of {len(batches)} --data batches"


def _eval_fn(ref: str | None, model, eval_batches):
    """``--eval module:function`` (a factory returning eval_fn(model) -> float), or agreement with FP32."""
    if ref is not None:
        fn = load_factory(ref, "--eval")()
        if not callable(fn):
            raise UserError(f"--eval {ref} must return a function eval_fn(model) -> float, got {type(fn).__name__}")
        return fn, f"--eval {ref}"
    from ..analysis.metrics import agreement

    fn = agreement(model, eval_batches)
    return fn, f"{fn.metric} with FP32"


# -- sensitivity -----------------------------------------------------------------------------
def _sensitivity_recipe(args) -> dict:
    from ..targets import resolve_target

    if args.recipe:
        return read_recipe(args.recipe, "sensitivity")
    if not args.model:
        raise UserError("lowbit sensitivity needs a model (module:function or a folder), or --recipe")
    return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "command": "sensitivity", "model": args.model,
            "data": args.data, "config": resolve_config(args).to_dict(), "method": args.method,
            "target": resolve_target(args.target).name,
            "options": {"batches": args.batches, "probes": args.probes, "seed": args.seed}}


def cmd_sensitivity(args) -> int:
    """Per-layer sensitivity: OUT/sensitivity.json, sensitivity.md and recipe.json."""
    from ..analysis._sensitivity import sensitivity

    recipe = _sensitivity_recipe(args)
    options = dict(recipe.get("options", {}))
    check_fields(options, SENSITIVITY_OPTIONS, "recipe: options")
    config = config_from_dict(recipe["config"], "recipe: config")
    out = output_folder(args.out)
    model = load_model(recipe["model"])
    batches = load_data(recipe.get("data"), recipe["model"])
    report = sensitivity(model, batches, config=config, method=recipe["method"], target=recipe["target"],
                         progress=not args.quiet, **options)
    report.save_json(out / "sensitivity.json")
    (out / "sensitivity.md").write_text(report.to_markdown() + "\n")
    write_json(out / "recipe.json", recipe)
    print(report.to_markdown(top=args.top))
    print(f"\nwrote {out}/sensitivity.json, sensitivity.md, recipe.json")
    return 0


# -- autoquant -------------------------------------------------------------------------------
def _budget(text: str | None) -> dict | None:
    if text is None:
        return None
    key, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    from ..analysis._measure import BUDGET_KEYS

    if key not in BUDGET_KEYS or number is None:
        raise UserError(f"--budget {text!r}: expected KEY=NUMBER with KEY one of {', '.join(BUDGET_KEYS)}, "
                        "e.g. avg_weight_bits=5")
    return {key: number}


def _train_data(ref: str | None):
    if ref is None:
        return None
    from ._qat import load_qat_data

    return load_qat_data(ref)[0]


def _replay_recipe(args, chosen: dict, n_calib: int) -> dict:
    """The chosen model's recipe as ``lowbit export`` reads it (calibrated on the first ``n_calib``
    batches of --data, as autoquant was)."""
    recipe = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "model": args.model, **chosen}
    if chosen["command"] == "quantize":
        recipe.update(data=args.data, calib_batches=n_calib)
        return recipe
    t = chosen["training"]
    recipe["data"] = args.train_data
    recipe["training"] = {"epochs": t["epochs"], "lr": t["lr"], "weight_decay": t["weight_decay"],
                          "loss": "cross_entropy", "distill_weight": t["distill_weight"],
                          "temperature": t["temperature"], "freeze_bn_after": None, "freeze_observers_after": None,
                          "max_grad_norm": None, "seed": t["seed"], "shuffle": True, "checkpoint_every": 200}
    return recipe


def cmd_autoquant(args) -> int:
    """The ladder: OUT/autoquant.json / .md, recipe.json, model.onnx, fp32.onnx, report.json."""
    from ..analysis._autoquant import autoquant
    from ..analysis._measure import layer_bits
    from ..export import export_onnx
    from ..report import compare

    model = load_model(args.model)
    calib, eval_batches, where = _held_out(load_data(args.data, args.model))
    eval_fn, metric = _eval_fn(args.eval, model, eval_batches)
    example = first_batch(calib)
    out = output_folder(args.out)
    result = autoquant(model, calib, eval_fn, args.max_drop, budget=_budget(args.budget),
                       train_data=_train_data(args.train_data), config=resolve_config(args),
                       example_inputs=example, rungs=args.rungs, qat_epochs=args.qat_epochs, target=args.target,
                       progress=not args.quiet)
    export_onnx(model, out / "fp32.onnx", example)
    export_onnx(result.model, out / "model.onnx", example)
    comparison = compare(model, result.model, inputs=example, onnx=out / "model.onnx", fp32_onnx=out / "fp32.onnx")
    comparison.save_json(out / "report.json")
    data = {**result.to_dict(), "metric": metric, "evaluation": where, "bits": layer_bits(result.model)}
    (out / "autoquant.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / "autoquant.md").write_text(f"Metric: {metric}, {where}.\n\n{result.to_markdown()}\n")
    write_json(out / "recipe.json", _replay_recipe(args, result.recipe, len(calib)))
    print(f"Metric: {metric}, {where}.\n\n{result.to_markdown()}")
    print(f"\nwrote {out}/model.onnx, fp32.onnx, recipe.json (replay: lowbit export {out}/recipe.json --out ...), "
          "autoquant.json, autoquant.md, report.json")
    return 0 if result.met or not args.strict else 1


# -- report ----------------------------------------------------------------------------------
def cmd_report(args) -> int:
    """One HTML file from what quantize / sensitivity / autoquant wrote into a folder."""
    from ..report import html

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{args.folder} is not a folder (give the --out folder of lowbit quantize, sensitivity "
                         "or autoquant)")
    found = {name: read_json(folder / f"{name}.json", name) for name in ("report", "sensitivity", "autoquant")
             if (folder / f"{name}.json").exists()}
    if not found:
        raise UserError(f"{folder} holds none of report.json, sensitivity.json, autoquant.json")
    auto = found.get("autoquant", {})
    mixed = auto.get("mixed") or {}
    ladder = {"steps": auto["steps"], "reason": auto["reason"]} if auto else None
    path = html(Path(args.out) if args.out else folder / "report.html", title=args.title,
                comparison=found.get("report"), sensitivity=found.get("sensitivity") or auto.get("sensitivity"),
                bits=auto.get("bits"), front=mixed.get("front"), chosen=mixed.get("chosen"), ladder=ladder,
                notes=[f"Metric: {auto['metric']}, {auto['evaluation']}."] if auto else ())
    print(f"wrote {path}")
    return 0
