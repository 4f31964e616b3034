"""html: one self-contained file (no outside resource, figures as PNG data URIs, no script),
user text escaped, a section per input given and none for the others; Chromium renders it."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.analysis import LayerSensitivity, SensitivityReport
from lowbit.report import html
from lowbit.report._html import num

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TITLES = {"comparison": "FP32 vs quantized", "kernels": "Kernels ONNX Runtime runs",
          "sensitivity": "Layer sensitivity", "bits": "Bits per layer", "front": "Mixed-precision trade-off",
          "ladder": "Autoquant ladder", "notes": "Notes"}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A real Comparison (with ONNX Runtime rows and latency) and inspect_onnx's report."""
    torch.manual_seed(0)
    model = MLP().eval()
    qmodel = lowbit.quantize(model, [_x(16, 32, seed=s) for s in range(2)], "w8a8", progress=False)
    path = tmp_path_factory.mktemp("html") / "int8.onnx"
    lowbit.export_onnx(qmodel, path, _x(2, 32))
    comparison = lowbit.compare(model, qmodel, inputs=_x(8, 32, seed=9), onnx=path, batch_sizes=(1, 4),
                                latency_runs=3)
    return comparison, lowbit.inspect_onnx(path)


def _sensitivity(script_name="<script>alert(1)</script>"):
    rows = [LayerSensitivity("fc1", "Linear", 2048, 4, 0.002, {"sqnr_db": 21.5}),
            LayerSensitivity(script_name, "Linear", 4096, 4, 0.31, {"sqnr_db": 9.0}),
            LayerSensitivity("fc3", "Linear", 640, 4, 0.00004, {"sqnr_db": 33.1}),
            LayerSensitivity("head", "Linear", 640, 32, 0.0, {})]
    return SensitivityReport(method="sqnr", choice="w4a8", cost_unit="1 - cosine", layers=rows, seconds=1.5,
                             settings={"where": "PyTorch simulation", "batches": 2})


FRONT = [{"resource": {"avg_weight_bits": b}, "error": e, "where": "PyTorch simulation"}
         for b, e in [(4.0, 0.2), (5.0, 0.04), (6.0, 0.01), (8.0, 0.004)]]
LADDER = {"steps": [
    {"rung": "ptq", "tried": "w4a8", "metric": 0.61, "size_mb": 0.02, "latency_ms": 0.1, "seconds": 3.0,
     "met": False, "note": "0.61 < 0.99"},
    {"rung": "mixed", "tried": "4/8 & more", "metric": 0.995, "size_mb": 0.03, "latency_ms": None, "seconds": 9.5,
     "met": True, "note": ""}], "reason": "stopped at <mixed>: target met"}


def _full_report(path, measured):
    comparison, kernels = measured
    return html(path, title="MLP <w8a8> & co", comparison=comparison, kernels=kernels, sensitivity=_sensitivity(),
                bits={"fc1": 8, "<script>alert(1)</script>": 4, "fc3": 4, "head": 32}, front=FRONT, chosen=1,
                ladder=LADDER, notes=["a note with <b>markup</b> & an ampersand"])


