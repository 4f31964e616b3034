"""SmoothQuant's pair discovery and exactness probes (the method: ``smooth.py``'s docstring).

* ``observe``: one pass over the calibration data with hooks.  Linears that read one tensor
  form a ``Group`` with that tensor's producer (matched by identity; weakrefs tell a reused
  ``id``) and its running per-channel max |x|.
* ``reference``: the first batch (cut to ``PROBE_ITEMS`` items where it slices) run once
  more, recording the model output and every norm / Linear output's per-channel mean |x|.
* ``probe``: random scales folded into a group's producer must scale the group's input by
  exactly ``1 / s`` and leave every other norm / Linear output and the model output as
  recorded; the parameters are put back bit for bit.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.walk import run_model

NORMS = (nn.LayerNorm, nn.RMSNorm)  # exact types: a subclass may change forward
PROBE_ITEMS = 4  # probes run on this many items of the first batch (where it slices)
RTOL = 1e-3  # probes and the final check: largest output change allowed (per channel, relative)


@contextlib.contextmanager
def _removing(handles: list):
    """Remove the hook ``handles`` on exit."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _channel_abs(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).abs().float()  # (tokens, C)


def _floor(ref: torch.Tensor) -> float:
    """1e-3 of max |ref|: no channel's change is judged against less (an outlier channel would
    hide a change of the others from a comparison against the overall max)."""
    return max(1e-3 * float(ref.abs().max()), 1e-30) if ref.numel() else 1e-30


# -- one pass over the data: groups, producers, per-channel maxima ----------------------------
@dataclass
class Group:
    """Linears (``consumers``) that read one activation tensor of ``channels`` channels."""

    consumers: list[str]
    channels: int
    source: str | None = None  # norm or Linear whose output *is* the input (first batch)
    producer: str | None = None  # source, or else the Linear that ran last with C outputs
    amax: torch.Tensor | None = None  # (C,) max |x| per channel over all batches
    mean_abs: torch.Tensor | None = None  # (C,) mean |x| per channel on the probe batch
    problem: str = ""  # why the group cannot be smoothed at all


def _lookup(table: dict, x: torch.Tensor) -> str | None:
    entry = table.get(id(x))  # ids are reused once a tensor dies: the weakref tells
    return entry[0] if entry is not None and entry[1]() is x else None


