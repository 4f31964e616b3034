"""Staged QAT of SmolLM2-135M-Instruct after PTQ: perplexity before and after, train-step time vs FP32.

1. FP32 perplexity on the first ``--eval-windows`` windows of 512 tokens of
   ``english_text("eval")`` (``lowbit.report.perplexity``).
2. PTQ: ``lowbit.quantize(model, calib, --config, algorithms=["gptq"])`` on ``--gptq-windows``
   windows of 512 calibration tokens (``--ptq rtn``: round to nearest, no data); with
   ``--mixed-bits B`` the config is ``lowbit.mixed_precision``'s choice of W4 g128 / W8 per channel
   per Linear at ``B`` average weight bits on the same windows; its perplexity.
3. ``lowbit.qat.from_ptq`` (learned scales starting at the PTQ scales: GPTQ's on-grid weights
   rescale their fixed codes, ``learn="auto"``; ``--learn lsq`` for plain LSQ) and ``llm_schedule``: stage 0
   trains only the scales of the blocks and the head, then ``--stages`` groups of decoder blocks
   unfreeze, the last blocks first; embedding, norms and the head's weight stay frozen.  Each
   stage is ``--steps-per-stage`` AdamW steps of ``--batch`` windows of ``--seq`` tokens of the
   calibration text (disjoint from the evaluation pages), pure distillation from the FP32 model
   (per-token KL of the next-token distributions, temperature 1), through ``lowbit.qat.fit``.
   The perplexity of ``lowbit.qat.convert(qat)`` (what export writes) after every stage.
4. Train-step time: an FP32 fine-tuning step (cross-entropy, AdamW over every parameter) against a
   QAT step of the last stage, with and without the teacher's forward pass, on the same batch
   shape, in interleaved rounds in this process; wall and CPU seconds (``time.process_time``).

    python benchmarks/bench_llm_qat.py [--config w4a16-g128] [--ptq gptq] [--steps-per-stage 28]
                                       [--json /tmp/llmqat/bench.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time

import _machine
import torch
import torch.nn.functional as F

import lowbit
from lowbit.qat import (
    causal_lm_loss,
    distillation_loss,
    fit,
    from_ptq,
    llm_schedule,
    lm_batches,
    param_groups,
)
from lowbit.report import perplexity
from lowbit.zoo import english_text, smollm2, token_windows

log = logging.getLogger("bench_llm_qat")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="w4a16-g128")
    p.add_argument("--ptq", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--mixed-bits", type=float, default=None,
                   help="QAT the mixed 4/8 model instead: lowbit.mixed_precision over w4a16-g128 / w8a16 at this "
                        "average of weight bits (on the GPTQ windows), then --ptq on its config")
    p.add_argument("--gptq-windows", type=int, default=64, help="512-token calibration windows for GPTQ")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="tokens per training window")
    p.add_argument("--batch", type=int, default=2, help="windows per training step")
    p.add_argument("--stages", type=int, default=2, help="groups of decoder blocks unfrozen one per stage")
    p.add_argument("--steps-per-stage", type=int, default=28)
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate of the weights")
    p.add_argument("--scale-lr", type=float, default=5e-5, help="AdamW learning rate of the learned scales")
    p.add_argument("--learn", choices=("auto", "lsq", "rescale"), default="auto", help="from_ptq's learn=")
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    return p.parse_args()


def _ppl(model, windows) -> float:
    model.eval()
    return perplexity(model, windows, progress=False).perplexity


def _quantize(model, tok, args) -> tuple[torch.nn.Module, float]:
    start = time.perf_counter()
    calib = [{"input_ids": w[None]} for w in token_windows(tok, english_text("calib"), 512, count=args.gptq_windows)]
    config = args.config
    if args.mixed_bits is not None:
        choice = lowbit.mixed_precision(model, calib, ("w4a16-g128", "w8a16"), {"avg_weight_bits": args.mixed_bits})
        config = choice.config
        log.info("mixed at %.2f bits: %d 8-bit linears", choice.predicted["avg_weight_bits"],
                 sum(c == "w8a16" for c in choice.assignment.values()))
    if args.ptq == "gptq":
        ptq = lowbit.quantize(model, calib, config, algorithms=["gptq"], progress=False)
    else:
        ptq = lowbit.quantize(model, None, config, progress=False)
    return ptq, time.perf_counter() - start


def _train(model, qat, train, evals, args) -> list[dict]:
    """Staged distillation through fit, one fit call per stage (same optimizer and schedule);
    the converted model's perplexity after each stage."""
    sched = llm_schedule(qat, steps_per_stage=args.steps_per_stage, stages=args.stages)
    opt = torch.optim.AdamW(param_groups(qat, lr=args.lr, scale_lr=args.scale_lr, weight_decay=0.0))
    batches = lm_batches(train, args.batch)
    rows = []
    for stage, patterns in enumerate(sched.stages):
        part = batches[stage * args.steps_per_stage:(stage + 1) * args.steps_per_stage]
        trainable = sum(p.numel() for p in qat.parameters() if p.requires_grad)
        wall, cpu = time.perf_counter(), time.process_time()
        res = fit(qat, part, causal_lm_loss, epochs=1, optimizer=opt, schedule=sched, teacher=model,
                  distill_weight=1.0, temperature=1.0, shuffle=False, progress=False, seed=stage)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        ppl = _ppl(lowbit.qat.convert(qat), evals)
        qat.train()
        rows.append({"stage": stage, "patterns": patterns, "trainable_params": trainable, "steps": len(part),
                     "tokens": sum(ids.numel() for _, ids in part), "last_kl": res.final_loss,
                     "wall_s": wall, "cpu_s": cpu, "perplexity": ppl})
        log.info("stage %d: %s", stage, rows[-1])
    return rows


