"""lowbit.quantize (PTQ): inputs it accepts, errors it gives, and what it produces."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lowbit
from lowbit.config import W8, W8A8, W8A8_DYNAMIC, LayerQuant, QuantConfig, Rule
from lowbit.nn.modules import QuantAdd, QuantConv2d, QuantLinear, QuantStub, TensorQuant, has_quantizers
from lowbit.nn.swap import SwapReport
from lowbit.numerics import INT8_WEIGHT, UINT8_ACTIVATION
from lowbit.observers import OBSERVERS
from lowbit.ptq import QuantSummary, iter_quantizers, quantize


def _batches(n, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)
        self.unused = nn.Linear(4, 4)  # registered but never called

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.conv2(F.relu(self.conv1(h))) + h)
        return self.head(h.mean((2, 3)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Linear(8, 6)
        self.right = nn.Linear(4, 6)

    def forward(self, x, y):
        return torch.cat([self.left(x), self.right(y)], dim=1)


def _seeded(cls):
    torch.manual_seed(0)
    model = cls()
    if cls is ConvBN:  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _min_cosine(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).min().item()


def _activation_quantizers(qmodel):
    return [(n, q) for n, q in iter_quantizers(qmodel) if not n.endswith(".weight")]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        n: type(m) for n, m in model.named_modules()
    }


def _assert_unchanged(model, snapshot):
    state, types = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(has_quantizers(m) for m in model.modules())
    assert not hasattr(model, "lowbit_summary")


# -- the original model ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ConvBN, Residual])
def test_original_model_is_untouched(cls):
    model = _seeded(cls).train()  # also its training flag
    snapshot = _snapshot(model)
    qmodel = quantize(model, _batches(2, 2, 3, 8, 8), equalize=True, progress=False)
    assert qmodel is not model
    _assert_unchanged(model, snapshot)
    assert model.training
    assert any(isinstance(m, QuantConv2d) for m in qmodel.modules())


def test_inplace_quantizes_the_model_itself():
    model = _seeded(MLP)
    fc1_weight = model.fc1.weight
    qmodel = quantize(model, _batches(2, 4, 16), inplace=True, progress=False)
    assert qmodel is model
    assert type(model.fc1) is QuantLinear and model.fc1.weight is fc1_weight
    assert isinstance(model.lowbit_summary, QuantSummary)


def test_inplace_refuses_to_rewrite_residual_adds_and_quantizes_without_them():
    model = _seeded(Residual)
    with pytest.raises(ValueError, match="inplace=True cannot quantize the residual adds"):
        quantize(model, _batches(2, 2, 3, 8, 8), inplace=True, progress=False)
    qmodel = quantize(model, _batches(2, 2, 3, 8, 8), inplace=True, quantize_adds=False, progress=False)
    assert type(model.conv1) is QuantConv2d
    assert qmodel is model


# -- calibration data -------------------------------------------------------------------------------
class DictData(Dataset):
    def __init__(self, n):
        self.x, self.y = torch.randn(n, 8), torch.randn(n, 4)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _calib(kind):
    """(model, calibration data, number of batches, one batch as positional args) per form of data."""
    g = torch.Generator().manual_seed(3)
    if kind == "tensors":
        data = _batches(3, 8, 16)
        return _seeded(MLP), data, 3, (data[0],)
    if kind == "tuples":
        data = [(torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)) for _ in range(2)]
        return _seeded(TwoInputs), data, 2, data[0]
    if kind == "dicts":  # keyword order differs from the signature: they go by name
        data = [{"y": torch.randn(8, 4, generator=g), "x": torch.randn(8, 8, generator=g)} for _ in range(2)]
        return _seeded(TwoInputs), data, 2, (data[0]["x"], data[0]["y"])
    if kind == "dataloader":
        xs = torch.randn(10, 16, generator=g)
        return _seeded(MLP), DataLoader(TensorDataset(xs), batch_size=4), 3, (xs,)
    if kind == "dataloader-dicts":
        ds = DictData(8)
        return _seeded(TwoInputs), DataLoader(ds, batch_size=4), 2, (ds.x, ds.y)
    if kind == "generator":
        data = _batches(4, 8, 16)
        return _seeded(MLP), (x for x in data), 4, (data[0],)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["tensors", "tuples", "dicts", "dataloader", "dataloader-dicts", "generator"]
)
def test_calibration_data_forms(kind):
    model, data, n, example = _calib(kind)
    qmodel = quantize(model, data, progress=False)
    summary = qmodel.lowbit_summary
    assert summary.calibration_batches == n
    used = [q for name, q in _activation_quantizers(qmodel) if not name.startswith("unused")]
    assert used and all(q.mode == "static" and q.is_frozen for q in used)
    with torch.no_grad():  # calibrated on these very inputs: close to float
        out = qmodel(*example)
        assert not torch.equal(out, model(*example))
        assert _min_cosine(out, model(*example)) > 0.99


def test_progress_bar_is_optional(capsys):
    quantize(_seeded(MLP), _batches(3, 4, 16), progress=False)
    assert capsys.readouterr().err == ""
    quantize(_seeded(MLP), _batches(3, 4, 16), progress=True)
    assert "calibrating" in capsys.readouterr().err


@pytest.mark.parametrize(
    "empty",
    [[], (x for x in []), DataLoader(TensorDataset(torch.randn(0, 16)))],
    ids=["list", "generator", "dataloader"],
)
def test_empty_calibration_data_is_a_clear_error(empty):
    with pytest.raises(ValueError, match="calibration data is empty"):
        quantize(_seeded(MLP), empty, progress=False)


def test_static_config_without_data_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs calibration data.*w8a8-dynamic"):
        quantize(_seeded(MLP), None, "w8a8", progress=False)


def test_nan_in_calibration_data_names_the_tensor():
    data = _batches(3, 4, 16)
    data[1][2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"fc1\.input: contains 1 NaN"):
        quantize(_seeded(MLP), data, progress=False)


def test_nan_made_inside_the_model_names_the_tensor():
    class Sqrt(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.sqrt(self.fc1(x)))  # NaN where fc1's output is negative

    with pytest.raises(ValueError, match=r"fc2\.input: contains \d+ NaN"):
        quantize(_seeded(Sqrt), _batches(2, 8, 4), progress=False)


def test_model_error_during_calibration_names_the_batch_and_keeps_the_model():
    model = _seeded(MLP)
    snapshot = _snapshot(model)
    data = _batches(2, 4, 16) + [torch.randn(4, 15)]  # batch 2 has the wrong width
    with pytest.raises(RuntimeError, match=r"calibration batch 2 failed") as info:
        quantize(model, data, progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error is kept as the cause
    _assert_unchanged(model, snapshot)


def test_value_error_from_the_model_names_the_batch():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[0] != 4:
                raise ValueError("expected a batch of 4")
            return self.fc(x)

    with pytest.raises((ValueError, RuntimeError), match=r"batch 1"):
        quantize(_seeded(Picky), [torch.randn(4, 4), torch.randn(3, 4)], progress=False)


# -- configs without calibration ---------------------------------------------------------------------
@pytest.mark.parametrize("config", ["w8a8-dynamic", "w8"])
def test_configs_without_static_activations_need_no_data(config):
    model = _seeded(MLP)
    qmodel = quantize(model, None, config, progress=False)
    assert qmodel.lowbit_summary.calibration_batches == 0
    for name, q in iter_quantizers(qmodel):
        assert q.mode == ("static" if name.endswith(".weight") else "dynamic"), name
        if name.endswith(".weight"):
            assert q.is_frozen
    x = torch.randn(6, 16)
    out = qmodel(x)
    assert not torch.equal(out, model(x))
    assert _min_cosine(out, model(x)) > 0.99


def test_unused_layer_input_is_disabled_and_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit.ptq"):
        qmodel = quantize(_seeded(MLP), _batches(2, 4, 16), progress=False)
    assert qmodel.unused.input_quantizer.mode == "disabled"
    assert qmodel.lowbit_summary.uncalibrated == ["unused.input"]
    assert qmodel.unused.weight_quantizer.is_frozen  # weights need no data
    assert "unused.input saw no calibration data" in caplog.text
    x = torch.randn(2, 4)
    with torch.no_grad():  # the disabled input is float; the layer still runs
        qmodel.unused(x)


def test_model_without_quantizable_layers_warns_and_still_works(caplog):
    model = nn.Sequential(nn.LayerNorm(6), nn.GELU()).eval()
    with caplog.at_level(logging.WARNING, logger="lowbit.ptq"):
        qmodel = quantize(model, [torch.randn(2, 6)], progress=False)
    assert "no layer was quantized" in caplog.text
    assert qmodel.lowbit_summary.layers.quantized == {}
    assert qmodel.lowbit_summary.layers.unsupported == {"0": "LayerNorm"}
    x = torch.randn(3, 6)
    assert torch.equal(qmodel(x), model(x))


def test_a_bare_layer_is_quantized():
    qmodel = quantize(nn.Linear(8, 4), _batches(2, 4, 8), progress=False)
    assert isinstance(qmodel, QuantLinear)


def test_summary_describes_the_run():
    qmodel = quantize(_seeded(MLP), _batches(3, 4, 16), W8A8.skip("fc2"), progress=False)
    summary = qmodel.lowbit_summary
    assert isinstance(summary, QuantSummary) and isinstance(summary.layers, SwapReport)
    assert summary.config == W8A8.skip("fc2")
    assert set(summary.layers.quantized) == {"fc1", "unused"}
    assert set(summary.layers.skipped) == {"fc2"}
    assert type(qmodel.fc2) is nn.Linear
    assert summary.calibration_batches == 3


def test_quantize_accepts_a_config_object_and_logs_layers(caplog):
    cfg = QuantConfig(
        default=LayerQuant(
            weight=TensorQuant(spec=INT8_WEIGHT),
            input=TensorQuant(spec=UINT8_ACTIVATION, observer="moving_average"),
        )
    )
    with caplog.at_level(logging.INFO, logger="lowbit"):
        qmodel = quantize(_seeded(MLP), _batches(2, 4, 16), cfg, progress=False)
    assert qmodel.fc1.input_quantizer.observer_kind == "moving_average"
    assert "quantized fc1: Linear" in caplog.text


# -- memory and accuracy ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_observer_memory_does_not_grow_with_batches(kind):
    model = _seeded(MLP)
    cfg = W8A8.with_observer(kind)

    def state_numel(n):
        g = torch.Generator().manual_seed(n)
        data = (torch.randn(4, 16, generator=g) * (1 + i % 7) for i in range(n))  # ranges keep changing
        qmodel = quantize(model, data, cfg, progress=False)
        assert qmodel.lowbit_summary.calibration_batches == n
        return sum(b.numel() for b in qmodel.buffers())

    assert state_numel(2) == state_numel(50)


@pytest.mark.parametrize("cls, shape", [(MLP, (16,)), (ConvBN, (3, 12, 12)), (Residual, (3, 12, 12))])
def test_w8a8_outputs_stay_close_to_float(cls, shape):
    model = _seeded(cls)
    calib = _batches(4, 8, *shape, seed=1)
    qmodel = quantize(model, calib, "w8a8", progress=False)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert not torch.equal(ref, out)  # it is quantized
    assert _min_cosine(ref, out) > 0.99


def test_fold_bn_removes_batchnorm_and_keeps_outputs():
    model = _seeded(ConvBN)
    calib = _batches(4, 8, 3, 12, 12, seed=1)
    qmodel = quantize(model, calib, progress=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qmodel.modules())
    assert qmodel.lowbit_summary.layers.unsupported == {}
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert _min_cosine(qmodel(x), model(x)) > 0.99
    unfolded = quantize(model, calib, fold_bn=False, progress=False)
    assert set(unfolded.lowbit_summary.layers.unsupported) == {"features.1", "features.4", "features.7"}


def test_quantize_adds_routes_residual_adds_through_quant_add():
    model = _seeded(Residual)
    calib = _batches(3, 4, 3, 8, 8)
    qmodel = quantize(model, calib, progress=False)
    adds = [m for m in qmodel.modules() if isinstance(m, QuantAdd)]
    assert len(adds) == 1
    for _, q in adds[0].quantizers():
        assert q.mode == "static" and q.is_frozen  # calibrated with the layers
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _min_cosine(qmodel(x), model(x)) > 0.99
    assert not any(
        isinstance(m, QuantAdd) for m in quantize(model, calib, quantize_adds=False, progress=False).modules()
    )
    # Dynamic activations have no calibrated grid for the add: it stays float.
    assert not any(
        isinstance(m, QuantAdd) for m in quantize(model, None, "w8a8-dynamic", progress=False).modules()
    )


def test_public_entry_point_is_ptq_quantize():
    assert lowbit.quantize is quantize


def test_a_model_on_the_meta_device_is_refused_before_any_work():
    with torch.device("meta"):
        model = MLP()
    with pytest.raises(ValueError, match=r"quantize: the model has no data \(fc1.weight is on the meta device.*to_empty"):
        quantize(model, _batches(1, 4, 16), "w8a8", progress=False)


def test_a_single_calibration_tensor_is_one_batch():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(8, 16)
    qmodel = quantize(model, x, "w8a8", progress=False)
    assert qmodel.lowbit_summary.calibration_batches == 1
    same = quantize(model, [x], "w8a8", progress=False)
    assert qmodel.lowbit_summary.options == same.lowbit_summary.options
    with torch.no_grad():
        assert torch.equal(qmodel(x), same(x))


# -- config rules for residual adds and pool inputs ------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + F.relu(self.conv(x))  # its add is named "<block>.add"


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Block(), _Block())
        self.pool = nn.AdaptiveAvgPool2d(1)  # its input stub is named "pool_input"
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.blocks(F.relu(self.stem(x)))
        return self.head(torch.flatten(self.pool(h), 1))


def _graph_quantizers(qmodel) -> dict[str, tuple[str, ...]]:
    """{name of each QuantAdd / QuantStub: the observer kinds of its quantizers}."""
    return {name: tuple(q.observer_kind for _, q in m.quantizers()) for name, m in qmodel.named_modules()
            if isinstance(m, (QuantAdd, QuantStub))}


def test_config_rules_pick_residual_adds_and_pool_inputs_by_name_and_type(tmp_path):
    model, calib = _seeded(TwoBlocks), _batches(2, 4, 3, 8, 8)
    default = quantize(model, calib, progress=False)
    assert _graph_quantizers(default) == {"blocks.0.add": ("mse", "mse"), "blocks.1.add": ("mse", "mse"),
                                          "pool_input": ("mse",)}
    percentile = LayerQuant(input=TensorQuant(spec=UINT8_ACTIVATION, observer="percentile"))
    config = W8A8.with_rules(Rule(pattern="blocks.0.add", layer=None),  # first match wins: this add stays float
                             Rule(pattern="type:QuantAdd", layer=percentile),
                             Rule(pattern="type:QuantStub", layer=LayerQuant(input=TensorQuant(spec=UINT8_ACTIVATION))))
    qmodel = quantize(model, calib, config, progress=False)
    assert _graph_quantizers(qmodel) == {"blocks.1.add": ("percentile", "percentile"), "pool_input": ("minmax",)}
    assert qmodel.get_submodule("blocks.1.conv").input_quantizer.observer_kind == "mse"  # layers keep theirs
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _min_cosine(qmodel(x), model(x)) > 0.99
    loaded = lowbit.load(_seeded(TwoBlocks), lowbit.save(qmodel, tmp_path / "m"))  # the rules replay
    assert _graph_quantizers(loaded) == _graph_quantizers(qmodel)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_rules_keep_pools_float_and_quantize_adds_where_only_a_rule_has_activations():
    model, calib = _seeded(TwoBlocks), _batches(2, 4, 3, 8, 8)
    floats = W8A8.with_rules(Rule(pattern="pool_input", layer=None),
                             Rule(pattern="type:QuantAdd", layer=W8A8_DYNAMIC.default))  # dynamic: no fixed grid
    assert _graph_quantizers(quantize(model, calib, floats, progress=False)) == {}
    # weight-only everywhere but the blocks: their adds are quantized, the pool input is not
    blocks_only = QuantConfig(rules=(Rule(pattern="blocks.*", layer=W8A8.default),), default=W8.default)
    qmodel = quantize(model, calib, blocks_only, progress=False)
    assert _graph_quantizers(qmodel) == {"blocks.0.add": ("mse", "mse"), "blocks.1.add": ("mse", "mse")}
    assert qmodel.head.input_quantizer is None