class Observer:
    """Hooks that group Linears by input tensor, find its producer and keep its maxima."""

    def __init__(self, model: nn.Module, skip: Iterable[nn.Module] = ()) -> None:
        skipped = {id(m) for m in skip}
        modules = list(model.named_modules())
        self.linears = {n: m for n, m in modules if type(m) is nn.Linear and id(m) not in skipped}
        self.producers = {n: m for n, m in modules if type(m) in NORMS} | self.linears
        self.groups: dict[str, Group] = {}  # key: the group's first consumer
        self.group_of: dict[str, str] = {}
        self.problems: dict[str, str] = {}  # consumer -> why its group cannot be smoothed
        self.batch = 0
        self.ran: list[str] = []  # Linears in the order they returned, first batch
        self._outputs: dict[int, tuple[str, weakref.ref]] = {}  # id -> producer, output (this batch)
        self._inputs: dict[int, tuple[str, weakref.ref]] = {}  # id -> first reader, tensor (this batch)
        self._calls: Counter[str] = Counter()

    def end_batch(self) -> None:
        for name, calls in self._calls.items():
            if calls > 1:
                self.problems[name] = f"{name} runs {calls} times per forward (shared layer)"
        self.batch += 1
        self._outputs, self._inputs, self._calls = {}, {}, Counter()

    def hooks(self):
        """Context manager: the hooks, in place while it is entered."""
        handles = [m.register_forward_pre_hook(self._pre_hook(n)) for n, m in self.linears.items()]
        handles += [m.register_forward_hook(self._post_hook(n)) for n, m in self.producers.items()]
        return _removing(handles)

    def _post_hook(self, name: str):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                self._outputs[id(out)] = (name, weakref.ref(out))
            if self.batch == 0 and name in self.linears:
                self.ran.append(name)
        return hook

    def _pre_hook(self, name: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                self.problems[name] = f"{name} is called without a positional tensor input"
                return
            x = args[0]
            self._calls[name] += 1
            key = _lookup(self._inputs, x)  # another Linear already read this very tensor?
            if key is None:
                key = name
                self._inputs[id(x)] = (name, weakref.ref(x))
            if self.batch == 0 and name not in self.group_of:
                self._join(name, key, _lookup(self._outputs, x))
            if self.group_of.get(name) != key:
                self.problems[name] = f"{name} shares its input with other layers differently across batches"
            elif key == name:  # the group's first reader: producer check and statistics, once
                group = self.groups[name]
                if _lookup(self._outputs, x) != group.source:
                    self.problems[name] = f"the producer of {name}'s input differs between batches"
                amax = _channel_abs(x).amax(0)
                if not torch.isfinite(amax).all():
                    raise ValueError(f"the input of {name} holds NaN or inf; check the calibration data")
                group.amax = amax if group.amax is None else torch.maximum(group.amax, amax)
        return hook

    def _join(self, name: str, key: str, source: str | None) -> None:
        self.group_of[name] = key
        if key != name:
            self.groups[key].consumers.append(name)
            return
        channels = self.linears[name].in_features
        last = next((n for n in reversed(self.ran) if self.linears[n].out_features == channels), None)
        self.groups[name] = Group([name], channels, source=source, producer=source or last)


def observe(model: nn.Module, calib_data: Iterable, skip: Iterable[nn.Module] = ()) -> tuple[Observer, object]:
    """One pass with hooks on every norm and every ``nn.Linear`` but those in ``skip``.
    Returns (observer, first batch)."""
    observer, first = Observer(model, skip), None
    with observer.hooks():
        for batch in calib_data:
            try:
                run_model(model, batch)
            except ValueError as exc:
                raise ValueError(f"smooth_quant: calibration batch {observer.batch}: {exc}") from exc
            except Exception as exc:
                raise RuntimeError(f"smooth_quant: calibration batch {observer.batch} failed "
                                   f"in the model: {exc}") from exc
            first = batch if observer.batch == 0 else first
            observer.end_batch()
    if observer.batch == 0:
        raise ValueError("smooth_quant: calibration data is empty; give at least one batch of model inputs")
    for name, why in observer.problems.items():
        if name in observer.group_of:
            observer.groups[observer.group_of[name]].problem = why
    return observer, first


# -- the reference run, and comparing against it -----------------------------------------------
def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple/list, dict or HF ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for item in obj for t in _tensors(item)] if isinstance(obj, (tuple, list)) else []


