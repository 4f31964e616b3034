"""lowbit.save(..., packed=True): weights on a frozen static grid are stored as integer codes
(2-4 bits two a byte, low nibble first; 5-8 bits one a byte), and lowbit.load gives a model
whose outputs equal the saved one's bit for bit.  The codes are checked against ONNX's own int4
packing and against ``integer_params()``; the file's data shrinks by exactly the bytes the
shapes say; damaged packed tensors are errors naming the tensor; tied, learned and conv-BN
weights stay float; an unpacked save is byte for byte what it was."""

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.persist.test_persist import net
from torch import nn

import lowbit
from lowbit._files import sha256_file
from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.conv_bn import QuantConvBn2d
from lowbit.nn.modules import QuantLayer, TensorQuant
from lowbit.numerics import QuantSpec
from lowbit.persist import _packed, manifest
from lowbit.persist._state import split_state

pytestmark = pytest.mark.usefixtures("one_thread")

X_NET = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
X_MLP = torch.randn(8, 200, generator=torch.Generator().manual_seed(1))


def mlp(seed: int) -> nn.Module:
    """in_features 200: group 128 leaves a ragged last group of 72; 33 outputs: odd code counts."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(200, 33), nn.ReLU(), nn.Linear(33, 7)).eval()


def weight_only(bits: int, *, symmetric: bool, granularity: str = "group") -> QuantConfig:
    spec = QuantSpec(bits=bits, signed=symmetric, symmetric=symmetric, granularity=granularity, axis=0 if
                     granularity == "channel" else 1, group_size=128 if granularity == "group" else None)
    return QuantConfig(name=f"w{bits}-{granularity}-{'sym' if symmetric else 'asym'}",
                       default=LayerQuant(weight=TensorQuant(spec=spec)))


def _data_bytes(path) -> int:
    """Bytes of a safetensors file after its 8-byte length and JSON header: the tensors' data."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def _same_outputs(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    ya, yb = getattr(ya, "logits", ya), getattr(yb, "logits", yb)
    assert torch.equal(ya, yb)


def _rewrite(folder, change_tensors=None, change_manifest=None):
    """Change a saved folder and make its manifest's checksums match again (so the check that
    fires is the packed-tensor one, not the file's sha256)."""
    data = json.loads((folder / "manifest.json").read_text())
    if change_tensors is not None:
        tensors = load_file(folder / "model.safetensors")
        change_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": manifest.FORMAT})
        data["tensors"].update(bytes=(folder / "model.safetensors").stat().st_size,
                               sha256=sha256_file(folder / "model.safetensors"))
    if change_manifest is not None:
        change_manifest(data)
    data.pop("checksum")
    (folder / "manifest.json").write_bytes(manifest.encode(data))


# -- round trips, bit for bit ------------------------------------------------------------------
@pytest.mark.parametrize("bits, symmetric, granularity", [
    (8, True, "channel"), (8, False, "channel"), (4, True, "group"), (4, False, "group"),
    (3, True, "group"), (3, False, "group"), (2, False, "group"), (6, True, "group"),
])
def test_weight_only_grids_round_trip_bit_for_bit_and_shrink_by_the_expected_bytes(tmp_path, bits, symmetric,
                                                                                    granularity):
    qmodel = lowbit.quantize(mlp(0), None, weight_only(bits, symmetric=symmetric, granularity=granularity),
                             progress=False)
    plain = lowbit.save(qmodel, tmp_path / "plain")
    folder = lowbit.save(qmodel, tmp_path / "packed", packed=True)
    entries = json.loads((folder / "manifest.json").read_text())["packed"]
    assert sorted(entries) == ["0.weight", "2.weight"]
    # the data shrinks by exactly 4 bytes a weight less the codes' bytes: ceil(n / 2) or n
    per_code = 0.5 if bits <= 4 else 1
    saved = sum(4 * n - math.ceil(n * per_code) for n in (200 * 33, 33 * 7))
    assert _data_bytes(plain / "model.safetensors") - _data_bytes(folder / "model.safetensors") == saved

    loaded = lowbit.load(mlp(1), folder)  # other float weights: every value comes from the file
    _same_outputs(loaded, qmodel, X_MLP)
    for name, layer in _layers(qmodel).items():
        mine, theirs = _layers(loaded)[name].integer_params().weight, layer.integer_params().weight
        assert torch.equal(mine.values, theirs.values) and torch.equal(mine.scale, theirs.scale), name
    again = lowbit.load(mlp(2), lowbit.save(loaded, tmp_path / "again", packed=True))  # packs again, same model
    _same_outputs(again, qmodel, X_MLP)


