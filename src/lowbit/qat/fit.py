"""fit: a small reference training loop for QAT, for the CLI and the examples.

Your own loop works as well (``prepare_qat`` returns a plain ``nn.Module``); this one adds
what a QAT fine-tune usually needs and is tedious to get right:

* a fine-tuning default optimizer: AdamW at lr 1e-4 over ``param_groups`` (no weight decay
  on quantizer scales / zero-points, biases or norms; zero-points at a rate in grid units);
* optional distillation from the FP32 model (KL on the logits, mixed with the task loss);
* ``QATSchedule.step()`` after every optimizer step;
* checkpoints that resume bit-identically: the data order of an epoch depends only on
  ``(seed, epoch)``, and a resumed run skips exactly the batches already consumed;
* a loss or gradient that goes NaN/Inf stops the run, naming the step, before the
  optimizer step, and the last good checkpoint is never overwritten;
* TensorBoard logging (``monitor.Monitor``): loss, lr, metric and, with ``figures``, the
  per-layer figures of ``lowbit.report.layers``; tqdm progress bars.

    result = lowbit.qat.fit(qmodel, train_batches, F.cross_entropy, epochs=3, teacher=model,
                            checkpoint_dir="runs/qat", log_dir="runs/qat/tb", figures=lowbit.report.layers)
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..ptq import run_model
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .distill import distillation_loss
from .monitor import LayerFigures
from .optim import param_groups

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"  # the last good state in checkpoint_dir, replaced atomically


@dataclass
class FitResult:
    """What ``fit`` did.

    Attributes:
        steps: optimizer steps done in total (a resumed run counts the earlier ones too).
        epochs: epochs completed.
        final_loss: the training loss of the last step (None when no step ran).
        metrics: ``eval_fn(model)`` after each completed epoch.
        resumed_from: the step of the checkpoint this run continued from, or None.
        checkpoint: the checkpoint file, when ``checkpoint_dir`` was given.
    """

    steps: int
    epochs: int
    final_loss: float | None
    metrics: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    checkpoint: Path | None = None


def _default_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``param_groups``: decay on weight matrices / kernels only, learned scales at
    ``lr``, LSQ+ zero-points at the matching rate in integer units."""
    return torch.optim.AdamW(param_groups(model, lr, weight_decay=weight_decay), lr=lr)


