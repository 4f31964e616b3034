"""SmolLM2-135M-Instruct at 4 bits, group 128: lowbit (RTN, GPTQ, AWQ + GPTQ) against ONNX Runtime's
MatMulNBits quantizer (default RTN, HQQ, GPTQ) and NNCF ``compress_weights`` (int4_sym g128 ratio 1.0;
ratio 0.8 by the Hessian criterion with AWQ and scale estimation), against FP32, in one run.

Every method is scored on the same windows: the first ``--windows`` non-overlapping windows of
``--window`` tokens of ``lowbit.zoo.english_text("eval")``, each window on its own, exp of the mean
next-token NLL (``lowbit.report.perplexity``'s definition).  Data-aware methods calibrate on the first
``--calib`` windows of ``english_text("calib")`` (ONNX Runtime's GPTQ on the first ``--ort-gptq-calib``
of them: it runs the whole graph once per MatMul input per window, ~120 runs per window here).

Where a number comes from: "PyTorch" is the model in PyTorch (lowbit's fake-quant simulation, NNCF's
decompressing model); "ORT" is an ONNX file in ONNX Runtime (CPU, ``--threads`` threads, every
MatMulNBits at ``--accuracy-level``), one prefill per window through ``lowbit.export.llm.run_step``.
The FP32 file is ``export_llm`` of the float model (plain MatMul); ORT's quantizer rewrites it; each
lowbit model is exported by ``export_llm`` from its simulation.  Size: the ONNX file, or for NNCF its
compressed state dict.  Quantize wall / CPU seconds: the quantization call alone (CPU: the process's,
all threads), with the peak resident memory while it ran.

Stages (``--stages``, run in the order given, by default this one; rows are appended to ``--rows`` as they finish, and
``--render FILE`` prints the table of a finished or interrupted run again)::

    fp32 lowbit-w4 lowbit-w4-decoder ort-default ort-hqq nncf-int4 lowbit-w3 nncf-awq lowbit-mixed ort-gptq

    python benchmarks/bench_llm_peers.py [--windows 16] [--calib 16] [--ort-gptq-calib 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import _machine
import torch
from _llm_peers import (
    COVERAGE,
    Row,
    file_mb,
    load_rows,
    lowbit_config,
    nncf_compress,
    nncf_coverage,
    onnx_coverage,
    ort_perplexity,
    ort_quantize,
    save_row,
    state_dict_mb,
    timed,
)
from _selection import command, log_to_stderr, parse
from check_large_export import GIB, PeakRSS

import lowbit
from lowbit.export import export_llm
from lowbit.report import perplexity

log = logging.getLogger("bench_llm_peers")
STAGES = ["fp32", "lowbit-w4", "lowbit-w4-decoder", "ort-default", "ort-hqq", "nncf-int4", "lowbit-w3", "nncf-awq",
          "lowbit-mixed", "ort-gptq"]
ALGORITHMS = {"RTN": [], "GPTQ": ["gptq"], "AWQ+GPTQ": ["awq", "gptq"]}
TARGET = 1.12  # the target: W4 g128 with GPTQ (or AWQ + GPTQ) <= 1.12x FP32 perplexity
MIXED_TARGET = 1.06  # mixed 4/8 at <= 4.5 average weight bits


@dataclass
class Run:
    """What every stage shares: the model, the data, where files and rows go."""

    model: torch.nn.Module
    windows: torch.Tensor  # (n, T) evaluation windows
    calib: torch.Tensor  # (m, T) calibration windows
    folder: Path
    rows: Path
    args: argparse.Namespace

    @property
    def fp32_path(self) -> Path:
        return self.folder / "fp32.onnx"

    def torch_ppl(self, model: torch.nn.Module) -> float:
        return perplexity(model, self.windows, batch_size=self.args.batch_size, progress=False).perplexity

    def ort_ppl(self, path: Path) -> float:
        return ort_perplexity(path, self.windows, threads=self.args.threads)

    def keep(self, row: Row) -> None:
        log.info("%s: PyTorch %s, ORT %s, %s MB, %s s", row.method, row.ppl_torch, row.ppl_ort, row.size_mb,
                 row.wall_s)
        save_row(row, self.rows)


def _quantized(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its wall and CPU seconds and peak RSS (GiB) while it ran."""
    with PeakRSS() as rss:
        value, wall, cpu = timed(fn, *args, **kwargs)
    return value, wall, cpu, rss.peak / GIB


