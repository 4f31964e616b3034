"""Per-layer latency from ONNX Runtime profiles: node names -> layers, and the additive
prediction against measured files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.analysis import assignment_config, decision_layers
from lowbit.analysis._latency import (
    LatencyTable,
    attribute,
    export_uniform,
    latency_table,
    module_path,
    profile_files,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Conv-BN-ReLU, depthwise conv, pointwise conv, pool, linear head."""

    def __init__(self, c: int = 24):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()),
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU()),
            nn.Conv2d(c, 2 * c, 1), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * c, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


NET_LAYERS = ["features.0.0", "features.1.0", "features.2", "features.4", "classifier"]


def _order(model):
    return [name for name, _ in model.named_modules() if name]


# -- names: what torch, lowbit and ORT write (copied from real exports and ORT 1.32 profiles) --------
@pytest.mark.parametrize(("node", "op", "layer"), [
    ("/features.0.0/Conv_token_1", "QLinearConv", "features.0.0"),  # traced quantized model, fused by ORT
    ("/classifier/Gemm", "QGemm", "classifier"),
    ("features.2.input/QuantizeLinear", "QuantizeLinear", "features.2"),  # a layer's input quantizer
    ("classifier.input/QuantizeLinear@/Flatten", "QuantizeLinear", "classifier"),  # copied before a Flatten
    ("/features/features.0/features.0.0/Conv", "Conv", "features.0.0"),  # float model: scope names
    ("/features/features.0/features.0.2/Relu_output_0_nchwc", "Conv", "features.0.0"),  # Conv+ReLU, NCHWc
    ("/features/features.3/Relu_output_0_nchwc", "Conv", "features.2"),
    ("/features.1.0/Conv_output_0_nchwc", "Conv", "features.1.0"),
    ("/pool/GlobalAveragePool", "QLinearGlobalAveragePool", None),
    ("/pool/GlobalAveragePool_output_0_nchwc", "GlobalAveragePool", None),
    ("pool_input.input/QuantizeLinear", "QuantizeLinear", None),  # a module only the quantized model has
    ("Transpose_token_9", "Transpose", None),
    ("ReorderOutput", "ReorderOutput", None),
    ("/features/features.1/features.1.1/Relu", "Relu", None),  # not a contraction: other
])
def test_attribute_names(node, op, layer):
    model = Net()
    assert attribute(node, op, NET_LAYERS, _order(model)) == layer


def test_module_path_hugging_face_scopes():
    modules = {"encoder", "encoder.layer", "encoder.layer.0", "encoder.layer.0.attention",
               "encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query",
               "encoder.layer.0.attention.output", "encoder.layer.0.attention.output.dense"}
    assert module_path("/encoder/layer.0/attention/self/query/MatMul", modules) == "encoder.layer.0.attention.self.query"
    assert module_path("/encoder/layer.0/attention/output/dense/MatMul_token_3", modules) == \
        "encoder.layer.0.attention.output.dense"
    layers = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.output.dense"]
    order = sorted(modules, key=lambda n: (n.count("."), n))
    assert attribute("/encoder/layer.0/attention/self/query/MatMul", "MatMul", layers, order) == layers[0]
    assert module_path("/embeddings/Add", modules) == ""


def test_latency_table_round_trip():
    table = LatencyTable(per_layer={"a": {"w8a8": 1.0, "float": 2.0}}, other={"w8a8": 0.5, "float": 0.25},
                         total={"w8a8": 1.6, "float": 2.2})
    assert table.predict({"a": "float"}, "w8a8") == 2.5
    assert table.uniform("float") == 2.25
    assert LatencyTable.from_dict(table.to_dict()) == table


# -- against real files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    calib = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    x = torch.randn(1, 3, 32, 32)
    table = latency_table(model, calib, ["w8a8", "w4a8", None], x, runs=30)
    return model, calib, x, table


def test_profile_adds_up_to_the_measured_run(setup):
    model, _, _, table = setup
    assert set(table.per_layer) == set(decision_layers(model)) == set(NET_LAYERS)
    for choice in ("w8a8", "w4a8", "float"):
        # every layer ran some kernel of its own; the attributed time is most of the run
        assert all(table.per_layer[layer][choice] > 0 for layer in NET_LAYERS), (choice, table.per_layer)
        layers_ms = sum(table.per_layer[layer][choice] for layer in NET_LAYERS)
        assert layers_ms > 0.5 * table.uniform(choice)
        # per-layer medians + other (median of the rest of each run) ~ the wall clock of session.run
        # (which adds Python's call overhead: a few µs)
        assert table.uniform(choice) == pytest.approx(table.total[choice], rel=0.25, abs=0.03)


def _measured_ratio(model, calib, x, mixed, folder):
    """Measured ms of the file with ``mixed`` (layer -> choice) over uniform w8a8's, timed together
    (interleaved, so load from other processes falls on both)."""
    config = assignment_config(model, mixed, base="w8a8")
    lowbit.export_onnx(lowbit.quantize(model, calib, config, progress=False), folder / "mixed.onnx", x)
    export_uniform(model, calib, "w8a8", folder / "w8a8.onnx", x)
    measured = profile_files({"mixed": folder / "mixed.onnx", "w8a8": folder / "w8a8.onnx"}, x, model, runs=30)
    return measured["mixed"].total / measured["w8a8"].total


def test_mixed_w4_w8_prediction_matches_its_file(setup, tmp_path):
    # Every layer integer: the kernels are the uniform files' kernels, so the sum holds.
    model, calib, x, table = setup
    mixed = dict(zip(NET_LAYERS, ["w4a8", "w8a8", "w4a8", "w4a8", "w8a8"]))
    predicted = table.predict(mixed, "w8a8") / table.uniform("w8a8")
    assert predicted == pytest.approx(_measured_ratio(model, calib, x, mixed, tmp_path), rel=0.15)


def test_mixed_float_prediction_is_a_lower_bound(setup, tmp_path):
    # Where an integer layer feeds a float one, ORT runs that layer in float behind DequantizeLinear
    # nodes, and layouts change (Reorder / Transpose): time the additive table does not see
    # (measured on this net: 15-40 % more than predicted).  The prediction stays below the file.
    model, calib, x, table = setup
    mixed = dict(zip(NET_LAYERS, ["w8a8", None, "w8a8", None, "w8a8"]))
    names = {layer: "float" if c is None else c for layer, c in mixed.items()}
    predicted = table.predict(names, "w8a8") / table.uniform("w8a8")
    measured = _measured_ratio(model, calib, x, mixed, tmp_path)
    assert 0.9 * predicted <= measured <= 2.5 * predicted
