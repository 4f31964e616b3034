"""``lowbit quantize`` (PTQ, export, report) and ``lowbit export`` (replay a recipe)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ._common import (
    RECIPE_FORMAT,
    RECIPE_VERSION,
    UserError,
    check_fields,
    config_from_dict,
    first_batch,
    load_data,
    load_model,
    output_folder,
    read_json,
    read_recipe,
    reject_options,
    write_json,
)

# recipe "options": keyword arguments of lowbit.quantize.  "algorithms" is the resolved list of steps,
# each as Step.to_dict() writes it (every field, so the recipe replays the same whatever the defaults).
QUANTIZE_OPTIONS = ("progress", "smoothquant", "algorithms")
# options of lowbit quantize that only a causal LM takes (dest -> flag)
LLM_ONLY = {"calib_samples": "--calib-samples", "seq_len": "--seq-len", "calib_text": "--calib-text",
            "eval_windows": "--eval-windows", "eval_text": "--eval-text", "new_tokens": "--new-tokens",
            "accuracy_level": "--accuracy-level"}
# A recipe written before targets existed was quantized, and exported, with int8 weights.
LEGACY_TARGET = "x86-vnni"


def resolve_config(args):
    """``--config`` (a preset, a QuantConfig .json or a recipe.json) with ``--skip`` / ``--observer`` applied."""
    from ..config import CONFIGS, get_config

    if args.config.endswith(".json"):
        data = read_json(args.config, "--config")
        if isinstance(data, dict) and data.get("format") == RECIPE_FORMAT:  # a whole recipe: take its config
            data = data.get("config")
        config = config_from_dict(data, args.config)
    elif args.config in CONFIGS:
        config = get_config(args.config)
    else:
        raise UserError(f"--config {args.config!r} is neither a preset ({', '.join(CONFIGS)}) nor a .json file")
    if args.skip:
        config = config.skip(*args.skip)
    if args.observer:
        try:
            config = config.with_observer(args.observer)
        except ValueError as exc:
            raise UserError(f"--observer: {exc}") from None
    return config


def quantize_from_recipe(recipe: dict, where: str = "recipe"):
    """Load the model and data a quantize recipe names and run PTQ; returns (model, qmodel, batches)."""
    from ..ptq import quantize

    options = dict(recipe.get("options", {}))
    check_fields(options, QUANTIZE_OPTIONS, f"{where}: options")
    if "algorithms" in options:  # checked before the model loads
        options["algorithms"] = resolve_steps(options["algorithms"], f"{where}: options.algorithms",
                                              smoothquant=options.get("smoothquant"))
    config = config_from_dict(recipe["config"], f"{where}: config")
    model = load_model(recipe["model"])
    batches = load_data(recipe.get("data"), recipe["model"])
    if "calib_batches" in recipe:
        batches = batches[:recipe["calib_batches"]]
    qmodel = quantize(model, batches, config, target=recipe.get("target", LEGACY_TARGET), **options)
    return model, qmodel, batches


def resolve_steps(algorithms, where: str, smoothquant: float | None = None) -> tuple:
    """The steps ``lowbit.quantize`` runs for ``algorithms`` (a short-form string or a recipe's
    list), BatchNorm folding included; a UserError naming ``where`` when they do not parse."""
    from ..ptq import resolve_algorithms

    if not isinstance(algorithms, (str, list)):
        raise UserError(f"{where}: expected a list of algorithms, got {type(algorithms).__name__}")
    try:
        return resolve_algorithms(algorithms, smoothquant=smoothquant)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: {exc}") from None


def _encoder_defaults(args) -> None:
    """The defaults of the module:function / encoder path; a UserError for options only a causal LM takes."""
    reject_options(args, LLM_ONLY, f"for causal LMs only ({args.model} is not a *ForCausalLM folder)")
    args.config = args.config or "w8a8"
    args.threads = args.threads or [1]
    args.latency_runs = args.latency_runs or 50
    args.batch = args.batch or [1]


def cmd_quantize(args) -> int:
    """PTQ, export FP32 + quantized ONNX, write the recipe and the comparison report (a causal LM:
    ``lowbit.cli._llm_commands.cmd_quantize_llm``)."""
    from ..export import export_onnx
    from ..report import compare
    from ..targets import resolve_target
    from ._llm import causal_architecture, refuse_gguf

    refuse_gguf(args.model)
    if causal_architecture(args.model) is not None:
        from ._llm_commands import cmd_quantize_llm

        return cmd_quantize_llm(args)
    _encoder_defaults(args)
    config = resolve_config(args)
    options = {"progress": not args.quiet}
    if args.smoothquant is not None:
        options["smoothquant"] = args.smoothquant
    if args.algorithms is not None:
        if args.smoothquant is not None:
            raise UserError("--smoothquant and --algorithms: give SmoothQuant once, in --algorithms "
                            f"(e.g. smoothquant(alpha={args.smoothquant}))")
        options["algorithms"] = [s.to_dict() for s in resolve_steps(args.algorithms, "--algorithms")]
    # The resolved target, not "auto": the recipe replays to the same bytes on another CPU.
    recipe = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "command": "quantize", "model": args.model,
              "data": args.data, "config": config.to_dict(), "options": options,
              "target": resolve_target(args.target).name}
    out = output_folder(args.out)
    model, qmodel, batches = quantize_from_recipe(recipe)
    example = first_batch(batches)
    export_onnx(model, out / "fp32.onnx", example)
    export_onnx(qmodel, out / "model.int8.onnx", example)
    write_json(out / "recipe.json", recipe)
    report = compare(model, qmodel, inputs=example, onnx=out / "model.int8.onnx", fp32_onnx=out / "fp32.onnx",
                     threads=args.threads, batch_sizes=args.batch, latency_runs=args.latency_runs)
    (out / "report.md").write_text(str(report) + "\n")
    report.save_json(out / "report.json")
    print(report)
    print(f"\nwrote {out}/model.int8.onnx, fp32.onnx, recipe.json, report.md, report.json")
    return 0


def cmd_export(args) -> int:
    """Replay a recipe (quantize, or qat: train again) and export the model to ``--out`` for the
    recipe's target, or ``--target`` (``lowbit.export``: a runtime other than the recipe's is refused)."""
    from ._qat import first_inputs, qat_from_recipe

    recipe = read_recipe(args.recipe)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give the file to write")
    target = getattr(args, "target", None)
    if "llm" in recipe and target is not None:
        raise UserError("--target: a causal-LM recipe exports ONNX Runtime's MatMulNBits file only; leave it out")
    if target is not None:  # before the replay (which may train): a refusal costs nothing
        _check_target(recipe, target, args.recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    if recipe.get("command") == "qat":  # train again (same recipe, same weights), then export
        with tempfile.TemporaryDirectory() as tmp:
            _, qmodel, train, _ = qat_from_recipe(recipe, checkpoint_dir=tmp, progress=False, where=args.recipe)
        _export(qmodel, out, first_inputs(train), target)
    elif "llm" in recipe:  # a causal LM: export_llm with the recipe's options
        from ._llm_commands import export_llm_recipe

        export_llm_recipe(recipe, args.recipe, out)
    else:
        _, qmodel, batches = quantize_from_recipe(recipe, args.recipe)
        _export(qmodel, out, first_batch(batches), target)
    print(f"wrote {out}")
    return 0


def _check_target(recipe: dict, target: str, where: str) -> None:
    """A UserError when the recipe's model cannot be exported for ``--target``."""
    from ..export.dispatch import check_compatible, requested_target
    from ..targets import resolve_target

    recorded = resolve_target(recipe.get("target", LEGACY_TARGET))
    try:
        check_compatible(recorded, requested_target(target, recorded))
    except ValueError as exc:
        raise UserError(f"--target {target}: {exc} (recipe {where})") from None


def _export(qmodel, out: Path, example, target: str | None) -> None:
    """``lowbit.export`` for ``target`` (None: the model's); a missing exporter or extra is a UserError."""
    from ..export.dispatch import export

    try:
        export(qmodel, out, example, target=target)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            raise  # a package the model itself needs: main() names it
        raise UserError(str(exc)) from None
