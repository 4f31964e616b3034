"""lowbit.ptq.steps: PTQ algorithms as ordered, serialisable steps.

The registry and its JSON / short forms, clear errors for unknown names, fields and impossible
orders, flags that build exactly the same steps (bit-identical models), a user's own step, and
an ordered recipe that goes through JSON and ``lowbit.save`` / ``load`` to the same ONNX bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from tests.persist.test_persist import net
from torch import nn

import lowbit
from lowbit.ptq import (
    AWQ,
    CLE,
    GPTQ,
    RTN,
    AdaRound,
    BiasCorrection,
    FoldBatchNorm,
    RangeSearch,
    SmoothQuant,
    Step,
    TieEmbedding,
    parse_step,
    parse_steps,
    register_step,
    resolve_algorithms,
)
from lowbit.ptq import steps as ptq_steps
from lowbit.ptq.steps import FLOAT, STEPS, check_order, steps_from_flags

pytestmark = pytest.mark.usefixtures("one_thread")


class Encoder(nn.Module):
    """Linear-ReLU-Linear (a CLE pair), a LayerNorm whose output also feeds a residual (SmoothQuant
    must insert scales), a head."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.norm(self.down(torch.relu(self.up(x))))
        return self.head(h + self.fc(h))


def conv_net(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU6-Conv-BN-ReLU (a pair CLE crosses ReLU6 for), a residual add, a pool, a Linear."""
    return net(seed)


def encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Encoder().eval()


IMAGES = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
ROWS = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) * torch.linspace(0.1, 8, 16)
        for i in range(2)]


def _same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert (torch.equal(sa[key], sb[key]) if isinstance(sa[key], torch.Tensor) else sa[key] == sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _onnx_sha(qmodel: nn.Module, x: torch.Tensor, path) -> str:
    lowbit.export_onnx(qmodel, path, x)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- registry, JSON and short forms ------------------------------------------------------------
def test_registry_holds_lowbits_steps_with_their_phases():
    assert dict(STEPS) == {"fold_bn": FoldBatchNorm, "cle": CLE, "smoothquant": SmoothQuant,
                           "bias_correction": BiasCorrection, "range_search": RangeSearch, "adaround": AdaRound,
                           "rtn": RTN, "gptq": GPTQ, "awq": AWQ, "tie_embedding": TieEmbedding}
    assert [cls.phase for cls in STEPS.values()] == ["float"] * 3 + ["calibrated"] * 5 + ["float", "calibrated"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SmoothQuant().alpha = 0.5


@pytest.mark.parametrize("step", [FoldBatchNorm(), CLE(), CLE(relu6_to_relu=True, iterations=7, tol=0.01),
                                  SmoothQuant(alpha=0.5, insert_scales=False), BiasCorrection(reference="model")])
def test_every_step_round_trips_through_json_and_its_short_form(step):
    assert Step.from_dict(json.loads(json.dumps(step.to_dict()))) == step
    assert parse_step(str(step)) == step
    assert parse_steps([str(step)]) == parse_steps([step.to_dict()]) == (step,)


def test_short_forms():
    assert parse_steps("cle,smoothquant(alpha=0.8),bias_correction") == (CLE(), SmoothQuant(alpha=0.8),
                                                                           BiasCorrection())
    assert parse_steps(" cle(relu6_to_relu=True, iterations=20) , bias_correction(reference=model)") == (
        CLE(relu6_to_relu=True, iterations=20), BiasCorrection(reference="model"))
    assert parse_steps("bias_correction(reference='model')") == (BiasCorrection(reference="model"),)
    assert parse_steps("") == parse_steps([]) == ()
    assert str(SmoothQuant(alpha=0.5)) == "smoothquant(alpha=0.5)" and str(CLE()) == "cle"
    assert SmoothQuant(alpha=1) == SmoothQuant(alpha=1.0) and isinstance(SmoothQuant(alpha=1).alpha, float)


@pytest.mark.parametrize("bad, message", [
    ("nonesuch", r"unknown algorithm 'nonesuch' \(known: fold_bn, cle, smoothquant, bias_correction"),
    ("smoothqunt", r"unknown algorithm 'smoothqunt'; did you mean 'smoothquant'\?"),
    ("cle(relu6=true)", r"algorithm 'cle': unknown field\(s\) \['relu6'\]; CLE takes \['relu6_to_relu', "),
    ("smoothquant(alpha=1.5)", r"SmoothQuant.alpha must be a number in \[0.0, 1.0\], got 1.5"),
    ("bias_correction(reference=float)", r"BiasCorrection.reference must be 'layer' or 'model'"),
    ("smoothquant(alpha=0.8", r"missing the closing '\)'"),
    ("smoothquant(0.8)", r"'0.8' is not field=value"),
    ([{"alpha": 0.8}], r"unknown algorithm None"),
    ([{"name": "fold_bn", "x": 1}], r"algorithm 'fold_bn': unknown field\(s\) \['x'\]; FoldBatchNorm takes no fields"),
    ([{"name": "cle", "relu6": True, "tol": 1}], r"algorithm 'cle': unknown field\(s\) \['relu6'\]"),
])
def test_unknown_names_fields_and_bad_values_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_steps(bad)


@pytest.mark.parametrize("bad, message", [
    ("cle(relu6_to_relu=yes)", r"CLE.relu6_to_relu must be true or false, got 'yes'"),
    ([3], r"3 is not a Step, a name like 'cle' or a mapping"),
])
def test_values_of_the_wrong_type_are_named(bad, message):
    with pytest.raises(TypeError, match=message):
        parse_steps(bad)


# -- order and flags ---------------------------------------------------------------------------
def test_an_impossible_order_is_an_error_before_any_work():
    def data():  # a calibration iterator that must never be read
        raise AssertionError("read")
        yield

    model = conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"algorithms out of order: cle runs on the float model before layers "
                                         r"are swapped, so it cannot come after bias_correction, which runs on "
                                         r"the quantized model after calibration"):
        lowbit.quantize(model, data(), "w8a8", algorithms=[BiasCorrection(), CLE()], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    check_order([FoldBatchNorm(), CLE(), SmoothQuant(), CLE(), BiasCorrection(), BiasCorrection()])  # fine


def test_flags_and_a_list_together_or_a_step_without_data_are_errors():
    with pytest.raises(ValueError, match=r"\['equalize', 'smoothquant'\] given together with algorithms="):
        resolve_algorithms([CLE()], equalize=True, smoothquant=0.8)
    with pytest.raises(ValueError, match="fold_bn=False, but algorithms lists FoldBatchNorm"):
        resolve_algorithms("fold_bn", fold_bn=False)
    with pytest.raises(ValueError, match=r"smoothquant\(alpha=0.5\) needs calibration data"):
        lowbit.quantize(encoder(), None, "w8a8-dynamic", algorithms="smoothquant(alpha=0.5)", progress=False)


def test_folding_comes_first_unless_the_list_places_it():
    assert resolve_algorithms(None) == (FoldBatchNorm(),)
    assert resolve_algorithms([CLE()]) == (FoldBatchNorm(), CLE())
    assert resolve_algorithms([CLE()], fold_bn=False) == (CLE(),)
    assert resolve_algorithms([SmoothQuant(), FoldBatchNorm()]) == (SmoothQuant(), FoldBatchNorm())
    assert steps_from_flags(equalize_relu6=True, smoothquant=0.5, bias_correction=True) == (
        FoldBatchNorm(), CLE(relu6_to_relu=True), SmoothQuant(alpha=0.5), BiasCorrection())


@pytest.mark.parametrize("make, data, flags, algorithms", [
    (conv_net, IMAGES, {"equalize": True, "bias_correction": True}, [CLE(), BiasCorrection()]),
    (conv_net, IMAGES, {"equalize_relu6": True}, "fold_bn,cle(relu6_to_relu=true)"),
    (conv_net, IMAGES, {"fold_bn": False, "bias_correction": True}, [{"name": "bias_correction"}]),
    (encoder, ROWS, {"smoothquant": 0.5}, [SmoothQuant(alpha=0.5)]),
    (encoder, ROWS, {"equalize": True, "smoothquant": 0.8, "bias_correction": True},
     "cle,smoothquant(alpha=0.8),bias_correction"),
], ids=["cle-bc", "cle-relu6", "no-fold-bc", "smoothquant", "all"])
def test_flags_build_the_same_steps_and_a_bit_identical_model(make, data, flags, algorithms):
    by_flags = lowbit.quantize(make(), data, "w8a8", progress=False, **flags)
    fold = {"fold_bn": flags["fold_bn"]} if "fold_bn" in flags else {}
    by_list = lowbit.quantize(make(), data, "w8a8", algorithms=algorithms, progress=False, **fold)
    assert by_flags.lowbit_summary.algorithms == by_list.lowbit_summary.algorithms
    assert by_flags.lowbit_summary.reports == by_list.lowbit_summary.reports
    _same_model(by_flags, by_list, data[0])


def test_the_summary_records_each_step_and_what_it_did():
    qmodel = lowbit.quantize(encoder(), ROWS, "w8a8", algorithms="cle,smoothquant(alpha=0.5),bias_correction",
                             progress=False)
    summary = qmodel.lowbit_summary
    assert summary.algorithms == (FoldBatchNorm(), CLE(), SmoothQuant(alpha=0.5), BiasCorrection())
    folded, pairs, smoothing, corrected = summary.reports
    assert folded == [] and pairs == [["up", "down"]]
    assert summary.smoothing is smoothing  # 1/s folds into up; the others get a SmoothedInput
    assert [g.consumers for g in smoothing.folded] == [("down",)]
    assert [g.consumers for g in smoothing.inserted] == [("up",), ("fc",), ("head",)]
    assert corrected == ["up.linear", "down", "fc.linear", "head.linear"]
    assert summary.options == {"quantize_adds": True}


# -- a user's own step -------------------------------------------------------------------------
frozen_step = dataclasses.dataclass(frozen=True, kw_only=True)


@frozen_step
class ScaleHead(Step):
    """Scales the head's weight (a float-model step), to show a user's step runs in its place."""

    name = "test_scale_head"
    phase = FLOAT
    factor: float = 2.0

    def run(self, model, ctx):
        with torch.no_grad():
            model.head.weight.mul_(self.factor)
        return model, {"scaled": "head"}


@pytest.fixture
def scale_head():
    """ScaleHead registered for one test (the registry is global)."""
    assert register_step(ScaleHead) is ScaleHead
    yield ScaleHead
    del ptq_steps._STEPS[ScaleHead.name]


def test_a_registered_user_step_runs_in_order_and_round_trips(tmp_path, scale_head):
    assert STEPS["test_scale_head"] is ScaleHead
    plain = lowbit.quantize(encoder(), ROWS, "w8a8", progress=False)
    qmodel = lowbit.quantize(encoder(), ROWS, "w8a8", algorithms="test_scale_head(factor=0.5)", progress=False)
    assert torch.equal(qmodel.head.weight, plain.head.weight * 0.5)
    assert qmodel.lowbit_summary.reports[-1] == {"scaled": "head"}
    loaded = lowbit.load(encoder(1), lowbit.save(qmodel, tmp_path / "m"))
    assert loaded.lowbit_summary.algorithms == (FoldBatchNorm(), ScaleHead(factor=0.5))
    assert loaded.lowbit_summary.reports == qmodel.lowbit_summary.reports
    _same_model(loaded, qmodel, ROWS[0])


def test_registering_a_bad_step_class_is_an_error():
    with pytest.raises(ValueError, match="'cle' is taken by CLE"):
        register_step(frozen_step(type("MyCLE", (Step,), {"name": "cle", "__annotations__": {}})))
    with pytest.raises(TypeError, match="frozen dataclass subclass of Step"):
        register_step(type("Plain", (), {"name": "plain"}))
    with pytest.raises(ValueError, match=r"MyStep.name must be an identifier \(its name in recipes\), got 'my step'"):
        register_step(frozen_step(type("MyStep", (Step,), {"name": "my step", "__annotations__": {}})))
    named = type("Named", (Step,), {"__annotations__": {"name": str}, "name": "named"})
    with pytest.raises(ValueError, match="has a field called 'name'"):
        register_step(frozen_step(named))


# -- a recipe as data, replayed ----------------------------------------------------------------
def test_an_ordered_recipe_round_trips_through_json_and_save_load_to_the_same_onnx_bytes(tmp_path):
    steps = [SmoothQuant(alpha=0.5), CLE(), BiasCorrection()]  # not the flags' order
    recipe = json.dumps({"algorithms": [s.to_dict() for s in steps]})
    first = lowbit.quantize(encoder(), ROWS, "w8a8", algorithms=steps, progress=False)
    again = lowbit.quantize(encoder(), ROWS, "w8a8", algorithms=json.loads(recipe)["algorithms"], progress=False)
    assert again.lowbit_summary.algorithms == (FoldBatchNorm(), *steps)
    x = ROWS[0]
    sha = _onnx_sha(first, x, tmp_path / "first.onnx")
    assert _onnx_sha(again, x, tmp_path / "again.onnx") == sha

    folder = lowbit.save(first, tmp_path / "saved")
    saved = json.loads((folder / "manifest.json").read_text())
    assert saved["version"] == 2
    assert [d["name"] for d in saved["summary"]["algorithms"]] == ["fold_bn", "smoothquant", "cle", "bias_correction"]
    loaded = lowbit.load(encoder(1), folder)
    assert loaded.lowbit_summary.algorithms == first.lowbit_summary.algorithms
    assert loaded.lowbit_summary.smoothing == first.lowbit_summary.smoothing
    assert _onnx_sha(loaded, x, tmp_path / "loaded.onnx") == sha
