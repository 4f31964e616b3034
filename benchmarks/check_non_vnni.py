"""ONNX Runtime on an x86 CPU without VNNI, checked from any x86 machine.

Runs the exported files in ONNX Runtime under ``qemu-x86_64 -cpu EPYC-Milan`` (user-mode
emulation of an AMD EPYC Zen 3: AVX2, no AVX-512, no VNNI), so ORT's MLAS picks the kernels it
picks on such a CPU (``vpmaddubsw``), and compares ORT's outputs with

* ``emulate_ort(qmodel, cpu="x86-avx2")``: lowbit's integer emulation of that arithmetic
  (expected: bit-identical for every target),
* ``emulate_ort(qmodel, cpu="x86-vnni")``: the exact int32 arithmetic (expected: identical
  only for the non-VNNI targets, which cannot saturate),
* the PyTorch simulation (top-1 agreement on MobileNetV2 photos).

Needs ``qemu-user`` (``apt-get install qemu-user``).  Timings under emulation mean nothing
and none are taken.

    python benchmarks/check_non_vnni.py                 # layer cases + MobileNetV2 on 64 photos
    python benchmarks/check_non_vnni.py --photos 256 --skip-layers
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

QEMU_CPU = "EPYC-Milan"


def _run_ort(job: str) -> None:
    """(Under qemu) run every ``<key>.onnx`` of the job folder on its input; save the outputs."""
    import onnxruntime as ort

    data = np.load(job + ".in.npz")
    outs = {}
    for key in data.files:
        session = ort.InferenceSession(os.path.join(os.path.dirname(job), key + ".onnx"),
                                       providers=["CPUExecutionProvider"])
        outs[key] = session.run(None, {session.get_inputs()[0].name: data[key]})[0]
    np.savez(job + ".out.npz", **outs)


def _ort_without_vnni(folder: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    job = os.path.join(folder, "job")
    np.savez(job + ".in.npz", **feeds)
    cmd = ["qemu-x86_64", "-cpu", QEMU_CPU, sys.executable, os.path.abspath(__file__), "--run-ort", job]
    result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if "TCG doesn't support" not in line]
        raise RuntimeError("ORT under qemu failed:\n" + "\n".join(lines[-20:]))
    out = np.load(job + ".out.npz")
    return {key: out[key] for key in out.files}


def _layer_cases():
    import torch
    from torch import nn

    def seq(*layers):
        return nn.Sequential(*layers)

    # Each ends in a Linear (a float-output QGemm): a model may not return a Conv's output.
    yield "Linear (QGemm), K=37", seq(nn.Linear(37, 16), nn.ReLU(), nn.Linear(16, 8)), torch.randn(32, 37)
    yield "3x3 conv, 3 input channels", seq(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)), \
        torch.randn(4, 3, 12, 12)
    yield "3x3 conv stride 2, 16 channels", seq(nn.Conv2d(16, 12, 3, 2, 1), nn.ReLU(), nn.Conv2d(12, 8, 1)), \
        torch.randn(4, 16, 11, 11)
    yield "1x1 conv, 5 channels (odd K)", seq(nn.Conv2d(5, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 3)), \
        2 * torch.randn(4, 5, 9, 9)
    yield "grouped conv (2 groups)", seq(nn.Conv2d(8, 12, 3, groups=2, padding=1), nn.ReLU(), nn.Conv2d(12, 6, 1)), \
        torch.randn(4, 8, 9, 9)
    yield "depthwise conv", seq(nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1)), \
        torch.randn(4, 8, 9, 9)
    yield "depthwise x2 multiplier", seq(nn.Conv2d(8, 16, 3, groups=8, padding=1), nn.ReLU(), nn.Conv2d(16, 6, 1)), \
        torch.randn(4, 8, 9, 9)
    yield "Conv1d dilated", seq(nn.Conv1d(6, 8, 3, dilation=2), nn.ReLU(), nn.Conv1d(8, 4, 1)), torch.randn(4, 6, 20)


def _with_head(model, x):
    from torch import nn

    if isinstance(model[-1], nn.Linear):
        return model
    return nn.Sequential(*model, nn.ReLU(), nn.Flatten(), nn.Linear(model(x)[0].numel(), 5))


def check_layers(targets: list[str]) -> list[str]:
    """Bit-exactness of both emulations against ORT-without-VNNI on small layer cases."""
    import torch

    import lowbit
    from lowbit.runtime import emulate_ort

    torch.manual_seed(0)
    feeds, expect, rows = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model, x) in enumerate(_layer_cases()):
            model = _with_head(model, x)
            with torch.no_grad():  # larger weights than the default init: every layer can saturate
                for p in model.parameters():
                    if p.dim() > 1:
                        p.mul_(3)
            for target in targets:
                qmodel = lowbit.quantize(model, [x], "w8a8", target=target, progress=False)
                key = f"case{i}_{target}"
                lowbit.export_onnx(qmodel, os.path.join(tmp, key + ".onnx"), x[:1])
                feeds[key] = x.numpy()
                with torch.no_grad():
                    expect[key] = (name, target, emulate_ort(qmodel, cpu="x86-avx2")(x),
                                   emulate_ort(qmodel, cpu="x86-vnni")(x))
        got = _ort_without_vnni(tmp, feeds)
    rows.append("| layer | target | emulation (x86-avx2) = ORT | exact int32 = ORT |")
    rows.append("|---|---|---|---|")
    for key, (name, target, avx2, vnni) in expect.items():
        y = torch.from_numpy(got[key])
        rows.append(f"| {name} | {target} | {_same(avx2, y)} | {_same(vnni, y)} |")
    return rows


def _same(a, b) -> str:
    differ = int((a != b).sum())
    return "bit-exact" if differ == 0 else f"{differ} of {b.numel()} outputs differ"


def check_mobilenet(targets: list[str], n_photos: int, n_calib: int) -> list[str]:
    """MobileNetV2 W8A8 per target: simulation and emulation against ORT-without-VNNI on photos."""
    import torch
    from _selection import CALIB_BATCH, EVAL_BATCH, image_batches  # (imported here: not under qemu)

    import lowbit
    from lowbit.report.fidelity import fidelity
    from lowbit.runtime import emulate_ort
    from lowbit.zoo import mobilenet_v2

    model = mobilenet_v2()
    calib = image_batches(n_calib, "calib", CALIB_BATCH)  # bench_ptq's calibration and evaluation photos
    photos = torch.cat(image_batches(n_photos, "eval", EVAL_BATCH))
    with torch.no_grad():
        fp32 = model(photos)
    feeds, expect = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            qmodel = lowbit.quantize(model, calib, "w8a8", target=target, progress=False)
            lowbit.export_onnx(qmodel, os.path.join(tmp, target + ".onnx"), photos[:1])
            feeds[target] = photos.numpy()
            with torch.no_grad():
                expect[target] = (qmodel(photos), emulate_ort(qmodel, cpu="x86-avx2")(photos))
        got = _ort_without_vnni(tmp, feeds)
    rows = [(f"MobileNetV2 W8A8, {n_calib} calibration photos, {n_photos} held-out photos, ORT under qemu "
             f"-cpu {QEMU_CPU} (no VNNI)"), "",
            "| target | top-1 simulation = ORT | emulation (x86-avx2) = ORT | top-1 ORT = FP32 | KL(FP32 ‖ ORT) |",
            "|---|---:|---|---:|---:|"]
    for target, (sim, emu) in expect.items():
        y = torch.from_numpy(got[target])
        vs_fp32 = fidelity(fp32, y)
        rows.append(f"| {target} | {fidelity(sim, y)['top1_agreement']:.1%} | {_same(emu, y)} | "
                    f"{vs_fp32['top1_agreement']:.1%} | {vs_fp32['kl']:.3f} |")
    return rows


def tie_inputs(x, block: int, seed: int = 0):
    """``x`` with half of each ``block`` of its last axis (never the block's largest value) moved onto
    ``(j + 1/2) * amax / 127``: rounding ties of MatMulNBits' int8 activation grid (accuracy_level 4),
    where any other arithmetic than ORT's gives other codes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k = x.shape[-1]
    blocks = torch.nn.functional.pad(x, (0, -k % block)).reshape(*x.shape[:-1], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    ties = (torch.randint(-120, 120, blocks.shape, generator=g).float() + 0.5) * (amax / 127.0)
    move = (torch.rand(blocks.shape, generator=g) < 0.5) & (blocks.abs() < amax)
    return torch.where(move, ties, blocks).reshape(*x.shape[:-1], -1)[..., :k].contiguous()


def _nbits_cases():
    from lowbit.numerics import QuantSpec

    def group(bits, size, symmetric=True):
        return QuantSpec(bits=bits, symmetric=symmetric, granularity="group", axis=1, group_size=size)

    yield "int4 g32, K 96", group(4, 32), 96
    yield "int4 g128, K 160 (ragged last block)", group(4, 128), 160
    yield "int4 g16 affine, K 80", group(4, 16, symmetric=False), 80
    yield "int8 per channel, K 576 (blocks of 64)", QuantSpec(bits=8, granularity="channel", axis=0), 576


def check_matmulnbits() -> list[str]:
    """One MatMulNBits node per case at accuracy_level 4, on inputs full of rounding ties, in ORT
    without VNNI, against ``lowbit.runtime.matmulnbits.int8_blocks`` (the simulation of the file)."""
    import onnx
    import torch
    from torch import nn

    import lowbit
    from lowbit.config import LayerQuant, QuantConfig
    from lowbit.export.llm._linear import prepare, write_linear
    from lowbit.export.llm._writer import GraphWriter
    from lowbit.nn.modules import TensorQuant
    from lowbit.runtime.matmulnbits import int8_blocks

    torch.manual_seed(0)
    feeds, expect = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, spec, k) in enumerate(_nbits_cases()):
            config = QuantConfig(name="t", default=LayerQuant(weight=TensorQuant(spec=spec)))
            layer = lowbit.quantize(nn.Sequential(nn.Linear(k, 48)), None, config, progress=False)[0]
            nb = prepare(layer, "fc")
            for shape in ((2, 5), (1, 1)):
                key = f"nbits{i}_{shape[0]}x{shape[1]}"
                w = GraphWriter()
                x_name = w.input("x", onnx.TensorProto.FLOAT, list(shape) + [k])
                write_linear(w, [("fc", layer, nb)], x_name, "fc", accuracy_level=4, output="y")
                w.output("y", onnx.TensorProto.FLOAT, list(shape) + [48])
                onnx.save(w.model(opset=21, graph_name="t", producer="check", metadata={}),
                          os.path.join(tmp, key + ".onnx"))
                x = tie_inputs(torch.randn(*shape, k), nb.block_size, seed=i)
                feeds[key] = x.numpy()
                with torch.no_grad():
                    expect[key] = (f"{name}, input {shape[0]}x{shape[1]}", layer(int8_blocks(x, nb.block_size)),
                                   layer(x))
        got = _ort_without_vnni(tmp, feeds)
    rows = [(f"MatMulNBits at accuracy_level 4 under qemu -cpu {QEMU_CPU}, inputs on rounding ties "
             "(max |difference| / max |ORT output|)"), "",
            "| case | simulation of the file (int8 blocks) vs ORT | plain simulation vs ORT |", "|---|---:|---:|"]
    for key, (name, emulated, plain) in expect.items():
        y = torch.from_numpy(got[key])
        scale = float(y.abs().max())
        rows.append(f"| {name} | {float((emulated - y).abs().max()) / scale:.1e} | "
                    f"{float((plain - y).abs().max()) / scale:.1e} |")
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--run-ort":
        _run_ort(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="*", default=["x86-vnni", "x86-avx2-u8u8", "x86-avx2-w7"])
    parser.add_argument("--photos", type=int, default=64, help="held-out MobileNetV2 photos")
    parser.add_argument("--calib", type=int, default=64, help="calibration photos")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-mobilenet", action="store_true")
    parser.add_argument("--skip-matmulnbits", action="store_true")
    args = parser.parse_args()
    if shutil.which("qemu-x86_64") is None:
        raise SystemExit("error: qemu-x86_64 not found; apt-get install qemu-user")
    if not args.skip_layers:
        print("\n".join(check_layers(args.targets)), end="\n\n")
    if not args.skip_matmulnbits:
        print("\n".join(check_matmulnbits()), end="\n\n")
    if not args.skip_mobilenet:
        print("\n".join(check_mobilenet(args.targets, args.photos, args.calib)))


if __name__ == "__main__":
    main()