# -- stages ----------------------------------------------------------------------------------------

def stage_fp32(run: Run) -> None:
    export_llm(run.model, run.fp32_path, accuracy_level=run.args.accuracy_level, max_length=run.args.window)
    run.keep(Row("FP32", "none (float32; the peers' input file)", ppl_torch=run.torch_ppl(run.model),
                 ppl_ort=run.ort_ppl(run.fp32_path), size_mb=file_mb(run.fp32_path)))


def tied(args: argparse.Namespace, coverage: str = "all") -> bool:
    """Whether a row of ``coverage`` ends with ``TieEmbedding``: ``--tie`` and lm_head quantized ("all")."""
    return getattr(args, "tie", False) and coverage == "all"


def algorithm_steps(algorithm: str, args: argparse.Namespace, coverage: str = "all") -> list:
    """The recipe steps of ``algorithm`` (``ALGORITHMS``), AWQ reading ``--awq-batches`` windows, GPTQ as
    ``--gptq`` gives it with ``--gptq-clip``'s range search; then ``TieEmbedding`` where ``tied``."""
    clip = {"auto": "auto", "true": True, "false": False}[getattr(args, "gptq_clip", "false")]
    gptq = dataclasses.replace(lowbit.ptq.parse_step(getattr(args, "gptq", "gptq")), clip=clip)
    made = {"awq": lambda: lowbit.ptq.AWQ(batches=args.awq_batches), "gptq": lambda: gptq}
    steps = [made[step]() for step in ALGORITHMS[algorithm]]
    return steps + ([lowbit.ptq.TieEmbedding()] if tied(args, coverage) else [])


def algorithm_label(algorithm: str, args: argparse.Namespace) -> str:
    """``algorithm`` as the table names it: with the windows AWQ's search read when not all, GPTQ's
    options when on."""
    awq = "awq" in ALGORITHMS[algorithm] and args.awq_batches is not None and args.awq_batches < args.calib
    label = f"{algorithm} (AWQ search on {args.awq_batches} windows)" if awq else algorithm
    steps = algorithm_steps(algorithm, args)
    gptq = [s for s in steps if isinstance(s, lowbit.ptq.GPTQ)]
    options = [what for what, on in (("clip search", any(s.clips(steps) for s in gptq)),
                                     ("true sequential", any(s.true_sequential for s in gptq)),
                                     ("the float target", any(s.asymmetric for s in gptq)),
                                     ("scale refit", any(s.rescale for s in gptq))) if on]
    return label + (f" with {', '.join(options)}" if options else "")


def weights_label(coverage: str, args: argparse.Namespace) -> str:
    """What the ``coverage`` rows quantize (``COVERAGE``), the embedding reading lm_head's table where ``tied``."""
    if tied(args, coverage):
        return COVERAGE["all"].replace("embedding int8 per row", "embedding reads lm_head's table (TieEmbedding)")
    return COVERAGE[coverage]


def lowbit_row(run: Run, algorithm: str, bits: int, coverage: str) -> Row:
    """lowbit.quantize with ``algorithm`` (``ALGORITHMS``) on ``lowbit_config(bits, coverage)``,
    scored in PyTorch and, exported by ``export_llm``, in ONNX Runtime."""
    config = lowbit_config(bits, coverage)
    steps = algorithm_steps(algorithm, run.args, coverage)
    calib = [{"input_ids": w[None]} for w in run.calib] if algorithm != "RTN" else None
    label = f"lowbit W{bits} g128 sym, {algorithm_label(algorithm, run.args)}" + (
        "" if coverage == "all" else ", lm_head float") + (", tied table" if tied(run.args, coverage) else "")
    return scored(run, label, f"{weights_label(coverage, run.args)}; int{bits} g128 symmetric", len(calib or ()),
                  lowbit.quantize, run.model, calib, config, algorithms=steps or None, progress=False)


