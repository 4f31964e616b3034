"""``lowbit sensitivity``, ``lowbit autoquant`` and ``lowbit report`` through the installed command,
as a user runs them: each writes a recipe that replays its result."""

from __future__ import annotations

import html
import json
import textwrap

import pytest
from tests.cli.test_entry_point import run

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 10))


    def data():
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(6)]


    def neg_mse():
        """eval_fn: minus the output MSE to FP32 (no quantized model reaches 0)."""
        model, x = net(), torch.cat(data()[-2:])
        ref = model(x).detach()
        return lambda m: -float(((m(x) - ref) ** 2).mean())
''')


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "mine.py").write_text(USER_MODULE)
    return tmp_path


def test_sensitivity_writes_rows_and_its_recipe_replays_them(folder):
    done = run("sensitivity", "mine:net", "--data", "mine:data", "--config", "w4a8", "--method", "sqnr",
               "--batches", "2", "--out", "sens", "--quiet", cwd=folder)
    assert done.returncode == 0, done.stderr
    first = json.loads((folder / "sens" / "sensitivity.json").read_text())
    assert [row["name"] for row in first["layers"]] == ["0", "2", "5"]
    assert "Sensitivity (sqnr, w4a8)" in done.stdout
    again = run("sensitivity", "--recipe", "sens/recipe.json", "--out", "again", "--quiet", cwd=folder)
    assert again.returncode == 0, again.stderr
    second = json.loads((folder / "again" / "sensitivity.json").read_text())
    assert [r["cost"] for r in second["layers"]] == [r["cost"] for r in first["layers"]]


def test_autoquant_writes_its_best_model_a_replayable_recipe_and_a_report(folder):
    done = run("autoquant", "mine:net", "--data", "mine:data", "--eval", "mine:neg_mse", "--config", "w4a8",
               "--max-drop", "0", "--rungs", "ptq", "selective", "mixed", "--budget", "avg_weight_bits=16",
               "--out", "aq", "--quiet", "--strict", cwd=folder)
    # no quantized model has zero MSE within 16 bits: every rung is tried, the best is kept, --strict exits 1
    result = json.loads((folder / "aq" / "autoquant.json").read_text())
    assert done.returncode == 1 and not result["met"], done.stderr
    assert result["metric"] == "--eval mine:neg_mse"
    assert {s["rung"] for s in result["steps"]} == {"ptq", "selective", "mixed"}
    assert result["reason"].startswith("No rung met the target") and result["reason"] in done.stdout
    assert result["sensitivity"]["method"] == "sqnr" and result["mixed"]["front"]
    assert set(result["bits"]) == {"0", "2", "5"}
    # the recipe replays the chosen model: the same ONNX bytes
    replay = run("export", "aq/recipe.json", "--out", "again.onnx", cwd=folder)
    assert replay.returncode == 0, replay.stderr
    assert (folder / "again.onnx").read_bytes() == (folder / "aq" / "model.onnx").read_bytes()
    report = run("report", "aq", "--title", "tiny <net>", cwd=folder)
    assert report.returncode == 0, report.stderr
    page = (folder / "aq" / "report.html").read_text()
    assert "tiny &lt;net&gt;" in page and html.escape(result["reason"]) in page
    assert page.count("data:image/png;base64,") >= 3  # sensitivity bars, bits per layer, the front


def test_report_on_an_empty_folder_is_a_clear_error(folder):
    (folder / "empty").mkdir()
    done = run("report", "empty", cwd=folder)
    assert done.returncode == 2 and "holds none of report.json" in done.stderr
