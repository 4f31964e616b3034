"""GPTQ on one weight (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers").

A layer ``y = W x`` is quantized to ``Q`` minimising ``tr((W - Q) H (W - Q)^T)``, ``H = 2/n sum x x^T``
over its calibration inputs (the input Hessian).  GPTQ rounds the columns of ``W`` one at a time and
moves the columns not yet rounded to compensate (Optimal Brain Surgeon's update): with ``U`` the
upper Cholesky factor of ``H^-1``, column ``j`` rounded to ``q_j`` adds ``-(w_j - q_j) / U_jj * U_jk``
to every later column ``k``.  Around that loop:

* dead inputs (zero on every calibration row, ``H_jj == 0``): column zeroed, ``H_jj`` set to 1,
  as the paper's code does;
* damping ``damp * mean(diag H)`` on the diagonal (default 1%), grown tenfold with a logged
  warning while the Cholesky factorisation fails;
* ``act_order``: columns by decreasing ``H_jj`` (the most energy first, while the most columns
  are left to absorb the error);
* lazy batches: the updates stay inside a block of ``block_size`` columns and reach the later
  columns as one matrix product per block (the same result, far fewer passes over ``W``);
* the grid is the layer's own frozen weight quantizer's (``Grid``): scales and zero-points from
  the ORIGINAL weight ("static groups"), so the exported layout stays plain in any visiting
  order and the result is on the grid by construction (``gptq_layer`` checks the quantizer maps
  it to itself).  ``static_groups=False`` (natural order only) refits each group's range, by the
  quantizer's own estimator, when GPTQ reaches it, and installs the new ranges;
* ``clip`` (``clip_search``): before GPTQ, each static range shrunk by the factor in 1.00 .. 0.75 whose
  round-to-nearest error, weighted by the inputs' energies ``H_jj``, is least (the GPTQ paper's
  code has an unweighted ``mse`` grid of this kind; AWQ and NNCF weight it by the inputs as here);
* ``rescale`` (``fit_scales``): after GPTQ, each static range's scale moved to the least-squares
  optimum of the objective with GPTQ's integer codes fixed (a small ``groups x groups`` system per
  row), which can only lower the objective; the codes stay, so the layout and the export are unchanged.

Numbers: ``H`` sums float32 products in float64; the factorisations run in float64, the column
loop in float32 (as the paper's code), on the transposed weight, ``ROWS_CHUNK`` rows at a time
(rows are independent given ``H``).  The objective is reported for round to nearest and for
GPTQ; should GPTQ's be the larger (it is greedy), the round-to-nearest weight is kept.

Example::

    h = Hessian(layer, "fc")
    for x in inputs:
        h.add(x)
    report = gptq_layer(layer, h.matrix(), name="fc")    # writes the weight, returns the objectives
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.quantizer import Quantizer
from ..nn.registry import CONV, GEMM, kind_of
from ..numerics import expand_param, fake_quantize
from ..observers import make_observer

log = logging.getLogger(__name__)

DAMP_GROWTH, DAMP_TRIES = 10.0, 6  # damping grows 0.01 -> 0.1 -> ... while the Cholesky fails
ROWS_CHUNK = 4096  # weight rows at a time (GPTQ and the objective): bounds the working memory


# -- the input Hessian -------------------------------------------------------------------------
def unsupported(layer: nn.Module) -> str | None:
    """Why GPTQ cannot take ``layer`` (None when it can): a gemm or a 1-d / 2-d ungrouped conv."""
    kind = kind_of(layer)
    if kind is None or kind.kernel not in (GEMM, CONV):
        return "it is not a gemm or convolution layer"
    if kind.kernel == CONV and (layer.weight.dim() not in (3, 4) or layer.groups != 1):
        return "only ungrouped 1-d and 2-d convolutions are supported"
    return None


class Hessian:
    """Streaming ``H = 2/n sum x x^T`` over the ``n`` input rows ``layer`` (a gemm, or an ungrouped
    1-d / 2-d conv; ``name`` for messages) contracts: a gemm's tokens (any leading dimensions), a
    conv's receptive fields (``F.unfold``, in ``weight.flatten(1)``'s order).  Memory: one ``K x K``
    float64 matrix whatever the number of batches; ``merge`` adds another's statistics (shards)."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        why = unsupported(layer)
        if why:
            raise ValueError(f"{name}: GPTQ cannot take this {type(layer).__name__}: {why}")
        self.layer, self.name = layer, name
        self.columns = layer.weight[0].numel()
        self.sum = torch.zeros(self.columns, self.columns, dtype=torch.float64, device=layer.weight.device)
        self.rows = 0
        self.shift_sum: torch.Tensor | None = None  # sum (x_float - x)^T x: see ``add``

    def _as_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (rows, columns): what each output position multiplies with the weight."""
        layer = self.layer
        if kind_of(layer).kernel == GEMM:
            return x.reshape(-1, x.shape[-1])
        if x.dim() == layer.weight.dim() - 1:  # an unbatched input
            x = x.unsqueeze(0)
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)  # as the layer pads ('same' too)
        k, s, d = layer.kernel_size, layer.stride, layer.dilation
        if x.dim() == 3:  # a 1-d conv is a 2-d one of height 1
            x, k, s, d = x.unsqueeze(2), (1, *k), (1, *s), (1, *d)
        cols = F.unfold(x, k, dilation=d, stride=s)  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        """Fold one batch of the layer's inputs (as the layer receives them) into the sum; with
        ``x_float``, the same rows as the float model gives them to the layer, also ``(x_float - x)^T x``
        (``shift``)."""
        rows = self._as_rows(x.detach()).float()
        if rows.shape[1] != self.columns:
            raise ValueError(f"{self.name}: input has {rows.shape[1]} features per row, the weight "
                             f"{self.columns} columns")
        self.sum.add_(rows.T @ rows)  # (float32 products, summed in float64)
        self.rows += rows.shape[0]
        if x_float is not None:
            delta = self._as_rows(x_float.detach()).float() - rows
            if self.shift_sum is None:
                self.shift_sum = torch.zeros_like(self.sum)
            self.shift_sum.add_(delta.T @ rows)

    def merge(self, others: list[Hessian]) -> Hessian:
        """Add the statistics of ``others`` (the same layer's inputs on other shards) to this one."""
        for other in others:
            self.sum += other.sum.to(self.sum.device)
            self.rows += other.rows
            if other.shift_sum is not None:
                if self.shift_sum is None:
                    self.shift_sum = torch.zeros_like(self.sum)
                self.shift_sum += other.shift_sum.to(self.sum.device)
        return self

    def shift(self) -> torch.Tensor | None:
        """``D = 2/n sum (x_float - x)^T x`` (float64), None when no float inputs were given.  GPTQ's
        target then becomes the float model's output: ``||X_float W^T - X Q^T||^2`` equals
        ``tr((W' - Q) H (W' - Q)^T)`` up to a constant, with ``W' = W + W D H^-1``."""
        return None if self.shift_sum is None else self.shift_sum * (2.0 / self.rows)

    def matrix(self) -> torch.Tensor:
        """``H`` (float64).  ValueError when no row was added or an input held NaN / Inf."""
        if self.rows == 0:
            raise ValueError(f"{self.name}: GPTQ saw no input rows (the calibration data never reached it)")
        h = self.sum * (2.0 / self.rows)
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"{self.name}: its calibration inputs hold NaN or Inf; check the data or the "
                             "layers before it")
        return h


