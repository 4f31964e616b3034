"""``html``: one self-contained HTML file a person can read: tables, figures, notes.

Everything is inside the file: CSS inline, figures as PNG ``data:`` URIs, no script, no
link to anything outside it; every piece of user text is escaped.  The inputs are plain
data or objects with ``to_dict()`` (``Comparison``, ``OnnxKernelReport``,
``SensitivityReport`` ...), so this module needs nothing above the report layer.

    lowbit.report.html("runs/mnv2/report.html", comparison=lowbit.compare(...),
                       kernels=lowbit.inspect_onnx("runs/mnv2/model.int8.onnx"),
                       sensitivity=report, bits={"features.0.0": 8, "classifier.1": 32})
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path

from .._files import write_atomic
from ..export.onnx_inspect import classify
from . import plots

WHERE = {"pytorch": "PyTorch simulation", "ort": "ONNX Runtime"}
TOP_ROWS = 12  # sensitivity rows shown in the table (the figure shows every layer)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2933;
       margin: 0; background: #f5f7fa; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #e3e7eb; }
h3 { font-size: 15px; margin: 20px 0 6px; }
.meta, .caption { color: #616e7c; font-size: 12.5px; }
nav { margin: 8px 0 0; font-size: 13px; }
nav a { margin-right: 14px; color: #2f5f8f; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e7eb; text-align: left; vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.hl td { background: #fdecea; }
.good { color: #1e7b4d; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
code { font-size: 12.5px; background: #f0f3f6; padding: 1px 4px; border-radius: 3px; }
ul.notes { padding-left: 20px; color: #3e4c59; }
details { margin: 6px 0; font-size: 13px; } summary { cursor: pointer; color: #2f5f8f; }
.reason { margin: 6px 0; padding: 8px 12px; background: #f0f3f6; border-left: 4px solid #5d7fa3; }
"""


