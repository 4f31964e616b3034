"""Data-parallel QAT with DistributedDataParallel: every rank holds the same scales, and the
run matches single-process training on the global batch.

    torchrun --standalone --nproc-per-node 2 -m lowbit.examples.qat_ddp [--steps 5] [--reference]

Each rank trains a small Conv-BN-ReLU CNN with a residual add on its shard of every global
batch (deterministic synthetic data), in several QAT set-ups (``--scenario``, all by default):

    observe          w8a8, learn=None, no calibration: activations observed (moving average) every step
    lsq-calib        w4a8, LSQ, calibrated on each rank's shard (MSE histograms), merged across ranks
    lsqplus-init     w4a8, LSQ+, no calibration: scales start from the first (global) batch
    observe-step     as ``observe``, observers reduced once per step (sync_observers) instead of the hook
    observe-localbn  as ``observe``, BatchNorm statistics left per rank
    nosync           as ``observe`` with plain DDP only (the negative control: replicas drift apart)

Rank 0 prints, per set-up, how many state-dict entries differ between ranks (bit for bit)
and the time per step; with ``--reference`` also the largest relative difference to one
process training on the whole global batch.  ``--out DIR`` saves each rank's state dicts.
Runs on CPU (gloo) or, where every rank has a GPU, on CUDA (NCCL).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("lowbit.examples.qat_ddp")


@dataclass(frozen=True)
class Scenario:
    name: str
    config: str
    learn: str | None
    calibrate: bool
    # How the ranks are kept in step: "prepare_ddp" (the one call: calibration, BatchNorm, LSQ
    # gradients, observer hook), "step" (the same, but observers reduced once per step with
    # sync_observers(mode="step") instead of the hook), "local-bn" (prepare_ddp without
    # BatchNorm synchronisation), None (plain DDP).
    sync: str | None = "prepare_ddp"


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("observe", "w8a8", None, False),
        Scenario("lsq-calib", "w4a8", "lsq", True),
        Scenario("lsqplus-init", "w4a8", "lsq+", False),
        Scenario("observe-step", "w8a8", None, False, sync="step"),
        Scenario("observe-localbn", "w8a8", None, False, sync="local-bn"),
        Scenario("nosync", "w8a8", None, False, sync=None),
    )
}


class Net(nn.Module):
    """Conv-BN-ReLU, a residual Conv-BN-ReLU block, global pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.body(h)
        return self.fc(torch.flatten(self.pool(h), 1))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net().eval()


