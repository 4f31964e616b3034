"""export_qnn: the float ONNX file and AIMET encodings that Qualcomm's tool chain quantizes with.

Checked three ways:

* golden: the JSON of a layer with hand-set ranges, field by field (AIMET 1.0.0: offsets on the
  unsigned grid, ``-zero_point`` for uint8 activations, ``-128`` for int8 symmetric weights);
* ONNX Runtime, no AIMET needed: the encodings applied to the float file as ONNX Q/DQ (the
  arithmetic AIMET documents) reproduce lowbit's own QDQ export;
* AIMET itself: ``aimet_onnx.QuantizationSimModel`` loads the pair (``load_encodings_to_sim``)
  and its outputs equal lowbit's simulation, and AIMET writes the same encodings back out.
  aimet-onnx pins other packages than lowbit's, so it runs in its own interpreter:
  ``LOWBIT_AIMET_PYTHON``, else ``runs/venvs/aimet/bin/python`` of this checkout, else this one.

Why "equal" is per row, not for all rows (measured, aimet-onnx 2.42, ORT 1.32, Xeon with VNNI):
AIMET's quantizer rounds ``x / scale - offset`` half away from zero where lowbit (like ONNX
QuantizeLinear) rounds ``x / scale`` half to even, and AIMET's convolutions are ONNX Runtime's
float kernels, summing in another order than PyTorch.  A value on a rounding tie then lands on
the neighbouring code.  Measured on the models below: the CNN, 4096 inputs, 99.93 % of rows
bit-identical, the rest within 0.0012 (outputs up to 0.93), argmax 100 %; the MLP with int8
symmetric activations 99.6 % (within 0.0024 of outputs up to 1.44); the W4A8 CNN, the MLP and the
embedding model bit-identical on every row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.export.qnn import ENCODING_VERSION, encodings_as_qdq, encodings_path, export_qnn
from lowbit.nn.quantizer import Quantizer
from lowbit.numerics import UINT8_ACTIVATION

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


# -- models built here -------------------------------------------------------------------------------
class CNN(nn.Module):
    """conv-relu, conv-relu6, a residual add (QuantAdd), max-pool, average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise, as MobileNetV2's
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        y = nn.functional.relu6(self.conv2(x))
        x = nn.functional.max_pool2d(self.conv3(y) + x, 2)
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class MLP(nn.Module):
    """Linear layers on (batch, tokens, features): MatMul + Add in ONNX, not Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class FloatReader(MLP):
    """A quantized tensor (fc2's input) that a float op reads too (lowbit leaves ReduceMean float)."""

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + h.mean(-1, keepdim=True)


class Embedder(nn.Module):
    """An int8 per-row embedding table (no QNN encoding: written in float on lowbit's grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, ids):
        return self.fc(torch.relu(self.emb(ids)))


def _quantized(model: nn.Module, calib: list[torch.Tensor], config="w8a8") -> nn.Module:
    return lowbit.quantize(model.eval(), calib, config, target="qnn", progress=False)


def _cnn(config="w8a8") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(4)]
    return _quantized(CNN(), calib, config), torch.randn(512, 3, 8, 8, generator=gen)


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(3)
    qmodel = _quantized(MLP(), [torch.randn(8, 5, 12, generator=gen) for _ in range(4)])
    # An output quantizer on the model's output: the graph output keeps its name and its grid.
    out = Quantizer(UINT8_ACTIVATION, name="fc2.output")
    out.set_qparams(torch.tensor(0.02), torch.tensor(128, dtype=torch.int32))
    qmodel.fc2.output_quantizer = out
    return qmodel, torch.randn(256, 5, 12, generator=gen)


def _mlp_signed() -> tuple[nn.Module, torch.Tensor]:
    """Signed symmetric int8 activations (TensorRT's grid): encodings keep the sign (``is_sym``)."""
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(7)
    qmodel = lowbit.quantize(MLP().eval(), [torch.randn(8, 5, 12, generator=gen) for _ in range(4)], "w8a8",
                             target="tensorrt", progress=False)
    return qmodel, torch.randn(256, 5, 12, generator=gen)


def _two_ranges() -> tuple[nn.Module, torch.Tensor]:
    """The CNN with conv2's input range widened by 3/2: the tensor feeding conv2 and the add
    is quantized with two ranges (export copies it through an Identity)."""
    qmodel, x = _cnn()
    q = qmodel.conv2.input_quantizer
    q.set_qparams(q.scale * 1.5, q.zero_point)
    return qmodel, x


def _float_reader() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(8)
    gen = torch.Generator().manual_seed(9)
    qmodel = _quantized(FloatReader(), [torch.randn(8, 5, 12, generator=gen) for _ in range(4)])
    return qmodel, torch.randn(256, 5, 12, generator=gen)


def _embedder() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(5)
    qmodel = _quantized(Embedder(), [torch.randint(0, 40, (8, 6), generator=gen) for _ in range(4)])
    return qmodel, torch.randint(0, 40, (128, 6), generator=gen)


EXPORTED_BACK = ("cnn", "mlp_3d")  # cases whose encodings AIMET writes back out
CASES = {"cnn": _cnn, "cnn_w4a8": lambda: _cnn("w4a8"), "mlp_3d": _mlp, "mlp_signed": _mlp_signed,
         "two_ranges": _two_ranges, "float_reader": _float_reader, "embedding": _embedder}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[nn.Module, torch.Tensor, Path]]:
    folder = tmp_path_factory.mktemp("qnn")
    out = {}
    for name, build in CASES.items():
        qmodel, x = build()
        out[name] = (qmodel, x, export_qnn(qmodel, folder / f"{name}.onnx", x[:2]))
    return out


def _simulate(qmodel: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return qmodel(x).numpy()


# -- the files ---------------------------------------------------------------------------------------
def test_golden_encodings_of_a_layer(tmp_path):
    """Hand-set ranges -> the exact JSON entries (AIMET 1.0.0: offsets on the unsigned grid)."""
    layer = nn.Sequential(nn.Linear(3, 2)).eval()
    with torch.no_grad():
        layer[0].weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]]))
        layer[0].bias.copy_(torch.tensor([0.3, -0.7]))
    qmodel = _quantized(layer, [torch.randn(4, 3)])
    qmodel[0].input_quantizer.set_qparams(torch.tensor(0.5), torch.tensor(3, dtype=torch.int32))
    qmodel[0].weight_quantizer.set_qparams(torch.tensor([1 / 127, 2 / 127]), torch.zeros(2, dtype=torch.int32))
    path = export_qnn(qmodel, tmp_path / "fc.onnx", torch.randn(1, 3))
    doc = json.loads(encodings_path(path).read_text())
    w_scale = [float(np.float32(1 / 127)), float(np.float32(2 / 127))]
    bias_scale = [float(np.float32(0.5) * np.float32(s)) for s in w_scale]
    assert doc == {
        "version": "1.0.0", "producer": doc["producer"],
        "activation_encodings": [{"name": "input", "dtype": "INT", "bw": 8, "is_sym": False,
                                  "enc_type": "PER_TENSOR", "scale": [0.5], "offset": [-3]}],
        "param_encodings": [
            {"name": "0.weight", "dtype": "INT", "bw": 8, "is_sym": True, "enc_type": "PER_CHANNEL",
             "scale": w_scale, "offset": [-128, -128]},
            {"name": "0.bias", "dtype": "INT", "bw": 32, "is_sym": True, "enc_type": "PER_CHANNEL",
             "scale": bias_scale, "offset": [-(2**31), -(2**31)]}],
    }
    assert doc["producer"]["package"] == "lowbit" and ENCODING_VERSION == "1.0.0"
    # AIMET's reading: min = offset * scale, max = (offset + 255) * scale
    assert (-3 * 0.5, 252 * 0.5) == (-1.5, 126.0)


