"""The installed ``lowbit`` command and ``python -m lowbit``, run as a user runs them (subprocesses)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lowbit
from lowbit.cli import build_parser

LOWBIT = Path(sys.executable).with_name("lowbit")  # the console script pip wrote for pyproject's [project.scripts]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

USER_MODULE = textwrap.dedent('''
    """A user's own models and data, in the folder lowbit is run from (not installed anywhere)."""
    import torch
    from torch import nn


    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


    def data():
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)]
''')


def run(*args: str, cwd: Path, entry: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (entry or [str(LOWBIT)]) + list(args)
    return subprocess.run(cmd, check=False, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def _installed():
    # make test installs the package (pip install -e .): a missing console script is a failure, not a skip
    assert LOWBIT.exists(), f"no console script at {LOWBIT}: install lowbit with pip install -e ."


def test_version_and_python_dash_m_help(tmp_path):
    version = run("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout == f"lowbit {lowbit.__version__}\n"
    helped = run("--help", cwd=tmp_path, entry=[sys.executable, "-m", "lowbit"])
    assert helped.returncode == 0 and helped.stdout.startswith("usage: lowbit ")
    for command in ("quantize", "qat", "export", "bench", "inspect"):
        assert f"    {command} " in helped.stdout


def test_every_command_and_option_has_help():
    parser = build_parser("doc", "0")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.dest for c in sub._choices_actions} == set(sub.choices)
    assert all(c.help for c in sub._choices_actions)
    for name, command in [("lowbit", parser), *sub.choices.items()]:
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"


def test_module_function_from_the_current_folder_then_inspect_and_bench(tmp_path):
    (tmp_path / "mymodels.py").write_text(USER_MODULE)
    done = run("quantize", "mymodels:net", "--data", "mymodels:data", "--out", "run", "--quiet",
               "--latency-runs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model.int8.onnx").is_file() and "quantized onnx" in done.stdout

    inspected = run("inspect", "run/model.int8.onnx", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    assert "| op | kind | count |" in inspected.stdout and "| QLinearConv | integer |" in inspected.stdout
    assert "inputs: input [batch, 3, 8, 8]" in inspected.stdout
    assert "target: " in inspected.stdout and "(lowbit.target metadata)" in inspected.stdout

    timed = run("bench", "run/fp32.onnx", "run/model.int8.onnx", "--runs", "2", cwd=tmp_path)
    assert timed.returncode == 0, timed.stderr
    assert sum(line.startswith("| run/") for line in timed.stdout.splitlines()) == 2


def test_user_errors_are_one_line_with_status_2_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "notes.onnx").write_text("not a model")
    cases = [
        (["quantize", "mymodels:net", "--data", "mymodels:data"], "cannot import module 'mymodels'"),
        (["inspect", "notes.onnx"], "notes.onnx is not an ONNX model"),
    ]  # more cases run in process: tests/test_cli.py
    for args, message in cases:
        done = run(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
        assert "Traceback" not in done.stderr
    debug = run("inspect", "missing.onnx", "--debug", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "UserError: ONNX file missing.onnx does not exist" in debug.stderr


def test_algorithms_from_the_shell_are_recorded_and_the_recipe_replays_to_the_same_bytes(tmp_path):
    import json

    (tmp_path / "mymodels.py").write_text(USER_MODULE)
    done = run("quantize", "mymodels:net", "--data", "mymodels:data", "--algorithms",
               "cle,bias_correction(reference=model)", "--out", "run", "--quiet", "--latency-runs", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    steps = json.loads((tmp_path / "run" / "recipe.json").read_text())["options"]["algorithms"]
    assert steps == [{"name": "fold_bn"}, {"name": "cle", "relu6_to_relu": False, "iterations": 50, "tol": 0.001},
                     {"name": "bias_correction", "reference": "model"}]
    replayed = run("export", "run/recipe.json", "--out", "again.onnx", cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "run" / "model.int8.onnx").read_bytes()
