"""QuantConfig: ordered rules (first match wins), presets, and JSON recipes."""

from __future__ import annotations

import dataclasses
import json

import pytest
from torch import nn

from lowbit import config as config_module
from lowbit.config import (
    CONFIG_FORMAT_VERSION,
    CONFIGS,
    W3A16_G128,
    W4A16_G32,
    W4A16_G128,
    W8,
    W8A8,
    W8A8_DYNAMIC,
    W8A16,
    LayerQuant,
    QuantConfig,
    Rule,
    get_config,
)
from lowbit.nn.modules import QuantLinear, TensorQuant
from lowbit.numerics import (
    INT3_WEIGHT_G128,
    INT4_WEIGHT_G32,
    INT4_WEIGHT_G128,
    INT8_ACTIVATION,
    INT8_WEIGHT,
    UINT8_ACTIVATION,
)

W_INT8 = LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT))
W_INT4 = LayerQuant(weight=TensorQuant(spec=INT4_WEIGHT_G128))
W8_A8 = LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT), input=TensorQuant(spec=UINT8_ACTIVATION))


class MyLinear(nn.Linear):
    pass


def _custom() -> QuantConfig:
    """A config using every kind of field a recipe can hold."""
    return QuantConfig(
        name="my-recipe",
        rules=(
            Rule(pattern="classifier", layer=None),
            Rule(pattern="type:Embedding", layer=W_INT8),
            Rule(
                pattern="encoder.layer.*.attention.*",
                layer=LayerQuant(
                    weight=TensorQuant(
                        spec=INT4_WEIGHT_G128, observer="mse", observer_options=(("num_candidates", 20),)
                    ),
                    input=TensorQuant(spec=UINT8_ACTIVATION, dynamic=True),
                ),
            ),
            Rule(
                pattern="encoder.*.output",
                layer=LayerQuant(
                    weight=TensorQuant(spec=INT8_WEIGHT),
                    input=TensorQuant(
                        spec=INT8_ACTIVATION, observer="percentile", observer_options=(("percentile", 99.9),)
                    ),
                    output=TensorQuant(spec=INT8_ACTIVATION),
                ),
            ),
        ),
        default=W8_A8,
    )


# -- resolve ------------------------------------------------------------------------------
def test_first_matching_rule_wins_in_order():
    cfg = QuantConfig(
        rules=(Rule(pattern="fc*", layer=W_INT4), Rule(pattern="fc1", layer=W_INT8)), default=W8_A8
    )
    lin = nn.Linear(2, 2)
    assert cfg.resolve("fc1", lin) == (W_INT4, "rule 'fc*'")
    assert cfg.resolve("head", lin) == (W8_A8, "default")
    reordered = dataclasses.replace(cfg, rules=cfg.rules[::-1])
    assert reordered.resolve("fc1", lin) == (W_INT8, "rule 'fc1'")
    assert reordered.resolve("fc2", lin) == (W_INT4, "rule 'fc*'")


def test_with_rules_take_precedence_and_leave_the_original_alone():
    base = QuantConfig(rules=(Rule(pattern="fc*", layer=W_INT4),), default=W8_A8)
    cfg = base.with_rules(Rule(pattern="fc1", layer=W_INT8))
    lin = nn.Linear(2, 2)
    assert cfg.resolve("fc1", lin) == (W_INT8, "rule 'fc1'")
    assert cfg.resolve("fc2", lin) == (W_INT4, "rule 'fc*'")
    assert base.resolve("fc1", lin) == (W_INT4, "rule 'fc*'")
    assert [r.pattern for r in cfg.rules] == ["fc1", "fc*"]


def test_globs_match_whole_qualified_names_case_sensitively():
    rule = Rule(pattern="encoder.layer.*.attention.*", layer=None)
    lin = nn.Linear(2, 2)
    assert rule.matches("encoder.layer.11.attention.self.query", lin)
    assert not rule.matches("encoder.layer.11.output.dense", lin)
    assert not rule.matches("model.encoder.layer.0.attention.q", lin)  # anchored at the start
    assert not Rule(pattern="Head", layer=None).matches("head", lin)
    assert Rule(pattern="layer[0-2]", layer=None).matches("layer1", lin)