def test_float_file_holds_lowbit_weights_on_the_grid(exported):
    qmodel, _, path = exported["cnn"]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert not [n.op_type for n in model.graph.node if "Quantize" in n.op_type]
    assert {p.key: p.value for p in model.metadata_props}["lowbit.target"] == "qnn"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("conv1", "conv2", "conv3", "fc"):
        layer = getattr(qmodel, name)
        ints = layer.integer_params()
        w = ints.weight.values.float() * ints.weight.scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
        np.testing.assert_array_equal(inits[f"{name}.weight"], w.numpy())
        np.testing.assert_array_equal(inits[f"{name}.bias"], (ints.bias.values.float() * ints.bias.scale).numpy())
    doc = json.loads(encodings_path(path).read_text())
    names = {e["name"] for e in doc["activation_encodings"] + doc["param_encodings"]}
    tensors = {t for n in model.graph.node for t in (*n.input, *n.output)} | {"input"}
    assert names <= tensors  # every encoding names a tensor of the float file


def test_w4a8_weights_are_4_bit_encodings(exported):
    doc = json.loads(encodings_path(exported["cnn_w4a8"][2]).read_text())
    bits = {e["name"]: e["bw"] for e in doc["param_encodings"] if e["bw"] != 32}
    assert bits == {"conv1.weight": 8, "conv2.weight": 4, "conv3.weight": 4, "fc.weight": 8}  # preset: ends int8
    assert all(e["offset"] == [-8] * len(e["scale"]) for e in doc["param_encodings"] if e["bw"] == 4)


