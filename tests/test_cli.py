"""The `lowbit` command line: quantize and qat write artifacts and a recipe; export and qat --recipe replay it."""

import json

import pytest
import torch
from torch import nn

from lowbit import cli

pytestmark = pytest.mark.usefixtures("one_thread")


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


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def tiny_encoder():
    return TinyEncoder().eval()


def tiny_rows():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=gen) * torch.linspace(0.1, 8, 16) for _ in range(2)]


def test_quantize_smoothquant_is_recorded_and_replayed(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["quantize", "tests.test_cli:tiny_encoder", "--data", "tests.test_cli:tiny_rows",
                     "--smoothquant", "0.8", "--out", str(out), "--quiet"]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["options"]["smoothquant"] == 0.8
    again = tmp_path / "again.onnx"
    assert cli.main(["export", str(out / "recipe.json"), "--out", str(again)]) == 0
    assert again.read_bytes() == (out / "model.int8.onnx").read_bytes()


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


def qat_data():
    gen = torch.Generator().manual_seed(2)
    train = [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(3)]

    def accuracy(model):
        with torch.no_grad():
            return sum(float((model(x).argmax(1) == y).float().mean()) for x, y in train) / len(train)

    return train, [x for x, _ in train[:2]], accuracy


def qat_data_bad():
    return [torch.randn(2, 3, 8, 8)]


def _tensors(path):
    return torch.load(path, weights_only=True)["model"]


def test_qat_trains_writes_state_recipe_onnx_and_the_recipe_replays_to_the_same_weights(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["qat", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:qat_data", "--config", "w4a8",
                     "--epochs", "2", "--lr", "1e-3", "--distill", "0.5", "--freeze-bn-after", "4",
                     "--checkpoint-every", "2", "--log-dir", str(tmp_path / "tb"), "--onnx", "--out", str(out),
                     "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "QAT w4a8: 6 steps over 2 epochs" in printed and "metric per epoch" in printed
    for name in ("qat_model.pt", "recipe.json", "model.onnx", "checkpoints/checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    assert any((tmp_path / "tb").iterdir())  # TensorBoard events
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["command"] == "qat" and recipe["options"] == {"learn": "lsq", "fold_bn": True}
    assert recipe["training"]["distill_weight"] == 0.5 and recipe["training"]["epochs"] == 2

    # the trained state loads into the model prepared the same way
    from lowbit.qat import load_checkpoint, prepare_qat

    fresh = prepare_qat(tiny_cnn(), "w4a8", qat_data()[1], progress=False)
    assert load_checkpoint(out / "qat_model.pt", fresh).step == 6

    again = tmp_path / "again"
    assert cli.main(["qat", "--recipe", str(out / "recipe.json"), "--out", str(again), "--quiet"]) == 0
    first, second = _tensors(out / "qat_model.pt"), _tensors(again / "qat_model.pt")
    assert first.keys() == second.keys()
    assert all(torch.equal(v, second[k]) for k, v in first.items() if isinstance(v, torch.Tensor))

    onnx_again = tmp_path / "again.onnx"
    assert cli.main(["export", str(out / "recipe.json"), "--out", str(onnx_again)]) == 0
    assert onnx_again.read_bytes() == (out / "model.onnx").read_bytes()


def test_qat_run_again_resumes_from_its_checkpoint(tmp_path, capsys):
    args = ["qat", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:qat_data", "--config", "w8a8",
            "--epochs", "1", "--out", str(tmp_path), "--quiet"]
    assert cli.main(args) == 0
    first = _tensors(tmp_path / "qat_model.pt")
    capsys.readouterr()
    assert cli.main([*args[:-3], "--epochs", "2", "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from step 3" in printed and "6 steps over 2 epochs" in printed
    assert not torch.equal(first["fc.weight"], _tensors(tmp_path / "qat_model.pt")["fc.weight"])


def test_qat_bad_data_or_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"must return \(train_batches, calib_batches"):
        cli.main(["qat", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:qat_data_bad", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs a model"):
        cli.main(["qat", "--out", str(tmp_path)])
    quantize_recipe = tmp_path / "recipe.json"
    quantize_recipe.write_text(json.dumps({"format": "lowbit.recipe", "version": 1, "model": "x:y"}))
    with pytest.raises(SystemExit, match="is a quantize recipe, not a qat one"):
        cli.main(["qat", "--recipe", str(quantize_recipe)])
