"""Calibration: observe activations over the data, freeze every static quantizer."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..nn.quantizer import Quantizer
from ..nn.walk import fixed_weights, quantizers_by_role, run_model

log = logging.getLogger(__name__)


def check_has_data(model: nn.Module, verb: str) -> None:
    """Raise before any work when ``model`` holds tensors on the meta device (no values)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ValueError(
                f"{verb}: the model has no data ({name} is on the meta device, shapes without values); "
                "load real weights first, e.g. model.to_empty(device='cpu') then "
                "model.load_state_dict(torch.load(path, weights_only=True))"
            )


def as_batches(calib_data):
    """Calibration data as an iterable of batches: a single tensor is ONE batch (iterating it
    would give its rows)."""
    return [calib_data] if isinstance(calib_data, torch.Tensor) else calib_data


def calibrate(model: nn.Module, calib_data: Iterable, *, progress: bool = True) -> tuple[int, list[str]]:
    """Observe activations over ``calib_data`` and freeze every static quantizer.

    Weight quantizers observe their weight once.  Returns the number of batches
    and the names of activation quantizers that saw no data (they are disabled,
    so those tensors stay float, and logged).
    """
    activation = []
    weights = []
    for module, role, q in quantizers_by_role(model):
        if q.mode == "dynamic" or q.observer is None:
            continue
        if role == "weight":
            q.observer.reset()
            q.observer(module.weight)
            q.freeze()
            weights.append((module, q))
        else:
            activation.append(q)
    return calibrate_activations(model, activation, calib_data, progress=progress, weights=weights)


def calibrate_activations(model: nn.Module, activation: list[Quantizer], calib_data: Iterable, *,
                          progress: bool = True, weights: list[tuple[nn.Module, Quantizer]] = ()
                          ) -> tuple[int, list[str]]:
    """Observe the ``activation`` quantizers over ``calib_data`` and freeze them; those that saw
    no data are disabled (their tensor stays float), logged and returned by name, with the number
    of batches.  ``weights``: frozen (layer, weight quantizer) pairs whose fake-quantized weight is
    computed once for the whole pass."""
    for q in activation:
        q.observer.reset()
        q.mode = "calibrating"
    n_batches = 0
    if activation:
        with fixed_weights(list(weights)):
            n_batches = _feed(model, calib_data, progress)

    uncalibrated = []
    for q in activation:
        if q.observer.has_data:
            q.freeze()
        else:
            q.mode = "disabled"
            uncalibrated.append(q.name)
            log.warning("%s saw no calibration data; this tensor stays float", q.name)
    return n_batches, uncalibrated


def _feed(model: nn.Module, calib_data: Iterable, progress: bool) -> int:
    from tqdm.auto import tqdm

    if calib_data is None:
        raise ValueError("static quantization needs calibration data (an iterable of model inputs); "
                         "pass calib_data, or use a dynamic config such as 'w8a8-dynamic'")
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            total = len(calib_data) if hasattr(calib_data, "__len__") else None
            for batch in tqdm(calib_data, total=total, desc="calibrating", unit="batch", disable=not progress):
                try:
                    run_model(model, batch)
                except ValueError as exc:  # bad data: NaN named by its tensor, or the model's own check
                    raise ValueError(f"calibration batch {n}: {exc}") from exc
                except Exception as exc:
                    raise RuntimeError(f"calibration batch {n} failed in the model: {exc}") from exc
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("calibration data is empty: give at least one batch of model inputs")
    return n
