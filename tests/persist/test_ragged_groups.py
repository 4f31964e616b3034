"""lowbit.save -> lowbit.load of a model with group-wise weights whose last group is shorter (576 inputs
in groups of 128) and an lm_head tied to its embedding: the rebuilt model has the same state
(scales of ceil(576 / 128) = 5 groups), the same outputs bit for bit, and exports the same bytes."""

import pytest
import torch
from torch import nn

import lowbit

pytestmark = pytest.mark.usefixtures("one_thread")


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 576)
        self.mlp = nn.Sequential(nn.Linear(576, 80), nn.ReLU(), nn.Linear(80, 576))
        self.lm_head = nn.Linear(576, 40, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(h + self.mlp(h))


def tied_lm(seed: int) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM().eval()


@pytest.mark.parametrize("preset", ["w4a16-g128", "w3a16-g128"])
def test_ragged_group_model_round_trips(preset, tmp_path):
    qmodel = lowbit.quantize(tied_lm(0), None, preset, progress=False)
    assert tuple(qmodel.lm_head.weight_quantizer.scale.shape) == (40, 5)
    assert tuple(qmodel.mlp[2].weight_quantizer.scale.shape) == (576, 1)  # 80 inputs: one short group
    folder = lowbit.save(qmodel, tmp_path / "lm")
    loaded = lowbit.load(tied_lm(1), folder)  # other float weights: all come from the file
    assert loaded.lm_head.weight is loaded.embed.weight  # still tied
    saved, mine = qmodel.state_dict(), loaded.state_dict()
    assert saved.keys() == mine.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == mine[key].dtype and torch.equal(value, mine[key]), key
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids), qmodel(ids))
    lowbit.export_onnx(qmodel, tmp_path / "before.onnx", ids)
    lowbit.export_onnx(loaded, tmp_path / "after.onnx", ids)
    assert (tmp_path / "before.onnx").read_bytes() == (tmp_path / "after.onnx").read_bytes()