def test_signed_symmetric_activations_keep_their_sign(exported):
    doc = json.loads(encodings_path(exported["mlp_signed"][2]).read_text())
    assert [(e["bw"], e["is_sym"], e["offset"]) for e in doc["activation_encodings"]] == [(8, True, [-128])] * 2


def test_two_ranges_on_one_tensor_keep_the_finest_and_requantize(exported):
    """QNN quantizes a tensor once: the finer range sits on the tensor, the coarser on an Identity copy."""
    qmodel, _, path = exported["two_ranges"]
    model = onnx.load(path)
    (copy,) = [n for n in model.graph.node if n.op_type == "Identity"]
    doc = {e["name"]: e for e in json.loads(encodings_path(path).read_text())["activation_encodings"]}
    fine, coarse = doc[copy.input[0]]["scale"][0], doc[copy.output[0]]["scale"][0]
    assert fine == pytest.approx(float(qmodel.add_0.b_quantizer.scale))
    assert coarse == pytest.approx(float(qmodel.conv2.input_quantizer.scale)) and coarse > fine
    conv2 = next(n for n in model.graph.node if n.name == "/conv2/Conv")
    assert conv2.input[0] == copy.output[0]


def test_embedding_table_is_float_on_the_grid(exported):
    qmodel, _, path = exported["embedding"]
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    ints = qmodel.emb.integer_params().weight
    np.testing.assert_array_equal(inits["emb.weight"], (ints.values.float() * ints.scale[:, None]).numpy())
    doc = json.loads(encodings_path(path).read_text())
    assert "emb.weight" not in {e["name"] for e in doc["param_encodings"]}


# -- ONNX Runtime: the encodings as ONNX Q/DQ --------------------------------------------------------
def test_a_tensor_also_read_in_float_carries_its_encoding_on_a_copy(exported):
    """QNN quantizes an encoded tensor for every reader: the float reader must read the tensor
    itself, without an encoding, and fc2 an Identity copy that carries it."""
    _, _, path = exported["float_reader"]
    graph = onnx.load(path).graph
    copy = next(n for n in graph.node if n.op_type == "Identity" and n.output[0].endswith("/quantized"))
    readers = [n.op_type for n in graph.node if copy.input[0] in n.input]
    assert sorted(readers) == ["Identity", "ReduceMean"]
    names = {e["name"] for e in json.loads(encodings_path(path).read_text())["activation_encodings"]}
    assert copy.output[0] in names and copy.input[0] not in names


