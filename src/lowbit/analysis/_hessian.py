"""Sensitivity by the Hessian trace (HAWQ-V2, Dong et al. 2020): how sharply the loss curves around
each layer's float weight, times how far quantization moves that weight.

The Hessian is taken on the float model as the quantized model holds it (every quantizer
switched off: BatchNorm folded, float-phase algorithms applied), so the weight it differentiates
is the one the weight quantizer rounds.  The loss, averaged over the evaluation batches:

* ``loss_fn(output, batch)`` when given (``output``: the model's output tensor, ``batch``: the
  model input it came from);
* else the divergence from the float output itself (detached): KL(softmax(y32) || softmax(y))
  per sample for 2-D logits, else sum (y - y32)^2 / sum y32^2.  Both are 0 with a zero gradient
  at the float point, so their Hessian there is the Gauss-Newton matrix J^T M J (for KL,
  M = diag(p) - p p^T: the Fisher information of the output distribution): positive
  semi-definite, and 1/2 dW^T H dW is the second-order estimate of the divergence that
  ``method="ablation"`` measures.

Hutchinson's estimator: Tr(H_i) = E[v_i^T H_i v_i] for Rademacher v (entries +-1).  Per probe,
one v over every layer's weight and ONE Hessian-vector product give v_i^T (H v)_i for all layers
at once: v_i^T H_ii v_i plus cross terms v_i^T H_ij v_j of zero mean, which the off-diagonal
blocks add to the variance (a layer of small curvature next to layers of large curvature gets a
wide ``trace_ci95``: raise ``probes``).  Probe ``k`` draws the same v on every batch (seeded by
``seed`` and ``k``), so each probe estimates the trace of the batch-averaged Hessian and the
probes' spread gives the confidence interval.

The product is the Gauss-Newton one, H v = J^T (d2 loss / d output2) J v: J v by forward-mode AD
(``torch.func.jvp``), the small output-space Hessian by double backward through the loss alone,
J^T by an ordinary backward.  It equals the true Hessian-vector product for the default losses
(their gradient is 0 at the float point) and, on every layer's diagonal block, for networks
piecewise linear in each weight (ReLU / ReLU6 CNNs, Linear stacks) whatever ``loss_fn``; for other
models with a ``loss_fn`` away from its minimum it drops the term (d loss / d output) d2 output /
dW2.  Why not double backward through the model: PyTorch's convolution double backward loops
over the groups of a grouped conv, one conv call per group (MobileNetV2: about 7,300 conv calls per
product; one batch, two probes took 156 s that way against 27 s this way, on a loaded machine).

values: ``trace`` (mean over probes), ``trace_ci95`` (1.96 std / sqrt(probes)),
``trace_per_param`` (trace / weight elements: HAWQ-V2's average eigenvalue), ``perturbation``
(||Q(W) - W||^2 with the quantized model's calibrated weight quantizer).

``cost`` = 1/2 trace_per_param * perturbation (a negative trace estimate counts as 0: noise
around a small trace, or a ``loss_fn`` that is not convex there).  That is HAWQ-V2's
Omega_i = Tr(H_i)/n_i ||Q(W_i) - W_i||^2 (its Eq. 2.11) halved: the 1/2 makes the cost the second-order Taylor estimate of the
loss increase (dW^T H dW ~ Tr(H)/n ||dW||^2 for a perturbation with no preferred direction), in
the loss's unit, comparable to ablation's cost; ranks and any solver's choices are unchanged.
Only the weight perturbation is counted, not the activation quantization.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from ..nn.walk import first_tensor
from ._ablation import is_logits
from ._layers import quantized_only
from ._sqnr import EvalSet, eval_mode, weight_delta

LossFn = Callable[[torch.Tensor, object], torch.Tensor]
COST_UNIT = ("1/2 Tr(H)/n ||Q(W) - W||^2: second-order estimate of the loss increase from this layer's "
             "weight quantization (HAWQ-V2's Omega / 2)")


def default_loss(output: torch.Tensor, _batch=None) -> torch.Tensor:
    """Divergence of ``output`` from its own detached value: 0 with zero gradient, PSD Hessian."""
    ref = output.detach()
    if is_logits(output):
        return F.kl_div(F.log_softmax(output, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
    return ((output - ref) ** 2).sum() / (ref**2).sum().clamp_min(torch.finfo(ref.dtype).tiny)


@contextlib.contextmanager
def _requiring_grad(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    saved = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, saved, strict=True):
            t.requires_grad_(flag)


def _rademacher(weights: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w.dtype).to(w.device) for w in weights]


def _call(model: nn.Module, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
    """``model``'s output tensor on ``batch`` with ``params`` in place of its own."""
    if isinstance(batch, Mapping):
        return first_tensor(functional_call(model, params, (), dict(batch)))
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    return first_tensor(functional_call(model, params, args))