def output_change(out, ref: list[torch.Tensor]) -> float:
    """Largest |out - ref| of a model output against the ``ref`` tensors, relative to its
    channel's (last dim) max |ref|, floored at 1e-3 of the tensor's max (``_floor``)."""
    worst = 0.0
    for a, b in zip(_tensors(out), ref, strict=True):
        if a.shape != b.shape or not torch.is_floating_point(b):
            worst = max(worst, 0.0 if a.shape == b.shape and torch.equal(a, b) else float("inf"))
        elif b.numel():
            channels = b.shape[-1] if b.dim() else 1
            a, b = a.detach().float().reshape(-1, channels), b.float().reshape(-1, channels)
            scale = b.abs().amax(0).clamp(min=_floor(b))  # (C,)
            worst = max(worst, float(((a - b).abs() / scale).max()))
    return worst


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Per-channel statistics ``a`` vs ``b`` (C,) beyond RTOL of each channel (floored at 1e-3 of
    the largest)."""
    return a.shape != b.shape or bool(((a - b).abs() > RTOL * b.abs().clamp(min=_floor(b))).any())


def _probe_batch(batch):
    """The first PROBE_ITEMS items of every tensor in ``batch`` (tensor, tuple/list or dict), or
    the batch itself when its tensors do not share one leading size above that."""
    if isinstance(batch, dict):
        items = list(batch.values())
    else:
        items = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    sizes = {t.shape[0] if t.dim() else 0 for t in items if isinstance(t, torch.Tensor)}
    if len(sizes) != 1 or sizes.pop() <= PROBE_ITEMS:
        return batch
    cut = [t[:PROBE_ITEMS] if isinstance(t, torch.Tensor) else t for t in items]
    if isinstance(batch, dict):
        return dict(zip(batch, cut, strict=True))
    return type(batch)(cut) if isinstance(batch, (tuple, list)) else cut[0]


@dataclass
class ProbeData:
    """What probes compare against: the reference run on the probe batch."""

    batch: object  # the first calibration batch, cut to PROBE_ITEMS items where it slices
    out: list[torch.Tensor]  # the model's output tensors on it
    stats: dict[str, torch.Tensor]  # norm / Linear -> (C,) mean |output| per channel, first call


def reference(model: nn.Module, first, observer: Observer) -> ProbeData:
    """Run the probe batch once, recording what probes compare against (and each group's
    ``mean_abs``)."""
    groups = [g for g in observer.groups.values() if not g.problem]
    stats: dict[str, torch.Tensor] = {}

    def keep_input(group):
        def hook(module, args):
            group.mean_abs = _channel_abs(args[0]).mean(0) if group.mean_abs is None else group.mean_abs
        return hook

    def keep_output(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor) and name not in stats:
                stats[name] = _channel_abs(out).mean(0)
        return hook

    cut = _probe_batch(first)
    for batch in [first] if cut is first else [cut, first]:  # the cut batch, else the whole one
        stats.clear()
        for g in groups:
            g.mean_abs = None
        handles = [observer.linears[g.consumers[0]].register_forward_pre_hook(keep_input(g)) for g in groups]
        handles += [m.register_forward_hook(keep_output(n)) for n, m in observer.producers.items()]
        try:
            with _removing(handles):
                result = run_model(model, batch)
            break
        except Exception:  # a model that rejects the cut batch: probe on the whole one
            if batch is first:
                raise
    out = [t.detach().clone() for t in _tensors(result)]
    if not out:
        raise TypeError(f"smooth_quant compares model outputs, but a {type(result).__name__} holds no tensor "
                        "it can find; wrap the model so that it returns tensors, a tuple or a dict of them")
    return ProbeData(batch, out, dict(stats))


# -- probing a pair ----------------------------------------------------------------------------
def fold(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """1/s into the producer (norm weight and bias, or Linear output rows and bias), s into the
    consumers' input columns. In place."""
    with torch.no_grad():
        producer.weight.div_(s.to(producer.weight).view(-1, *[1] * (producer.weight.dim() - 1)))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias))
        for c in consumers:
            c.weight.mul_(s.to(c.weight))


@contextlib.contextmanager
def _restoring(modules: list[nn.Module]):
    """Put back every parameter of ``modules`` on exit, bit for bit."""
    saved = [(p, p.detach().clone()) for m in modules for p in m.parameters(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


class _Refused(Exception):
    """Raised by a probe's hook to stop the forward once the verdict is known."""


def probe(model: nn.Module, data: ProbeData, group: Group, producers: dict[str, nn.Module],
          gen: torch.Generator) -> str:
    """Fold random scales in e^-2..e^2 into ``group.producer``: "" when the consumers' input is
    scaled by exactly 1/s and every other norm / Linear output and the model output stay the
    same, else why not. The parameters are put back exactly."""
    name, producer = group.producer, producers[group.producer]
    consumers = [producers[c] for c in group.consumers]
    s = torch.empty(group.channels).uniform_(-2.0, 2.0, generator=gen).exp()
    checked: set[str] = set()

    def check_input(module, args):
        if group.consumers[0] not in checked:
            checked.add(group.consumers[0])
            if _differs(_channel_abs(args[0]).mean(0) * s.to(args[0].device), group.mean_abs):
                raise _Refused(f"the path from {name} is not linear per channel "
                               "(an activation or norm between)")

    def check_output(other):
        def hook(module, args, out):
            if other == name or other in checked or other not in data.stats or not torch.is_tensor(out):
                return
            checked.add(other)
            if _differs(_channel_abs(out).mean(0), data.stats[other]):
                raise _Refused(f"{name}'s output also feeds other ops (e.g. a residual add): "
                               f"folding changes the output of {other}")
        return hook

    handles = [consumers[0].register_forward_pre_hook(check_input)]
    handles += [m.register_forward_hook(check_output(n)) for n, m in producers.items()]
    try:
        with _removing(handles), _restoring([producer, *consumers]):
            fold(producer, consumers, s)
            out = run_model(model, data.batch)
    except _Refused as refused:
        return str(refused)
    if group.consumers[0] not in checked:
        return f"{group.consumers[0]} did not run on the probe batch"
    change = output_change(out, data.out)
    return f"{name}'s output also feeds other ops: folding changes the model output by {change:.2g}" \
        if change > RTOL else ""
