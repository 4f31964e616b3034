"""The weight-only LLM presets (``w4a16-g128``, ``w4a16-g32``, ``w3a16-g128``, ``w8a16``) on a small
language model whose hidden size 576 (SmolLM2's) is not a multiple of 128 and whose ``lm_head`` is
tied to the embedding: no calibration data, every Linear (``lm_head`` too) rounded to nearest on its
groups' largest-magnitude values (on -8 / -4 for the 4- and 3-bit presets: ``signed_scale``), checked
against a naive loop; the export runs in ONNX Runtime and gives the
simulation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.export import inspect_onnx
from lowbit.runtime.ort import OrtModel

# preset -> (qmin, qmax, group size or None for one scale per output row, signed scale) of its Linear weights
PRESETS = {
    "w4a16-g128": (-8, 7, 128, True),
    "w4a16-g32": (-8, 7, 32, True),
    "w3a16-g128": (-4, 3, 128, True),
    "w8a16": (-127, 127, None, False),
}
EMBEDDING = (-127, 127, None, False)  # every preset: int8 per row


class TinyLM(nn.Module):
    """Embedding -> MLP with a residual -> lm_head tied to the embedding (SmolLM2's layout)."""

    def __init__(self, vocab: int = 48, hidden: int = 576, inner: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, inner)  # 576 inputs: 4 groups of 128 and one of 64
        self.down = nn.Linear(inner, hidden)  # 96 inputs: one short group of 128, three of 32
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.lm_head(h + self.down(torch.relu(self.up(h))))


def _tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


def rtn(w: torch.Tensor, qmin: int, qmax: int, group: int | None, signed: bool) -> torch.Tensor:
    """Symmetric round-to-nearest, one scale per row and group of ``group`` columns (the last group
    shorter), scale = the group's max |w| / ((qmax - qmin) / 2), or with ``signed`` the group's
    largest-magnitude value (the negative one on a tie) / qmin; a naive loop over the groups."""
    out = torch.empty_like(w)
    step = group or w.shape[1]
    for start in range(0, w.shape[1], step):
        chunk = w[:, start:start + step]
        if signed:
            lo, hi = chunk.amin(1, keepdim=True), chunk.amax(1, keepdim=True)
            scale = torch.where(-lo >= hi, lo, hi) / qmin
        else:
            scale = chunk.abs().amax(1, keepdim=True) / ((qmax - qmin) / 2)
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        out[:, start:start + step] = torch.clamp(torch.round(chunk / scale), qmin, qmax) * scale
    return out


def rtn_reference(model: TinyLM, grid: tuple[int, int, int | None]) -> TinyLM:
    """``model`` with every Linear weight rounded on ``grid`` and the embedding table on int8 rows;
    the tie is broken, since the two layers round the same table differently."""
    ref = copy.deepcopy(model)
    table = model.embed.weight.detach()
    with torch.no_grad():
        ref.embed.weight = nn.Parameter(rtn(table, *EMBEDDING))
        ref.lm_head.weight = nn.Parameter(rtn(table, *grid))
        for name in ("up", "down"):
            getattr(ref, name).weight.copy_(rtn(getattr(model, name).weight, *grid))
    return ref


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_needs_no_data_and_rounds_every_linear_to_nearest(preset):
    model = _tiny_lm()
    table = model.embed.weight.detach().clone()
    qmodel = lowbit.quantize(model, None, preset, progress=False)
    assert qmodel.lowbit_summary.config.name == preset and qmodel.lowbit_summary.calibration_batches == 0
    assert set(qmodel.lowbit_summary.layers.quantized) == {"embed", "up", "down", "lm_head"}
    # The tie survives and nothing wrote the float table: each layer fake-quantizes it its own way.
    assert qmodel.lm_head.weight is qmodel.embed.weight and torch.equal(qmodel.embed.weight, table)
    ids = torch.randint(0, 48, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids), rtn_reference(model, PRESETS[preset])(ids), rtol=1e-6, atol=1e-6)
        assert not torch.equal(qmodel(ids), model(ids))


def test_presets_describe_their_weights():
    described = {}
    for preset in PRESETS:
        qmodel = lowbit.quantize(_tiny_lm(), None, preset, progress=False)
        described[preset] = qmodel.lowbit_summary.layers.quantized["lm_head"]
        assert qmodel.lowbit_summary.layers.quantized["embed"].startswith("Embedding: weight int8 sym narrow per-channel")
    assert described == {
        "w4a16-g128": "Linear: weight int4 sym signed-scale group(axis=1, size=128) (default)",
        "w4a16-g32": "Linear: weight int4 sym signed-scale group(axis=1, size=32) (default)",
        "w3a16-g128": "Linear: weight int3 sym signed-scale group(axis=1, size=128) (default)",
        "w8a16": "Linear: weight int8 sym narrow per-channel(axis=0) (default)",
    }


@pytest.mark.parametrize("preset", list(PRESETS))
def test_export_runs_in_onnxruntime_and_equals_the_simulation(preset, tmp_path):
    qmodel = lowbit.quantize(_tiny_lm(), None, preset, progress=False)
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(2))
    path = tmp_path / f"{preset}.onnx"
    lowbit.export_onnx(qmodel, path, ids)
    with torch.no_grad():
        simulated = qmodel(ids)
    # DequantizeLinear feeding float MatMuls (ORT level basic): the simulation up to float rounding
    # (sums of 576 products in another order).
    rounding = 1e-6 * float(simulated.abs().max())
    torch.testing.assert_close(OrtModel(path, optimization="basic")(ids), simulated, rtol=1e-5, atol=rounding)
    # At ORT's default level every weight-only MatMul on (batch, tokens, hidden), group-wise or per
    # channel, becomes MatMulNBits, which rounds the activations to int8 by default (accuracy level 4).
    assert inspect_onnx(path).op_counts.get("MatMulNBits") == 3
    default = OrtModel(path)(ids)
    assert float((default - simulated).abs().max()) < 0.02 * float(simulated.abs().max())
