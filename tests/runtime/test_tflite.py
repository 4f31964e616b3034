"""export_tflite + TFLiteModel on a small CNN and a small MLP, run by LiteRT's interpreter.

What is checked against what:
* the file's kernels: every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED / ADD / MEAN reads int8
  activations (weights int8, biases int32, outputs int8), read from the flatbuffer's tensor types;
* the file's numbers: every activation scale / zero point lowbit calibrated is in the file (zero point
  shifted by -128), and each layer's int8 weights, per-channel scales and int32 bias equal lowbit's
  ``integer_params()`` exactly;
* outputs: each FULLY_CONNECTED kernel, fed the file's own int8 input, equals lowbit's layer within one
  step of its output grid (the simulation rounds a float result half to even; TFLite requantizes the
  int32 accumulator with a fixed-point multiplier, so a value within float error of a tie may round
  the other way); the whole network's outputs agree within a few output steps (those one-step
  differences propagate, a little amplified, through later layers) on the grid of the simulation's
  own output quantizer (``target="tflite"`` adds it where the file's kernel writes int8).

litert-torch, the converter, clashes with this environment's packages (its xdsl pin needs
typing-extensions < 4.13), so it may live in its own venv: ``$LOWBIT_LITERT_PYTHON`` or
``runs/venvs/litert/bin/python`` (a venv with ``pip install litert-torch``); without one the conversion tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.export import tflite as tflite_export
from lowbit.export.tflite import export_tflite
from lowbit.nn.modules import QuantAdd, QuantStub, is_quantized

pytestmark = pytest.mark.usefixtures("one_thread")
interpreter = pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert")
from lowbit.runtime import emulate_tflite
from lowbit.runtime.tflite import TFLiteModel, inspect_tflite, measure_latency

# A conversion costs a litert-torch start (~10 s of imports) plus the conversion: the CNN (conv, depthwise,
# residual add, pool, fully-connected) runs by default, the MLP's file with `pytest -m slow`.
SLOW = pytest.mark.slow
REPO_VENV = Path(__file__).resolve().parents[2] / "runs" / "venvs" / "litert" / "bin" / "python"


def _litert_python() -> str | None:
    """Where litert-torch runs: None for this interpreter; skips when it is nowhere."""
    if importlib.util.find_spec("litert_torch") is not None:
        return None
    python = os.environ.get(tflite_export.PYTHON_ENV) or (str(REPO_VENV) if REPO_VENV.exists() else None)
    if python is None:
        pytest.skip(f"litert-torch not installed: pip install litert-torch, or a venv with it named by "
                    f"${tflite_export.PYTHON_ENV}")
    return python


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, depthwise + ReLU6, 1x1 projection with a residual add, pool, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6())
        self.project = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _built(model, shape, tmp_path_factory, name):
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():  # a trained-looking BatchNorm, so folding it matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    calib = [_randn(8, *shape, seed=s) for s in range(4)]
    qmodel = lowbit.quantize(model, calib, "w8a8", target="tflite", progress=False)
    path = export_tflite(qmodel, tmp_path_factory.mktemp(name) / f"{name}.tflite", calib[0][:1], calibration=calib,
                         python=_litert_python())
    return qmodel, path


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return _built(SmallCNN(), (3, 16, 16), tmp_path_factory, "cnn")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return _built(_mlp(), (32,), tmp_path_factory, "mlp")


def _layers(qmodel, x):
    """lowbit's quantized layers in the order they run."""
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in qmodel.modules() if is_quantized(m)]
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    return order