class _Page(HTMLParser):
    """Tags, attribute values and text of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text, self.ids = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        self.ids += [v for k, v in attrs if k == "id"]

    def handle_data(self, data):
        self.text.append(data)


def _parse(path):
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_the_file_is_self_contained(tmp_path, measured):
    out = _full_report(tmp_path / "sub" / "report.html", measured)
    assert out == tmp_path / "sub" / "report.html"
    page = _parse(out)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    for tag, key, value in page.attrs:
        assert not (key.startswith("on")), (tag, key)  # no event handlers: nothing runs
        if key in ("src", "href"):
            assert value.startswith(("data:image/png;base64,", "#")), (tag, key, value[:60])
    assert not re.search(r"url\(|@import|https?://", " ".join(page.text) + out.read_text().split("<body>")[0])
    images = [v for tag, k, v in page.attrs if tag == "img" and k == "src"]
    assert len(images) == 4  # latency, sensitivity, bits, front
    for src in images:
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 2000


def test_user_text_is_escaped(tmp_path, measured):
    text = _full_report(tmp_path / "report.html", measured).read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>markup</b>" not in text and "a note with &lt;b&gt;markup&lt;/b&gt; &amp; an ampersand" in text
    assert "<title>MLP &lt;w8a8&gt; &amp; co</title>" in text
    assert "stopped at &lt;mixed&gt;: target met" in text and "4/8 &amp; more" in text


def test_sections_follow_the_inputs(tmp_path, measured):
    page = _parse(_full_report(tmp_path / "all.html", measured))
    assert page.ids == list(TITLES)
    text = " ".join(page.text)
    for title in TITLES.values():
        assert title in text
    # what each section says it measured, and where
    assert "PyTorch simulation" in text and "ONNX Runtime" in text and "Latency (measured in ONNX Runtime)" in text
    assert "measured in PyTorch simulation" in text and "100% of compute nodes run in integers" in text
    assert "QGemm" in text and "speed-up" in text

    page = _parse(html(tmp_path / "front.html", front=FRONT, chosen=FRONT[2]))
    assert page.ids == ["front"]
    assert [v for tag, k, v in page.attrs if tag == "img" and k == "src"]  # the plot
    assert "★" in page.text  # the chosen point's row

    page = _parse(html(tmp_path / "ladder.html", ladder=LADDER["steps"]))  # a plain list of rungs
    assert page.ids == ["ladder"] and "img" not in page.tags and "target met" not in " ".join(page.text)

    page = _parse(html(tmp_path / "sens.html", sensitivity=[_sensitivity("a"), _sensitivity("b").to_dict()]))
    assert page.ids == ["sensitivity"] and page.tags.count("img") == 2

    page = _parse(html(tmp_path / "empty.html", notes=()))
    assert page.ids == [] and "Nothing to report" in " ".join(page.text)


def test_comparison_as_a_dict_and_bits_with_params(tmp_path, measured):
    comparison, kernels = measured
    text = html(tmp_path / "r.html", comparison=comparison.to_dict(), kernels=[kernels.to_dict()],
                sensitivity=_sensitivity("fc2"), bits={"fc1": 8, "fc2": 4, "fc3": 4, "head": 32}).read_text()
    quantized_size = next(r["size_mb"] for r in comparison.rows if r["model"] == "quantized onnx")
    assert f"<td class=num>{num(quantized_size)}</td>" in text
    # params known from the sensitivity rows: counts per width, and the mean bits per parameter
    assert "<td>4-bit</td><td class=num>2</td><td class=num>50.0%</td><td class=num>4,736</td>" in text
    mean = (2048 * 8 + 4736 * 4 + 640 * 32) / (2048 + 4736 + 640)
    assert f"Mean weight bits per parameter: {mean:.2f} over 7,424 parameters." in text


def test_chosen_must_be_on_the_front(tmp_path):
    with pytest.raises(ValueError, match="not an index"):
        html(tmp_path / "r.html", front=FRONT, chosen=7)
    with pytest.raises(ValueError, match="not one of the front's points"):
        html(tmp_path / "r.html", front=FRONT, chosen={"resource": {"avg_weight_bits": 3}, "error": 1.0})
    assert not (tmp_path / "r.html").exists()


def test_a_mixed_precision_result_and_an_autoquant_result(tmp_path):
    """The to_dict() shapes of lowbit.analysis's MixedPrecisionResult and AutoQuantResult."""
    points = [{"error": e, "resources": {"size_mb": mb, "avg_weight_bits": b}, "assignment": {"fc1": c, "fc2": "w4a8"}}
              for e, mb, b, c in [(0.1, 1.0, 4.0, "w4a8"), (0.02, 1.2, 6.0, "w8a8")]]
    mixed = {"budget": {"avg_weight_bits": 5.0}, "predicted": {"error": 0.03, "size_mb": 1.1, "avg_weight_bits": 4.9},
             "assignment": {"fc1": "w8a8", "fc2": "w4a8"}, "front": points}
    steps = [{"rung": "ptq", "tried": "w4a8", "metric": 0.8, "drop": 0.1, "avg_weight_bits": 4.2, "size_mb": 1.0,
              "onnx_mb": 1.2, "latency_ms": 2.0, "latency_ratio": 0.9, "seconds": 3.0, "within_budget": True,
              "met": False, "note": ""},
             {"rung": "mixed", "tried": "mixed 4/8", "metric": 0.895, "drop": 0.005, "avg_weight_bits": 5.1,
              "size_mb": 1.3, "onnx_mb": None, "latency_ms": None, "latency_ratio": None, "seconds": 9.0,
              "within_budget": False, "met": False, "note": ""}]
    autoquant = {"format": "lowbit.AutoQuantResult", "version": 1, "met": False, "reason": "no rung met the target",
                 "chosen": 1, "fp32_metric": 0.9, "max_drop": 0.01, "budget": {"size_mb": 1.2}, "steps": steps}
    text = html(tmp_path / "r.html", front=mixed, ladder=autoquant).read_text()
    # the front against the budget's kind; the budget's own solution (between swept points) starred
    assert "<th class=num>avg_weight_bits</th><th class=num>size_mb</th><th class=num>error</th>" in text
    assert ("<tr class=hl><td>★</td><td class=num>2</td><td class=num>4.9</td><td class=num>1.1</td>"
            "<td class=num>0.03</td><td>w4a8 1, w8a8 1</td></tr>") in text
    assert "Error against avg_weight_bits" not in text  # (inside the PNG, not the HTML)
    # every rung column autoquant fills; the chosen rung highlighted; where each figure comes from
    assert "<th class=num>vs INT8</th>" in text and "over budget" in text and "<tr class=hl><td>mixed</td>" in text
    assert "FP32 metric 0.9; max drop 0.01; budget size_mb 1.2" in text
    assert "latency: the exported file in ONNX Runtime" in text


