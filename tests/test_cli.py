"""The `lowbit` command line: quantize writes artifacts and a recipe; export replays the recipe."""

import json

import pytest
import torch
from torch import nn

from lowbit import cli


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def tiny_cnn():
    return TinyCNN().eval()


def tiny_data():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(3)]


def test_quantize_writes_artifacts_and_export_replays_the_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data",
                     "--config", "w8a8", "--skip", "fc", "--out", str(out), "--quiet"])
    assert code == 0
    for name in ("model.int8.onnx", "fp32.onnx", "recipe.json", "report.md", "report.json"):
        assert (out / name).stat().st_size > 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == "tests.test_cli:tiny_cnn" and recipe["config"]["rules"][0]["pattern"] == "fc"
    assert "quantized onnx" in capsys.readouterr().out

    again = tmp_path / "again.onnx"
    assert cli.main(["export", str(out / "recipe.json"), "--out", str(again)]) == 0
    assert again.read_bytes() == (out / "model.int8.onnx").read_bytes()  # same recipe, same bytes


def test_bench_times_onnx_files(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data", "--out", str(out),
              "--quiet"])
    capsys.readouterr()
    assert cli.main(["bench", str(out / "fp32.onnx"), str(out / "model.int8.onnx"), "--batch", "1", "2",
                     "--runs", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and ".onnx" in line]
    assert len(rows) == 4


def test_bad_factory_is_a_clear_error():
    with pytest.raises(SystemExit, match="module:function"):
        cli.main(["quantize", "not_a_factory", "--data", "tests.test_cli:tiny_data"])
    with pytest.raises(SystemExit, match="cannot load"):
        cli.main(["quantize", "tests.test_cli:missing", "--data", "tests.test_cli:tiny_data"])