def _weighted_ops(path):
    """(op name, input tensor details) of the file's conv / fully-connected ops, in order."""
    it = interpreter.Interpreter(model_path=str(path),
                                 experimental_op_resolver_type=interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    details = {t["index"]: t for t in it.get_tensor_details()}
    ops = [op for op in it._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    return it, [(op["op_name"], [details[i] for i in op["inputs"]], details[op["outputs"][0]]) for op in ops]


@pytest.mark.parametrize("which, expected", [
    ("cnn", {"CONV_2D": 2, "DEPTHWISE_CONV_2D": 1, "ADD": 1, "MEAN": 1, "FULLY_CONNECTED": 1}),
    pytest.param("mlp", {"FULLY_CONNECTED": 3}, marks=SLOW),
])
def test_every_compute_op_runs_in_int8(which, expected, request):
    _, path = request.getfixturevalue(which)
    report = inspect_tflite(path)
    assert report.fully_integer and report.float_ops == {}, report
    assert report.integer_ops == expected, report
    for name, ins, outs in report.ops:
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            assert ins == ("int8", "int8", "int32") and outs == ("int8",), (name, ins, outs)
        elif name in ("ADD", "MEAN"):
            assert ins[0] == "int8" and outs == ("int8",), (name, ins, outs)
    assert str(report).endswith("float none")


@pytest.mark.parametrize("which", ["cnn", pytest.param("mlp", marks=SLOW)])
def test_file_holds_lowbit_scales_weights_and_biases(which, request):
    qmodel, path = request.getfixturevalue(which)
    x = _randn(1, *(3, 16, 16) if which == "cnn" else (32,), seed=9)
    layers = _layers(qmodel, x)
    it, ops = _weighted_ops(path)
    assert len(ops) == len(layers)
    for layer, (op, (inp, weight, bias), _) in zip(layers, ops, strict=True):
        ints = layer.integer_params()
        values = ints.weight.values.numpy()  # torch layout: (out, in, kh, kw) / (out, in)
        if op == "CONV_2D":
            values = values.transpose(0, 2, 3, 1)  # TFLite: OHWI
        elif op == "DEPTHWISE_CONV_2D":
            values = values.transpose(1, 2, 3, 0)  # TFLite: 1HWC, channel last
        np.testing.assert_array_equal(it.get_tensor(weight["index"]), values, err_msg=f"{layer.weight_quantizer.name}")
        q = weight["quantization_parameters"]
        np.testing.assert_array_equal(q["scales"], ints.weight.scale.numpy())  # float32, bit for bit
        assert not q["zero_points"].any()
        assert q["quantized_dimension"] == (3 if op == "DEPTHWISE_CONV_2D" else 0)
        np.testing.assert_array_equal(it.get_tensor(bias["index"]), ints.bias.values.numpy())
        assert inp["quantization"] == pytest.approx((float(ints.input.scale), int(ints.input.zero_point) - 128), rel=0)
    # every activation range lowbit calibrated (layer inputs, the residual add's operands, the pool's stub)
    in_file = {(t["quantization"][0], t["quantization"][1]) for t in it.get_tensor_details()}
    ranges = [(float(q.scale), int(q.zero_point) - 128) for m in qmodel.modules()
              if is_quantized(m) or isinstance(m, (QuantAdd, QuantStub)) for role, q in m.quantizers() if role != "weight"]
    assert len(ranges) >= len(layers)
    assert set(ranges) <= in_file


@pytest.mark.parametrize("which, shape", [("cnn", (3, 16, 16)), pytest.param("mlp", (32,), marks=SLOW)])
def test_fully_connected_kernels_equal_the_simulation_within_one_step(which, shape, request):
    """Each FULLY_CONNECTED op fed the file's own int8 input vs lowbit's layer (+ ReLU + the next grid)."""
    qmodel, path = request.getfixturevalue(which)
    it = interpreter.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                                 experimental_op_resolver_type=interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    details = {t["index"]: t for t in it.get_tensor_details()}
    model = TFLiteModel(path)  # (only for its input quantization)
    layers = [m for m in _layers(qmodel, _randn(1, *shape, seed=0)) if isinstance(m, nn.Linear)]
    ops = [op for op in it._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"]
    mismatched, total = 0, 0
    for seed in range(20):
        x = _randn(1, *shape, seed=100 + seed) * 1.5
        it.set_tensor(model.inputs[0]["index"], model.feeds(x)[0])
        it.invoke()
        for k, (layer, op) in enumerate(zip(layers, ops, strict=True)):
            s_in, z_in = details[op["inputs"][0]]["quantization"]
            s_out, z_out = details[op["outputs"][0]]["quantization"]
            x_in = torch.from_numpy((it.get_tensor(op["inputs"][0]).astype(np.float32) - z_in) * np.float32(s_in))
            with torch.no_grad():
                y = layer(x_in)
                y = torch.relu(y) if k < len(layers) - 1 else y
            want = torch.clamp(torch.round(y / s_out) + z_out, -128, 127).numpy()
            got = it.get_tensor(op["outputs"][0]).astype(np.float32)
            assert np.abs(got - want).max() <= 1, (k, np.abs(got - want).max())
            mismatched += int((got != want).sum())
            total += got.size
    assert mismatched / total < 0.02, f"{mismatched} of {total} codes one step off"


@pytest.mark.parametrize("which, shape", [("cnn", (3, 16, 16)), pytest.param("mlp", (32,), marks=SLOW)])
def test_outputs_agree_with_the_simulation(which, shape, request):
    """The file's outputs vs lowbit's simulation: target="tflite" quantizes the head's output as the file's
    int8 FULLY_CONNECTED writes it, so both are on one grid (the export calibrates no range of its own)."""
    qmodel, path = request.getfixturevalue(which)
    model = TFLiteModel(path)
    scale, zero_point = model.outputs[0]["quantization"]
    head = [m for m in qmodel.modules() if isinstance(m, nn.Linear)][-1].output_quantizer
    assert head is not None and (scale, zero_point) == (float(head.scale), int(head.zero_point) - 128)
    steps = []
    for seed in range(32):
        x = _randn(1, *shape, seed=200 + seed) * (1 + seed % 3)  # (some inputs past the calibrated range)
        with torch.no_grad():
            want = torch.clamp(torch.round(qmodel(x) / scale) + zero_point, -128, 127)
        got = model(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        steps.append((torch.round(got / scale) + zero_point - want).abs())
    steps = torch.cat(steps)
    # a kernel's one-step tie differences (see the module docstring) may reach the output, rarely
    assert steps.max() <= 2 and (steps == 0).float().mean() >= 0.9, (which, steps.max(), (steps == 0).float().mean())


def test_runner_quantizes_inputs_as_lowbit_and_times(cnn):
    qmodel, path = cnn
    model = TFLiteModel(path, threads=1, xnnpack=False)
    x = _randn(1, 3, 16, 16, seed=3)
    q = next(m for m in qmodel.modules() if is_quantized(m)).input_quantizer
    codes = torch.round(x / q.scale) + q.zero_point - 128  # lowbit's grid, shifted to int8
    np.testing.assert_array_equal(model.feeds(x)[0], codes.clamp(-128, 127).numpy().astype(np.int8))
    stats = measure_latency(model, model.feeds(x), warmup=2, runs=5)
    assert stats.runs == 5 and stats.batch == 1 and 0 < stats.median_ms <= stats.p90_ms * 1.0001 + 1e-9
    with pytest.raises(ValueError, match="static shape"):
        model(_randn(2, 3, 16, 16, seed=0))


@pytest.mark.parametrize("config, match", [("w8a8-dynamic", "dynamic activation"), ("w4a8", "int8 symmetric")])
def test_unsupported_specs_are_named_before_converting(config, match, tmp_path):
    torch.manual_seed(0)
    calib = [_randn(8, 32, seed=0)]
    qmodel = lowbit.quantize(_mlp().eval(), calib, config, progress=False)
    with pytest.raises(ValueError, match=match):
        export_tflite(qmodel, tmp_path / "m.tflite", calib[0][:1], python=sys.executable)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_converter_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(tflite_export.PYTHON_ENV, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litert_torch" else real(name, *a))
    calib = [_randn(8, 32, seed=0)]
    qmodel = lowbit.quantize(_mlp().eval(), calib, "w8a8", progress=False)
    with pytest.raises(ModuleNotFoundError, match="pip install litert-torch"):
        export_tflite(qmodel, tmp_path / "m.tflite", calib[0][:1])
    with pytest.raises(ModuleNotFoundError, match="pip install litert-torch"):  # a Python without it
        export_tflite(qmodel, tmp_path / "m.tflite", calib[0][:1], python=sys.executable)
    assert not list(tmp_path.iterdir())


def test_missing_interpreter_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(ModuleNotFoundError, match="pip install ai-edge-litert"):
        TFLiteModel(tmp_path / "absent.tflite")


@pytest.fixture(scope="module")
def tied_cnn(tmp_path_factory):
    """The CNN with grids that put the residual ADD and the MEAN on exact rounding ties: the add's operands
    share a scale s and its output has 2s (so half of its results end in .5), and the MEAN keeps the scale
    with a zero point one code higher (so every sum that is 32 mod 64 is a tie).  Where ONNX Runtime's
    float kernels round ties to even, XNNPACK's fixed-point ADD rounds them up and its MEAN folds the
    zero points into the float sum before rounding: the kernels differ on hundreds of elements."""
    torch.manual_seed(0)
    calib = [_randn(8, 3, 16, 16, seed=s) for s in range(4)]
    qmodel = lowbit.quantize(SmallCNN().eval(), calib, "w8a8", target="tflite", progress=False)
    add = next(m for m in qmodel.modules() if isinstance(m, QuantAdd))
    stub = next(m for m in qmodel.modules() if isinstance(m, QuantStub))
    head = next(m for m in qmodel.modules() if isinstance(m, nn.Linear))
    dw = next(m for m in qmodel.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    s = add.a_quantizer.scale.clone()
    for q, scale, zp in ((add.a_quantizer, s, 0), (dw.input_quantizer, s, 0), (add.b_quantizer, s, 121),
                         (stub.input_quantizer, 2 * s, 110), (head.input_quantizer, 2 * s, 111)):
        q.set_qparams(scale.reshape(q.scale.shape), torch.tensor(zp, dtype=q.zero_point.dtype).reshape(q.zero_point.shape))
    path = export_tflite(qmodel, tmp_path_factory.mktemp("tied") / "tied.tflite", calib[0][:1], calibration=calib,
                         python=_litert_python())
    return qmodel, path


def test_integer_emulation_equals_litert_bit_for_bit(cnn, tied_cnn):
    """emulate_tflite (XNNPACK's requantization, fixed-point ADD and MEAN) against the file in LiteRT, on
    the calibrated CNN and on the one whose ADD and MEAN sit on ties (where ORT's kernels round otherwise)."""
    for qmodel, path in (cnn, tied_cnn):
        emulated = emulate_tflite(qmodel)
        assert emulated.kernel_counts() == {"QUANTIZE": 1, "CONV_2D": 3, "ADD": 1, "MEAN": 1, "FULLY_CONNECTED": 1,
                                            "DEQUANTIZE": 1}
        model = TFLiteModel(path)
        for seed in range(16):
            x = _randn(1, 3, 16, 16, seed=300 + seed) * (1 + seed % 3)
            got = model(x)
            with torch.no_grad():
                want = emulated(x)
            assert torch.equal(got, want), (path.name, seed, (got - want).abs().max())


def test_xnnpack_add_and_mean_are_not_onnx_runtimes(tied_cnn):
    """On the tied grids the two runtimes' ADD and MEAN kernels differ (so the test above checks something)."""
    from lowbit.runtime import _ort_kernels as K
    from lowbit.runtime import _xnnpack_kernels as X

    qmodel, _ = tied_cnn
    add = next(m for m in qmodel.modules() if isinstance(m, QuantAdd))
    stub = next(m for m in qmodel.modules() if isinstance(m, QuantStub))
    head = next(m for m in qmodel.modules() if isinstance(m, nn.Linear))
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (4, 8, 8, 8), generator=g).float() for _ in range(2))
    qa, qb, qy, qh = add.a_quantizer, add.b_quantizer, stub.input_quantizer, head.input_quantizer
    args = (a, qa.scale, int(qa.zero_point), b, qb.scale, int(qb.zero_point), qy.scale, int(qy.zero_point), 0, 255)
    ours, ort = X.add(*args), K.qlinear_add(*args)
    exact = ((a - int(qa.zero_point)) + (b - int(qb.zero_point))) / 2 + int(qy.zero_point)
    ties = exact != exact.floor()
    assert torch.equal(ours[ties], (exact[ties] + 0.5).clamp(0, 255))  # half up
    assert torch.equal(ort[ties], torch.round(exact[ties]).clamp(0, 255))  # half to even
    assert int((ours != ort).sum()) > a.numel() // 8  # (half of the results are ties; half of those differ)
    pooled = (qy.scale, int(qy.zero_point), qh.scale, int(qh.zero_point), 0, 255)
    maps = torch.randint(0, 256, (16, 64, 8, 8), generator=g).float()  # 1024 means, 1 in 64 of them a tie
    assert int((X.mean(maps, *pooled) != K.qlinear_global_average_pool(maps, *pooled)).sum()) > 3