# -- small pieces ----------------------------------------------------------------------------
def _plain(obj):
    """``obj.to_dict()`` for report objects, ``obj`` itself for plain data."""
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def num(value, suffix: str = "") -> str:
    """A number as a person reads it: ints with thousands separators, 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}{suffix}"
    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return ("-" if value < 0 else "") + "inf"
    a = abs(value)
    if a == 0:
        text = "0"
    elif a >= 1000:
        text = f"{value:,.0f}"
    elif a >= 1e-3:
        text = f"{value:.4g}"
    else:
        text = f"{value:.2e}"
    return text + suffix


def _cell(value, numeric: bool) -> str:
    """A right-aligned cell in a numeric column, or for any number."""
    numeric = numeric or (isinstance(value, (int, float)) and not isinstance(value, bool))
    return f"<td class=num>{escape(num(value))}</td>" if numeric else f"<td>{escape(num(value))}</td>"


def _table(head: Sequence[str], rows: Iterable[Sequence], numeric: Iterable[int] = (),
           highlight: Iterable[int] = ()) -> str:
    """A table; cells are raw values (formatted with ``num``, escaped); a cell given as
    ``("html", text)`` is inserted as already-safe HTML."""
    numeric, highlight = set(numeric), set(highlight)
    head_html = "".join(f"<th{' class=num' if i in numeric else ''}>{escape(h)}</th>" for i, h in enumerate(head))
    body = []
    for r, row in enumerate(rows):
        cells = "".join((f"<td{' class=num' if i in numeric else ''}>{c[1]}</td>" if isinstance(c, tuple)
                         else _cell(c, i in numeric)) for i, c in enumerate(row))
        body.append(f"<tr{' class=hl' if r in highlight else ''}>{cells}</tr>")
    return f"<table><thead><tr>{head_html}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _span(text: str, cls: str) -> tuple[str, str]:
    """A ``_table`` cell of escaped ``text`` in a CSS class."""
    return "html", f'<span class="{cls}">{escape(text)}</span>'


def _figure(png: bytes, alt: str, caption: str) -> str:
    # drawn at plots.DPI, shown at 100 pixels per figure inch: sharp on high-density screens
    width = int.from_bytes(png[16:20], "big") * 100 // plots.DPI  # the PNG header's width
    return (f'<img src="{plots.data_uri(png)}" width="{width}" alt="{escape(alt)}">'
            f'<div class="caption">{escape(caption)}</div>')


def _section(ident: str, title: str, body: str) -> tuple[str, str, str]:
    return ident, title, f'<section id="{ident}"><h2>{escape(title)}</h2>{body}</section>'


def _p(text: str, cls: str = "caption") -> str:
    return f'<p class="{cls}">{escape(text)}</p>'


# -- sections ---------------------------------------------------------------------------------
def _comparison(data: Mapping) -> str:
    rows = data.get("rows", [])
    keys = sorted({k for r in rows for k in r.get("metrics", {})})
    base_size = {r.get("where"): r.get("size_mb") for r in rows if r.get("model", "").startswith("fp32")}
    table = []
    for r in rows:
        size, ref = r.get("size_mb"), base_size.get(r.get("where"))
        ratio = size / ref if size is not None and ref else None
        table.append([r.get("model"), WHERE.get(r.get("where"), r.get("where")), size,
                      None if ratio is None else f"{ratio:.3g}x",
                      *(r.get("metrics", {}).get(k) for k in keys)])
    body = (_p("Fidelity to FP32 on the same inputs (or your eval_fn's metric), and file size; "
               "each row says where it was measured.")
            + _table(["model", "measured in", "size (MB)", "size vs FP32", *keys], table,
                     numeric=range(2, 4 + len(keys))))
    if data.get("parity"):
        body += "<h3>PyTorch vs ONNX Runtime on the quantized model</h3>"
        pkeys = sorted({k for v in data["parity"].values() for k in v})
        body += _table(["PyTorch side", *pkeys], [[name, *(v.get(k) for k in pkeys)]
                                                  for name, v in data["parity"].items()], numeric=range(1, 1 + len(pkeys)))
    body += _latency(data.get("latency", []))
    if data.get("notes"):
        body += '<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in data["notes"]) + "</ul>"
    return body


def _latency(latency: Sequence[Mapping]) -> str:
    if not latency:
        return ""
    cells = list(dict.fromkeys((x["threads"], x["batch"]) for x in latency))
    by = {(x["model"], x["threads"], x["batch"]): x for x in latency}
    models = list(dict.fromkeys(x["model"] for x in latency))
    rows = []
    for t, b in cells:
        fp32, q = by.get(("fp32", t, b)), by.get(("quantized", t, b))
        speedup = fp32["median_ms"] / q["median_ms"] if fp32 and q and q["median_ms"] else None
        rows.append([t, b, *(by.get((m, t, b), {}).get("median_ms") for m in models),
                     *(by.get((m, t, b), {}).get("p90_ms") for m in models),
                     None if speedup is None else _span(f"{speedup:.2f}x", "good" if speedup >= 1 else "bad")])
    head = ["threads", "batch", *(f"{m} median ms" for m in models), *(f"{m} p90 ms" for m in models),
            "speed-up"]
    labels = [f"{t} thread{'s' if t != 1 else ''}, batch {b}" for t, b in cells]
    png = plots.latency_bars(labels, {m: [by.get((m, t, b), {}).get("median_ms") for t, b in cells]
                                      for m in models}, title="Median latency, ONNX Runtime CPU provider")
    return ("<h3>Latency (measured in ONNX Runtime)</h3>" + _table(head, rows, numeric=range(len(head)))
            + _figure(png, "latency chart", "Median wall time of one run call, ONNX Runtime CPU provider."))


def _kernels(reports: Sequence[Mapping]) -> str:
    order = {"integer": 0, "float_compute": 1, "data_movement": 2, "other": 3}
    body = _p("The graph ONNX Runtime runs after its optimizer (measured, not read from the file): "
              "integer kernels are what the quantization bought; float compute nodes are left to look at.")
    for r in reports:
        frac = r.get("integer_fraction")
        name = Path(str(r.get("path", "model"))).name
        body += (f"<h3>{escape(name)}</h3>"
                 + _p(f"ONNX Runtime {r.get('onnxruntime_version', '')}, optimization level {r.get('level', '')}: "
                      + ("no compute nodes" if frac is None else f"{frac:.0%} of compute nodes run in integers")))
        ops = sorted(r.get("op_counts", {}).items(), key=lambda kv: (order[classify(kv[0])], kv[0]))
        body += _table(["op", "kind", "nodes"], [[op, classify(op).replace("_", " "), n] for op, n in ops],
                       numeric=[2], highlight=[i for i, (op, _) in enumerate(ops) if classify(op) == "float_compute"])
        floats = r.get("float_compute_nodes", [])
        if floats:
            body += (f"<details><summary>{len(floats)} float compute node{'s' * (len(floats) != 1)}</summary>"
                     f"<code>{escape(', '.join(floats))}</code></details>")
    return body


def _sensitivity(data: Mapping) -> str:
    layers = data.get("layers", [])
    method, choice, unit = data.get("method", "?"), data.get("choice", "?"), data.get("cost_unit", "cost")
    where = data.get("where") or data.get("settings", {}).get("where")
    head = f"<h3>{escape(str(method))} on {escape(str(choice))}</h3>"
    facts = [f"cost = {unit}", f"{len(layers)} layers"]
    facts += [f"measured in {where}"] if where else []
    facts += [f"{data['seconds']:.1f} s"] if data.get("seconds") else []
    facts += [f"{k} {num(v)}" for k, v in data.get("baseline", {}).items()]
    facts += [f"{k}={v}" for k, v in data.get("settings", {}).items() if k != "where"]
    if not layers:
        return head + _p("; ".join(facts) + ". No layers.")
    highlight = min(3, len(layers))
    png = plots.sensitivity_bars([r["name"] for r in layers], [r["cost"] for r in layers], unit=str(unit),
                                 highlight=highlight, title=f"Per-layer cost, {method}, {choice}")
    ranked = sorted(layers, key=lambda r: -r["cost"] if not math.isnan(r["cost"]) else math.inf)[:TOP_ROWS]
    keys = sorted({k for r in ranked for k in r.get("values", {})})
    rows = [[i + 1, r["name"], r.get("kind"), r.get("params"), r.get("weight_bits"), r["cost"],
             *(r.get("values", {}).get(k) for k in keys)] for i, r in enumerate(ranked)]
    table = _table(["rank", "layer", "kind", "params", "bits", "cost", *keys], rows,
                   numeric=[0, 3, 4, 5, *range(6, 6 + len(keys))], highlight=range(highlight))
    caption = (f"Every layer in model order; the {highlight} most sensitive in red"
               + (f"; measured in {where}." if where else "."))
    return (head + _p("; ".join(facts) + ".") + _figure(png, "per-layer sensitivity", caption)
            + f"<h3>Most sensitive {len(ranked)} of {len(layers)}</h3>" + table)


def _bits(bits: Mapping[str, int], params: Mapping[str, int]) -> str:
    names, widths = list(bits), [int(b) for b in bits.values()]
    png = plots.bits_bars(names, widths, title="Weight bits per layer")
    counts = Counter(widths)
    known = all(n in params for n in names)
    total = sum(params[n] for n in names) if known else 0
    rows = []
    for b in sorted(counts):
        n_params = sum(params[n] for n, w in zip(names, widths) if w == b) if known else None
        rows.append(["float" if b == 32 else f"{b}-bit", counts[b], f"{counts[b] / len(names):.1%}",
                     n_params, None if not total else f"{n_params / total:.1%}"])
    head = ["weights", "layers", "share of layers", "params", "share of params"]
    body = _figure(png, "bits per layer", "Weight bits of each layer in model order; float = kept in FP32.")
    body += _table(head if known else head[:3], [r if known else r[:3] for r in rows], numeric=range(1, 5))
    if total:
        mean = sum(params[n] * w for n, w in zip(names, widths)) / total
        body += _p(f"Mean weight bits per parameter: {mean:.2f} over {total:,} parameters.")
    return body


def _chosen_index(front: Sequence[Mapping], chosen) -> int | None:
    if chosen is None or isinstance(chosen, bool):
        return None
    if isinstance(chosen, int):
        if not -len(front) <= chosen < len(front):
            raise ValueError(f"html: chosen={chosen} is not an index into the {len(front)} front points")
        return chosen % len(front)
    chosen = _plain(chosen)
    for i, point in enumerate(front):
        if point == chosen:
            return i
    raise ValueError("html: chosen is not one of the front's points; pass the point itself or its index")


def _resources(point: Mapping) -> Mapping:
    """A point's resources: ``resource`` in hand-made points, ``resources`` in ``FrontPoint``."""
    return point.get("resources", point.get("resource", {}))


