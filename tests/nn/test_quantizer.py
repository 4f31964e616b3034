"""Quantizer: its four modes, freezing, and saving / loading its (data-shaped) state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import TensorQuant
from lowbit.nn.quantizer import Quantizer
from lowbit.nn.swap import swap_modules
from lowbit.numerics import (
    INT8_ACTIVATION,
    INT8_WEIGHT,
    UINT8_ACTIVATION,
    compute_qparams,
    fake_quantize,
    tensor_minmax,
)
from lowbit.ptq import iter_quantizers, quantize


def _x(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _calibrated(spec, *batches, name="t", observer="minmax"):
    q = Quantizer(spec, observer=observer, name=name)
    q.mode = "calibrating"
    for b in batches:
        q(b)
    q.freeze()
    return q


# -- modes ------------------------------------------------------------------------------
def test_new_quantizer_is_static_and_unfrozen():
    q = Quantizer(UINT8_ACTIVATION, name="fc.input")
    assert q.mode == "static" and not q.is_frozen
    assert q.scale.numel() == 0 and q.zero_point.numel() == 0


def test_calibrating_passes_input_through_and_feeds_observer():
    q = Quantizer(UINT8_ACTIVATION, name="fc.input")
    q.mode = "calibrating"
    x1, x2 = _x(4, 8, seed=1), _x(4, 8, seed=2, scale=10.0)
    for x in (x1, x2):
        before = x.clone()
        y = q(x)
        assert torch.equal(y, before)  # bit for bit the float input
        assert torch.equal(x, before)  # and the input itself is not modified
    assert int(q.observer.num_batches) == 2
    lo, hi = q.observer.compute_range()
    assert lo.item() == min(x1.min(), x2.min()).item()
    assert hi.item() == max(x1.max(), x2.max()).item()
    assert not q.is_frozen  # calibration alone does not install a scale


def test_freeze_installs_the_observers_qparams():
    batches = [_x(4, 8, seed=s) for s in range(3)]
    q = Quantizer(UINT8_ACTIVATION, name="fc.input")
    q.mode = "calibrating"
    for b in batches:
        q(b)
    expected_scale, expected_zp = q.observer.qparams()
    q.freeze()
    assert q.mode == "static" and q.is_frozen
    assert torch.equal(q.scale, expected_scale)
    assert torch.equal(q.zero_point, expected_zp)
    assert q.scale.dtype == torch.float32 and q.zero_point.dtype == torch.int32
    # And they are min-max qparams of everything seen.
    allx = torch.cat(batches)
    s, z = compute_qparams(allx.min(), allx.max(), UINT8_ACTIVATION)
    assert torch.equal(q.scale, s) and torch.equal(q.zero_point, z)


@pytest.mark.parametrize(
    "spec, shape",
    [(UINT8_ACTIVATION, (4, 8)), (INT8_ACTIVATION, (2, 3, 5)), (INT8_WEIGHT, (6, 4))],
    ids=["uint8-tensor", "int8-tensor", "int8-channel"],
)
def test_static_mode_equals_fake_quantize_bit_for_bit(spec, shape):
    calib = _x(*shape, seed=0, scale=1.0)
    q = _calibrated(spec, calib)
    # Wider data than calibration, so saturation is exercised too.
    x = _x(*shape, seed=5, scale=4.0)
    assert x.abs().max() > calib.abs().max()
    y = q(x)
    assert torch.equal(y, fake_quantize(x, q.scale, q.zero_point, spec))
    assert not torch.equal(y, x)  # it did quantize


def test_static_mode_uses_installed_qparams_not_the_observer():
    q = _calibrated(UINT8_ACTIVATION, _x(4, 8))
    s, z = torch.tensor(0.05), torch.tensor(10, dtype=torch.int32)
    q.set_qparams(s, z)
    x = _x(4, 8, seed=3)
    assert torch.equal(q(x), fake_quantize(x, s, z, UINT8_ACTIVATION))
    # set_qparams keeps its own copy.
    s.mul_(2)
    assert q.scale.item() == pytest.approx(0.05)


def test_dynamic_mode_recomputes_qparams_from_each_input():
    q = Quantizer(UINT8_ACTIVATION, dynamic=True, name="fc.input")
    assert q.mode == "dynamic" and q.observer is None
    small, big = _x(4, 8, seed=1, scale=0.5), _x(4, 8, seed=2, scale=20.0)
    for x in (small, big):
        s, z = compute_qparams(*tensor_minmax(x, UINT8_ACTIVATION), UINT8_ACTIVATION)
        assert torch.equal(q(x), fake_quantize(x, s, z, UINT8_ACTIVATION))
        qs, qz = q.qparams_for(x)
        assert torch.equal(qs, s) and torch.equal(qz, z)
    assert q.qparams_for(small)[0] < q.qparams_for(big)[0]
    assert not q.is_frozen  # nothing is stored between calls


def test_disabled_is_identity():
    q = _calibrated(UINT8_ACTIVATION, _x(4, 8))
    q.mode = "disabled"
    x = _x(4, 8, seed=9, scale=100.0)
    assert q(x) is x


def test_unfrozen_static_quantizer_raises_naming_the_tensor():
    q = Quantizer(UINT8_ACTIVATION, name="encoder.layer.0.fc.input")
    with pytest.raises(RuntimeError, match=r"encoder\.layer\.0\.fc\.input.*calibrate"):
        q(_x(2, 3))


def test_invalid_mode_raises():
    q = Quantizer(UINT8_ACTIVATION, name="fc.input")
    with pytest.raises(ValueError, match=r"fc\.input.*mode must be one of"):
        q.mode = "training"
    assert q.mode == "static"


def test_dynamic_quantizer_cannot_calibrate_or_freeze():
    q = Quantizer(UINT8_ACTIVATION, dynamic=True, name="fc.input")
    with pytest.raises(ValueError, match=r"fc\.input.*dynamic"):
        q.mode = "calibrating"
    with pytest.raises(ValueError, match=r"fc\.input.*dynamic"):
        q.freeze()
    assert q.mode == "dynamic"


def test_freeze_without_data_raises():
    q = Quantizer(UINT8_ACTIVATION, name="fc.input")
    q.mode = "calibrating"
    with pytest.raises(RuntimeError, match=r"fc\.input.*no data"):
        q.freeze()


def test_nan_input_while_calibrating_names_the_tensor():
    q = Quantizer(UINT8_ACTIVATION, name="fc1.input")
    q.mode = "calibrating"
    x = _x(2, 3)
    x[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"fc1\.input.*NaN"):
        q(x)


# -- state --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, shape, param_shape",
    [(UINT8_ACTIVATION, (4, 8), ()), (INT8_WEIGHT, (6, 4), (6,))],
    ids=["per-tensor", "per-channel"],
)
def test_state_dict_round_trip_into_fresh_quantizer(spec, shape, param_shape):
    q = _calibrated(spec, _x(*shape), name="fc.weight")
    fresh = Quantizer(spec, name="fc.weight")
    assert not fresh.is_frozen
    fresh.load_state_dict(q.state_dict())
    assert fresh.mode == "static" and fresh.is_frozen
    assert tuple(fresh.scale.shape) == param_shape == tuple(q.scale.shape)
    assert torch.equal(fresh.scale, q.scale) and torch.equal(fresh.zero_point, q.zero_point)
    assert fresh.zero_point.dtype == torch.int32
    x = _x(*shape, seed=7)
    assert torch.equal(fresh(x), q(x))
    # The observer state travels too: freezing again gives the same qparams.
    fresh.freeze()
    assert torch.equal(fresh.scale, q.scale)


@pytest.mark.parametrize("mode", ["disabled", "calibrating", "static"])
def test_state_dict_restores_mode(mode):
    q = _calibrated(UINT8_ACTIVATION, _x(4, 8))
    q.mode = mode
    fresh = Quantizer(UINT8_ACTIVATION)
    fresh.load_state_dict(q.state_dict())
    assert fresh.mode == mode


def test_state_dict_of_dynamic_quantizer_round_trips():
    q = Quantizer(UINT8_ACTIVATION, dynamic=True)
    fresh = Quantizer(UINT8_ACTIVATION, dynamic=True)
    fresh.load_state_dict(q.state_dict())
    assert fresh.mode == "dynamic" and not fresh.is_frozen


def test_loading_an_unfrozen_state_unfreezes():
    frozen = _calibrated(UINT8_ACTIVATION, _x(4, 8))
    frozen.load_state_dict(Quantizer(UINT8_ACTIVATION).state_dict())
    assert not frozen.is_frozen and frozen.mode == "static"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_whole_quantized_model_saves_and_loads_with_weights_only():
    model = _mlp()
    config = QuantConfig(
        default=LayerQuant(
            weight=TensorQuant(spec=INT8_WEIGHT),
            input=TensorQuant(
                spec=UINT8_ACTIVATION, observer="percentile", observer_options=(("percentile", 99.0),)
            ),
        )
    )
    calib = [_x(4, 8, seed=s) for s in range(3)]
    qmodel = quantize(model, calib, config, progress=False)
    buffer = io.BytesIO()
    torch.save(qmodel.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = copy.deepcopy(model)
    swap_modules(fresh, config.resolve)
    assert not any(q.is_frozen for _, q in iter_quantizers(fresh))
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, q), (_, ref) in zip(iter_quantizers(fresh), iter_quantizers(qmodel), strict=True):
        assert q.mode == ref.mode, name
        assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero_point, ref.zero_point), name
    x = _x(5, 8, seed=11)
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))
