"""export_onnx(opset=...): the default stays 19 (existing files byte-identical); 21..27 on request run
in ONNX Runtime with the same kernels and the same outputs as 20, for every preset."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

import lowbit
from lowbit.config import CONFIGS
from lowbit.export import export_onnx, inspect_onnx
from lowbit.export._blocked import uses_blocked
from lowbit.export._opset import DEFAULT_OPSET, MAX_OPSET, stamp_opset
from lowbit.runtime.ort import OrtModel


class _Image(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.GELU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.features(x))


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, ids):
        return self.body(self.embed(ids))  # Linear on (batch, tokens, dim): MatMul in ONNX


def _models(config: str):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    ids = torch.randint(0, 50, (4, 6))
    yield lowbit.quantize(_Image().eval(), [x[:4], x[4:]], config, progress=False), x[:2]
    yield lowbit.quantize(_Tokens().eval(), [ids], config, progress=False), ids[:2]


def _opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain == "")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_higher_opsets_give_the_same_outputs_and_kernels(config, tmp_path):
    for i, (qmodel, x) in enumerate(_models(config)):
        default = export_onnx(qmodel, tmp_path / f"{i}-default.onnx", x)
        # Group-wise weights need blocked DequantizeLinear: opset 21 by default, and 20 is refused.
        blocked = uses_blocked(qmodel)
        assert _opset_of(default) == (21 if blocked else DEFAULT_OPSET)
        if blocked:
            with pytest.raises(ValueError, match="blocked DequantizeLinear from opset 21 on"):
                export_onnx(qmodel, tmp_path / f"{i}-20.onnx", x, opset=20)
        opsets = (21, MAX_OPSET) if blocked else (20, 21, MAX_OPSET)
        runs = {}
        for opset in opsets:
            path = tmp_path / f"{i}-{opset}.onnx"
            model = export_onnx(qmodel, path, x, opset=opset)
            assert _opset_of(model) == opset
            assert model.ir_version == max(9, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
            runs[opset] = (OrtModel(path)(x), inspect_onnx(path).op_counts)
        base = runs[opsets[0]]
        for opset in opsets[1:]:
            torch.testing.assert_close(runs[opset][0], base[0], rtol=0, atol=0, msg=f"{config} opset {opset}")
            assert runs[opset][1] == base[1], f"{config}: ORT runs other kernels at opset {opset}"


def test_default_is_opset_19_byte_for_byte(tmp_path):
    qmodel, x = next(_models("w8a8"))
    export_onnx(qmodel, tmp_path / "default.onnx", x)
    export_onnx(qmodel, tmp_path / "19.onnx", x, opset=19)
    assert (tmp_path / "default.onnx").read_bytes() == (tmp_path / "19.onnx").read_bytes()


@pytest.mark.parametrize("opset", [12, 28, "21", 21.0, True])
def test_bad_opset_values_are_refused_before_anything_is_written(opset, tmp_path):
    qmodel, x = next(_models("w8"))
    with pytest.raises(ValueError, match=r"opset must be an integer in 13\.\.27"):
        export_onnx(qmodel, tmp_path / "m.onnx", x, opset=opset)
    assert list(tmp_path.iterdir()) == []


def _group_norm_model(opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 2])
    inits = [onnx.numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("s", "b")]
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2, name="gn")
    return helper.make_model(helper.make_graph([node], "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", opset)])


def test_stamping_refuses_an_op_whose_meaning_changed():
    model = _group_norm_model(20)
    with pytest.raises(ValueError, match=r"gn: ONNX GroupNormalization changed meaning in opset 21.*opset=20"):
        stamp_opset(model, 21)
    stamp_opset(model, 20)  # the traced opset: nothing to do
    assert _opset_of(model) == 20
