"""Manifests of format version 1 (quantize's algorithms as flags) still load.

The golden files are the manifests that lowbit.save wrote before version 2, byte for byte: a
CNN quantized with ``equalize_relu6=True, bias_correction=True`` (BatchNorm folding, ReLU6 ->
ReLU, a bias created, a residual add, a pool) and a pre-LN block with ``smoothquant=0.5``
(SmoothedInput wrappers).  ``model.safetensors`` did not change between the versions, so each
is paired with the one this lowbit writes for the same model (its size and sha256 written into
the old manifest, so the test does not pin torch's random initialisation).
"""

import json
from pathlib import Path

import pytest
import torch
from tests.persist.test_persist import net
from torch import nn

import lowbit
from lowbit.persist import manifest
from lowbit.ptq import CLE, BiasCorrection, FoldBatchNorm, SmoothQuant

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = Path(__file__).parent / "golden"


class Block(nn.Module):
    """A LayerNorm whose output also feeds a residual add: SmoothQuant inserts scales."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.norm(x)
        h = h + self.fc(h)
        return self.out(h)


def block(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return Block().eval()


def _net_case():
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    qmodel = lowbit.quantize(net(0), [x[:16], x[16:]], "w8a8", equalize_relu6=True, bias_correction=True,
                             progress=False)
    return qmodel, net(1), x, (FoldBatchNorm(), CLE(relu6_to_relu=True), BiasCorrection())


def _block_case():
    rows = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 8, 16)
    qmodel = lowbit.quantize(block(0), [rows[:8], rows[8:]], "w8a8", smoothquant=0.5, progress=False)
    return qmodel, block(1), rows, (FoldBatchNorm(), SmoothQuant(alpha=0.5))


@pytest.mark.parametrize("golden, case", [("v1_net_cle_relu6_bias_correction.json", _net_case),
                                          ("v1_block_smoothquant.json", _block_case)], ids=["net", "block"])
def test_a_version_1_manifest_loads_into_the_same_model(tmp_path, golden, case):
    qmodel, fresh, x, steps = case()
    folder = lowbit.save(qmodel, tmp_path / "m")
    assert json.loads((folder / "manifest.json").read_text())["version"] == manifest.VERSION == 2

    old = json.loads((GOLDEN / golden).read_text())
    assert old["version"] == 1 and "smoothquant" in old["summary"]["options"]
    old["tensors"] = json.loads((folder / "manifest.json").read_text())["tensors"]
    old.pop("checksum")
    (folder / "manifest.json").write_bytes(manifest.encode(old))

    loaded = lowbit.load(fresh, folder)
    summary = loaded.lowbit_summary
    assert summary.algorithms == steps == qmodel.lowbit_summary.algorithms
    assert summary.options == {"quantize_adds": True}
    assert summary.smoothing == qmodel.lowbit_summary.smoothing
    assert loaded.state_dict().keys() == qmodel.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    # saved again, it is a version-2 folder that loads the same
    again = lowbit.load(fresh, lowbit.save(loaded, tmp_path / "again"))
    with torch.no_grad():
        assert torch.equal(again(x), qmodel(x))


def test_a_version_1_qat_manifest_is_read_as_it_is(tmp_path):
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    qmodel = lowbit.prepare_qat(net(0), "w4a8", x, progress=False)
    folder = lowbit.save(qmodel, tmp_path / "qat")
    data = json.loads((folder / "manifest.json").read_text())
    data.pop("checksum")
    data["version"] = 1  # a QAT summary did not change between the versions
    (folder / "manifest.json").write_bytes(manifest.encode(data))
    loaded = lowbit.load(net(1), folder)
    assert loaded.lowbit_summary.options == qmodel.lowbit_summary.options
    loaded.eval(), qmodel.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