def test_skip_keeps_matching_layers_float():
    cfg = W8A8.skip("classifier", "encoder.*.attention.*")
    lin = nn.Linear(2, 2)
    assert cfg.resolve("classifier", lin) == (None, "rule 'classifier'")
    assert cfg.resolve("encoder.0.attention.q", lin)[0] is None
    assert cfg.resolve("encoder.0.output", lin) == W8A8.resolve("encoder.0.output", lin)
    # skip comes before the preset's own rules: it wins even over the embedding rule.
    assert W8A8.skip("emb").resolve("emb", nn.Embedding(3, 2))[0] is None
    assert W8A8.resolve("classifier", lin)[0] is not None  # the preset is unchanged


def test_type_rules_match_class_and_base_class_names():
    rule = Rule(pattern="type:Linear", layer=None)
    assert rule.matches("x", nn.Linear(2, 2))
    assert rule.matches("x", MyLinear(2, 2))  # base class
    assert rule.matches("x", QuantLinear.from_float(nn.Linear(2, 2), name="x"))
    assert not rule.matches("Linear", nn.Conv2d(1, 1, 1))  # a type rule never looks at the name
    assert not Rule(pattern="Linear", layer=None).matches(
        "x", nn.Linear(2, 2)
    )  # a name rule never looks at the type
    assert Rule(pattern="type:Conv*", layer=None).matches("x", nn.Conv1d(1, 1, 1))
    assert Rule(pattern="type:MyLinear", layer=None).matches("x", MyLinear(2, 2))
    assert not Rule(pattern="type:MyLinear", layer=None).matches("x", nn.Linear(2, 2))
    assert Rule(pattern="type:_ConvNd", layer=None).matches("x", nn.Conv2d(1, 1, 1))


def test_with_observer_changes_only_static_activation_quantizers():
    cfg = _custom()
    new = cfg.with_observer("entropy", bins=512)
    changed = TensorQuant(spec=UINT8_ACTIVATION, observer="entropy", observer_options=(("bins", 512),))
    assert new.default == dataclasses.replace(cfg.default, input=changed)
    old_rules, new_rules = cfg.rules, new.rules
    assert [r.pattern for r in new_rules] == [r.pattern for r in old_rules]
    assert new_rules[0] == old_rules[0]  # layer=None
    assert new_rules[1] == old_rules[1]  # weight only
    assert new_rules[2] == old_rules[2]  # dynamic input: no calibration to change
    assert new_rules[3].layer.input.observer == "entropy"
    assert new_rules[3].layer.input.observer_options == (("bins", 512),)
    assert new_rules[3].layer.input.spec == INT8_ACTIVATION
    assert new_rules[3].layer.weight == old_rules[3].layer.weight
    assert new_rules[3].layer.output == old_rules[3].layer.output
    assert cfg == _custom()  # the original is unchanged


def test_with_observer_for_weights():
    new = W8A8.with_observer("mse", role="weight")
    assert new.default.weight.observer == "mse"
    assert new.default.input == W8A8.default.input
    for rule in new.rules:  # the embedding table too
        assert rule.layer is None or rule.layer.weight is None or rule.layer.weight.observer == "mse"


# -- recipes --------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [*CONFIGS.values(), _custom()], ids=[*CONFIGS, "custom"])
def test_json_round_trip(cfg):
    data = cfg.to_dict()
    assert data["format"] == "lowbit.QuantConfig" and data["version"] == CONFIG_FORMAT_VERSION
    text = json.dumps(data, sort_keys=True)
    back = QuantConfig.from_dict(json.loads(text))
    assert back == cfg
    assert json.dumps(back.to_dict(), sort_keys=True) == text


def test_with_observer_options_survive_json():
    cfg = W8A8.with_observer("percentile", percentile=99.99)
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _recipe() -> dict:
    return json.loads(json.dumps(_custom().to_dict()))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(extra=1), r"QuantConfig: unknown field\(s\) \['extra'\]"),
        (lambda d: d["default"].update(wieght=None), r"LayerQuant: unknown field\(s\) \['wieght'\]"),
        (
            lambda d: d["default"]["input"].update(obsrver="mse"),
            r"TensorQuant: unknown field\(s\) \['obsrver'\]",
        ),
        (
            lambda d: d["default"]["weight"]["spec"].update(bitz=4),
            r"QuantSpec: unknown field\(s\) \['bitz'\]",
        ),
        (lambda d: d["rules"][3]["layer"].update(extra=1), r"LayerQuant: unknown field\(s\) \['extra'\]"),
        (lambda d: d.pop("format"), r"not a lowbit QuantConfig recipe"),
        (lambda d: d.update(format="torchao.Config"), r"not a lowbit QuantConfig recipe"),
        (
            lambda d: d.update(version=CONFIG_FORMAT_VERSION + 1),
            rf"version {CONFIG_FORMAT_VERSION + 1} is not supported \(expected {CONFIG_FORMAT_VERSION}\)",
        ),
        (lambda d: d.pop("version"), r"version None is not supported"),
        (lambda d: d.update(default={"weight": None, "input": None, "output": None}), r"quantizes nothing"),
        (lambda d: d["default"]["weight"]["spec"].update(bits=9), r"QuantSpec.bits must be one of"),
    ],
    ids=[
        "config-field",
        "layer-field",
        "tensor-field",
        "spec-field",
        "rule-layer-field",
        "no-format",
        "wrong-format",
        "new-version",
        "no-version",
        "empty-layer",
        "bad-bits",
    ],
)
def test_bad_recipes_are_clear_errors(edit, message):
    data = _recipe()
    edit(data)
    with pytest.raises(ValueError, match=message):
        QuantConfig.from_dict(data)