def _front_points(front, chosen) -> tuple[list[dict], int | None, str | None]:
    """(points, index of the chosen one, the budget kind to plot against) from a list of points or
    a ``MixedPrecisionResult`` (its ``front``, its ``predicted`` assignment chosen by default)."""
    front = _plain(front)
    kind = None
    if isinstance(front, Mapping):  # a mixed-precision result
        kind = next(iter(front.get("budget") or {}), None)
        predicted = front.get("predicted") or {}
        points = [_plain(p) for p in front.get("front", [])]
        if chosen is None and predicted:
            resources = {k: v for k, v in predicted.items() if k != "error"}
            match = [i for i, p in enumerate(points)
                     if p.get("error") == predicted.get("error") and _resources(p) == resources]
            if not match:  # the budget's own solution, between two swept points
                points.append({"error": predicted.get("error"), "resources": resources,
                               "assignment": front.get("assignment", {})})
            chosen = match[0] if match else len(points) - 1
        return points, _chosen_index(points, chosen), kind
    points = [_plain(p) for p in front]
    return points, _chosen_index(points, chosen), kind


def _front(front, chosen) -> str:
    front, idx, kind = _front_points(front, chosen)
    resources = list(dict.fromkeys(k for p in front for k in _resources(p)))
    if kind in resources:
        resources.remove(kind)
        resources.insert(0, kind)
    extra = list(dict.fromkeys(k for p in front for k, v in p.items() if k not in ("resource", "resources", "error")
                               and isinstance(v, (str, int, float, bool))))
    wheres = {p.get("where") for p in front if p.get("where")}
    where = f" (error measured in {', '.join(sorted(map(str, wheres)))})" if wheres else ""
    body = ""
    if resources:
        x = resources[0]
        points = [(_resources(p).get(x), p.get("error")) for p in front]
        keep = [i for i, (a, b) in enumerate(points) if a is not None and b is not None]
        png = plots.pareto([points[i][0] for i in keep], [points[i][1] for i in keep],
                           chosen=keep.index(idx) if idx in keep else None, x_label=x, y_label="error",
                           title=f"Error against {x}")
        body += _figure(png, "Pareto front", f"Each point is one mixed-precision assignment; the star is "
                                             f"the one chosen{where}.")
    per_choice = any(isinstance(p.get("assignment"), Mapping) for p in front)
    rows = [["★" if i == idx else "", i, *(_resources(p).get(k) for k in resources), p.get("error"),
             *(p.get(k) for k in extra), *([_per_choice(p.get("assignment"))] if per_choice else [])]
            for i, p in enumerate(front)]
    head = ["", "#", *resources, "error", *extra, *(["layers per choice"] if per_choice else [])]
    body += _table(head, rows, numeric=range(1, 3 + len(resources)), highlight=[] if idx is None else [idx])
    return body


