"""The ONNX post-processing passes on hand-built graphs: structure after, values unchanged."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from lowbit.export.onnx_export import _postprocess

RNG = np.random.default_rng(0)


def _model(nodes, inits: dict, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _run(model, x):
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def _processed(model) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    after = onnx.ModelProto()
    after.CopyFrom(model)
    _postprocess(after, 19)
    onnx.checker.check_model(after, full_check=True)
    return model, after


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _act_q(name_in, name_out, scale="s", zp="z"):
    return [helper.make_node("QuantizeLinear", [name_in, scale, zp], [f"{name_out}_q"]),
            helper.make_node("DequantizeLinear", [f"{name_out}_q", scale, zp], [name_out])]


ACT = {"s": np.float32(0.05), "z": np.uint8(128)}


def test_quantized_constant_becomes_int8_and_transpose_folds():
    w = RNG.standard_normal((8, 16)).astype(np.float32)  # a Linear weight [out, in]
    nodes = [*_act_q("x", "xd"),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["xd", "wt"], ["y"])]
    inits = {**ACT, "w": w, "ws": np.abs(w).max(1) / 127, "wz": np.zeros(8, np.int8)}
    before, after = _processed(_model(nodes, inits, [2, 3, 16], [2, 3, 8]))
    assert _ops(after) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]
    weight = [t for t in after.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(weight) == 1 and list(weight[0].dims) == [16, 8]
    x = RNG.standard_normal((2, 3, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(after, x), _run(before, x))


def test_identical_quantizers_merge_and_different_ones_warn(caplog):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), *_act_q("r", "a"), *_act_q("r", "b", "s2", "z"),
             *_act_q("r", "c"), helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "c"], ["y"])]
    before, after = _processed(_model(nodes, {**ACT, "s2": np.float32(0.04)}, [4], [4]))
    assert _ops(after).count("QuantizeLinear") == 2  # a and c merged; b has another scale
    assert "quantized with 2 different scales" in caplog.text
    x = RNG.standard_normal(4).astype(np.float32)
    np.testing.assert_array_equal(_run(after, x), _run(before, x))


def test_quantize_is_copied_in_front_of_data_movement():
    nodes = [*_act_q("x", "xd"), helper.make_node("Add", ["xd", "xd"], ["sum"]),
             helper.make_node("MaxPool", ["sum"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]), *_act_q("f", "y")]
    before, after = _processed(_model(nodes, ACT, [1, 2, 4, 4], [1, 8]))
    # Add -> Q -> DQ -> MaxPool -> Q -> DQ -> Flatten -> Q -> DQ: ORT fuses each group.
    assert _ops(after)[3:] == ["QuantizeLinear", "DequantizeLinear", "MaxPool", "QuantizeLinear",
                               "DequantizeLinear", "Flatten", "QuantizeLinear", "DequantizeLinear"]
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32) * 3
    np.testing.assert_array_equal(_run(after, x), _run(before, x))


def _conv_bn(q_weight: np.ndarray, gamma: np.ndarray, bias: str = "float"):
    """``DQ(x), DQ(W)[, bias] -> Conv -> BatchNormalization``; the bias is a float initializer,
    ``DQ(int32)`` on the grid ``x_scale * w_scale`` as export writes it, or absent."""
    c = q_weight.shape[0]
    bias_nodes, conv_inputs = [], ["xd", "wd", "b"]
    if bias == "int32":
        bias_nodes = [helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], axis=0)]
    elif bias == "none":
        conv_inputs = ["xd", "wd"]
    nodes = [*_act_q("x", "xd"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0), *bias_nodes,
             helper.make_node("Conv", conv_inputs, ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-5)]
    inits = {**ACT, "wq": q_weight, "ws": np.full(c, 0.01, np.float32), "wz": np.zeros(c, np.int8), "gamma": gamma,
             "beta": RNG.standard_normal(c).astype(np.float32), "mean": RNG.standard_normal(c).astype(np.float32),
             "var": RNG.uniform(0.5, 2, c).astype(np.float32)}
    if bias == "float":
        inits["b"] = RNG.standard_normal(c).astype(np.float32)
    elif bias == "int32":
        inits.update(bq=RNG.integers(-3000, 3000, c).astype(np.int32), bs=np.full(c, 0.05 * 0.01, np.float32),
                     bz=np.zeros(c, np.int32))
    return _model(nodes, inits, [1, 3, 5, 5], [1, c, 5, 5])


@pytest.mark.parametrize("bias", ["float", "int32", "none"])
def test_batchnorm_folds_into_the_weight_scale(bias):
    q = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    before, after = _processed(_conv_bn(q, np.array([1.5, -0.7, 0.3, -2.0], np.float32), bias))
    assert "BatchNormalization" not in _ops(after)
    # k * b + shift is on no integer grid: the folded bias is float (ORT rounds it when it fuses).
    assert [t.name for t in after.graph.initializer if t.data_type == TensorProto.INT32] == []
    x = RNG.standard_normal((1, 3, 5, 5)).astype(np.float32)
    want = _run(before, x)
    np.testing.assert_allclose(_run(after, x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_batchnorm_that_cannot_fold_is_kept_and_reported(caplog):
    q = RNG.integers(-127, 128, (2, 3, 3, 3)).astype(np.int8)
    q[1, 0, 0, 0] = -128  # negating this channel (negative gamma) would overflow int8
    with caplog.at_level(logging.WARNING):
        _, after = _processed(_conv_bn(q, np.array([1.0, -1.0], np.float32)))
    assert "BatchNormalization" in _ops(after) and "not folded" in caplog.text