def test_a_cnn_packs_its_int8_convs_and_exports_the_same_onnx_bytes(tmp_path):
    qmodel = lowbit.quantize(net(0), [X_NET], "w8a8", progress=False)
    folder = lowbit.save(qmodel, tmp_path / "cnn", packed=True)
    entries = json.loads((folder / "manifest.json").read_text())["packed"]
    assert set(entries) == {f"{name}.weight" for name in _layers(qmodel)}  # every conv and the Linear
    assert {e["layout"] for e in entries.values()} == {"bytes"}
    loaded = lowbit.load(net(1), folder)
    _same_outputs(loaded, qmodel, X_NET)
    lowbit.export_onnx(qmodel, tmp_path / "before.onnx", X_NET)
    lowbit.export_onnx(loaded, tmp_path / "after.onnx", X_NET)
    assert (tmp_path / "before.onnx").read_bytes() == (tmp_path / "after.onnx").read_bytes()


@pytest.mark.parametrize("preset", ["w4a16-g32", "w4a16-g128"])
def test_tiny_llama_packs_its_linears_and_keeps_the_tied_head_float(tmp_path, preset, caplog):
    from lowbit.zoo import tiny_llama

    qmodel = lowbit.quantize(tiny_llama(0), None, preset, progress=False)
    with caplog.at_level("INFO", logger="lowbit.persist._packed"):
        folder = lowbit.save(qmodel, tmp_path / "lm", packed=True)
    assert "lm_head.weight stays float in the packed file: tied to model.embed_tokens.weight" in caplog.text
    data = json.loads((folder / "manifest.json").read_text())
    assert data["version"] == manifest.PACKED_VERSION == 3
    assert data["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    projections = {f"{name}.weight" for name in _layers(qmodel) if name.endswith("_proj")}
    assert set(data["packed"]) == projections and len(projections) == 14
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    loaded = lowbit.load(tiny_llama(1), folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still one tensor
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    _same_outputs(loaded, qmodel, ids)


# -- the bytes themselves ----------------------------------------------------------------------
@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (3, True)])
def test_packed_bytes_are_onnx_int4_packing_of_integer_params(tmp_path, bits, symmetric):
    qmodel = lowbit.quantize(mlp(0), None, weight_only(bits, symmetric=symmetric), progress=False)
    folder = lowbit.save(qmodel, tmp_path / "m", packed=True)
    tensors = load_file(folder / "model.safetensors")
    for name, layer in _layers(qmodel).items():
        codes = layer.integer_params().weight.values
        raw = tensors[f"{name}.weight.packed"]
        assert raw.dtype == torch.uint8 and raw.numel() == math.ceil(codes.numel() / 2)
        # ONNX's own INT4 / UINT4 tensor packing (flattened, first element in the low nibble)
        kind = ml_dtypes.int4 if symmetric else ml_dtypes.uint4
        reference = numpy_helper.from_array(codes.numpy().astype(kind)).raw_data
        assert raw.numpy().tobytes() == reference, name
        assert torch.equal(_packed.unpack_codes(raw, tuple(codes.shape), layer.weight_quantizer.spec, name), codes)


def test_int8_codes_are_stored_as_they_are():
    spec = QuantSpec(bits=8, granularity="channel", axis=0)
    codes = torch.tensor([[-128, 0, 127], [5, -6, 7]], dtype=torch.int8)
    assert torch.equal(_packed.pack_codes(codes, spec), codes)
    nibble = QuantSpec(bits=4, signed=False, symmetric=False, granularity="channel", axis=0)
    packed = _packed.pack_codes(torch.tensor([[1, 2, 15]], dtype=torch.uint8), nibble)
    assert packed.tolist() == [0x21, 0x0F]  # 1 low, 2 high; 15 low, padding 0 high


# -- damaged packed tensors --------------------------------------------------------------------
def _saved_w3(tmp_path):
    qmodel = lowbit.quantize(mlp(0), None, weight_only(3, symmetric=True), progress=False)
    return lowbit.save(qmodel, tmp_path / "m", packed=True)


def test_a_truncated_packed_tensor_is_an_error_naming_it(tmp_path):
    folder = _saved_w3(tmp_path)
    _rewrite(folder, lambda t: t.update({"0.weight.packed": t["0.weight.packed"][:-1].clone()}))
    with pytest.raises(ValueError, match=r"packed tensor 0\.weight\.packed is torch.uint8 of shape \(3299,\), but "
                                         r"its weight, int3 sym group\(axis=1, size=128\) of shape \(33, 200\), "
                                         r"packs into 3300 .*truncated or corrupted"):
        lowbit.load(mlp(1), folder)