def _per_choice(assignment) -> str:
    """``{"conv1": "w8a8", "fc": "w4a8", ...}`` -> ``"w4a8 1, w8a8 1"``."""
    if not isinstance(assignment, Mapping):
        return ""
    return ", ".join(f"{choice} {n}" for choice, n in sorted(Counter(map(str, assignment.values())).items()))


# optional rung columns, shown when some rung has them (autoquant's ``Rung`` fills them all)
_RUNG_COLUMNS = {"rung": "rung", "tried": "tried", "metric": "metric", "drop": "drop",
                 "avg_weight_bits": "avg bits", "size_mb": "size (MB)", "onnx_mb": "ONNX (MB)",
                 "latency_ms": "latency (ms)", "latency_ratio": "vs INT8", "seconds": "seconds"}


def _ladder(ladder) -> str:
    ladder = _plain(ladder)
    info = ladder if isinstance(ladder, Mapping) else {}
    steps = [_plain(s) for s in (info.get("steps", []) if info else ladder)]
    keys = [k for k in _RUNG_COLUMNS if any(k in s for s in steps)]
    rows = []
    for s in steps:
        met = s.get("met")
        mark = ("" if met is None else _span("met", "good") if met
                else _span("over budget" if s.get("within_budget") is False else "not met", "bad"))
        rows.append([*(s.get(k) for k in keys), mark, s.get("note", "")])
    facts = [f"{label} {num(info[k])}" for k, label in (("fp32_metric", "FP32 metric"), ("max_drop", "max drop"))
             if info.get(k) is not None]
    facts += [f"budget {', '.join(f'{k} {num(v)}' for k, v in info['budget'].items())}"] if info.get("budget") else []
    if info.get("format") == "lowbit.AutoQuantResult":
        facts += ["metric: eval_fn in the PyTorch simulation", "latency: the exported file in ONNX Runtime"]
    body = _p("Each rung is tried only when the ones before it missed the target"
              + (f"; {'; '.join(facts)}." if facts else "."))
    chosen = info.get("chosen")
    body += _table([*(_RUNG_COLUMNS[k] for k in keys), "target", "note"], rows,
                   numeric=range(2, len(keys)), highlight=[chosen] if isinstance(chosen, int) else [])
    if info.get("reason"):
        body += f'<p class="reason">{escape(str(info["reason"]))}</p>'
    return body