def scored(run: Run, label: str, weights: str, calib: int, build, *args, **kwargs) -> Row:
    """The model ``build(*args, **kwargs)`` returns (timed, with its peak RSS; it read ``calib``
    calibration windows), scored in PyTorch and, exported by ``export_llm``, in ONNX Runtime."""
    qmodel, wall, cpu, peak = _quantized(build, *args, **kwargs)
    row = Row(label, weights, ppl_torch=run.torch_ppl(qmodel), wall_s=wall, cpu_s=cpu, peak_gib=peak,
              calib=calib)
    path = run.folder / "lowbit.onnx"
    export_llm(qmodel, path, accuracy_level=run.args.accuracy_level, max_length=run.args.window)
    row.ppl_ort, row.size_mb = run.ort_ppl(path), file_mb(path)
    path.unlink()
    del qmodel
    gc.collect()
    return row


def stage_lowbit_w4(run: Run) -> None:
    for algorithm in run.args.w4_algorithms or ALGORITHMS:
        run.keep(lowbit_row(run, algorithm, 4, "all"))


def stage_lowbit_w4_decoder(run: Run) -> None:
    """``--decoder-algorithms`` (default: RTN and the best W4 algorithm of ``lowbit-w4`` by PyTorch
    perplexity, AWQ+GPTQ when that stage did not run) with ``lm_head`` and the embedding float: the
    layers ORT's quantizer covers."""
    algorithms = run.args.decoder_algorithms
    if not algorithms:
        done = {r.method: r.ppl_torch for r in load_rows(run.rows)}
        scored = {a: done.get(f"lowbit W4 g128 sym, {a}") for a in ("GPTQ", "AWQ+GPTQ")}
        algorithms = ["RTN", min((a for a in scored if scored[a] is not None), key=scored.get, default="AWQ+GPTQ")]
    for algorithm in algorithms:
        run.keep(lowbit_row(run, algorithm, 4, "decoder"))


def stage_lowbit_w3(run: Run) -> None:
    for algorithm in ("RTN", "GPTQ"):
        run.keep(lowbit_row(run, algorithm, 3, "all"))


def gptq_costs(model: torch.nn.Module, calib: list, steps: list) -> dict:
    """The reconstruction costs of W4 g128 and W8 (round to nearest, Fisher-weighted), the W4 ones scaled
    per layer by what GPTQ (``steps``' GPTQ, on a W4 copy) left of round to nearest's error: the error
    GPTQ will leave, not the one rounding would."""
    from lowbit.analysis._llm_sensitivity import reconstruction_sensitivities

    reports = reconstruction_sensitivities(model, calib, ["w4a16-g128", "w8a16"])
    gptq = [s for s in steps if isinstance(s, lowbit.ptq.GPTQ)]
    w4 = lowbit.quantize(model, calib, "w4a16-g128", algorithms=gptq, progress=False)
    layers = w4.lowbit_summary.reports[-1]["layers"]
    for row in reports["w4a16-g128"].layers:
        done = layers.get(row.name)
        if done:
            row.cost *= done["objective_gptq"] / done.get("objective_rtn_unclipped", done["objective_rtn"])
    return reports


def mixed_quantize(model: torch.nn.Module, calib: list, bits: float, steps: list,
                   cost: str = "rtn") -> torch.nn.Module:
    """``lowbit.mixed_precision`` over W4 g128 / W8 per channel for every Linear (lm_head included) at
    ``bits`` average weight bits (costs: ``cost``, "rtn" the default reconstruction costs, "gptq" those
    after GPTQ, ``gptq_costs``), then ``steps`` (GPTQ, or AWQ + GPTQ) on that config: choice and
    quantization, one timed call."""
    reports = gptq_costs(model, calib, steps) if cost == "gptq" else None
    result = lowbit.mixed_precision(model, calib, ("w4a16-g128", "w8a16"), {"avg_weight_bits": bits},
                                    sensitivities=reports)
    eights = [n for n, c in result.assignment.items() if c == "w8a16"]
    log.info("mixed at %.2f bits: %d 8-bit linears: %s", result.predicted["avg_weight_bits"], len(eights), eights)
    return lowbit.quantize(model, calib, result.config, algorithms=steps, progress=False)