@pytest.mark.parametrize(
    "edit",
    [lambda r: r.update(layers=None), lambda r: r.pop("layer")],
    ids=["unknown-rule-field", "missing-layer"],
)
def test_bad_rules_in_recipes_are_clear_errors(edit):
    data = _recipe()
    edit(data["rules"][0])
    with pytest.raises(ValueError, match=r"Rule"):
        QuantConfig.from_dict(data)


@pytest.mark.parametrize(
    "kwargs",
    [{"spec": "uint8-activation"}, {"spec": UINT8_ACTIVATION, "observer": "minmx"}],
    ids=["spec-not-a-QuantSpec", "unknown-observer"],
)
def test_tensor_quant_checks_its_fields(kwargs):
    with pytest.raises((TypeError, ValueError)):
        TensorQuant(**kwargs)


def test_constructor_errors():
    with pytest.raises(ValueError, match="quantizes nothing.*layer=None"):
        LayerQuant()
    with pytest.raises(TypeError, match=r"LayerQuant.weight must be a TensorQuant or None, got QuantSpec"):
        LayerQuant(weight=INT8_WEIGHT)
    with pytest.raises(ValueError, match="non-empty glob"):
        Rule(pattern="", layer=None)
    with pytest.raises(TypeError, match="Rule objects"):
        QuantConfig(rules=(("fc", None),))
    with pytest.raises(TypeError):
        QuantConfig(nmae="typo")  # keyword-only dataclass: unknown fields are errors
    with pytest.raises(TypeError):
        Rule("fc", None)  # keyword-only


def test_rules_given_as_a_list_become_a_tuple():
    cfg = QuantConfig(rules=[Rule(pattern="a", layer=None)])
    assert cfg.rules == (Rule(pattern="a", layer=None),)
    hash(cfg)  # frozen and hashable, so it can key caches


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        W8A8.name = "changed"
    with pytest.raises(TypeError):
        CONFIGS["mine"] = W8  # read-only view


# -- presets --------------------------------------------------------------------------------
def test_configs_are_keyed_by_preset_name():
    assert all(name == cfg.name for name, cfg in CONFIGS.items())
    assert {"w8a8", "w8a8-dynamic", "w8"} <= set(CONFIGS)
    assert CONFIGS["w8a8"] is W8A8 and CONFIGS["w8a8-dynamic"] is W8A8_DYNAMIC and CONFIGS["w8"] is W8
    # Every QuantConfig constant in the module is registered.
    constants = {v.name for v in vars(config_module).values() if isinstance(v, QuantConfig)}
    assert constants == set(CONFIGS)


def test_preset_semantics():
    lin, emb = nn.Linear(2, 2), nn.Embedding(3, 2)
    static = W8A8.resolve("fc", lin)[0]
    assert static.weight.spec == INT8_WEIGHT and static.input.spec == UINT8_ACTIVATION
    assert not static.input.dynamic
    dynamic = W8A8_DYNAMIC.resolve("fc", lin)[0]
    assert dynamic.input.dynamic and dynamic.weight.spec == INT8_WEIGHT
    weight_only = W8.resolve("fc", lin)[0]
    assert weight_only.input is None and weight_only.weight.spec == INT8_WEIGHT
    for cfg in CONFIGS.values():  # embeddings quantize their table, never their integer indices
        layer = cfg.resolve("emb", emb)[0]
        assert layer.weight is not None and layer.input is None