# -- the grid ----------------------------------------------------------------------------------
@dataclass
class Grid:
    """A weight's integer grid, column by column of the 2-D weight (``weight.flatten(1)``).

    Column ``j`` uses ``scale[:, col_group[j]]`` and ``zero_point[:, col_group[j]]`` (one value
    per row), codes in ``[qmin, qmax]``.  ``groups``: the column ranges sharing one range per row
    (a group-wise weight along its input axis; the last may be shorter), else None.
    """

    scale: torch.Tensor  # (rows, G) float32
    zero_point: torch.Tensor  # (rows, G) float32, integers
    col_group: torch.Tensor  # (columns,) int64
    qmin: int
    qmax: int
    groups: list[tuple[int, int]] | None = None

    def round_all(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (rows, columns) rounded to nearest on its grid: ``(clamp(round(w / s) + z) - z) * s``,
        the arithmetic of ``lowbit.numerics.fake_quantize`` (round half to even)."""
        s, z = self.scale[:, self.col_group], self.zero_point[:, self.col_group]
        return (torch.div(w.float(), s).round_().add_(z).clamp_(self.qmin, self.qmax).sub_(z)).mul_(s)

    def rows(self, a: int, b: int) -> Grid:
        """The grid of rows ``a:b`` (views: a refit writes through to this grid)."""
        return Grid(scale=self.scale[a:b], zero_point=self.zero_point[a:b], col_group=self.col_group,
                    qmin=self.qmin, qmax=self.qmax, groups=self.groups)


def grid_of(q: Quantizer, weight: torch.Tensor) -> Grid:
    """The grid of ``q`` (a frozen weight quantizer) laid over ``weight``, column by column."""
    scale, zero_point = q.qparams_for(weight)
    spec, rows, cols = q.spec, weight.shape[0], weight[0].numel()
    if weight.dim() == 2 and spec.granularity == "group" and spec.resolved_axis(2) == 1:
        size = spec.group_size
        starts = range(0, cols, size)
        col_group = torch.arange(cols, device=scale.device) // size
        return Grid(scale=scale.float(), zero_point=zero_point.float(), col_group=col_group,
                    qmin=spec.qmin, qmax=spec.qmax, groups=[(a, min(a + size, cols)) for a in starts])
    # any other layout: one value per element (a view where the layout broadcasts)
    s, z = (expand_param(p.float(), weight.shape, spec, q.name).reshape(rows, cols)
            for p in (scale, zero_point))
    return Grid(s, z, torch.arange(cols, device=s.device), spec.qmin, spec.qmax)


# -- the algorithm -----------------------------------------------------------------------------
Refit = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # columns (rows, k) -> scale, zero-point


def objective(weight: torch.Tensor, quantized: torch.Tensor | Callable[[int, int], torch.Tensor],
              h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` (2-D ``W``; float32 products summed in float64), ``ROWS_CHUNK`` rows
    at a time; ``quantized`` is ``Q``, or gives its rows ``a:b`` (so a large ``Q`` need not exist)."""
    total, h = 0.0, h.float()
    for a in range(0, weight.shape[0], ROWS_CHUNK):
        b = min(a + ROWS_CHUNK, weight.shape[0])
        q = quantized(a, b) if callable(quantized) else quantized[a:b]
        d = weight[a:b].float() - q.float()
        total += float(((d @ h) * d).sum(dtype=torch.float64))
    return total


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """``U``, the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, and the ``damp``
    that made both factorisations succeed (grown by ``DAMP_GROWTH`` after each failure).  Damps
    ``h`` in place; at most three ``K x K`` matrices live at once."""
    mean, added = float(h.diagonal().mean()), 0.0
    for attempt in range(DAMP_TRIES):
        h.diagonal().add_(damp * mean - added)
        added = damp * mean
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp
        if attempt + 1 < DAMP_TRIES:
            log.warning("gptq: %s: the Cholesky factorisation failed with damping %g of the mean Hessian "
                        "diagonal; retrying with %g", name, damp, damp * DAMP_GROWTH)
            damp *= DAMP_GROWTH
    raise RuntimeError(f"{name}: GPTQ's Cholesky factorisation failed even with damping {damp:g}; its inputs "
                       "may span wildly different scales: keep this layer out of GPTQ (a config rule) or "
                       "check the calibration data")


@dataclass(frozen=True)
class _Plan:
    """What ``H`` decides for every row: column order, dead columns and ``U`` in that order, damping."""

    perm: torch.Tensor
    dead: torch.Tensor
    u: torch.Tensor
    damp: float


def _plan(h: torch.Tensor, *, damp: float, act_order: bool, name: str, dtype: torch.dtype) -> _Plan:
    dead = h.diagonal() == 0  # an input never seen: its column cannot matter; H_jj = 1 keeps H invertible
    if act_order:
        perm = torch.argsort(torch.where(dead, 1.0, h.diagonal()), descending=True, stable=True)
        h, dead = h[perm[:, None], perm], dead[perm]  # (one copy: H may be large)
    else:
        perm, h = torch.arange(h.shape[0], device=h.device), h.clone()
    h.diagonal()[dead] = 1.0
    u, used = _inverse_cholesky(h, damp, name)
    return _Plan(perm=perm, dead=dead, u=u.to(dtype), damp=used)


def _current_group(wt: torch.Tensor, w1t: torch.Tensor, errt: torch.Tensor, u: torch.Tensor,
                   block: tuple[int, int], i: int, group: tuple[int, int]) -> torch.Tensor:
    """The columns of ``group`` as they stand when GPTQ reaches its first column (``i`` of the
    current ``block``), as (columns, rows): those inside the block carry its updates so far, those
    past it the updates the block will pass on at its end."""
    (i1, i2), (a, b) = block, group
    inside = w1t[a - i1:min(b, i2) - i1]
    if b <= i2:
        return inside.clone()
    beyond = wt[i2:b] - u[i1:i1 + i, i2:b].T @ errt[:i]
    return torch.cat([inside, beyond])


def _quantize_rows(weight: torch.Tensor, plan: _Plan, grid: Grid, *, block_size: int, refit: Refit | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """GPTQ's column loop on some rows of a 2-D weight (rows are independent given ``U``).  It runs
    on the transposed weight, so a column and the columns it updates are contiguous rows."""
    wt = weight.T[plan.perm].to(dtype)  # (columns in GPTQ's order, rows): a copy, the loop updates it
    wt[plan.dead] = 0
    u, cols = plan.u, wt.shape[0]
    st, zt = grid.scale.T.contiguous(), grid.zero_point.T.contiguous()  # (groups, rows)
    affine = bool(zt.any()) or refit is not None
    order, group_of = plan.perm.tolist(), grid.col_group[plan.perm].tolist()
    starts = {} if refit is None else {a: (a, b) for a, b in grid.groups}
    out = torch.empty_like(wt)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1t, u1 = wt[i1:i2], u[i1:i2, i1:i2]  # (a view: its updates stay inside the block)
        errt = torch.empty_like(w1t)
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if order[i1 + i] in starts:
                columns = _current_group(wt, w1t, errt, u, (i1, i2), i, starts[order[i1 + i]])
                scale, zero_point = refit(columns.T.float())
                st[g], zt[g] = scale.reshape(-1), zero_point.reshape(-1).float()
                grid.scale[:, g], grid.zero_point[:, g] = st[g], zt[g]
            col = w1t[i]
            q = torch.div(col.float(), st[g]).round_()  # lowbit.numerics' arithmetic: round half to even
            if affine:
                q = q.add_(zt[g]).clamp_(grid.qmin, grid.qmax).sub_(zt[g]).mul_(st[g])
            else:
                q = q.clamp_(grid.qmin, grid.qmax).mul_(st[g])
            q = q.to(dtype)
            out[i1 + i] = q
            e = (col - q).div_(u1[i, i])
            w1t[i:].addr_(u1[i, i:], e, alpha=-1)  # OBS update of the block's later columns
            errt[i] = e
        wt[i2:].addmm_(u[i1:i2, i2:].T, errt, alpha=-1)  # ... and, lazily, of every column after it
    return out[torch.argsort(plan.perm)].T.float()


def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, grid: Grid, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, refit: Refit | None = None,
                  name: str = "weight", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """GPTQ of ``weight`` (rows, ...: flattened to the (rows, columns) ``h`` indexes; not changed) on
    ``grid`` (``grid_of``), with the float64 Hessian ``h``; see the module docstring for ``block_size``
    (columns per lazy batch), ``damp`` (relative, grown on failure) and ``act_order``.  ``refit``
    (non-static groups, natural order only): called with a group's current columns when GPTQ reaches
    it, returns each row's new scale and zero-point, written into ``grid``.  ``dtype``: of the column
    loop (float64 for reference checks).  Returns the quantized weight (rows, columns; float32, on the
    grid) and the damping used."""
    if refit is not None and (act_order or grid.groups is None):
        raise ValueError(f"{name}: refitted (non-static) groups need a group-wise grid and act_order=False")
    plan = _plan(h, damp=damp, act_order=act_order, name=name, dtype=dtype)
    flat = weight.detach().reshape(weight.shape[0], -1)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    for a in range(0, flat.shape[0], ROWS_CHUNK):
        b = min(a + ROWS_CHUNK, flat.shape[0])
        out[a:b] = _quantize_rows(flat[a:b], plan, grid.rows(a, b), block_size=block_size, refit=refit,
                                  dtype=dtype)
    return out, plan.damp


# -- one layer ---------------------------------------------------------------------------------
CLIP_FACTORS = tuple(round(1.0 - 0.01 * k, 2) for k in range(26))  # 1.00, 0.99, ..., 0.75


def _row_ranges(q: Quantizer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(col_group, scale, zero_point)`` of ``q`` over ``weight`` as one range per row (per channel
    along axis 0) or per group of a row (group-wise along axis 1): ``scale[:, col_group[j]]`` is
    column ``j``'s; None for other layouts."""
    scale, zero_point = q.qparams_for(weight)
    spec, rows, cols = q.spec, weight.shape[0], weight[0].numel()
    if spec.granularity == "group" and weight.dim() == 2 and spec.resolved_axis(2) == 1:
        col_group = torch.arange(cols, device=weight.device) // spec.group_size
        return col_group, scale.float(), zero_point.float()
    if spec.granularity == "channel" and spec.resolved_axis(weight.dim(), q.name) == 0:
        col_group = torch.zeros(cols, dtype=torch.int64, device=weight.device)
        return col_group, scale.float().reshape(rows, 1), zero_point.float().reshape(rows, 1)
    return None


def clip_search(q: Quantizer, weight: torch.Tensor, h: torch.Tensor, factors=CLIP_FACTORS) -> float:
    """Shrink each range of ``q`` (a frozen, symmetric weight quantizer: one range per group of a row,
    or per row) by the factor in ``factors`` whose round-to-nearest error, each column weighted by its
    input energy ``H_jj``, is least; the scales are installed in ``q``.  Clipping the few largest weights
    of a group buys a finer grid for the rest (GPTQ's reference ``mse`` grid, weighted by the inputs as
    AWQ's clip search and NNCF's scale estimation are).  The factor 1 (the range as it is) wins ties.
    Returns the fraction of ranges shrunk (0.0, logged, for layouts it does not search)."""
    ranges = _row_ranges(q, weight)
    if ranges is None:
        log.info("gptq: %s: %s has no per-row ranges to search; kept", q.name, q.spec.describe())
        return 0.0
    col_group, s, z = ranges
    if bool(z.any()):
        log.info("gptq: %s: affine ranges are not searched (the search moves scales only); kept", q.name)
        return 0.0
    spec, flat = q.spec, weight.detach().reshape(weight.shape[0], -1).float()
    rows = flat.shape[0]
    energy = h.diagonal().float().to(flat.device)
    best = torch.ones_like(s)
    for a in range(0, rows, ROWS_CHUNK):
        b = min(a + ROWS_CHUNK, rows)
        w, least = flat[a:b], torch.full((b - a, s.shape[1]), float("inf"), device=flat.device)
        for factor in factors:
            grid = Grid(scale=s[a:b] * factor, zero_point=z[a:b], col_group=col_group, qmin=spec.qmin,
                        qmax=spec.qmax)
            error = (w - grid.round_all(w)).square_().mul_(energy)
            per_range = torch.zeros_like(least).index_add_(1, col_group, error)
            better = per_range < least
            least = torch.where(better, per_range, least)
            best[a:b] = torch.where(better, torch.full_like(per_range, factor), best[a:b])
    scale, zero_point = q.qparams_for(weight)
    q.set_qparams(scale * best.reshape(scale.shape).to(scale.dtype), zero_point)
    return float((best < 1).float().mean())


def fit_scales(weight: torch.Tensor, quantized: torch.Tensor, q: Quantizer, h: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The scales that minimise GPTQ's objective ``tr((W - Q) H (W - Q)^T)`` with ``quantized``'s
    integer codes fixed: ``Q = s * d`` for each range (row, or group of a row) with ``d = code -
    zero_point``, so per row the scales ``s`` (one per group) solve the small least-squares system
    ``(D^T H D) s = D^T H w`` (``D``: the row's codes laid out column by group).  The codes GPTQ chose
    stay; only their spacing moves (in closed form; NNCF's scale estimation searches for it).  A range
    whose system is singular (codes all zero), or whose new scale would flip its sign or fall below
    1e-3 of the old one, keeps its scale.  Float64 throughout.

    Returns:
        ``(scale, Q)``: the new scales (``q``'s layout) and the weight they give (rows, columns; float32),
        or None for layouts without per-row ranges.
    """
    ranges = _row_ranges(q, weight)
    if ranges is None:
        return None
    col_group, s, _ = ranges
    rows, groups = s.shape
    hd = h.double().to(weight.device)
    old = s.double()
    codes = (quantized.reshape(rows, -1).double() / old[:, col_group]).round_()  # code - zero_point
    flat = weight.detach().reshape(rows, -1).double()
    members = [torch.nonzero(col_group == g).flatten() for g in range(groups)]
    new = old.clone()
    for a in range(0, rows, ROWS_CHUNK):
        b = min(a + ROWS_CHUNK, rows)
        d, w = codes[a:b], flat[a:b]
        m = torch.zeros(b - a, groups, groups, dtype=torch.float64, device=d.device)
        rhs = torch.zeros(b - a, groups, dtype=torch.float64, device=d.device)
        for g, cols in enumerate(members):
            hdg = d[:, cols] @ hd[cols]  # (r, columns): row r's H D[:, g]
            m[:, g] = torch.zeros_like(rhs).index_add_(1, col_group, hdg * d)
            rhs[:, g] = (hdg * w).sum(1)
        ok = m.diagonal(dim1=1, dim2=2) > 0  # a range with codes (and inputs) at all
        m = m + torch.diag_embed((~ok).double())  # (its row / column are zero: solved to 0, then kept)
        fitted = torch.linalg.solve(m, torch.where(ok, rhs, 0.0))
        keep = ~ok | ~torch.isfinite(fitted) | (fitted * old[a:b].sign() < 1e-3 * old[a:b].abs())
        new[a:b] = torch.where(keep, old[a:b], fitted)
    scale, _ = q.qparams_for(weight)
    new = new.float()  # (Q from the float32 scales: exactly what fake_quantize gives back)
    return new.reshape(scale.shape).to(scale.dtype), codes.float() * new[:, col_group]


def _refitter(q: Quantizer) -> Refit:
    """A group's range from its current columns, by ``q``'s own range estimator (kind and options),
    one range per row."""
    rows = q.spec.replace(granularity="channel", axis=0, group_size=None)
    options = q.observer.get_extra_state()["options"] if q.observer is not None else {}
    kind = q.observer_kind if q.observer is not None else "minmax"

    def refit(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        observer = make_observer(kind, rows, name=q.name, **options).to(columns.device)
        observer(columns)
        return observer.qparams()

    return refit


def _on_grid(q: Quantizer, weight: torch.Tensor) -> bool:
    """Whether ``q`` (static) maps ``weight`` to itself, by ``lowbit.numerics.fake_quantize``; a 2-D
    weight with one range per row or group of a row ``ROWS_CHUNK`` rows at a time (a large head)."""
    scale, zero_point = q.qparams_for(weight)
    spec = q.spec
    by_rows = weight.dim() == 2 and (spec.granularity == "tensor" or spec.resolved_axis(2) == (
        1 if spec.granularity == "group" else 0))
    step = ROWS_CHUNK if by_rows else weight.shape[0]
    for a in range(0, weight.shape[0], step):
        s, z = (p if p.dim() == 0 or not by_rows else p[a:a + step] for p in (scale, zero_point))
        if not torch.equal(fake_quantize(weight[a:a + step], s, z, spec, name=q.name), weight[a:a + step]):
            return False
    return True


def _shifted(weight: torch.Tensor, h: torch.Tensor, shift: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """``W + W D (H + damp * mean(diag H) I)^-1`` (float64 solve; ``W`` 2-D or a conv weight)."""
    flat = weight.reshape(weight.shape[0], -1).double()
    damped = h.double().clone()
    damped.diagonal().add_(damp * float(damped.diagonal().mean()))
    damped.diagonal()[damped.diagonal() == 0] = 1.0
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        log.warning("gptq: %s: the damped Hessian is not positive definite; the float target is not used", name)
        return weight
    moved = torch.cholesky_solve((flat @ shift.double().to(flat.device)).T, lower).T  # (W D) H^-1, H symmetric
    return (flat + moved).float().reshape(weight.shape)


def _rtn_objective(flat: torch.Tensor, grid: Grid, h: torch.Tensor, source: torch.Tensor | None = None) -> float:
    """``objective`` of ``flat`` against ``source`` (default ``flat``) rounded to nearest on ``grid``,
    row chunk by row chunk."""
    source = flat if source is None else source
    return objective(flat, lambda a, b: grid.rows(a, b).round_all(source[a:b]), h)


def gptq_layer(layer: nn.Module, h: torch.Tensor, *, name: str, block_size: int = 128, damp: float = 0.01,
               act_order: bool = True, static_groups: bool = True, clip: bool = False,
               rescale: bool = False, shift: torch.Tensor | None = None) -> dict:
    """GPTQ of ``layer``'s weight (a quantized gemm / conv with a frozen weight quantizer) on that
    quantizer's grid, with its input Hessian ``h``, written into the weight.  ``static_groups=False``
    refits each group of a group-wise Linear weight to the updated columns (with ``act_order=False``,
    else ValueError) and installs the new ranges in the quantizer; ``clip`` first shrinks each static
    range as ``clip_search`` finds best; ``rescale`` then moves each static range's scale to the
    least-squares optimum for the codes GPTQ chose (``fit_scales``); ``shift`` (``Hessian.shift``)
    makes the float model's output the target: GPTQ then rounds ``W' = W + W D H_damped^-1``, the
    weight that best maps the layer's quantized-model inputs to the float model's outputs (GPTAQ's
    asymmetric calibration, Li et al. 2025), every objective reported on ``W'``; the rest:
    ``gptq_quantize``.

    Returns:
        ``{"objective_rtn", "objective_gptq", "kept", "damp", "dead", "seconds"}`` (and ``"clipped"``,
        the fraction of ranges ``clip`` shrank, and ``"objective_rtn_unclipped"``, round to nearest's
        objective on the ranges before the search; with ``rescale``, ``"objective_unscaled"``, GPTQ's
        objective before the fit): the objective ``tr((W - Q) H (W - Q)^T)`` of round to
        nearest and of GPTQ, which one the weight holds (``"rtn"`` when GPTQ's was the larger: the weight
        is left as it was), the damping used, the number of dead inputs, the seconds taken.
        RuntimeError if every damping tried failed.
    """
    start = time.perf_counter()
    q = layer.weight_quantizer
    original = layer.weight.detach()
    weight = original if shift is None else _shifted(original, h, shift, damp, name)
    flat, own = weight.reshape(weight.shape[0], -1), original.reshape(original.shape[0], -1)
    searched = {}
    if clip and static_groups:  # (round to nearest's objective before the search, for the report)
        searched["objective_rtn_unclipped"] = _rtn_objective(flat, grid_of(q, weight), h, own)
        searched["clipped"] = clip_search(q, weight, h)
    grid = grid_of(q, weight)
    refit = None
    if not static_groups and grid.groups is not None:
        if act_order:
            raise ValueError(f"{name}: static_groups=False takes each group's range when GPTQ reaches it, "
                             "which with act_order is not in column order and export cannot write; use "
                             "static_groups=True (the default) or act_order=False")
        grid.scale, grid.zero_point = grid.scale.clone(), grid.zero_point.clone()
        refit = _refitter(q)
    rtn = _rtn_objective(flat, grid, h, own)  # the layer's own weight rounded (before a refit moves the grid)
    quantized, used = gptq_quantize(weight, h, grid, block_size=block_size, damp=damp, act_order=act_order,
                                    refit=refit, name=name)
    report = {"objective_rtn": rtn, "objective_gptq": objective(flat, quantized, h),
              "kept": "gptq", "damp": used, "dead": int((h.diagonal() == 0).sum()), **searched}
    fitted = fit_scales(weight, quantized, q, h) if rescale and refit is None else None
    if fitted is not None:
        value = objective(flat, fitted[1], h)
        report["objective_unscaled"] = report["objective_gptq"]
        if value < report["objective_gptq"]:
            report["objective_gptq"], quantized = value, fitted[1]
        else:
            fitted = None
    if report["objective_gptq"] > report["objective_rtn"]:
        report["kept"] = "rtn"
        log.info("gptq: %s: GPTQ's objective %.4g exceeds round to nearest's %.4g; keeping round to nearest",
                 name, report["objective_gptq"], report["objective_rtn"])
    else:
        if refit is not None:
            q.set_qparams(grid.scale.clone(), grid.zero_point.to(torch.int32))
        if fitted is not None:
            q.set_qparams(fitted[0], q.qparams_for(weight)[1])
        with torch.no_grad():
            layer.weight.copy_(quantized.reshape(weight.shape))
        del quantized
        if not _on_grid(q, layer.weight.detach()):
            raise RuntimeError(f"{name}: GPTQ's weight is not on its quantizer's grid (a lowbit bug)")
    report["seconds"] = time.perf_counter() - start
    log.info("gptq: %s objective %.4g (round to nearest %.4g), %.2f s", name, report["objective_gptq"],
             report["objective_rtn"], report["seconds"])
    return report