def test_without_matplotlib_figures_name_the_fix_and_tables_still_work(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as on a machine without it
    with pytest.raises(ImportError, match="pip install matplotlib"):
        html(tmp_path / "r.html", bits={"fc": 8})
    assert "ladder" in _parse(html(tmp_path / "r.html", ladder=LADDER)).ids  # no figure in it


def test_numbers_read_well():
    assert [num(v) for v in (None, True, 1234567, 0.0, 12345.6, 123.456, 0.98765, 0.0012345, 2.5e-7)] == [
        "", "yes", "1,234,567", "0", "12,346", "123.5", "0.9877", "0.001234", "2.50e-07"]
    assert [num(float("nan")), num(float("inf")), num(-float("inf")), num(2.0, "x")] == ["nan", "inf", "-inf", "2x"]


def test_sensitivity_figure_handles_zero_and_infinite_costs(tmp_path):
    report = _sensitivity("fc2").to_dict()
    report["layers"][1]["cost"] = float("inf")  # a layer that breaks the model
    page = _parse(html(tmp_path / "r.html", sensitivity=report))
    assert page.tags.count("img") == 1 and "inf" in page.text


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium) to render the report")
def test_chromium_renders_the_report(tmp_path, measured):
    out = _full_report(tmp_path / "report.html", measured)
    shot = tmp_path / "shot.png"
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--enable-logging=stderr", "--v=0", "--window-size=1280,2400"]
    run = subprocess.run([*common, f"--screenshot={shot}", out.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True)
    # page problems chromium reports: console messages, failed loads, blocked content
    page_errors = [line for line in run.stderr.splitlines()
                   if re.search(r"CONSOLE|Uncaught|net::ERR|Refused to|Not allowed to load", line)]
    assert not page_errors, page_errors
    png = shot.read_bytes()
    assert png.startswith(PNG_MAGIC) and int.from_bytes(png[16:20], "big") == 1280
    image = pytest.importorskip("PIL.Image").open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text, tables and figures, not a blank page

    dom = subprocess.run([*common, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    for ident, title in TITLES.items():
        assert f'id="{ident}"' in dom and title in dom
    assert dom.count("<img ") == 4
