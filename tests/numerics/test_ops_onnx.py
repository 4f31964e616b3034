"""quantize / dequantize agree with ONNX QuantizeLinear / DequantizeLinear.

Each case builds a tiny model (opset 21: per-tensor, per-axis and blocked layouts)::

    q    = QuantizeLinear(x, s, z)        # graph output, in the ONNX integer type
    q32  = Cast(q, to=INT32)              # the same codes in a type every runtime returns
    d    = DequantizeLinear(q, s, z)
    dq   = DequantizeLinear(Cast(codes, to=qtype), s, z)   # dequantize of arbitrary codes

and runs it with onnx's reference evaluator and with ONNX Runtime (CPU).  Scale and
zero-point are initializers so that 4-bit types never cross the Python boundary as
inputs (onnxruntime's Python binding cannot take ml_dtypes int4 arrays).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from lowbit.numerics import QuantSpec, dequantize, fake_quantize, quantize

OPSET = 21
ORT_NOT_IMPLEMENTED = ort.capi.onnxruntime_pybind11_state.NotImplemented

# (bits, signed) -> ONNX element type; narrow grids and 2/3/5/6/7 bits have no ONNX type of their own.
QTYPES = {
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
    (16, True): TensorProto.INT16,
    (16, False): TensorProto.UINT16,
}
# (bits, signed, affine): symmetric (zero point 0) and affine grids for every ONNX integer type.
GRIDS = [
    pytest.param(
        bits, signed, affine, id=f"{TensorProto.DataType.Name(qtype).lower()}-{'zp' if affine else 'sym'}"
    )
    for (bits, signed), qtype in QTYPES.items()
    for affine in ([False, True] if signed else [True])
]

# (shape, granularity, axis, group_size)
LAYOUTS = [
    pytest.param((5, 7), "tensor", None, None, id="tensor-2d"),
    pytest.param((2, 3, 4), "tensor", None, None, id="tensor-3d"),
    pytest.param((6, 5), "channel", 0, None, id="axis0"),
    pytest.param((6, 5), "channel", 1, None, id="axis1"),
    pytest.param((2, 3, 4), "channel", -1, None, id="axis-1"),
    pytest.param((2, 3, 4), "channel", 1, None, id="axis1-3d"),
    pytest.param((4, 8), "group", 1, 4, id="block-axis1"),
    pytest.param((8, 6), "group", 0, 2, id="block-axis0"),
    pytest.param((2, 6, 4), "group", 1, 3, id="block-3d"),
    pytest.param((2, 3, 8), "group", -1, 8, id="block-one-per-row"),
    # Ragged: the block size does not divide the axis, so the last block is shorter (ceil(D / B) scales).
    pytest.param((4, 10), "group", 1, 4, id="ragged-axis1"),
    pytest.param((7, 3), "group", 0, 3, id="ragged-axis0"),
    pytest.param((2, 7, 3), "group", 1, 5, id="ragged-3d"),
    pytest.param((3, 5), "group", -1, 8, id="ragged-one-short-block"),
]


def spec_for(bits: int, signed: bool, affine: bool, granularity: str, axis, group_size) -> QuantSpec:
    return QuantSpec(
        bits=bits,
        signed=signed,
        symmetric=signed and not affine,
        granularity=granularity,
        axis=axis,
        group_size=group_size,
    )


def build_model(spec: QuantSpec, shape, scale: np.ndarray, zp: np.ndarray) -> onnx.ModelProto:
    qtype = QTYPES[(spec.bits, spec.signed)]
    attrs = {}
    if spec.granularity != "tensor":
        attrs["axis"] = spec.axis
    if spec.granularity == "group":
        attrs["block_size"] = spec.group_size
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, scale.shape, scale.flatten().tolist()),
        helper.make_tensor("z", qtype, zp.shape, zp.flatten().astype(np.int64).tolist()),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.INT32),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], **attrs),
        helper.make_node("Cast", ["codes"], ["codes_q"], to=qtype),
        helper.make_node("DequantizeLinear", ["codes_q", "s", "z"], ["dq"], **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "quant",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("codes", TensorProto.INT32, shape),
        ],
        [
            helper.make_tensor_value_info("q", qtype, shape),
            helper.make_tensor_value_info("q32", TensorProto.INT32, shape),
            helper.make_tensor_value_info("d", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("dq", TensorProto.FLOAT, shape),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def make_case(spec: QuantSpec, shape, seed: int):
    """Random scale / zero-point in spec layout; x over the grid, beyond it, and near .5 ties."""
    gen = torch.Generator().manual_seed(seed)
    pshape = spec.param_shape(shape)
    scale = torch.exp(torch.empty(pshape).uniform_(-6.0, 1.0, generator=gen)).float()
    if spec.symmetric:
        zp = torch.zeros(pshape, dtype=torch.int32)
    else:
        zp = torch.randint(spec.qmin, spec.qmax + 1, pshape, generator=gen, dtype=torch.int32)
    s_el, z_el = _per_element(scale, spec, shape), _per_element(zp, spec, shape)
    span = spec.qmax - spec.qmin
    codes = torch.empty(shape).uniform_(spec.qmin - 0.2 * span, spec.qmax + 0.2 * span, generator=gen)
    # Half of the elements sit exactly on or one float32 ulp beside a .5 tie.
    tie = torch.round(codes) + 0.5
    nudge = torch.randint(-1, 2, shape, generator=gen).float()
    at_tie = ((tie - z_el) * s_el.double()).float()
    at_tie = torch.where(
        nudge > 0, torch.nextafter(at_tie, torch.tensor(np.inf, dtype=torch.float32)), at_tie
    )
    at_tie = torch.where(
        nudge < 0, torch.nextafter(at_tie, torch.tensor(-np.inf, dtype=torch.float32)), at_tie
    )
    x = torch.where(torch.rand(shape, generator=gen) < 0.5, ((codes - z_el) * s_el).float(), at_tie)
    # Make sure both ends saturate: the first element far below the grid, the last far above.
    s_flat, z_flat = s_el.expand(shape).reshape(-1), z_el.expand(shape).reshape(-1)
    x = x.reshape(-1)
    x[0] = (spec.qmin - 3 - z_flat[0]) * s_flat[0]
    x[-1] = (spec.qmax + 3 - z_flat[-1]) * s_flat[-1]
    x = x.reshape(shape)
    q_codes = torch.randint(spec.qmin, spec.qmax + 1, shape, generator=gen, dtype=torch.int32)
    return x, scale, zp, q_codes


def _per_element(p: torch.Tensor, spec: QuantSpec, shape) -> torch.Tensor:
    if spec.granularity == "tensor":
        return p
    axis = spec.axis % len(shape)
    if spec.granularity == "channel":
        view = [1] * len(shape)
        view[axis] = -1
        return p.reshape(view)
    return p.repeat_interleave(spec.group_size, dim=axis).narrow(axis, 0, shape[axis])


def lowbit_outputs(spec, x, scale, zp, codes):
    q = quantize(x, scale, zp, spec)
    assert q.dtype == spec.storage_dtype
    return {
        "q": q.to(torch.int64).numpy(),
        "d": dequantize(q, scale, zp, spec).numpy(),
        "fq": fake_quantize(x, scale, zp, spec).numpy(),
        "dq": dequantize(codes.to(spec.storage_dtype), scale, zp, spec).numpy(),
    }


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())  # stable across runs, unlike hash() of strings


def feeds(x, codes):
    return {"x": x.numpy(), "codes": codes.numpy()}


# -- reference evaluator ------------------------------------------------------------------


@pytest.mark.parametrize("shape, granularity, axis, group_size", LAYOUTS)
@pytest.mark.parametrize("bits, signed, affine", GRIDS)
def test_matches_onnx_reference(shape, granularity, axis, group_size, bits, signed, affine):
    spec = spec_for(bits, signed, affine, granularity, axis, group_size)
    x, scale, zp, codes = make_case(spec, shape, seed_of(shape, granularity, axis, bits, signed, affine))
    model = build_model(spec, shape, scale.numpy(), zp.numpy())
    q, q32, d, dq = ReferenceEvaluator(model).run(None, feeds(x, codes))

    # The reference returns the ONNX type itself (ml_dtypes int4 / uint4 for 4-bit).
    assert q.dtype == helper.tensor_dtype_to_np_dtype(QTYPES[(bits, signed)])
    q = q.astype(np.int64)
    assert np.array_equal(q, q32.astype(np.int64))

    ours = lowbit_outputs(spec, x, scale, zp, codes)
    assert np.array_equal(ours["q"], q)
    # Dequantize is (float(q) - float(z)) * s in float32 on both sides: bit for bit.
    assert d.dtype == dq.dtype == np.float32
    assert np.array_equal(ours["d"], d)
    assert np.array_equal(ours["fq"], d)
    assert np.array_equal(ours["dq"], dq)
    # The data really covers both saturation ends and the interior.
    assert (q == spec.qmin).any() and (q == spec.qmax).any()


def test_reference_without_zero_point_uses_output_dtype():
    # Symmetric int8 export may omit the zero point and set output_dtype instead.
    spec = QuantSpec(bits=8)
    x, scale, _, _ = make_case(spec, (4, 6), seed=11)
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=TensorProto.INT8)
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [4, 6])],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [scale.item()])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    (q,) = ReferenceEvaluator(model).run(None, {"x": x.numpy()})
    assert q.dtype == np.int8
    assert np.array_equal(quantize(x, scale, None, spec).numpy(), q)


# -- ONNX Runtime ----------------------------------------------------------------------


def run_ort(model, x, codes):
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(["q32", "d", "dq"], feeds(x, codes))
    except ORT_NOT_IMPLEMENTED as err:  # only "this runtime lacks the kernel" is a skip
        pytest.skip(f"onnxruntime {ort.__version__} CPU does not implement this case: {err}")


@pytest.mark.parametrize("shape, granularity, axis, group_size", LAYOUTS)
@pytest.mark.parametrize("bits, signed, affine", GRIDS)
def test_matches_onnxruntime(shape, granularity, axis, group_size, bits, signed, affine):
    spec = spec_for(bits, signed, affine, granularity, axis, group_size)
    x, scale, zp, codes = make_case(
        spec, shape, seed_of(shape, granularity, axis, bits, signed, affine, "ort")
    )
    q32, d, dq = run_ort(build_model(spec, shape, scale.numpy(), zp.numpy()), x, codes)
    ours = lowbit_outputs(spec, x, scale, zp, codes)
    assert np.array_equal(ours["q"], q32.astype(np.int64))
    assert np.array_equal(ours["d"], d)
    assert np.array_equal(ours["fq"], d)
    assert np.array_equal(ours["dq"], dq)


def test_cases_exercise_division_not_reciprocal():
    # The cases above pin down "divide by the scale": a fair share of their elements round
    # differently under x * (1 / s), the formula torch's own fake-quant kernels use.
    ambiguous = total = 0
    for layout in LAYOUTS:
        shape, granularity, axis, group_size = layout.values
        for grid in GRIDS:
            bits, signed, affine = grid.values
            spec = spec_for(bits, signed, affine, granularity, axis, group_size)
            x, scale, _, _ = make_case(spec, shape, seed_of(shape, granularity, axis, bits, signed, affine))
            s_el = _per_element(scale, spec, shape)
            ambiguous += int((torch.round(x / s_el) != torch.round(x * torch.reciprocal(s_el))).sum())
            total += x.numel()
    assert ambiguous >= 0.01 * total
