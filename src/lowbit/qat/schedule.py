"""QAT schedules: freeze observers, freeze BatchNorm, unfreeze layer groups in stages.

Call ``schedule.step()`` once per optimizer step, as with a learning-rate scheduler; the
schedule's position is part of its ``state_dict`` so a resumed run continues where it was.

    sched = QATSchedule(qmodel, freeze_observers_after=500, freeze_bn_after=800)
    for x, y in loader:
        loss_fn(qmodel(x), y).backward(); opt.step(); opt.zero_grad(); sched.step()
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

from torch import nn

from ..nn.conv_bn import QuantConvBn2d
from ..nn.quantizer import Quantizer

log = logging.getLogger(__name__)


def freeze_observers(model: nn.Module) -> int:
    """Fix every observing quantizer's range where it is (learnable ones start learning from
    it).  Returns how many were frozen."""
    n = 0
    for q in model.modules():
        if isinstance(q, Quantizer) and q.mode == "observing" and q.observer.has_data:
            q.freeze()
            n += 1
    return n


def freeze_bn(model: nn.Module) -> int:
    """Make every QAT conv-BN layer use (and stop updating) its running statistics.
    Returns how many were frozen."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantConvBn2d) and not m.bn_frozen:
            m.bn_frozen = True
            n += 1
    return n


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class QATSchedule:
    """Steps at which the QAT state changes.

    Args:
        model: the prepared model.
        freeze_observers_after: after this many steps, fix observed ranges (None: never).
        freeze_bn_after: after this many steps, BatchNorm uses its running statistics.
        stages: groups of module-name globs trained in order ("progressively unfreeze"):
            during stage k the parameters of groups 0..k train and those of later groups
            are frozen; modules no group matches always train.
        steps_per_stage: steps in each stage (needed with ``stages``).
        frozen: module-name globs whose parameters never train (embeddings, norms).  For one
            module, ``frozen`` wins over ``stages``; a submodule matched by a pattern of its own
            decides for its own parameters (modules are visited parents first), so a quantizer
            inside a frozen layer still learns its scale when a stage names it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        freeze_observers_after: int | None = None,
        freeze_bn_after: int | None = None,
        stages: Sequence[Sequence[str]] = (),
        steps_per_stage: int | None = None,
        frozen: Sequence[str] = (),
    ) -> None:
        for label, v in (("freeze_observers_after", freeze_observers_after), ("freeze_bn_after", freeze_bn_after),
                         ("steps_per_stage", steps_per_stage)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"QATSchedule: {label} must be a non-negative int or None, got {v!r}")
        if stages and not steps_per_stage:
            raise ValueError("QATSchedule: stages need steps_per_stage > 0")
        self.model = model
        self.freeze_observers_after = freeze_observers_after
        self.freeze_bn_after = freeze_bn_after
        self.stages = [list(group) for group in stages]
        self.steps_per_stage = steps_per_stage
        self.frozen = list(frozen)
        names = [name for name, _ in model.named_modules()]
        for label, group in [*(("stage", g) for g in self.stages), ("frozen", self.frozen)]:
            for pattern in group:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise ValueError(f"QATSchedule: {label} pattern {pattern!r} matches no module of the model")
        self.steps = 0
        self._apply()

    @property
    def stage(self) -> int:
        if not self.stages:
            return 0
        return min(self.steps // self.steps_per_stage, len(self.stages) - 1)

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.steps += 1
        self._apply()

    def _apply(self) -> None:
        due_observers = self.freeze_observers_after is not None and self.steps >= self.freeze_observers_after
        if due_observers and freeze_observers(self.model):
            log.info("QAT step %d: observers frozen", self.steps)
        due_bn = self.freeze_bn_after is not None and self.steps >= self.freeze_bn_after
        if due_bn and freeze_bn(self.model):
            log.info("QAT step %d: BatchNorm statistics frozen", self.steps)
        if self.stages or self.frozen:
            self._set_trainable()

    def _set_trainable(self) -> None:
        later = [p for group in self.stages[self.stage + 1:] for p in group]
        active = [p for group in self.stages[: self.stage + 1] for p in group]
        for name, module in self.model.named_modules():
            if _matches(name, self.frozen):
                trainable = False
            elif _matches(name, active):
                trainable = True
            elif _matches(name, later):
                trainable = False
            else:
                continue
            for p in module.parameters():
                p.requires_grad_(trainable)

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self._apply()