@pytest.mark.parametrize("case", ["cnn", "float_reader"])
def test_encodings_as_onnx_qdq_reproduce_the_simulation(exported, case):
    qmodel, x, path = exported[case]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # float kernels, as written
    session = ort.InferenceSession(encodings_as_qdq(path).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    got, want = session.run(None, {"input": x.numpy()})[0], _simulate(qmodel, x)
    rows_equal = (np.abs(got - want).max(axis=1) <= 5e-7).mean()
    assert rows_equal >= 0.98, rows_equal  # the rest: a rounding tie decided by float summation order
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99


# -- AIMET --------------------------------------------------------------------------------------------
_AIMET_WORKER = r"""
import json, sys
import numpy as np, onnx
from aimet_onnx.quantsim import QuantizationSimModel, load_encodings_to_sim
for job in json.load(open(sys.argv[1])):
    sim = QuantizationSimModel(onnx.load(job["onnx"]), session_options_kwargs={"intra_op_num_threads": 1})
    load_encodings_to_sim(sim, job["encodings"], strict=False)  # tensors without an encoding: disabled
    feeds = {sim.session.get_inputs()[0].name: np.load(job["input"])}
    np.save(job["output"], sim.session.run(None, feeds)[0])
    if job["export"]:
        sim.export(job["folder"], job["prefix"], export_model=False, encoding_version="1.0.0",
                   export_int32_bias=True)
"""


def _aimet_python() -> str | None:
    given = os.environ.get("LOWBIT_AIMET_PYTHON")
    if given:
        return given
    venv = REPO / "runs" / "venvs" / "aimet" / "bin" / "python"
    if venv.exists():
        return str(venv)
    import importlib.util

    return sys.executable if importlib.util.find_spec("aimet_onnx") else None


@pytest.fixture(scope="module")
def aimet(exported, tmp_path_factory) -> dict[str, tuple[np.ndarray, dict]]:
    """AIMET QuantSim's outputs for every case, and the encodings AIMET exports back, in one process."""
    python = _aimet_python()
    if python is None:
        pytest.skip("aimet-onnx is not installed: pip install aimet-onnx (in its own venv: it needs other "
                    "package versions) and set LOWBIT_AIMET_PYTHON to that venv's python")
    folder = tmp_path_factory.mktemp("aimet")
    jobs = []
    for name, (_, x, path) in exported.items():
        np.save(folder / f"{name}.in.npy", x.numpy())
        jobs.append({"onnx": str(path), "encodings": str(encodings_path(path)), "input": str(folder / f"{name}.in.npy"),
                     "output": str(folder / f"{name}.out.npy"), "folder": str(folder), "prefix": name,
                     "export": name in EXPORTED_BACK})
    (folder / "jobs.json").write_text(json.dumps(jobs))
    (folder / "worker.py").write_text(_AIMET_WORKER)
    done = subprocess.run([python, str(folder / "worker.py"), str(folder / "jobs.json")], check=False,
                          capture_output=True, text=True, timeout=300)
    if done.returncode and "No module named 'aimet_onnx'" in done.stderr:
        pytest.skip(f"{python} has no aimet-onnx: pip install aimet-onnx there, or set LOWBIT_AIMET_PYTHON")
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (np.load(folder / f"{name}.out.npy"),
                   json.loads((folder / f"{name}.encodings").read_text()) if name in EXPORTED_BACK else None)
            for name in exported}


@pytest.mark.parametrize("case", list(CASES))
def test_aimet_quantsim_equals_the_simulation(case, exported, aimet):
    qmodel, x, _ = exported[case]
    got, want = aimet[case][0], _simulate(qmodel, x)
    assert got.shape == want.shape
    if case == "two_ranges":  # requantized from the finer grid: rounded twice, so close, not equal
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # measured 0.0030 (outputs up to 0.89)
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95  # measured 1.0
        return
    rows = got.reshape(len(got), -1), want.reshape(len(want), -1)
    rows_equal = (rows[0] == rows[1]).all(axis=1).mean()
    # bit for bit but for rounding ties (module docstring): measured 99.93 % of rows or more
    assert rows_equal >= 0.98, (case, rows_equal)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.05 * scale, case


@pytest.mark.parametrize("case", EXPORTED_BACK)
def test_aimet_exports_the_same_encodings(case, exported, aimet):
    """AIMET's own export of the loaded sim (1.0.0, int32 biases) writes back what lowbit wrote."""
    ours = json.loads(encodings_path(exported[case][2]).read_text())
    theirs = aimet[case][1]
    assert theirs["version"] == ours["version"] == "1.0.0"
    for kind in ("activation_encodings", "param_encodings"):
        mine = {e["name"]: e for e in ours[kind]}
        back = {e["name"]: {**e, "offset": [int(o) for o in e["offset"]]} for e in theirs[kind]}
        assert back == mine, kind


# -- refusals -----------------------------------------------------------------------------------------
def test_refuses_what_encodings_cannot_express(tmp_path):
    x = torch.randn(4, 5, 12)
    dynamic = lowbit.quantize(MLP().eval(), [x], "w8a8-dynamic", progress=False)
    with pytest.raises(ValueError, match="static"):
        export_qnn(dynamic, tmp_path / "dyn.onnx", x)
    grouped = lowbit.quantize(MLP().eval(), [x], "w4a16-g128", progress=False)
    with pytest.raises(ValueError, match="per.channel"):
        export_qnn(grouped, tmp_path / "grouped.onnx", x)
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_qnn(_quantized(MLP(), [x]), tmp_path / "model.bin", x)
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing half-written, no temporary left