def _logits(out) -> torch.Tensor:
    """The logits in a model output: the tensor itself, ``.logits``, ``["logits"]`` or the first item."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"distillation needs logits, but the model returned a {type(out).__name__}; return a "
                    "tensor, a tuple starting with the logits, or an object with .logits")


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def _epoch_batches(train_data: Iterable, seed: int, epoch: int, shuffle: bool, skip: int):
    """The batches of one epoch after the first ``skip``.  A sequence (list of batches) is
    permuted by a generator seeded from ``(seed, epoch)``; any other iterable (a DataLoader)
    keeps its own order, drawn from the global torch RNG that ``fit`` reseeds per epoch."""
    if isinstance(train_data, Sequence):
        n = len(train_data)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch))).tolist()
        else:
            order = list(range(n))
        if skip > n:
            raise ValueError(f"the checkpoint consumed {skip} batches of epoch {epoch + 1} but train_data has {n}; "
                             "resume with the same data")
        return (train_data[i] for i in order[skip:])
    it = iter(train_data)
    for i in range(skip):
        if next(it, None) is None:
            raise ValueError(f"the checkpoint consumed {skip} batches of epoch {epoch + 1} but train_data ended "
                             f"after {i}; resume with the same data")
    return it


class _Loop:
    """One ``fit`` call's state; methods are the pieces of the loop."""

    def __init__(self, model, train_data, loss_fn, *, optimizer, schedule, teacher, distill_weight,
                 temperature, eval_fn, ckpt_path, checkpoint_every, monitor, figures, log_every, seed, shuffle,
                 progress, max_grad_norm):
        self.model, self.train_data, self.loss_fn = model, train_data, loss_fn
        self.optimizer, self.schedule, self.teacher = optimizer, schedule, teacher
        self.distill_weight, self.temperature, self.eval_fn = distill_weight, temperature, eval_fn
        self.ckpt_path, self.checkpoint_every, self.monitor = ckpt_path, checkpoint_every, monitor
        self.figures: LayerFigures | None = figures  # computes what the monitor logs per layer
        self.log_every, self.seed, self.shuffle = log_every, seed, shuffle
        self.progress, self.max_grad_norm = progress, max_grad_norm
        self.device = next(model.parameters()).device
        self.step, self.last_loss, self.metrics = 0, None, []
        self.saved_step: int | None = None  # step of the last good checkpoint on disk

    # -- one optimizer step ---------------------------------------------------------------
    def _loss(self, inputs, target) -> tuple[torch.Tensor, dict[str, float]]:
        out = run_model(self.model, inputs)
        task = self.loss_fn(out, target)
        if self.teacher is None:
            return task, {}
        with torch.no_grad():
            teacher_out = run_model(self.teacher, inputs)
        kd = distillation_loss(_logits(out), _logits(teacher_out), temperature=self.temperature)
        loss = (1 - self.distill_weight) * task + self.distill_weight * kd
        return loss, {"train/task_loss": float(task.detach()), "train/distill_loss": float(kd.detach())}

    def train_step(self, batch, where: str) -> float:
        inputs, target = _to(batch, self.device)
        try:
            loss, parts = self._loss(inputs, target)
        except Exception as exc:  # e.g. an observer refusing NaN activations: say where it happened
            last = (f"; the last good checkpoint (step {self.saved_step}) is {self.ckpt_path}"
                    if self.saved_step is not None else "")
            exc.add_note(f"in QAT step {self.step + 1} ({where}){last}")
            raise
        if not bool(torch.isfinite(loss.detach()).all()):
            raise self._nonfinite(f"loss is {float(loss.detach())}", where)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not bool(torch.isfinite(grad_norm)):
            raise self._nonfinite(f"gradient norm is {float(grad_norm)}", where)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, grad_norm)
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        self.step += 1
        self.last_loss = float(loss.detach())
        if self.monitor is not None:
            self.monitor.scalars({"train/loss": self.last_loss, "train/lr": self.optimizer.param_groups[0]["lr"],
                                  "train/grad_norm": float(grad_norm), **parts}, self.step)
            if self.step % self.log_every == 0:
                self.log_scales()
        return self.last_loss

    # -- per-layer figures: computed by ``figures`` (lowbit.report.layers), logged by the monitor --
    def log_bit_widths(self) -> None:
        if self.figures is not None:
            counts = self.figures.bit_widths(self.model)
            self.monitor.log_bit_widths(counts, self.figures.bit_width_table(counts), self.step)

    def log_scales(self) -> None:
        if self.figures is not None:
            self.monitor.log_scales(self.figures.quantizer_scales(self.model), self.step)

    def log_weight_errors(self) -> None:
        if self.figures is not None:
            self.monitor.log_weight_errors(self.figures.weight_errors(self.model), self.step)

    def _nonfinite(self, what: str, where: str) -> FloatingPointError:
        lr = self.optimizer.param_groups[0]["lr"]
        msg = f"QAT step {self.step + 1} ({where}): {what}; stopped before the optimizer step. "
        if self.saved_step is not None:
            msg += (f"The last good checkpoint (step {self.saved_step}) is kept at {self.ckpt_path}: resume "
                    f"from it with a lower learning rate (now {lr:g}) or max_grad_norm set.")
        else:
            msg += (f"Lower the learning rate (now {lr:g}) or set max_grad_norm; pass checkpoint_dir to keep "
                    "a good state to resume from.")
        return FloatingPointError(msg)

    # -- epochs, evaluation, checkpoints ----------------------------------------------------
    def run_epoch(self, epoch: int, epochs: int, skip: int, resumed: Checkpoint | None) -> None:
        from tqdm.auto import tqdm

        torch.manual_seed(_epoch_seed(self.seed, epoch))  # a DataLoader draws its shuffle seed here
        batches = _epoch_batches(self.train_data, self.seed, epoch, self.shuffle, skip)
        if resumed is not None and skip:
            set_rng_state(resumed.rng)  # mid-epoch: continue the random stream where it was saved
        total = len(self.train_data) if hasattr(self.train_data, "__len__") else None
        bar = tqdm(batches, total=total, initial=skip, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                   disable=not self.progress)
        for i, batch in enumerate(bar, start=skip):
            loss = self.train_step(batch, f"epoch {epoch + 1}, batch {i + 1}")
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if self.ckpt_path is not None and self.step % self.checkpoint_every == 0:
                self.save(epoch, i + 1)
        bar.close()
        self._end_epoch(epoch)

    def _end_epoch(self, epoch: int) -> None:
        if self.eval_fn is not None:
            self.model.eval()
            try:
                self.metrics.append(float(self.eval_fn(self.model)))
            finally:
                self.model.train()
            log.info("epoch %d: metric %.6g", epoch + 1, self.metrics[-1])
        if self.monitor is not None:
            if self.eval_fn is not None:
                self.monitor.scalar("eval/metric", self.metrics[-1], self.step)
            if self.step % self.log_every:  # else train_step just logged them
                self.log_scales()
            self.log_weight_errors()
            self.monitor.flush()
        if self.ckpt_path is not None:
            self.save(epoch + 1, 0)

    def save(self, epoch: int, batch: int) -> None:
        save_checkpoint(self.ckpt_path, self.model, self.optimizer, self.schedule, step=self.step, epoch=epoch,
                        batch=batch, extra={"metrics": list(self.metrics), "last_loss": self.last_loss,
                                            "seed": self.seed, "shuffle": self.shuffle})
        self.saved_step = self.step

    def resume(self) -> Checkpoint | None:
        if self.ckpt_path is None or not self.ckpt_path.exists():
            return None
        ck = load_checkpoint(self.ckpt_path, self.model, self.optimizer, self.schedule)  # restores RNG states
        self.step, self.saved_step = ck.step, ck.step
        self.metrics = list(ck.extra.get("metrics", []))
        self.last_loss = ck.extra.get("last_loss")
        for key in ("seed", "shuffle"):
            if key in ck.extra and ck.extra[key] != getattr(self, key):
                log.warning("%s was written with %s=%r, this run has %r: the data order will differ from the "
                            "original run", self.ckpt_path, key, ck.extra[key], getattr(self, key))
        log.info("resuming from %s: step %d, epoch %d, batch %d", self.ckpt_path, ck.step, ck.epoch + 1, ck.batch)
        return ck