def stage_lowbit_mixed(run: Run) -> None:
    calib = [{"input_ids": w[None]} for w in run.calib]
    bits, algorithm = run.args.mixed_bits, run.args.mixed_algorithm
    costs = ", layer costs after GPTQ" if run.args.mixed_cost == "gptq" else ""
    tie = ", tied table" if tied(run.args) else ""
    run.keep(scored(run, f"lowbit mixed W4 g128 / W8, {bits:g} avg bits, {algorithm_label(algorithm, run.args)}{costs}"
                    f"{tie}", f"{weights_label('all', run.args)}; 8-bit per channel where the sensitivity says, int4 g128 sym elsewhere; "
                    f"{bits:g} bits on average over the Linears", len(calib), mixed_quantize, run.model, calib, bits,
                    algorithm_steps(algorithm, run.args), run.args.mixed_cost))


def ort_row(run: Run, algorithm: str, label: str, calib: torch.Tensor | None = None) -> Row:
    path = run.folder / f"ort-{algorithm}.onnx"
    qmodel, wall, cpu, peak = _quantized(ort_quantize, run.fp32_path, path, algorithm,
                                         accuracy_level=run.args.accuracy_level, calib=calib)
    row = Row(f"ORT matmul_nbits_quantizer, {label}", onnx_coverage(qmodel), ppl_ort=run.ort_ppl(path),
              size_mb=file_mb(path), wall_s=wall, cpu_s=cpu, peak_gib=peak, calib=0 if calib is None else len(calib))
    path.unlink()
    return row


def stage_ort(algorithm: str, label: str):
    return lambda run: run.keep(ort_row(run, algorithm, label))


def stage_ort_gptq(run: Run) -> None:
    run.keep(ort_row(run, "gptq", "GPTQ (block 128, sym)", calib=run.calib[: run.args.ort_gptq_calib]))


def nncf_row(run: Run, label: str, **options) -> Row:
    try:
        import nncf  # noqa: F401
    except ImportError:  # only the missing package: the row says so and the run goes on
        return Row(f"NNCF compress_weights, {label}", "not run: nncf is not installed "
                   "(pip install -c constraints.txt 'nncf>=2.10')")
    cmodel, wall, cpu, peak = _quantized(nncf_compress, run.model, run.calib, **options)
    row = Row(f"NNCF compress_weights, {label}", nncf_coverage(run.model, cmodel), ppl_torch=run.torch_ppl(cmodel),
              size_mb=state_dict_mb(cmodel), wall_s=wall, cpu_s=cpu, peak_gib=peak, calib=len(run.calib))
    del cmodel
    gc.collect()
    return row


def stage_nncf_int4(run: Run) -> None:
    run.keep(nncf_row(run, "int4_sym g128, ratio 1.0"))


def stage_nncf_awq(run: Run) -> None:
    run.keep(nncf_row(run, "int4_sym g128, ratio 0.8 (Hessian), AWQ + scale estimation", ratio=0.8,
                      hessian=True, awq=True, scale_estimation=True))


RUNNERS = {"fp32": stage_fp32, "lowbit-w4": stage_lowbit_w4, "lowbit-w4-decoder": stage_lowbit_w4_decoder,
           "ort-default": stage_ort("default", "default RTN (block 128, sym)"),
           "ort-hqq": stage_ort("hqq", "HQQ (block 128; HQQ fits zero points)"), "nncf-int4": stage_nncf_int4,
           "lowbit-w3": stage_lowbit_w3, "nncf-awq": stage_nncf_awq, "lowbit-mixed": stage_lowbit_mixed,
           "ort-gptq": stage_ort_gptq}


# -- the table -------------------------------------------------------------------------------------