def test_llm_weight_only_presets():
    # Every Linear, the last one (lm_head) included, gets the weight grid with a plain min-max range
    # (round-to-nearest); no activation is quantized; embeddings keep int8 rows as in every preset.
    lm_head, emb = nn.Linear(576, 48), nn.Embedding(48, 576)
    expected = {"w4a16-g128": (W4A16_G128, INT4_WEIGHT_G128), "w4a16-g32": (W4A16_G32, INT4_WEIGHT_G32),
                "w3a16-g128": (W3A16_G128, INT3_WEIGHT_G128), "w8a16": (W8A16, INT8_WEIGHT)}
    for name, (cfg, spec) in expected.items():
        assert CONFIGS[name] is cfg
        bound = cfg.bind(nn.Sequential(nn.Linear(48, 576), lm_head))  # no @first / @last rule to bind
        layer, why = bound.resolve("1", lm_head)
        assert why == "default" and layer.input is None and layer.output is None
        assert layer.weight == TensorQuant(spec=spec)  # min-max, static
        assert cfg.resolve("embed", emb)[0] == LayerQuant(weight=TensorQuant(spec=INT8_WEIGHT))
    assert INT4_WEIGHT_G32.symmetric and INT4_WEIGHT_G32.group_size == 32 and INT4_WEIGHT_G32.axis == 1
    assert (INT3_WEIGHT_G128.bits, INT3_WEIGHT_G128.qmin, INT3_WEIGHT_G128.qmax) == (3, -4, 3)
    assert W8A16 == dataclasses.replace(W8, name="w8a16")


def test_get_config():
    assert get_config("w8a8") is W8A8
    custom = _custom()
    assert get_config(custom) is custom
    with pytest.raises(ValueError) as info:
        get_config("w3a5")
    message = str(info.value)
    assert "'w3a5'" in message
    for name in CONFIGS:
        assert name in message
    with pytest.raises(ValueError, match="presets"):
        get_config(None)


# -- position patterns: "@first" / "@last" ---------------------------------------------------
def _cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_bind_names_the_first_and_last_compute_layers():
    cfg = QuantConfig(rules=(Rule(pattern="@first", layer=W_INT8), Rule(pattern="@last", layer=None)), default=W_INT4)
    model = _cnn()
    bound = cfg.bind(model)
    assert [r.pattern for r in bound.rules] == ["0", "6"]
    assert bound.resolve("0", model[0])[0] == W_INT8
    assert bound.resolve("2", model[2])[0] == W_INT4
    assert bound.resolve("6", model[6])[0] is None
    # unbound, the position rules match nothing; the recipe keeps the position, not the names
    assert cfg.resolve("0", model[0])[0] == W_INT4
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert W8A8.bind(model) is W8A8  # no position rules: nothing to do


def test_bind_escapes_glob_characters_and_handles_one_layer_and_no_layer_models():
    cfg = QuantConfig(rules=(Rule(pattern="@first", layer=W_INT8),), default=W_INT4)
    odd = nn.Module()
    odd.add_module("a[1]", nn.Linear(2, 2))
    odd.add_module("a1", nn.Linear(2, 2))
    bound = cfg.bind(odd)
    assert bound.resolve("a[1]", odd.get_submodule("a[1]"))[0] == W_INT8
    assert bound.resolve("a1", odd.a1)[0] == W_INT4
    assert cfg.bind(nn.Linear(2, 2)).resolve("", nn.Linear(2, 2))[0] == W_INT8
    assert cfg.bind(nn.ReLU()).rules == ()


def test_4bit_presets_keep_the_first_and_last_layers_at_8_bits():
    import torch

    import lowbit

    for name in ("w4a8", "w4a4"):
        qmodel = lowbit.quantize(_cnn(), [torch.rand(2, 3, 8, 8)], name, progress=False)
        bits = {n: (m.weight_quantizer.spec.bits, m.input_quantizer.spec.bits)
                for n, m in qmodel.named_modules() if hasattr(m, "weight_quantizer")}
        act = 8 if name == "w4a8" else 4
        assert bits == {"0": (8, 8), "2": (4, act), "6": (8, 8)}, name
        # a user's rule still wins over the preset's position rules
        float_head = get_config(name).with_rules(Rule(pattern="6", layer=None))
        qmodel = lowbit.quantize(_cnn(), [torch.rand(2, 3, 8, 8)], float_head, progress=False)
        assert type(qmodel.get_submodule("6")) is nn.Linear
