"""``lowbit quantize`` on a causal LM, ``lowbit perplexity``, and ``lowbit export`` of a causal-LM recipe.

    lowbit quantize FOLDER --config w4a16-g128 --algorithms gptq --out runs/lm
    lowbit perplexity FOLDER                       # the float model
    lowbit perplexity --recipe runs/lm/recipe.json # the quantized one, rebuilt
    lowbit perplexity runs/lm/model.onnx --tokenizer FOLDER

quantize writes OUT/model.onnx (``export_llm``: MatMulNBits, GroupQueryAttention, a KV cache),
OUT/fp32.onnx (the float model by the same builder), OUT/recipe.json and OUT/report.md / report.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ._common import (
    RECIPE_FORMAT,
    RECIPE_VERSION,
    UserError,
    output_folder,
    read_recipe,
    reject_options,
    write_json,
)
from ._llm import (
    check_causal_folder,
    check_llm_section,
    export_from_recipe,
    load_causal_lm,
    load_tokenizer,
    quantize_llm_from_recipe,
    read_text,
    refuse_gguf,
    windows,
)

DEFAULTS = {"config": "w4a16-g128", "calib_samples": 64, "seq_len": 512, "eval_windows": 8, "new_tokens": 16,
            "accuracy_level": 4, "threads": [2], "latency_runs": 5}
ENCODER_ONLY = {"batch": "--batch", "smoothquant": "--smoothquant"}  # options a causal LM does not take


def _fill_defaults(args) -> None:
    for dest, value in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def _max_positions(folder: str) -> int | None:
    return json.loads((Path(folder) / "config.json").read_text()).get("max_position_embeddings")


def _check_lengths(args) -> None:
    longest = _max_positions(args.model)
    if longest is not None and args.seq_len > longest:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's max_position_embeddings "
                        f"({longest})")


def _recipe(args, config, steps) -> dict:
    from ..targets import resolve_target

    options = {"progress": not args.quiet, "algorithms": [s.to_dict() for s in steps]}
    llm = {"calib_samples": args.calib_samples, "seq_len": args.seq_len, "calib_text": args.calib_text,
           "accuracy_level": args.accuracy_level, "max_length": None, "fuse": True}
    return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "command": "quantize", "model": args.model,
            "data": args.data, "config": config.to_dict(), "options": options,
            "target": resolve_target(args.target).name, "llm": llm}


def _calibration(recipe: dict, steps, batches_seen: int | None) -> dict | None:
    if not any(s.needs_data for s in steps):
        return None
    if recipe.get("data"):
        return {"source": f"--data {recipe['data']}", "batches": batches_seen}
    llm = recipe["llm"]
    return {"source": llm["calib_text"] or "english_text('calib')", "samples": llm["calib_samples"],
            "seq_len": llm["seq_len"]}


def _measure(args, model, qmodel, tokenizer, paths: dict[str, Path], ev, ev_source: str) -> dict:
    """Perplexity (PyTorch, ONNX Runtime), sizes, latency, greedy agreement of both models."""
    from ..runtime.matmulnbits import matmulnbits_inputs
    from ..targets import cpu_info
    from ._llm_measure import OrtCausalLM, greedy, latency, perplexity_of, session_of
    from ._llm_report import file_bytes

    progress = not args.quiet
    torch_models = {"fp32": model, "quantized": qmodel}
    sessions = {name: session_of(path, max(args.threads)) for name, path in paths.items()}
    with matmulnbits_inputs(qmodel, args.accuracy_level):  # the simulation of the file: int8 inputs at level 4
        ppl = {name: {"pytorch": perplexity_of(m, ev, progress),
                      "onnxruntime": perplexity_of(OrtCausalLM(sessions[name]), ev, progress)}
               for name, m in torch_models.items()}
        greedy_ids = {name: greedy(m, sessions[name], tokenizer, args.new_tokens) for name, m in torch_models.items()}
    timed = []
    for threads in args.threads:
        by_threads = (sessions if threads == max(args.threads)
                      else {name: session_of(path, threads) for name, path in paths.items()})
        timed.append({"threads": threads, **latency(by_threads, ev[:1], args.latency_runs)})
    return {"perplexity": ppl, "size_bytes": {name: file_bytes(p) for name, p in paths.items()},
            "latency_ms": timed, "latency_rounds": args.latency_runs, "cpu": cpu_info().describe(),
            "greedy": greedy_ids,
            "new_tokens": args.new_tokens,
            "evaluation": {"source": ev_source, "windows": ev.shape[0], "seq_len": ev.shape[1],
                           "tokens": ev.shape[0] * (ev.shape[1] - 1)}}


def cmd_quantize_llm(args) -> int:
    """Quantize a causal LM weight-only, export it and the float model, write the recipe and the report."""
    from ._llm_report import build, to_markdown
    from ._ptq import resolve_config, resolve_steps

    reject_options(args, ENCODER_ONLY,
                   "not used for a causal LM (it is quantized weight-only; latency is measured at batch 1)")
    _fill_defaults(args)
    _check_lengths(args)
    config = resolve_config(args)
    steps = resolve_steps(args.algorithms or [], "--algorithms")
    recipe = _recipe(args, config, steps)
    out = output_folder(args.out)
    tokenizer = load_tokenizer(args.model)  # the evaluation text first: a missing one fails before quantizing
    ev_text, ev_source = read_text(args.eval_text, "eval", "--eval-text")
    ev = windows(tokenizer, ev_text, args.eval_windows, args.seq_len, ev_source, "--eval-text")
    done = quantize_llm_from_recipe(recipe, "--config/--algorithms")
    model, qmodel = done.model, done.qmodel
    paths = {"fp32": out / "fp32.onnx", "quantized": out / "model.onnx"}
    export_from_recipe(model, paths["fp32"], recipe)
    export_from_recipe(qmodel, paths["quantized"], recipe)
    write_json(out / "recipe.json", recipe)
    measured = _measure(args, model, qmodel, done.tokenizer, paths, ev, ev_source)
    names = [s.name for s in steps if s.name != "fold_bn"]
    llm = {"model": args.model, "config": config.name, "algorithms": names,
           "quantize_seconds": done.seconds, "accuracy_level": args.accuracy_level,
           "calibration": _calibration(recipe, steps, done.calib_batches), **measured}
    report = build(llm)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(to_markdown(report) + "\n")
    print(to_markdown(report))
    print(f"\nwrote {out}/model.onnx, fp32.onnx, recipe.json (replay: lowbit export {out}/recipe.json "
          "--out ...), report.md, report.json")
    return 0


def export_llm_recipe(recipe: dict, where: str, out: Path) -> None:
    """``lowbit export`` of a causal-LM recipe: quantize again, ``export_llm`` with its options."""
    export_from_recipe(quantize_llm_from_recipe(recipe, where).qmodel, out, recipe)


# -- perplexity ---------------------------------------------------------------------------------
def _onnx_model(path: str, threads: int, seq_len: int):
    """An ``export_llm`` file as a causal LM (``OrtCausalLM``); a UserError for any other ONNX file."""
    from ._llm_measure import OrtCausalLM, session_of
    from ._tools import _load_onnx

    proto = _load_onnx(path)
    inputs = [i.name for i in proto.graph.input]
    if "input_ids" not in inputs or not any(n.startswith("past_key_values.") for n in inputs):
        raise UserError(f"{path} is not a causal LM written by export_llm (inputs {inputs[:4]}); lowbit "
                        "perplexity runs the model.onnx / fp32.onnx of lowbit quantize on a causal LM")
    longest = {p.key: p.value for p in proto.metadata_props}.get("lowbit.max_length")
    if longest is not None and seq_len > int(longest):
        raise UserError(f"--seq-len {seq_len} is longer than {path} runs (lowbit.max_length {longest})")
    return OrtCausalLM(session_of(path, threads))


def _recipe_model(args) -> tuple[dict, str]:
    """The causal-LM recipe of ``--recipe``, checked, and the folder it quantizes (MODEL, if given)."""
    recipe = read_recipe(args.recipe, "quantize")
    if "llm" not in recipe:
        raise UserError(f"{args.recipe} is not the recipe of a causal LM (no llm section); lowbit perplexity "
                        "replays the recipe.json of lowbit quantize on a causal LM")
    check_llm_section(recipe, args.recipe)
    ref = args.model or recipe["model"]
    check_causal_folder(ref, "perplexity")
    return recipe, ref


def _perplexity_model(args) -> tuple[Callable[[], object], str, str, int]:
    """(a function that builds the model, the tokenizer's folder, where the model runs, the MatMulNBits
    accuracy_level its simulation follows) for ``lowbit perplexity``: every argument is checked before
    anything slow is built."""
    if args.model is not None:
        refuse_gguf(args.model)
    if args.model is not None and args.model.endswith(".onnx"):
        if args.recipe:
            raise UserError("--recipe rebuilds a PyTorch model; give it a model folder (or none), not an "
                            ".onnx file")
        if args.tokenizer is None:
            raise UserError(f"{args.model}: an .onnx model needs --tokenizer FOLDER (the model folder it was "
                            "exported from)")
        where = f"onnxruntime ({args.threads} threads)"
        return partial(_onnx_model, args.model, args.threads, args.seq_len), args.tokenizer, where, 0
    if args.recipe:
        recipe, ref = _recipe_model(args)
        rebuild = partial(quantize_llm_from_recipe, recipe, args.recipe, model_ref=ref,
                          progress=not args.quiet)
        level = recipe["llm"]["accuracy_level"]
        where = f"pytorch (quantized by the recipe; as its file computes, at accuracy_level {level})"
        return (lambda: rebuild().qmodel), args.tokenizer or ref, where, level
    if args.model is None:
        raise UserError("lowbit perplexity needs a model: a causal LM folder, an .onnx file with "
                        "--tokenizer, or --recipe")
    check_causal_folder(args.model, "perplexity")
    load = partial(load_causal_lm, args.model, progress=not args.quiet)
    return load, args.tokenizer or args.model, "pytorch", 0


def cmd_perplexity(args) -> int:
    """Perplexity of a causal LM (folder, recipe or export_llm file) over windows of evaluation text."""
    from ..runtime.matmulnbits import matmulnbits_inputs
    from ._llm_measure import perplexity_of

    build_model, tokenizer_folder, where, level = _perplexity_model(args)
    tokenizer = load_tokenizer(tokenizer_folder, "--tokenizer" if args.tokenizer else "model folder")
    text, source = read_text(args.eval_text, "eval", "--eval-text")
    ev = windows(tokenizer, text, args.windows, args.seq_len, source, "--eval-text")
    model = build_model()
    with matmulnbits_inputs(model, level):  # a recipe's model computes what its exported file computes
        result = perplexity_of(model, ev, progress=not args.quiet)
    name = args.model or f"{args.recipe} (model {tokenizer_folder})"
    print(f"perplexity {result['perplexity']:.4f} of {name} in {where}: {result['tokens']} predicted tokens "
          f"({result['windows']} windows of {args.seq_len} tokens of {source}), {result['seconds']:.1f} s")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"model": args.model, "recipe": args.recipe, "measured_in": where, "text": source,
                          "seq_len": args.seq_len, **result})
        print(f"wrote {path}")
    return 0

