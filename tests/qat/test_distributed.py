"""Data-parallel QAT (lowbit.qat.distributed): two real processes, gloo on CPU.

This file, run as a script (``_worker`` below), is started as 2 processes (gloo, file://
rendezvous: no port needed); together they run:
  * unit checks of the mechanism: each rank feeds its shard of the same global batches to
    quantizers whose observers are synchronised (per-forward hook, per-step reduction,
    calibration merge) and to a QuantConvBn2d with synchronised BatchNorm;
  * ``lowbit.examples.qat_ddp`` (DDP training of a small Conv-BN-ReLU CNN in several QAT
    set-ups), saving each rank's state dicts.
The tests then compare, in this process, rank against rank (must be bit-identical) and the
ranks against one process doing the same on the global batches:

  * observers and calibration: bit-identical to one process (min / max and histogram merges
    are exact; the moving average takes its EMA step towards the merged batch extremes); a
    user-defined observer that merges pair by pair (no ``reductions``) is all-gathered instead;
  * training: not bit-identical, because float sums run in another order (each rank's conv
    and BatchNorm reductions over half the batch, DDP's average of two gradients).  Measured:
    ~2e-7 relative on parameters, scales, BatchNorm and observer state.  Asserted: 1e-5 for
    ``learn=None`` (straight-through: a rounding that flips at a grid boundary because of a
    one-ulp difference barely changes the gradient) and 5e-3 for LSQ, where one such flip
    changes a scale gradient by a whole step: measured up to 1.4e-3 on some seeds.  What
    the synchronisation fixes is larger: without it (or with BatchNorm per rank, or LSQ's
    gradient scale left per rank) the difference is 1e-2 to 1e-1.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowbit.nn.conv_bn import ConvBn2d, QuantConvBn2d
from lowbit.nn.modules import QuantStub, TensorQuant
from lowbit.numerics import UINT8_ACTIVATION, QuantSpec
from lowbit.observers import Observer, make_observer

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD = 2
SEED = 2
STEPS = 4
SCENARIOS = ("observe", "lsq-calib", "lsqplus-init", "nosync")
KINDS = {"minmax": {}, "moving_average": {"averaging_constant": 0.3}, "percentile": {"bins": 256, "percentile": 99.0},
         "mse": {"bins": 256}, "entropy": {"bins": 512}, "pairwise": {}}
SPECS = {"tensor": UINT8_ACTIVATION,
         "channel": QuantSpec(bits=8, signed=False, symmetric=False, granularity="channel", axis=1)}


# -- shared by the worker and the tests -----------------------------------------------------
class PairwiseAbsMax(Observer):
    """A user-defined observer that declares no ``reductions`` but merges pair by pair
    (``_merge_state``): lowbit.qat.distributed all-gathers its state and merges it."""

    kind = "pairwise"

    def __init__(self, spec, name: str = "tensor") -> None:
        super().__init__(spec, name)
        self._add_state("amax", torch.float32)

    def _update(self, rows, first, lo, hi) -> None:
        amax = torch.maximum(-lo, hi)
        self.amax = amax if first else torch.maximum(self.amax, amax)

    def _merge_state(self, other: Observer) -> None:
        self.amax = torch.maximum(self.amax, other.amax)

    def _range_rows(self):
        return -self.amax, self.amax


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Channels with different scales and offsets so per-channel rows differ.
    return [torch.randn(8, 6, 5, generator=g) * torch.arange(1, 7).view(1, 6, 1) + 0.5 for _ in range(n)]


def _stub(kind: str, spec_name: str) -> QuantStub:
    if kind == "pairwise":
        stub = _stub("minmax", spec_name)
        q = stub.input_quantizer
        q.observer = PairwiseAbsMax(SPECS[spec_name], name=q.name)
        return stub
    options = tuple(sorted(KINDS[kind].items()))
    return QuantStub(TensorQuant(spec=SPECS[spec_name], observer=kind, observer_options=options),
                     name=f"{kind}-{spec_name}")


def _stubs(kinds) -> nn.ModuleDict:
    return nn.ModuleDict({f"{k}-{s}": _stub(k, s) for k in kinds for s in SPECS})


def _quantizer_state(stub: QuantStub) -> dict:
    q = stub.input_quantizer
    out = {f"observer.{k}": v.clone() for k, v in q.observer.state_dict().items() if isinstance(v, torch.Tensor)}
    if q.is_frozen:
        out["scale"], out["zero_point"] = q.scale.detach().clone(), q.zero_point.clone()
    return out


def _shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    n = x.shape[0] // WORLD
    return x[rank * n:(rank + 1) * n]


def _bn_layer() -> QuantConvBn2d:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    layer = QuantConvBn2d.from_float(ConvBn2d.from_pair(conv, bn), name="c")  # no quantizers: BN alone
    return layer.train()


def _bn_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 5, 5, generator=g) * 2 + 1, torch.randn(8, 4, 5, 5, generator=g)


def _bn_run(layer: QuantConvBn2d, x: torch.Tensor, g: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * g).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad,
            **{n: p.grad.clone() for n, p in layer.named_parameters()},
            "running_mean": layer.bn.running_mean.clone(), "running_var": layer.bn.running_var.clone()}


# -- the worker (run as `RANK=r WORLD_SIZE=2 python this_file OUT`, one process per rank) ----
def _worker(out: str) -> None:
    from lowbit.examples import qat_ddp
    from lowbit.qat.distributed import attach_observer_sync, sync_batchnorm, sync_observers

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    results: dict = {}

    hooked = _stubs(KINDS).train()
    stepped = _stubs(["minmax", "moving_average"]).train()
    for container in (hooked, stepped):
        for stub in container.values():
            stub.input_quantizer.mode = "observing"
    results["hook_count"] = attach_observer_sync(hooked)
    for x in _batches(3, seed=0):
        for stub in [*hooked.values(), *stepped.values()]:
            stub(_shard(x, rank))
        sync_observers(stepped, mode="step")
    results["hook"] = {k: _quantizer_state(s) for k, s in hooked.items()}
    results["step"] = {k: _quantizer_state(s) for k, s in stepped.items()}

    # Calibration on uneven shards: rank 0 sees batches 0 and 1, rank 1 batch 2; the "lonely"
    # quantizer sees data on rank 0 only.  All reduced by one sync_observers call.
    merged = _stubs(KINDS).eval()
    merged["lonely"] = _stub("minmax", "tensor")
    for stub in merged.values():
        stub.input_quantizer.mode = "calibrating"
    batches = _batches(3, seed=1)
    for x in (batches[:2] if rank == 0 else batches[2:]):
        for key, stub in merged.items():
            if key != "lonely" or rank == 0:
                stub(x)
    results["merge_count"] = sync_observers(merged, mode="merge")
    results["merge"] = {k: _quantizer_state(s) for k, s in merged.items()}

    # Misuse is reported on every rank alike (no rank left waiting in a collective).
    errors = {}
    differing = _stubs(["minmax"]).eval()
    for stub in differing.values():
        stub.input_quantizer.mode = "calibrating"
        stub(_shard(batches[0], rank))
    for label, call in (("attach", lambda: attach_observer_sync(differing)),
                        ("step_histogram", lambda: sync_observers(merged, mode="step")),
                        ("modes", lambda: _calibrate_with_modes(rank))):
        try:
            call()
            errors[label] = None
        except (RuntimeError, ValueError) as exc:
            errors[label] = type(exc).__name__
    results["errors"] = errors

    layer = _bn_layer()
    sync_batchnorm(layer)
    x, g = _bn_data()
    bn = _bn_run(layer, _shard(x, rank), _shard(g, rank))
    for key in ("weight", "bias", "bn.weight", "bn.bias"):  # DDP would average; sum = the global loss's gradient
        dist.all_reduce(bn[key])
    results["batchnorm"] = bn
    torch.save(results, os.path.join(out, f"unit.rank{rank}.pt"))

    qat_ddp.main(["--out", out, "--steps", str(STEPS), "--seed", str(SEED),
                  *[a for s in SCENARIOS for a in ("--scenario", s)]])
    dist.destroy_process_group()


def _calibrate_with_modes(rank: int) -> None:
    """A quantizer disabled on rank 1 only (its shard never reached it) but calibrated on rank 0."""
    from lowbit.qat.distributed import sync_calibration

    stub = _stub("minmax", "tensor")
    stub.input_quantizer.mode = "calibrating"
    if rank == 0:
        stub(_batches(1, seed=3)[0])
        stub.input_quantizer.freeze()
    else:
        stub.input_quantizer.mode = "disabled"
    sync_calibration(nn.ModuleDict({"stub": stub}))


# -- the tests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """Run the worker as 2 processes once (gloo, file:// rendezvous); the folder holding what
    each rank saved."""
    out = tmp_path_factory.mktemp("ddp")
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    failed = []
    for rank, proc in enumerate(procs):
        try:
            log, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} did not finish in 300 s")
        if proc.returncode != 0:
            failed.append(f"rank {rank} exited with {proc.returncode}:\n{log[-5000:]}")
    if failed:
        pytest.fail("\n".join(failed))
    return out


def _load(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key, value in b.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(a[key], value), f"{where}: {key} differs: {a[key]} vs {value}"
        else:
            assert a[key] == value, f"{where}: {key}"


def _single_observe(kind: str, spec_name: str, batches, *, training: bool) -> QuantStub:
    stub = _stub(kind, spec_name).train(training)
    stub.input_quantizer.mode = "observing" if training else "calibrating"
    for x in batches:
        stub(x)
    return stub


def test_observer_hook_folds_the_global_batch_on_every_rank_exactly(ranks):
    unit = _load(ranks, "unit")
    assert unit[0]["hook_count"] == len(KINDS) * len(SPECS)
    for key, state in unit[0]["hook"].items():
        _assert_same(unit[1]["hook"][key], state, f"rank 1 vs 0, {key}")
        kind, spec_name = key.split("-")
        ref = _quantizer_state(_single_observe(kind, spec_name, _batches(3, seed=0), training=True))
        _assert_same(state, ref, f"hooked {key} vs one process on the global batches")


def test_per_step_sync_equals_global_batch_observation_for_min_max_and_moving_average(ranks):
    unit = _load(ranks, "unit")
    for key, state in unit[0]["step"].items():
        _assert_same(unit[1]["step"][key], state, f"rank 1 vs 0, {key}")
        kind, spec_name = key.split("-")
        ref = _quantizer_state(_single_observe(kind, spec_name, _batches(3, seed=0), training=True))
        _assert_same(state, ref, f"step-synced {key} vs one process")


def test_calibration_merge_has_observer_merge_semantics_across_uneven_shards(ranks):
    unit = _load(ranks, "unit")
    assert unit[0]["merge_count"] == unit[1]["merge_count"] == len(KINDS) * len(SPECS) + 1
    batches = _batches(3, seed=1)
    for key, state in unit[0]["merge"].items():
        _assert_same(unit[1]["merge"][key], state, f"rank 1 vs 0, {key}")
        if key == "lonely":
            ref = _single_observe("minmax", "tensor", batches[:2], training=False)
        else:
            kind, spec_name = key.split("-")
            if kind == "moving_average":  # the mean of the two ranks' averages (Observer.merge)
                ref = _single_observe(kind, spec_name, batches[:2], training=False)
                ref.input_quantizer.observer.merge(_single_observe(kind, spec_name, batches[2:],
                                                                   training=False).input_quantizer.observer)
            else:  # min / max and histograms merge exactly: one observer that saw every batch
                ref = _single_observe(kind, spec_name, batches, training=False)
        _assert_same(state, _quantizer_state(ref), f"merged {key} vs one process")


def test_misuse_raises_the_same_error_on_every_rank(ranks):
    unit = _load(ranks, "unit")
    expected = {"attach": "RuntimeError", "step_histogram": "ValueError", "modes": "RuntimeError"}
    assert unit[0]["errors"] == unit[1]["errors"] == expected


def test_synced_batchnorm_is_batchnorm_of_the_global_batch(ranks):
    unit = _load(ranks, "unit")
    x, g = _bn_data()
    ref = _bn_run(_bn_layer(), x, g)
    for rank, res in enumerate(unit):
        bn = res["batchnorm"]
        for key in ("y", "x_grad"):  # this rank's shard of the output and of the input gradient
            torch.testing.assert_close(bn[key], _shard(ref[key], rank), rtol=1e-5, atol=1e-5)
        for key in ("weight", "bias", "bn.weight", "bn.bias", "running_mean", "running_var"):
            torch.testing.assert_close(bn[key], ref[key], rtol=1e-5, atol=1e-5)
    _assert_same(unit[1]["batchnorm"] | {"y": 0, "x_grad": 0}, unit[0]["batchnorm"] | {"y": 0, "x_grad": 0},
                 "rank 1 vs 0 (parameters' gradients and running statistics)")


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "nosync"])
def test_ddp_qat_replicas_stay_bitwise_identical(ranks, scenario):
    res = _load(ranks, scenario)
    assert res[0]["mismatches"] == res[1]["mismatches"] == []  # replica_mismatches, inside the run
    for part in ("init", "final"):
        _assert_same(res[1][part], res[0][part], f"{scenario} {part}: rank 1 vs rank 0")
    final = res[0]["final"]
    assert any(k.endswith("min_val") for k in final) or scenario != "observe"
    assert any(k.endswith("running_var") for k in final)
    assert res[0]["losses"] != res[1]["losses"]  # the ranks did train on different shards


def test_calibration_on_shards_then_sync_equals_one_process_calibrating_on_all(ranks):
    from lowbit.examples import qat_ddp

    ref = qat_ddp.train(qat_ddp.SCENARIOS["lsq-calib"], steps=0, seed=SEED, distributed=False, shards=WORLD)
    _assert_same(_load(ranks, "lsq-calib")[0]["init"], ref["init"], "calibrated on 2 shards vs 1 process")


@pytest.mark.parametrize("scenario,rtol", [("observe", 1e-5), ("lsq-calib", 5e-3), ("lsqplus-init", 5e-3)])
def test_ddp_qat_matches_single_process_training_on_the_global_batch(ranks, scenario, rtol):
    from lowbit.examples import qat_ddp

    ref = qat_ddp.train(qat_ddp.SCENARIOS[scenario], steps=STEPS, seed=SEED, distributed=False, shards=WORLD)
    diff = qat_ddp.compare_states(_load(ranks, scenario)[0]["final"], ref["final"])
    assert "shape_mismatch" not in diff
    assert max(diff.values()) <= rtol, diff
    assert min(ref["losses"]) < ref["losses"][0] or scenario != "observe"


def test_without_synchronisation_the_replicas_drift_apart(ranks):
    """The negative control: plain DDP (broadcast_buffers=False) keeps parameters identical,
    but observers and BatchNorm statistics follow each rank's shard."""
    from lowbit.examples import qat_ddp

    res = _load(ranks, "nosync")
    differing = res[0]["mismatches"]
    assert any(k.endswith(("min_val", "max_val")) for k in differing), differing
    assert any(k.endswith("running_var") for k in differing), differing
    ref = qat_ddp.train(qat_ddp.SCENARIOS["nosync"], steps=STEPS, seed=SEED, distributed=False, shards=WORLD)
    assert max(qat_ddp.compare_states(res[0]["final"], ref["final"]).values()) > 1e-3


# -- in one process ---------------------------------------------------------------------------
def test_hooks_survive_deepcopy_and_are_dropped_by_pickling():
    from lowbit.qat.distributed import BatchNormSync, ObserverSync, detach_sync

    layer = _bn_layer()
    layer.bn_sync = BatchNormSync(None)
    stub = _stub("minmax", "tensor")
    stub.input_quantizer.observe_hook = ObserverSync(None)
    model = nn.ModuleDict({"layer": layer, "stub": stub})
    twin = copy.deepcopy(model)  # what convert() and export do
    assert twin["layer"].bn_sync is layer.bn_sync and twin["stub"].input_quantizer.observe_hook is not None
    restored = pickle.loads(pickle.dumps(model))
    assert restored["layer"].bn_sync is None and restored["stub"].input_quantizer.observe_hook is None
    assert isinstance(layer.to_quant_conv(), nn.Conv2d) and "bn_sync" not in layer.to_quant_conv().__dict__
    assert detach_sync(model) == 2 and layer.bn_sync is None and stub.input_quantizer.observe_hook is None


def test_without_a_process_group_the_functions_say_what_to_do():
    from lowbit.qat.distributed import prepare_ddp

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        prepare_ddp(nn.ModuleDict({"stub": _stub("minmax", "tensor")}))


def test_default_path_has_no_hooks():
    """Without lowbit.qat.distributed nothing changes: the hooks default to None."""
    stub = _stub("minmax", "tensor").train()
    stub.input_quantizer.mode = "observing"
    x = _batches(1, seed=0)[0]
    stub(x)
    assert stub.input_quantizer.observe_hook is None and _bn_layer().bn_sync is None
    ref = make_observer("minmax", UINT8_ACTIVATION)
    ref(x)
    torch.testing.assert_close(stub.input_quantizer.scale, ref.qparams()[0], rtol=0, atol=0)


if __name__ == "__main__":
    _worker(sys.argv[1])
