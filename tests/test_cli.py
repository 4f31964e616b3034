"""The `lowbit` command line, in process: quantize and qat write artifacts and a recipe; export and qat --recipe
replay it; user errors are one line on stderr with exit status 2."""

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


def test_quantize_algorithms_are_recorded_in_order_and_replay_to_the_same_bytes(tmp_path):
    import lowbit
    from lowbit.ptq import CLE, BiasCorrection, SmoothQuant

    out = tmp_path / "run"
    assert cli.main(["quantize", "tests.test_cli:tiny_encoder", "--data", "tests.test_cli:tiny_rows", "--algorithms",
                     "cle,smoothquant(alpha=0.8),bias_correction", "--out", str(out), "--quiet",
                     "--latency-runs", "1"]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    steps = recipe["options"]["algorithms"]
    assert [s["name"] for s in steps] == ["fold_bn", "cle", "smoothquant", "bias_correction"]
    assert steps[2] == {"name": "smoothquant", "alpha": 0.8, "insert_scales": True}
    sha = (out / "model.int8.onnx").read_bytes()
    again = tmp_path / "again.onnx"
    assert cli.main(["export", str(out / "recipe.json"), "--out", str(again)]) == 0
    assert again.read_bytes() == sha
    # a hand-written recipe may give the short form
    short = tmp_path / "short.json"
    short.write_text(json.dumps({**recipe, "options": {"algorithms": "cle,smoothquant(alpha=0.8),bias_correction"}}))
    assert cli.main(["export", str(short), "--out", str(again)]) == 0
    assert again.read_bytes() == sha
    # and the Python API with the same list writes the same file
    qmodel = lowbit.quantize(tiny_encoder(), tiny_rows(), "w8a8", algorithms=[CLE(), SmoothQuant(alpha=0.8),
                             BiasCorrection()], target=recipe["target"], progress=False)
    lowbit.export_onnx(qmodel, tmp_path / "api.onnx", tiny_rows()[0])
    assert (tmp_path / "api.onnx").read_bytes() == sha


def test_bad_algorithms_are_one_line_errors(tmp_path, capsys):
    quantize = ["quantize", "tests.test_cli:tiny_encoder", "--data", "tests.test_cli:tiny_rows", "--out",
                str(tmp_path / "run"), "--quiet"]
    line = _user_error([*quantize, "--algorithms", "cle,nonesuch"], capsys)
    assert line.startswith("error: --algorithms: unknown algorithm 'nonesuch' (known: fold_bn, cle, smoothquant")
    line = _user_error([*quantize, "--algorithms", "bias_correction,cle"], capsys)
    assert "error: --algorithms: algorithms out of order: cle runs on the float model" in line
    line = _user_error([*quantize, "--smoothquant", "0.5", "--algorithms", "cle"], capsys)
    assert "give SmoothQuant once, in --algorithms (e.g. smoothquant(alpha=0.5))" in line
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"format": "lowbit.recipe", "version": 1, "model": "tests.test_cli:tiny_encoder",
                                  "data": "tests.test_cli:tiny_rows", "config": {},
                                  "options": {"algorithms": [{"name": "cle", "relu6": True}]}}))
    line = _user_error(["export", str(recipe), "--out", str(tmp_path / "m.onnx")], capsys)
    assert line.startswith(f"error: {recipe}: options.algorithms: algorithm 'cle': unknown field(s) ['relu6']")