def make_data(steps: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` global training batches ``x[t]`` / ``y[t]`` and 2 calibration batches."""
    g = torch.Generator().manual_seed(seed)
    calib = torch.randn(2, batch, 1, 8, 8, generator=g)
    x = torch.randn(steps, batch, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (steps, batch), generator=g)
    return x, y, calib


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of a global batch (the batch size must divide evenly)."""
    if batch.shape[0] % world:
        raise ValueError(f"global batch of {batch.shape[0]} does not split evenly over {world} ranks")
    n = batch.shape[0] // world
    return batch[rank * n:(rank + 1) * n]


def _cpu_state(model: nn.Module) -> dict:
    return {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in model.state_dict().items()}


def train(scenario: Scenario, *, steps: int = 5, batch: int = 16, lr: float = 0.05, seed: int = 0,
          device: str = "cpu", distributed: bool | None = None, shards: int = 2) -> dict:
    """Run one set-up.

    Args:
        distributed: train with DDP over the default process group, each rank on its shard
            of every global batch (None: when one is initialised with more than one rank);
            False: one process on the whole global batches.
        shards: in one process, the calibration batches are cut into this many pieces, so
            it calibrates on the same tensors (same batch shapes) as a run on that many ranks.

    Returns:
        ``init`` (state dict once prepared and synchronised), ``final``, ``losses`` (this
        rank's), ``mismatches`` (state-dict names differing between ranks; [] in one process)
        and ``step_seconds``.
    """
    from lowbit.qat import prepare_qat
    from lowbit.qat.distributed import (
        prepare_ddp,
        replica_mismatches,
        rescale_lsq_gradients,
        sync_batchnorm,
        sync_calibration,
        sync_observers,
    )

    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    x, y, calib = make_data(steps, batch, seed)
    calib_data = None
    if scenario.calibrate:
        pieces = [(rank, world)] if distributed else [(r, shards) for r in range(shards)]
        calib_data = [shard(c, r, n).to(device) for r, n in pieces for c in calib]
    qmodel = prepare_qat(make_model(seed).to(device), scenario.config, calib_data, learn=scenario.learn,
                         progress=False)
    step_sync = distributed and scenario.sync == "step"
    if distributed and scenario.sync in ("prepare_ddp", "local-bn"):
        prepare_ddp(qmodel, sync_bn=scenario.sync == "prepare_ddp")
    elif step_sync:
        sync_calibration(qmodel)
        sync_batchnorm(qmodel)
        rescale_lsq_gradients(qmodel)
    init = _cpu_state(qmodel)
    net = qmodel
    if distributed:
        kwargs = {"device_ids": [torch.cuda.current_device()]} if device.startswith("cuda") else {}
        net = nn.parallel.DistributedDataParallel(qmodel, **_no_buffer_broadcast(), **kwargs)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    losses = []
    start = time.perf_counter()
    for t in range(steps):
        xs, ys = (shard(x[t], rank, world), shard(y[t], rank, world))
        loss = F.cross_entropy(net(xs.to(device)), ys.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step_sync:
            sync_observers(qmodel, mode="step")
        losses.append(loss.item())
    step_seconds = (time.perf_counter() - start) / max(steps, 1)
    mismatches = replica_mismatches(qmodel) if distributed else []
    return {"init": init, "final": _cpu_state(qmodel), "losses": losses, "mismatches": mismatches,
            "step_seconds": step_seconds}


def _no_buffer_broadcast() -> dict:
    """DDP must not copy rank 0's buffers over the others before each forward: the observers
    and BatchNorms are kept identical by lowbit.qat.distributed (and in ``nosync`` the point is
    to see them differ).  torch 2.13 renamed the option."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def compare_states(got: dict, ref: dict) -> dict[str, float]:
    """Largest relative difference ``max|a - b| / max|b|`` per kind of floating-point entry
    (parameters, scales, BatchNorm statistics, observer ranges) between two state dicts."""
    kinds = {"scale": ("scale",), "bn": ("running_mean", "running_var"), "observer": ("min_val", "max_val")}
    out = {k: 0.0 for k in ("param", *kinds)}
    for key, b in ref.items():
        a = got.get(key)
        if not isinstance(b, torch.Tensor) or not b.is_floating_point() or not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape:
            out["shape_mismatch"] = out.get("shape_mismatch", 0.0) + 1
            continue
        rel = float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)) if b.numel() else 0.0
        leaf = key.rsplit(".", 1)[-1]
        kind = next((k for k, leaves in kinds.items() if leaf in leaves), "param")
        out[kind] = max(out[kind], rel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="set-up(s) to run (repeatable; default: all)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", action="store_true",
                        help="rank 0 also trains in one process on the global batches and compares")
    parser.add_argument("--out", help="save each rank's results as OUT/<scenario>.rank<r>.pt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    owns_group = not dist.is_initialized()
    if owns_group:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 1 else "gloo"
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu"
    if str(dist.get_backend()) == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        for name in args.scenario or list(SCENARIOS):
            scenario = SCENARIOS[name]
            result = train(scenario, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, device=device)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                torch.save(result, os.path.join(args.out, f"{name}.rank{rank}.pt"))
            if rank != 0:
                continue
            line = (f"{name:13s} ranks={world} differing entries={len(result['mismatches']):3d} "
                    f"loss={result['losses'][-1]:.4f} {1e3 * result['step_seconds']:.1f} ms/step")
            if args.reference:
                ref = train(scenario, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                            distributed=False, shards=world)
                diff = compare_states(result["final"], ref["final"])
                line += " | vs 1 process: " + " ".join(f"{k}={v:.1e}" for k, v in diff.items())
            print(line, flush=True)
        dist.barrier()
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