def traces(qmodel: nn.Module, batches: Sequence, names: Sequence[str], loss_fn: LossFn, probes: int,
           seed: int, bar: Callable[[Iterable], Iterable] = iter) -> torch.Tensor:
    """(probes, layers) float64: v_i^T (G v)_i per probe and layer, G = J^T (d2 loss / d output2) J
    of the batch-mean loss (the Gauss-Newton Hessian, see the module docstring)."""
    keys = [f"{n}.weight" for n in names]
    weights = [qmodel.get_submodule(n).weight for n in names]
    est = torch.zeros(probes, len(weights), dtype=torch.float64)
    with torch.enable_grad(), _requiring_grad(weights):
        for batch in bar(batches):
            out = _call(qmodel, dict(zip(keys, weights, strict=True)), batch)  # graph kept for J^T
            z = out.detach().requires_grad_(True)
            dz = torch.autograd.grad(loss_fn(z, batch), z, create_graph=True)[0]  # d loss / d output
            if not dz.requires_grad:
                continue  # the loss is linear in the output: no curvature
            for k in range(probes):
                vs = _rademacher(weights, seed * 1_000_003 + k)
                _, jv = jvp(lambda *ws, _b=batch: _call(qmodel, dict(zip(keys, ws, strict=True)), _b),
                            tuple(w.detach() for w in weights), tuple(vs))  # J v, forward mode
                mjv = torch.autograd.grad(dz, z, grad_outputs=jv, retain_graph=True)[0]  # (d2 loss / dz2) J v
                hvs = torch.autograd.grad(out, weights, grad_outputs=mjv, retain_graph=True, allow_unused=True)
                for i, hv in enumerate(hvs):  # J^T M J v, restricted to layer i, dotted with v_i
                    if hv is not None:
                        est[k, i] += float((vs[i].double() * hv.double()).sum()) / len(batches)
            del out, z, dz
    return est


def measure(qmodel: nn.Module, evalset: EvalSet, names: Sequence[str], loss_fn: LossFn | None, probes: int,
            seed: int, bar: Callable[[Iterable], Iterable] = iter) -> tuple[dict[str, tuple[float, dict]], dict]:
    """``{layer: (cost, values)}`` and the baseline (sum of costs: all weights quantized)."""
    layers = [qmodel.get_submodule(n) for n in names]
    with quantized_only(qmodel, []), eval_mode(qmodel):  # the float model
        est = traces(qmodel, evalset.batches, names, loss_fn or default_loss, probes, seed, bar)
    mean = est.mean(0)
    ci = 1.96 * est.std(0) / math.sqrt(probes) if probes > 1 else torch.full_like(mean, math.inf)
    rows = {}
    for j, (name, layer) in enumerate(zip(names, layers, strict=True)):
        perturbation = float((weight_delta(layer).double() ** 2).sum())
        per_param = float(mean[j]) / max(layer.weight.numel(), 1)
        cost = 0.5 * max(per_param, 0.0) * perturbation if perturbation else 0.0
        rows[name] = (cost, {"trace": float(mean[j]), "trace_ci95": float(ci[j]), "trace_per_param": per_param,
                             "perturbation": perturbation})
    return rows, {"total_cost": sum(c for c, _ in rows.values())}
