"""fake_quantize forward+backward: lowbit vs torch's fused fake-quant ops, same process.

Cases (from the foundation issue):
  * a 4096x4096 weight, int8 symmetric per output channel;
  * a 32x4096 activation, uint8 affine per tensor;
and the learned-scale (LSQ) variants against torch's ``_fake_quantize_learnable_*``.
Each timing is the median of ``--repeats`` forward+backward passes after warm-up.
The ratio is lowbit / torch: below 1.0 means lowbit is faster.

    python benchmarks/bench_fake_quant.py [--repeats 20] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lowbit.numerics import INT8_WEIGHT, UINT8_ACTIVATION, compute_qparams, fake_quantize, tensor_minmax
from lowbit.numerics.spec import QuantSpec


def median_ms(step, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def case(shape: tuple[int, ...], spec: QuantSpec, learned: bool):
    """(lowbit's step, torch's step): forward + backward of a random ``shape`` tensor on ``spec``'s
    grid, its range from min-max; with ``learned``, the scale gets a gradient too (LSQ)."""
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn_like(x)
    scale, zp = compute_qparams(*tensor_minmax(x, spec), spec)
    s = scale.clone().requires_grad_(learned)

    def ours():
        fake_quantize(x, s, zp, spec, learned=learned).backward(grad)

    qmin, qmax = spec.qmin, spec.qmax
    per_channel = spec.granularity == "channel"
    if learned:
        zf = zp.float()
        if per_channel:
            return ours, lambda: torch._fake_quantize_learnable_per_channel_affine(
                x, s, zf, 0, qmin, qmax, 1.0).backward(grad)
        s1, z1 = s.reshape(1), zf.reshape(1)
        return ours, lambda: torch._fake_quantize_learnable_per_tensor_affine(
            x, s1, z1, qmin, qmax, 1.0).backward(grad)
    if per_channel:
        return ours, lambda: torch.fake_quantize_per_channel_affine(x, scale, zp, 0, qmin, qmax).backward(grad)
    return ours, lambda: torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax).backward(grad)


WEIGHT, ACTIVATION = ((4096, 4096), INT8_WEIGHT), ((32, 4096), UINT8_ACTIVATION)
CASES = {  # label: (shape, spec, learned, torch's peer)
    "weight 4096x4096 int8 per-channel, STE": (*WEIGHT, False, "fake_quantize_per_channel_affine"),
    "activation 32x4096 uint8 per-tensor, STE": (*ACTIVATION, False, "fake_quantize_per_tensor_affine"),
    "weight 4096x4096 int8 per-channel, LSQ": (*WEIGHT, True, "_fake_quantize_learnable_per_channel_affine"),
    "activation 32x4096 uint8 per-tensor, LSQ": (*ACTIVATION, True, "_fake_quantize_learnable_per_tensor_affine"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    rows = []
    for label, (shape, spec, learned, peer) in CASES.items():
        ours, theirs = case(shape, spec, learned)
        repeats = args.repeats if "weight" in label else args.repeats * 20
        # Interleave the two so drift in machine load hits both alike.
        t_ours, t_theirs = [], []
        for _ in range(3):
            t_ours.append(median_ms(ours, repeats))
            t_theirs.append(median_ms(theirs, repeats))
        ms_ours, ms_theirs = min(t_ours), min(t_theirs)
        rows.append({"case": label, "peer": f"torch.{peer}", "lowbit_ms": ms_ours, "torch_ms": ms_theirs,
                     "ratio": ms_ours / ms_theirs})

    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}")
    print("| case (forward+backward) | torch peer | lowbit ms | torch ms | lowbit / torch |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | `{r['peer']}` | {r['lowbit_ms']:.3f} | {r['torch_ms']:.3f} | {r['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