def _step_fns(model, qat, ids):
    """One training step of each kind on the batch ``ids``: forward, backward, optimizer step."""
    fp32 = copy.deepcopy(model).train()
    fp32_opt = torch.optim.AdamW(fp32.parameters(), lr=1e-6)
    qat_opt = torch.optim.AdamW(param_groups(qat, lr=1e-6, weight_decay=0.0))

    def fp32_step():
        F.cross_entropy(fp32(ids, use_cache=False).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        fp32_opt.step()
        fp32_opt.zero_grad()

    def qat_ce_step():
        causal_lm_loss(qat(ids, use_cache=False), ids).backward()
        qat_opt.step()
        qat_opt.zero_grad()

    def qat_distill_step():
        with torch.no_grad():
            teacher = model(ids, use_cache=False).logits
        distillation_loss(qat(ids, use_cache=False).logits, teacher, temperature=1.0).backward()
        qat_opt.step()
        qat_opt.zero_grad()

    return {"fp32": fp32_step, "qat_ce": qat_ce_step, "qat_distill": qat_distill_step}


def _timing(model, qat, ids, rounds: int) -> dict:
    """Interleaved rounds (one warm-up each first); medians of wall and CPU seconds, and of the
    per-round ratio to the FP32 step of the same round."""
    steps = _step_fns(model, qat, ids)
    for fn in steps.values():
        fn()
    times = {k: {"wall": [], "cpu": []} for k in steps}
    for _ in range(rounds):
        for key, fn in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[key]["wall"].append(time.perf_counter() - wall)
            times[key]["cpu"].append(time.process_time() - cpu)
    out = {}
    for key, t in times.items():
        out[key] = {kind: statistics.median(v) for kind, v in t.items()}
        for kind in ("wall", "cpu"):
            out[key][f"{kind}_x_fp32"] = statistics.median(a / b for a, b in zip(t[kind], times["fp32"][kind], strict=True))
    return out


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = smollm2()
    evals = token_windows(tok, english_text("eval"), 512, count=args.eval_windows)
    total_steps = args.steps_per_stage * (args.stages + 1)
    train = token_windows(tok, english_text("calib"), args.seq, count=total_steps * args.batch)
    result = {"args": vars(args), "machine": _machine.machine(["transformers"]), "fp32": _ppl(model, evals)}
    log.info("FP32 perplexity %.3f", result["fp32"])
    ptq, result["ptq_seconds"] = _quantize(model, tok, args)
    result["ptq"] = _ppl(ptq, evals)
    log.info("PTQ (%s) perplexity %.3f in %.0f s", args.ptq, result["ptq"], result["ptq_seconds"])
    qat = from_ptq(ptq, learn=args.learn, inplace=True)
    result["stages"] = _train(model, qat, train, evals, args)
    result["timing"] = _timing(model, qat, train[: args.batch], args.timing_rounds)
    print(json.dumps(result, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
