"""QuantSpec: validation, the integer grid table, parameter layout, presets, (de)serialisation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lowbit.numerics import (
    INT4_WEIGHT,
    INT4_WEIGHT_G128,
    INT8_ACTIVATION,
    INT8_WEIGHT,
    INT8_WEIGHT_PER_TENSOR,
    PRESETS,
    SUPPORTED_BITS,
    UINT4_WEIGHT_G128,
    UINT8_ACTIVATION,
    QuantSpec,
    get_spec,
)
from lowbit.numerics import spec as spec_module

# -- validation -----------------------------------------------------------------------

# (kwargs, a fragment the message must contain so the user knows what to change)
INVALID = [
    pytest.param({"bits": 1}, "bits must be one of", id="bits-1"),
    pytest.param({"bits": 9}, "bits must be one of", id="bits-9"),
    pytest.param({"bits": 32}, "bits must be one of", id="bits-32"),
    pytest.param({"bits": 0}, "bits must be one of", id="bits-0"),
    pytest.param({"bits": True}, "bits must be one of", id="bits-bool"),
    pytest.param({"bits": 8.0}, "bits must be one of", id="bits-float"),
    pytest.param({"bits": "8"}, "bits must be one of", id="bits-str"),
    pytest.param({"granularity": "row"}, "granularity must be one of", id="granularity-unknown"),
    pytest.param({"signed": False, "symmetric": True}, "symmetric=False", id="symmetric-unsigned"),
    pytest.param(
        {"signed": False, "symmetric": False, "narrow_range": True}, "signed=True", id="narrow-unsigned"
    ),
    pytest.param({"axis": 0}, "per-tensor quantization takes no axis", id="axis-with-tensor"),
    pytest.param({"group_size": 32}, "per-tensor quantization takes no axis", id="group_size-with-tensor"),
    pytest.param({"granularity": "channel"}, "needs an integer axis", id="channel-without-axis"),
    pytest.param({"granularity": "channel", "axis": True}, "needs an integer axis", id="channel-bool-axis"),
    pytest.param({"granularity": "channel", "axis": 1.0}, "needs an integer axis", id="channel-float-axis"),
    pytest.param(
        {"granularity": "group", "group_size": 32}, "needs an integer axis", id="group-without-axis"
    ),
    pytest.param({"granularity": "group", "axis": 1}, "positive integer group_size", id="group-without-size"),
    pytest.param(
        {"granularity": "group", "axis": 1, "group_size": 0}, "positive integer group_size", id="group-size-0"
    ),
    pytest.param(
        {"granularity": "group", "axis": 1, "group_size": -4},
        "positive integer group_size",
        id="group-size-neg",
    ),
    pytest.param(
        {"granularity": "group", "axis": 1, "group_size": True},
        "positive integer group_size",
        id="group-size-bool",
    ),
    pytest.param(
        {"granularity": "group", "axis": 1, "group_size": 2.0},
        "positive integer group_size",
        id="group-size-float",
    ),
    pytest.param(
        {"granularity": "channel", "axis": 0, "group_size": 32},
        "only for granularity='group'",
        id="channel-with-group_size",
    ),
]


@pytest.mark.parametrize("kwargs, fragment", INVALID)
def test_invalid_spec_raises_with_helpful_message(kwargs, fragment):
    with pytest.raises(ValueError, match="QuantSpec") as info:
        QuantSpec(**kwargs)
    assert fragment in str(info.value)


def test_replace_revalidates():
    with pytest.raises(ValueError, match="symmetric"):
        INT8_ACTIVATION.replace(signed=False)
    assert INT8_ACTIVATION.replace(bits=4) == QuantSpec(bits=4)


def test_spec_is_frozen_and_keyword_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        INT8_ACTIVATION.bits = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        QuantSpec(8)  # type: ignore[misc]


# -- the integer grid ---------------------------------------------------------------------


def _grid_cases():
    for bits in SUPPORTED_BITS:
        width = 4 if bits == 4 else (8 if bits <= 8 else 16)
        half = 2 ** (bits - 1)
        yield bits, True, False, -half, half - 1, f"INT{width}"
        yield bits, True, True, -half + 1, half - 1, f"INT{width}"
        yield bits, False, False, 0, 2**bits - 1, f"UINT{width}"


@pytest.mark.parametrize("bits, signed, narrow, qmin, qmax, onnx_type", list(_grid_cases()))
def test_grid_table(bits, signed, narrow, qmin, qmax, onnx_type):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=signed, narrow_range=narrow)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    assert spec.onnx_type == onnx_type
    expected_storage = {
        (True, False): torch.int8,
        (False, False): torch.uint8,
        (True, True): torch.int16,
        (False, True): torch.uint16,
    }[(signed, bits > 8)]
    assert spec.storage_dtype == expected_storage
    # The container holds every code of the grid.
    info = torch.iinfo(spec.storage_dtype)
    assert info.min <= qmin and qmax <= info.max


def test_grid_spot_values():
    assert (QuantSpec(bits=8).qmin, QuantSpec(bits=8).qmax) == (-128, 127)
    assert (INT8_WEIGHT.qmin, INT8_WEIGHT.qmax) == (-127, 127)
    assert (UINT8_ACTIVATION.qmin, UINT8_ACTIVATION.qmax) == (0, 255)
    assert (INT4_WEIGHT_G128.qmin, INT4_WEIGHT_G128.qmax) == (-8, 7)
    assert (UINT4_WEIGHT_G128.qmin, UINT4_WEIGHT_G128.qmax) == (0, 15)
    assert (QuantSpec(bits=2).qmin, QuantSpec(bits=2).qmax) == (-2, 1)
    assert (QuantSpec(bits=16).qmin, QuantSpec(bits=16).qmax) == (-32768, 32767)


# -- parameter layout -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, shape, expected",
    [
        (QuantSpec(), (3, 4, 5), ()),
        (QuantSpec(granularity="channel", axis=0), (3, 4, 5), (3,)),
        (QuantSpec(granularity="channel", axis=1), (3, 4, 5), (4,)),
        (QuantSpec(granularity="channel", axis=-1), (3, 4, 5), (5,)),
        (QuantSpec(granularity="group", axis=1, group_size=2), (3, 4, 5), (3, 2, 5)),
        (QuantSpec(granularity="group", axis=0, group_size=3), (3, 4, 5), (1, 4, 5)),
        (QuantSpec(granularity="group", axis=-1, group_size=5), (3, 4, 5), (3, 4, 1)),
        (QuantSpec(granularity="group", axis=1, group_size=1), (6, 4), (6, 4)),
        (INT4_WEIGHT_G128, (64, 512), (64, 4)),
    ],
)
def test_param_shape(spec, shape, expected):
    assert spec.param_shape(shape) == expected
    assert spec.param_shape(torch.Size(shape)) == expected


@pytest.mark.parametrize("axis", [3, -4, 10])
def test_axis_out_of_range_names_tensor_and_valid_range(axis):
    spec = QuantSpec(granularity="channel", axis=axis)
    with pytest.raises(ValueError, match=r"conv1\.weight: axis .* out of range .*rank 3") as info:
        spec.param_shape((2, 3, 4), name="conv1.weight")
    assert "-3..2" in str(info.value)


@pytest.mark.parametrize(
    "shape, group_size, expected",
    [
        ((16, 300), 128, (16, 3)),  # 128 + 128 + 44: the last group is shorter (ONNX: ceil(D / B))
        ((16, 576), 128, (16, 5)),  # SmolLM2's hidden size
        ((16, 576), 32, (16, 18)),  # divides: as before
        ((16, 40), 128, (16, 1)),  # wider than the dimension: one short group
        ((16, 1), 7, (16, 1)),
        ((16, 0), 4, (16, 0)),  # no elements, no groups
    ],
)
def test_group_size_need_not_divide_dimension(shape, group_size, expected):
    spec = QuantSpec(granularity="group", axis=1, group_size=group_size)
    assert spec.param_shape(shape, name="fc.weight") == expected
    assert spec.param_shape(shape) == (*shape[:1], math.ceil(shape[1] / group_size))


def test_resolved_axis():
    assert QuantSpec(granularity="channel", axis=-1).resolved_axis(4) == 3
    assert QuantSpec(granularity="channel", axis=2).resolved_axis(4) == 2
    with pytest.raises(ValueError, match="per-tensor spec has no axis"):
        QuantSpec().resolved_axis(2)


@pytest.mark.parametrize(
    "spec, text",
    [
        (INT8_WEIGHT, "int8 sym narrow per-channel(axis=0)"),
        (UINT8_ACTIVATION, "uint8 affine per-tensor"),
        (UINT4_WEIGHT_G128, "uint4 affine group(axis=1, size=128)"),
    ],
)
def test_describe(spec, text):
    assert spec.describe() == text


# -- presets ------------------------------------------------------------------------------


def test_presets_registry_lists_every_named_constant():
    constants = {
        name: value
        for name, value in vars(spec_module).items()
        if name.isupper() and isinstance(value, QuantSpec)
    }
    assert set(constants.values()) == set(PRESETS.values())
    assert len(PRESETS) == len(constants)
    assert PRESETS["int8-weight"] is INT8_WEIGHT
    assert PRESETS["int8-weight-per-tensor"] is INT8_WEIGHT_PER_TENSOR
    assert PRESETS["int8-activation"] is INT8_ACTIVATION
    assert PRESETS["uint8-activation"] is UINT8_ACTIVATION
    assert PRESETS["int4-weight"] is INT4_WEIGHT
    assert PRESETS["int4-weight-g128"] is INT4_WEIGHT_G128
    assert PRESETS["uint4-weight-g128"] is UINT4_WEIGHT_G128


def test_presets_are_immutable():
    with pytest.raises(TypeError):
        PRESETS["mine"] = QuantSpec()  # type: ignore[index]


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_is_valid_and_resolvable(name):
    spec = PRESETS[name]
    assert QuantSpec(**spec.to_dict()) == spec  # passes validation again
    assert get_spec(name) is spec
    assert get_spec(spec) is spec


@pytest.mark.parametrize("bad", ["int3-weight", "", None, 8, ["int8-weight"]])
def test_get_spec_rejects_unknown_and_lists_presets(bad):
    with pytest.raises(ValueError, match="unknown quantization spec") as info:
        get_spec(bad)
    for name in PRESETS:
        assert name in str(info.value)


# -- (de)serialisation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    list(PRESETS.values())
    + [QuantSpec(bits=b, signed=s, symmetric=s) for b in SUPPORTED_BITS for s in (True, False)],
    ids=str,
)
def test_dict_round_trip(spec):
    data = spec.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(QuantSpec)}
    assert QuantSpec.from_dict(data) == spec


def test_from_dict_rejects_unknown_fields():
    data = INT8_WEIGHT.to_dict() | {"round_mode": "floor", "version": 2}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['round_mode', 'version'\]"):
        QuantSpec.from_dict(data)


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantSpec.from_dict({"bits": 12})


def test_from_dict_fills_defaults():
    assert QuantSpec.from_dict({"bits": 4}) == QuantSpec(bits=4)