def test_bench_times_onnx_files(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data", "--out", str(out),
              "--quiet"])
    capsys.readouterr()
    assert cli.main(["bench", str(out / "fp32.onnx"), str(out / "model.int8.onnx"), "--batch", "1", "2",
                     "--runs", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and ".onnx" in line]
    assert len(rows) == 4 and all(" | ort | " in row for row in rows)


def test_bench_times_onnx_files_in_openvino(tmp_path, capsys):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    out = tmp_path / "run"
    cli.main(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data", "--out", str(out),
              "--quiet", "--target", "openvino"])
    capsys.readouterr()
    assert cli.main(["bench", str(out / "model.int8.onnx"), "--runtime", "openvino", "--batch", "2",
                     "--runs", "3"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if ".onnx | " in line]
    assert len(rows) == 1 and rows[0][1:4] == ["openvino", "1", "2"] and float(rows[0][4]) > 0


def _user_error(argv, capsys) -> str:
    """Run ``lowbit argv`` expecting a user error: exit status 2 and one ``error:`` line on stderr."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_factory_is_a_clear_error(capsys):
    line = _user_error(["quantize", "not_a_factory", "--data", "tests.test_cli:tiny_data"], capsys)
    assert "neither a folder nor module:function" in line
    line = _user_error(["quantize", "./no/such/folder", "--data", "tests.test_cli:tiny_data"], capsys)
    assert line == "error: model folder ./no/such/folder does not exist"
    line = _user_error(["quantize", "tests.test_cli:tiny_cnnn", "--data", "tests.test_cli:tiny_data"], capsys)
    assert "has no 'tiny_cnnn'; did you mean tiny_cnn" in line
    line = _user_error(["quantize", "no_such_module:net", "--data", "tests.test_cli:tiny_data"], capsys)
    assert "cannot import module 'no_such_module'" in line and "current folder" in line
    line = _user_error(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli"], capsys)
    assert "--data 'tests.test_cli' is not of the form module:function" in line


def test_unknown_preset_and_lowbit_value_errors_are_one_line(capsys, tmp_path):
    line = _user_error(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data",
                        "--config", "w9a9", "--out", str(tmp_path)], capsys)
    assert "--config 'w9a9' is neither a preset (w8a8" in line
    # a ValueError raised by lowbit's own checks (here: a batch larger than the data) is a user error too
    line = _user_error(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data",
                        "--batch", "64", "--out", str(tmp_path), "--quiet"], capsys)
    assert "batch_sizes [64] exceed the 4 rows" in line
    with pytest.raises(ValueError, match="exceed"):  # --debug: the exception itself, with its traceback
        cli.main(["--debug", "quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data",
                  "--batch", "64", "--out", str(tmp_path), "--quiet"])


def test_missing_or_bad_onnx_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "notes.onnx").write_text("not a model")
    (tmp_path / "x.onnx").write_text("x\n")  # parses as an empty protobuf message
    assert "x.onnx is not an ONNX model (no graph outputs)" in _user_error(["inspect", str(tmp_path / "x.onnx")],
                                                                          capsys)
    assert "ONNX file" in _user_error(["inspect", str(tmp_path / "missing.onnx")], capsys)
    assert "is not an ONNX model" in _user_error(["bench", str(tmp_path / "notes.onnx")], capsys)
    assert "is a folder" in _user_error(["bench", str(tmp_path)], capsys)
    assert "no config.json" in _user_error(["quantize", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    (tmp_path / "file").write_text("")
    assert "is a file; give a folder" in _user_error(["quantize", "tests.test_cli:tiny_cnn", "--data",
                                                      "tests.test_cli:tiny_data", "--out", str(tmp_path / "file")],
                                                     capsys)


def test_recipe_that_does_not_parse_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "recipe.json"
    bad.write_text('{\n  "format": "lowbit.recipe",\n  "version": 1\n  "model": "x:y"\n}\n')
    line = _user_error(["export", str(bad), "--out", str(tmp_path / "m.onnx")], capsys)
    assert line == f"error: {bad}:4:3: invalid JSON: Expecting ',' delimiter"
    config = tmp_path / "config.json"
    config.write_text("{]")
    line = _user_error(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data",
                        "--config", str(config)], capsys)
    assert line.startswith(f"error: {config}:1:2: invalid JSON")
    line = _user_error(["export", str(tmp_path / "missing.json"), "--out", str(tmp_path / "m.onnx")], capsys)
    assert "missing.json does not exist" in line


def test_unknown_recipe_and_config_fields_are_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data", "--out", str(out),
                     "--quiet", "--latency-runs", "1"]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    for where, edit in [("top", {"modle": "x:y"}), ("options", {"options": {"progress": False, "smoothquant": 0.5,
                                                                            "alpha": 1}})]:
        path = tmp_path / f"{where}.json"
        path.write_text(json.dumps({**recipe, **edit}))
        line = _user_error(["export", str(path), "--out", str(tmp_path / "m.onnx")], capsys)
        assert f"error: {path}" in line and "unknown field(s) ['" in line and ("modle" in line or "alpha" in line)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**recipe["config"], "granularty": "tensor"}))
    line = _user_error(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data",
                        "--config", str(config)], capsys)
    assert line.startswith(f"error: {config}: QuantConfig: unknown field(s) ['granularty']")
    # a whole recipe.json is accepted as --config: its config is reused
    assert cli.main(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data", "--config",
                     str(out / "recipe.json"), "--out", str(tmp_path / "again"), "--quiet", "--latency-runs", "1"]) == 0


def test_output_folders_are_created_and_the_resolved_target_recorded(tmp_path):
    from lowbit.targets import resolve_target

    out = tmp_path / "a" / "b" / "run"
    assert cli.main(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data", "--out", str(out),
                     "--quiet", "--latency-runs", "1"]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["target"] == resolve_target("auto").name != "auto"
    onnx_path = tmp_path / "new" / "folder" / "m.onnx"
    assert cli.main(["export", str(out / "recipe.json"), "--out", str(onnx_path)]) == 0
    assert onnx_path.read_bytes() == (out / "model.int8.onnx").read_bytes()


def test_target_option_is_recorded_and_followed(tmp_path):
    import onnx

    out = tmp_path / "run"
    assert cli.main(["quantize", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:tiny_data", "--target",
                     "x86-avx2", "--out", str(out), "--quiet", "--latency-runs", "1"]) == 0
    assert json.loads((out / "recipe.json").read_text())["target"] == "x86-avx2-u8u8"  # the alias, resolved
    props = {p.key: p.value for p in onnx.load(str(out / "model.int8.onnx")).metadata_props}
    assert props["lowbit.target"] == "x86-avx2-u8u8"


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


def test_qat_bad_data_or_recipe_is_a_clear_error(tmp_path, capsys):
    line = _user_error(["qat", "tests.test_cli:tiny_cnn", "--data", "tests.test_cli:qat_data_bad",
                        "--out", str(tmp_path)], capsys)
    assert "must return (train_batches, calib_batches" in line
    assert "needs a model" in _user_error(["qat", "--out", str(tmp_path)], capsys)
    quantize_recipe = tmp_path / "recipe.json"
    quantize_recipe.write_text(json.dumps({"format": "lowbit.recipe", "version": 1, "model": "x:y"}))
    assert "is a quantize recipe, not a qat one" in _user_error(["qat", "--recipe", str(quantize_recipe)], capsys)