def test_codes_off_the_grid_and_missing_tensors_are_errors_naming_them(tmp_path):
    folder = _saved_w3(tmp_path)
    _rewrite(folder, lambda t: t["2.weight.packed"].__setitem__(0, 0x77))  # 7 is off the int3 grid [-4, 3]
    with pytest.raises(ValueError, match=r"packed tensor 2\.weight\.packed holds codes in \[-?\d+, 7\], off the "
                                         r"int3 sym .* grid \[-4, 3\] \(corrupted\)"):
        lowbit.load(mlp(1), folder)
    _rewrite(folder, lambda t: t.pop("2.weight.packed"))
    with pytest.raises(ValueError, match=r"the packed weight 2\.weight needs \['2\.weight\.packed'\], which the "
                                         r"file lacks"):
        lowbit.load(mlp(1), folder)


def test_manifest_fields_follow_the_version(tmp_path):
    folder = _saved_w3(tmp_path)
    _rewrite(folder, change_manifest=lambda d: d.update(version=2))  # a version-2 manifest has no packed field
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['packed'\]"):
        lowbit.load(mlp(1), folder)
    _rewrite(folder, change_manifest=lambda d: (d.pop("packed"), d.update(version=3)))
    with pytest.raises(ValueError, match=r"missing field\(s\) \['packed'\]"):
        lowbit.load(mlp(1), folder)
    folder = _saved_w3(tmp_path / "again")
    _rewrite(folder, change_manifest=lambda d: d["packed"]["0.weight"].update(layout="bytes"))
    with pytest.raises(ValueError, match=r"packed entry 0\.weight has dtype 'float32' and layout 'bytes'"):
        lowbit.load(mlp(1), folder)


# -- what stays float --------------------------------------------------------------------------
def test_learned_and_conv_bn_weights_stay_float_and_converted_qat_packs(tmp_path, caplog):
    qat = lowbit.prepare_qat(net(0), "w4a8", X_NET, progress=False)  # LSQ scales, conv-BN layers
    with caplog.at_level("INFO", logger="lowbit.persist._packed"):
        folder = lowbit.save(qat, tmp_path / "qat", packed=True)
    assert json.loads((folder / "manifest.json").read_text())["packed"] == {}
    assert "stem.0.weight stays float in the packed file: its quantizer learns its scale (lsq)" in caplog.text
    loaded = lowbit.load(net(1), folder)
    loaded.eval(), qat.eval()
    _same_outputs(loaded, qat, X_NET)

    fixed = lowbit.prepare_qat(net(0), "w4a8", X_NET, learn=None, progress=False)
    conv_bn = fixed.get_submodule("stem.0")
    assert isinstance(conv_bn, QuantConvBn2d)
    wq = conv_bn.weight_quantizer
    wq.set_qparams(*wq.qparams_for(conv_bn.quantized_weight_source()))  # a static grid on the folded weight
    caplog.clear()
    with caplog.at_level("INFO", logger="lowbit.persist._packed"):
        folder = lowbit.save(fixed, tmp_path / "conv-bn", packed=True)
    assert "stem.0.weight stays float in the packed file: its quantizer sees a transformed weight" in caplog.text
    assert "stem.0.weight" not in json.loads((folder / "manifest.json").read_text())["packed"]

    converted = lowbit.qat.convert(qat)
    folder = lowbit.save(converted, tmp_path / "converted", packed=True)
    entries = json.loads((folder / "manifest.json").read_text())["packed"]
    assert set(entries) == {f"{name}.weight" for name in _layers(converted)}
    _same_outputs(lowbit.load(net(1), folder), converted, X_NET)


# -- the default save is unchanged -------------------------------------------------------------
def test_an_unpacked_save_writes_what_it_wrote_before(tmp_path):
    qmodel = lowbit.quantize(mlp(0), None, weight_only(4, symmetric=True), progress=False)
    default = lowbit.save(qmodel, tmp_path / "default")
    unpacked = lowbit.save(qmodel, tmp_path / "unpacked", packed=False)
    for name in ("model.safetensors", "manifest.json"):
        assert (default / name).read_bytes() == (unpacked / name).read_bytes()
    # the tensors file of the code path before packing existed: split_state, then save_file
    save_file(split_state(qmodel.state_dict())[0], tmp_path / "reference.safetensors",
              metadata={"format": manifest.FORMAT})
    assert (default / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    data = json.loads((default / "manifest.json").read_text())
    assert data["version"] == manifest.VERSION == 2 and "packed" not in data
    with safe_open(default / "model.safetensors", "pt") as f:
        assert f.get_tensor("0.weight").dtype == torch.float32
    assert np.array_equal(load_file(default / "model.safetensors")["0.weight"].numpy(), qmodel[0].weight.detach().numpy())