def _check_args(train_data, epochs, distill_weight, checkpoint_every, log_every, max_grad_norm, log_dir,
                figures) -> None:
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1] (the share of the distillation loss), got {distill_weight!r}")
    if checkpoint_every < 1 or log_every < 1:
        raise ValueError("checkpoint_every and log_every must be >= 1")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    if figures is not None and log_dir is None:
        raise ValueError("figures are logged to TensorBoard: pass log_dir as well (or figures=None)")
    if iter(train_data) is train_data:
        raise ValueError("train_data must be re-iterable (a list of batches or a DataLoader), not a one-shot "
                         "iterator or generator: each epoch iterates it again")


def fit(
    model: nn.Module,
    train_data: Iterable,
    loss_fn: Callable,
    *,
    epochs: int,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    optimizer: torch.optim.Optimizer | None = None,
    schedule=None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    temperature: float = 2.0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 200,
    resume: bool = True,
    log_dir: str | os.PathLike | None = None,
    log_every: int = 10,
    figures: LayerFigures | None = None,
    wandb: bool | None = None,
    seed: int = 0,
    shuffle: bool = True,
    progress: bool = True,
    max_grad_norm: float | None = None,
) -> FitResult:
    """Train a ``prepare_qat`` model: a small reference loop (your own loop works too).

    Args:
        model: the prepared QAT model (trained in place).
        train_data: a re-iterable of ``(inputs, target)`` batches; ``inputs`` is a tensor, a
            tuple of positional args or a dict of keyword args (as ``lowbit.ptq.run_model``).
        loss_fn: ``loss_fn(model_output, target) -> scalar tensor``.
        epochs: passes over ``train_data`` (in total, counting a resumed run's earlier ones).
        lr, weight_decay: of the default optimizer, AdamW (no decay on quantizer
            scales / zero-points, biases and norms).
        optimizer: your own, built over ``model.parameters()`` (then lr / weight_decay are unused).
        schedule: a ``QATSchedule``; stepped after every optimizer step.
        teacher: the FP32 model; when given the loss is ``(1 - distill_weight) * task +
            distill_weight * distillation_loss(student, teacher, temperature)``.
        eval_fn: ``eval_fn(model) -> float``, called in eval mode after each epoch.
        checkpoint_dir: where ``checkpoint.pt`` is kept (every ``checkpoint_every`` steps and
            after each epoch); with ``resume`` a run continues from it.
        log_dir: TensorBoard folder (needs ``tensorboard``): loss, lr, gradient norm, metric;
            ``wandb`` as for ``Monitor``.
        log_every: steps between quantizer-scale logs.
        figures: what computes the per-layer figures to log with ``log_dir``: pass
            ``lowbit.report.layers`` for each quantizer's scale (every ``log_every`` steps and
            each epoch), a histogram of each weight's rounding error (each epoch) and the
            parameter count per bit-width (at the start); None logs none of them.
        seed: seeds torch / random / numpy at the start and torch at every epoch: the data
            order and random draws of an epoch depend only on the seed and the epoch.
        shuffle: permute a list of batches every epoch (a DataLoader keeps its own order).
        progress: tqdm progress bars.
        max_grad_norm: clip the gradient norm to this.

    Returns:
        A ``FitResult`` (steps, final loss, metric per epoch).

    Raises:
        FloatingPointError: the loss or gradient norm became NaN/Inf; the message names the
            step and the last good checkpoint (which is left as it was).
        ValueError: a checkpoint in ``checkpoint_dir`` is from another model or config.

    Example:
        >>> qmodel = lowbit.prepare_qat(model, "w4a8", calib_data=[x for x, _ in batches[:8]])
        >>> res = fit(qmodel, batches, F.cross_entropy, epochs=2, teacher=model, checkpoint_dir="runs/qat")
        >>> res = fit(qmodel, batches, F.cross_entropy, epochs=2, log_dir="runs/tb", figures=lowbit.report.layers)
    """
    _check_args(train_data, epochs, distill_weight, checkpoint_every, log_every, max_grad_norm, log_dir, figures)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    model.train()
    if teacher is not None:
        teacher.eval()
    if optimizer is None:
        optimizer = _default_optimizer(model, lr, weight_decay)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    monitor = None
    if log_dir is not None:
        from .monitor import Monitor

        monitor = Monitor(log_dir, wandb=wandb, config={"epochs": epochs, "lr": lr, "seed": seed,
                                                        "distill_weight": distill_weight if teacher else 0.0})
    loop = _Loop(model, train_data, loss_fn, optimizer=optimizer, schedule=schedule, teacher=teacher,
                 distill_weight=distill_weight, temperature=temperature, eval_fn=eval_fn, ckpt_path=ckpt_path,
                 checkpoint_every=checkpoint_every, monitor=monitor, figures=figures, log_every=log_every, seed=seed,
                 shuffle=shuffle, progress=progress, max_grad_norm=max_grad_norm)
    try:
        ck = loop.resume() if resume else None
        start_epoch, start_batch = (ck.epoch, ck.batch) if ck is not None else (0, 0)
        if monitor is not None:
            loop.log_bit_widths()
        for epoch in range(start_epoch, epochs):
            skip = start_batch if epoch == start_epoch else 0
            loop.run_epoch(epoch, epochs, skip, ck if epoch == start_epoch else None)
    finally:
        if monitor is not None:
            monitor.close()
    return FitResult(steps=loop.step, epochs=max(epochs, start_epoch), final_loss=loop.last_loss,
                     metrics=loop.metrics, resumed_from=ck.step if ck is not None else None, checkpoint=ckpt_path)
