"""Figures for ``lowbit.report.html``: matplotlib drawings returned as PNG bytes.

Each function takes plain numbers, draws one figure on matplotlib's Agg canvas (no display,
no pyplot state shared with the caller's own figures) and returns the PNG file's bytes;
``data_uri`` turns them into a ``data:`` URI for an ``<img>`` that needs no other file.

    png = plots.sensitivity_bars(["conv1", "fc"], [0.3, 0.001], unit="1 - cosine")
    '<img src="%s">' % plots.data_uri(png)
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

__all__ = ["bits_bars", "data_uri", "latency_bars", "pareto", "sensitivity_bars"]

ACCENT = "#c0392b"  # the most sensitive layers, the chosen point
BASE = "#5d7fa3"  # everything else
GREY = "#9aa5b1"
DPI = 150  # pixels per figure inch in the PNG
_BIT_COLOURS = {2: "#7b2d26", 3: "#b3472f", 4: "#e07b39", 5: "#e9a23b", 6: "#c9b63d", 7: "#8fb04a",
                8: "#4a9c6d", 16: "#3d7ea6", 32: "#6c757d"}


def _figure(width: float, height: float):
    """A matplotlib ``Figure`` on its own Agg canvas (``pyplot`` is never touched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("matplotlib"):
            raise
        raise ImportError("lowbit.report.html draws its figures with matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # no timestamp or version in the file: the same figures give the same bytes
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src=...>`` inside a single HTML file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)


def _spans_decades(values: Sequence[float], decades: float = 2.0) -> bool:
    """True when the positive finite values span more than ``decades`` powers of ten."""
    pos = [v for v in values if math.isfinite(v) and v > 0]
    return len(pos) >= 2 and math.log10(max(pos) / min(pos)) > decades


def sensitivity_bars(names: Sequence[str], costs: Sequence[float], *, unit: str, highlight: int = 3,
                     title: str = "") -> bytes:
    """Horizontal bars of each layer's cost, in the given (model) order, top to bottom.

    The ``highlight`` largest costs are drawn in the accent colour; the axis is logarithmic
    when the costs span more than two decades.  An infinite cost is drawn at the right edge
    and labelled "inf"; NaN as no bar.
    """
    costs = [float(c) for c in costs]
    finite = [c for c in costs if math.isfinite(c)]
    top_edge = max(finite, default=1.0) * (4.0 if _spans_decades(costs) else 1.15) or 1.0
    ranked = sorted(range(len(costs)), key=lambda i: -costs[i] if not math.isnan(costs[i]) else math.inf)
    accent = set(ranked[:highlight])
    shown = [top_edge if math.isinf(c) else (0.0 if math.isnan(c) else c) for c in costs]
    fig = _figure(7.5, 0.9 + 0.19 * len(names))
    ax = fig.add_subplot()
    ys = list(range(len(names)))
    ax.barh(ys, shown, color=[ACCENT if i in accent else BASE for i in ys], height=0.72)
    for i, c in enumerate(costs):
        if math.isinf(c):
            ax.text(shown[i], i, " inf", va="center", fontsize=7, color=ACCENT)
    ax.set_yticks(ys, [_short(n) for n in names], fontsize=7 if len(names) > 30 else 8)
    ax.invert_yaxis()  # the model's first layer on top
    ax.margins(y=0.5 / max(len(names), 1))
    if _spans_decades(costs):
        ax.set_xscale("log")
        ax.set_xlim(left=min(c for c in costs if math.isfinite(c) and c > 0) / 2)
    ax.set_xlabel(f"cost: {unit}" + (" (log scale)" if _spans_decades(costs) else ""), fontsize=9)
    return _finish_bars(fig, ax, len(names), title)


def _finish_bars(fig, ax, n_bars: int, title: str) -> bytes:
    """Grid, title and style of a horizontal bar chart; its PNG."""
    ax.tick_params(labeltop=n_bars > 25)  # a tall chart: the scale at both ends
    ax.grid(axis="x", color="#e3e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    _style(ax)
    return _png(fig)


def bits_bars(names: Sequence[str], bits: Sequence[int], *, title: str = "") -> bytes:
    """Horizontal bars of each layer's weight bits in model order (32 = float), coloured by width."""
    fig = _figure(7.5, 0.9 + 0.15 * len(names))
    ax = fig.add_subplot()
    ys = list(range(len(names)))
    ax.barh(ys, bits, color=[_BIT_COLOURS.get(int(b), GREY) for b in bits], height=0.72)
    ax.set_yticks(ys, [_short(n) for n in names], fontsize=7 if len(names) > 30 else 8)
    ax.invert_yaxis()
    ax.margins(y=0.5 / max(len(names), 1))
    ax.set_xscale("log", base=2)  # 2, 4, 8, 16, 32 evenly spaced
    ticks = sorted({int(b) for b in bits} | {2, 4, 8, 16, 32})
    ax.set_xticks(ticks, [("float" if t == 32 else str(t)) for t in ticks])
    ax.set_xlim(1.5, 40)
    ax.set_xlabel("weight bits", fontsize=9)
    return _finish_bars(fig, ax, len(names), title)


def pareto(xs: Sequence[float], ys: Sequence[float], *, chosen: int | None, x_label: str, y_label: str,
           title: str = "") -> bytes:
    """The points of a resource / error trade-off, joined in resource order; ``chosen`` starred."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    ax.plot([xs[i] for i in order], [ys[i] for i in order], "-o", color=BASE, markersize=5, linewidth=1.4,
            label="front")
    if chosen is not None:
        ax.plot([xs[chosen]], [ys[chosen]], "*", color=ACCENT, markersize=16, label="chosen", zorder=3)
        ax.annotate(f"  chosen: {xs[chosen]:.4g}, {ys[chosen]:.4g}", (xs[chosen], ys[chosen]), fontsize=8,
                    color=ACCENT, va="bottom")
    if _spans_decades(ys, 1.5):
        ax.set_yscale("log")
    ax.set_xlabel(x_label, fontsize=9)
    ax.set_ylabel(y_label, fontsize=9)
    ax.grid(color="#e3e7eb", linewidth=0.8)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    _style(ax)
    return _png(fig)


def latency_bars(cells: Sequence[str], series: dict[str, Sequence[float | None]], *, title: str = "") -> bytes:
    """Grouped bars: one group per cell (``"1 thread, batch 8"``), one bar per model in ``series``."""
    fig = _figure(7.0, 2.6)
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    colours = [GREY, BASE, ACCENT, "#4a9c6d"]
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(cells))]
        ax.bar(xs, [v or 0.0 for v in values], width=width * 0.95, label=name, color=colours[k % len(colours)])
    ax.set_xticks(range(len(cells)), cells, fontsize=8)
    ax.set_ylabel("median latency (ms)", fontsize=9)
    ax.grid(axis="y", color="#e3e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    _style(ax)
    return _png(fig)


def _short(name: str, width: int = 38) -> str:
    """A layer name that fits the axis: its end kept (where the block index and the layer are,
    ``…layer.3.attention.self.query``), whole dotted parts dropped from the front."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    while len(parts) > 1 and len(".".join(parts)) > width - 1:
        parts.pop(0)
    return "…" + ".".join(parts)[-(width - 1):]