# -- the page ----------------------------------------------------------------------------------
def _listed(x) -> list:
    """One report or a list of them, as a list of dicts."""
    return [] if x is None else [_plain(v) for v in (x if isinstance(x, (list, tuple)) else [x])]


def _bits_params(sensitivity: Sequence[Mapping]) -> dict[str, int]:
    return {r["name"]: r["params"] for s in sensitivity for r in s.get("layers", []) if "params" in r}


def html(path: str | Path, *, title: str = "lowbit report", comparison=None, sensitivity=None,
         bits: Mapping[str, int] | None = None, front=None, chosen=None, ladder=None,
         kernels=None, notes: Iterable[str] = ()) -> Path:
    """Write one self-contained HTML report (inline CSS, figures as data: URIs, no script).

    Every section is optional and left out without data.

    Args:
        path: the .html file to write (atomically; its folder is created).
        title: the page title.
        comparison: a ``Comparison`` from ``lowbit.compare`` (or its ``to_dict()``): fidelity,
            size, PyTorch vs ORT parity and the ORT latency grid.
        sensitivity: a ``SensitivityReport`` (or its ``to_dict()``), or a list of them: a bar
            per layer and the most sensitive rows.
        bits: ``{layer: weight bits}`` in model order, 32 for a layer kept float.
        front: mixed-precision points ``{"resource": {"avg_weight_bits": 5.0, ...}, "error": e, ...}``
            (or ``"resources"``), plotted against the first resource; or a ``MixedPrecisionResult``
            (or its ``to_dict()``): its front against its budget's kind, its assignment chosen.
        chosen: the chosen point of ``front`` (the point itself or its index).
        ladder: autoquant rungs ``[{"rung", "tried", "metric", "size_mb", "latency_ms", "seconds",
            "met", "note"}, ...]``, or ``{"steps": [...], "reason": "..."}``, or an
            ``AutoQuantResult`` (or its ``to_dict()``): every rung, the chosen one highlighted.
        kernels: ``lowbit.inspect_onnx``'s report (or its ``to_dict()``), or a list of them.
        notes: free text lines at the end.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> lowbit.report.html("report.html", comparison=cmp, kernels=lowbit.inspect_onnx("m.onnx"))
    """
    sens, kern = _listed(sensitivity), _listed(kernels)
    sections = []
    if comparison is not None:
        sections.append(_section("comparison", "FP32 vs quantized", _comparison(_plain(comparison))))
    if kern:
        sections.append(_section("kernels", "Kernels ONNX Runtime runs", _kernels(kern)))
    if sens:
        sections.append(_section("sensitivity", "Layer sensitivity", "".join(_sensitivity(s) for s in sens)))
    if bits:
        sections.append(_section("bits", "Bits per layer", _bits(dict(bits), _bits_params(sens))))
    if front:
        sections.append(_section("front", "Mixed-precision trade-off", _front(front, chosen)))
    if ladder is not None:
        sections.append(_section("ladder", "Autoquant ladder", _ladder(ladder)))
    notes = [str(n) for n in notes]
    if notes:
        sections.append(_section("notes", "Notes", '<ul class="notes">'
                                 + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"))
    return write_atomic(path, _page(title, sections).encode("utf-8"))


def _version() -> str:
    try:
        return importlib.metadata.version("lowbit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(source tree)"


def _page(title: str, sections: Sequence[tuple[str, str, str]]) -> str:
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    nav = "".join(f'<a href="#{ident}">{escape(name)}</a>' for ident, name, _ in sections)
    body = "".join(s for _, _, s in sections) or _p("Nothing to report: no data was given.")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{escape(title)}</h1><div class=\"meta\">lowbit {escape(_version())}, {stamp}</div>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")