def _cell(value: float | None, base: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" + (f" ({value / base:.3f}x)" if base else "")


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "" if value is None else format(value, fmt)


def table(rows: Sequence[Row]) -> list[str]:
    fp32 = next((r for r in rows if r.method == "FP32"), Row("FP32", ""))
    lines = [("| method | weights quantized | calib windows | perplexity PyTorch (x FP32) | perplexity ORT (x FP32) "
              "| size MB | quantize wall s | quantize CPU s | peak RSS GiB |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.weights} | {r.calib or ''} | {_cell(r.ppl_torch, fp32.ppl_torch)} | "
                     f"{_cell(r.ppl_ort, fp32.ppl_ort)} | {_num(r.size_mb)} | {_num(r.wall_s)} | {_num(r.cpu_s)} | "
                     f"{_num(r.peak_gib, '.2f')} |")
    return lines


def _ratio(row: Row, fp32: Row, where: str) -> float | None:
    value, base = getattr(row, f"ppl_{where}"), getattr(fp32, f"ppl_{where}")
    return None if value is None or base is None else value / base


def _w3_gap(by: dict[str, Row], fp32: Row) -> list[str]:
    """W3 g128: the share of RTN's gap to FP32 that GPTQ closes (target >= 60%), per runtime."""
    rtn, gptq = by.get("lowbit W3 g128 sym, RTN"), by.get("lowbit W3 g128 sym, GPTQ")
    if rtn is None or gptq is None:
        return []
    out = []
    for where, label in (("torch", "PyTorch"), ("ort", "ORT")):
        r, g, f = (getattr(x, f"ppl_{where}") for x in (rtn, gptq, fp32))
        if None not in (r, g, f):
            out.append(f"W3 g128, {label}: GPTQ closes {100 * (r - g) / (r - f):.1f}% of RTN's gap to FP32 "
                       "(target >= 60%).")
    return out


def _beats(mine: Row, peer: Row, fp32: Row) -> bool:
    """True when ``mine`` is closer to FP32 than ``peer`` in every runtime both were scored in."""
    pairs = [(_ratio(mine, fp32, w), _ratio(peer, fp32, w)) for w in ("torch", "ort")]
    pairs = [(m, p) for m, p in pairs if m is not None and p is not None]
    return bool(pairs) and all(m < p for m, p in pairs)


def _mixed(rows: Sequence[Row], fp32: Row) -> list[str]:
    """lowbit's mixed 4/8 row against its target (<= 1.06x FP32) and NNCF's ratio-0.8 mix (closer to
    FP32 at equal or smaller size)."""
    out = []
    for mine in (r for r in rows if r.method.startswith("lowbit mixed") and r.ppl_torch):
        ratio = _ratio(mine, fp32, "torch")
        line = f"{mine.method}: {ratio:.4f}x FP32 in PyTorch (target <= {MIXED_TARGET}x: " \
               f"{'met' if ratio <= MIXED_TARGET else 'not met'})"
        for nncf in (r for r in rows if "ratio 0.8" in r.method and r.ppl_torch):
            smaller = mine.size_mb is not None and nncf.size_mb is not None and mine.size_mb <= nncf.size_mb
            line += (f"; vs {nncf.method}: {'closer to' if _beats(mine, nncf, fp32) else 'not closer to'} FP32, "
                     f"{'at equal or smaller' if smaller else 'at a larger'} size ({_num(mine.size_mb)} vs "
                     f"{_num(nncf.size_mb)} MB)")
        out.append(line + ".")
    return out


def verdicts(rows: Sequence[Row]) -> list[str]:
    """The issue's targets, from the rows: W3 GPTQ's share of RTN's gap closed (>= 60%); the best
    lowbit W4 (GPTQ or AWQ+GPTQ) <= 1.12x FP32 and below every pure-int4 peer in the same runtime."""
    by = {r.method: r for r in rows}
    fp32 = by.get("FP32")
    if fp32 is None:
        return ["(no FP32 row: no ratios)"]
    out = _w3_gap(by, fp32)
    peers = [r for r in rows if r.method.startswith(("ORT", "NNCF")) and "ratio 0.8" not in r.method
             and (r.ppl_ort or r.ppl_torch)]
    for head_float in (False, True):  # the best GPTQ / AWQ+GPTQ row of each coverage, whatever its options
        mine = [r for r in rows if r.method.startswith(("lowbit W4 g128 sym, GPTQ", "lowbit W4 g128 sym, AWQ+GPTQ"))
                and ("lm_head float" in r.method) == head_float and r.ppl_torch]
        if not mine:
            continue
        best = min(mine, key=lambda r: r.ppl_torch)
        ratio = _ratio(best, fp32, "torch")
        lost = [p.method for p in peers if not _beats(best, p, fp32)]
        out.append(f"{best.method}: {ratio:.4f}x FP32 in PyTorch (target <= {TARGET}x: "
                   f"{'met' if ratio <= TARGET else 'not met'}); closer to FP32 than {len(peers) - len(lost)} of "
                   f"{len(peers)} int4 ratio-1.0 peers in the same runtime" + (f" (not: {'; '.join(lost)})" if lost else "")
                   + ".")
    return out + _mixed(rows, fp32)


def report(rows: Sequence[Row], header: Sequence[str]) -> str:
    return "\n".join([*header, *table(rows), "", *verdicts(rows)])


def setup(args: argparse.Namespace, folder: Path) -> Run:
    from lowbit.zoo import english_text, smollm2, token_windows

    model, tokenizer = smollm2()
    windows = token_windows(tokenizer, english_text("eval"), window=args.window, count=args.windows)
    calib = token_windows(tokenizer, english_text("calib"), window=args.window, count=args.calib)
    return Run(model=model.eval(), windows=windows, calib=calib, folder=folder, rows=Path(args.rows), args=args)


def header(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    info = _machine.machine(("torch", "onnxruntime", "onnx", "transformers", "nncf"))
    return ["### LLM peers, one run", "", f"`{command('bench_llm_peers.py', argv)}`", "",
            _machine.machine_line(info, ("torch", "onnxruntime", "transformers", "nncf", "lowbit"), threads=True), "",
            (f"SmolLM2-135M-Instruct; {args.windows} windows of {args.window} tokens of `english_text(\"eval\")`; "
             f"calibration: the first {args.calib} windows of `english_text(\"calib\")` ({args.ort_gptq_calib} for "
             f"ORT's GPTQ); ORT files at accuracy_level {args.accuracy_level}, {args.threads} threads."), ""]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--calib", type=int, default=16, help="calibration windows for data-aware methods")
    parser.add_argument("--ort-gptq-calib", type=int, default=8, help="of those, how many ORT's GPTQ reads")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per PyTorch forward pass")
    parser.add_argument("--mixed-bits", type=float, default=4.5, help="lowbit-mixed: average weight bits")
    parser.add_argument("--mixed-algorithm", default="GPTQ", choices=[a for a in ALGORITHMS if a != "RTN"],
                        help="lowbit-mixed: the algorithm after the bit-width choice")
    parser.add_argument("--awq-batches", type=int, default=None,
                        help="calibration windows AWQ's search reads (default: all of --calib)")
    parser.add_argument("--mixed-cost", choices=["rtn", "gptq"], default="rtn",
                        help="lowbit-mixed: layer costs of round to nearest (lowbit.mixed_precision's own) or of "
                             "GPTQ (each W4 cost scaled by what GPTQ left of it on a W4 copy)")
    parser.add_argument("--gptq-clip", choices=["auto", "true", "false"], default="false",
                        help="GPTQ(clip=...): each group's range shrunk where its input-weighted error falls "
                             "(auto: unless AWQ clipped; default false, as the rows before the search)")
    parser.add_argument("--gptq", default="gptq",
                        help="the GPTQ step in its short form, e.g. 'gptq(true_sequential=true,asymmetric=true,"
                             "rescale=true)' (its clip: --gptq-clip)")
    parser.add_argument("--tie", action="store_true",
                        help="lowbit rows with lm_head quantized: TieEmbedding (the embedding reads lm_head's "
                             "table; one table in the file)")
    parser.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level of every file")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--w4-algorithms", nargs="+", choices=list(ALGORITHMS),
                        help="lowbit-w4's algorithms (default: all)")
    parser.add_argument("--decoder-algorithms", nargs="+", choices=list(ALGORITHMS),
                        help="lowbit-w4-decoder's algorithms (default: RTN and lowbit-w4's best)")
    parser.add_argument("--rows", default="llm_peers_rows.jsonl", help="JSON lines the rows are appended to")
    parser.add_argument("--render", metavar="ROWS", help="only print the table of this rows file")
    args, argv = parse(parser, argv)
    log_to_stderr(log)
    torch.set_num_threads(args.threads)
    if args.render:
        print(report(load_rows(Path(args.render)), header(args, argv)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_llm_peers_") as tmp:
        run = setup(args, Path(tmp))
        if "fp32" not in args.stages and any(s.startswith("ort") for s in args.stages):
            parser.error("the ort-* stages quantize the FP32 file: include the fp32 stage")
        for stage in args.stages:  # in the order given
            log.info("stage %s", stage)
            RUNNERS[stage](run)
    print(report(load_rows(run.rows), header(args, argv)))


if __name__ == "__main__":
    main()
