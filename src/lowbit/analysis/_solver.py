"""The mixed-precision integer program: one choice per layer, least total error under a budget.

With layers ``l``, choices ``c``, binaries ``x[l, c]``:

    minimise    sum cost[l, c] x[l, c]
    subject to  sum_c x[l, c] = 1                  for every layer l
                sum resource[l, c] x[l, c] <= budget

solved exactly by ``scipy.optimize.milp`` (HiGHS branch and bound, relative gap 0).  A choice
whose cost or resource is not finite is ruled out for that layer (its ``x`` bounded to 0).
``pareto_front`` sweeps the budget from the least to the most a best assignment needs and keeps
the non-dominated (resource, error) points.

Arrays are ``(layers, choices)`` float arrays; assignments are one choice index per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Slack on the budget row, relative to its scale: a budget computed as exactly an assignment's
# resource (the front's sweep end points) must not become infeasible through float rounding.
_REL_SLACK = 1e-9


@dataclass(frozen=True)
class Solution:
    """One optimal assignment: ``choice[l]`` indexes the choices of layer ``l``."""

    choice: tuple[int, ...]
    error: float  # sum of the chosen costs
    resource: float  # sum of the chosen resources


class InfeasibleBudget(ValueError):
    """No assignment fits the budget; ``smallest`` is the least resource any assignment needs."""

    def __init__(self, budget: float, smallest: float, message: str | None = None):
        self.budget, self.smallest = budget, smallest
        super().__init__(message or f"no assignment fits the budget {budget:.6g}: the smallest achievable is "
                                    f"{smallest:.6g}")


def _checked(costs, resources) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float arrays of one shape, and the mask of the allowed (layer, choice) pairs."""
    costs, resources = np.asarray(costs, dtype=float), np.asarray(resources, dtype=float)
    if costs.ndim != 2 or costs.shape != resources.shape or costs.size == 0:
        raise ValueError(f"costs and resources must be (layers, choices) arrays of one shape, got "
                         f"{costs.shape} and {resources.shape}")
    allowed = np.isfinite(costs) & np.isfinite(resources)
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        raise ValueError(f"layer(s) {empty.tolist()} have no choice with a finite cost and resource")
    return np.where(allowed, costs, 0.0), np.where(allowed, resources, 0.0), allowed


def _extreme(values: np.ndarray, allowed: np.ndarray, pick) -> float:
    return float(sum(pick(row[ok]) for row, ok in zip(values, allowed)))


def smallest_resource(resources, allowed=None) -> float:
    """The least total resource of any assignment (each layer at its cheapest allowed choice)."""
    resources = np.asarray(resources, dtype=float)
    allowed = np.isfinite(resources) if allowed is None else allowed
    return _extreme(resources, allowed, np.min)


def solve(costs, resources, budget: float) -> Solution:
    """The assignment of least total cost whose total resource is at most ``budget``.

    Args:
        costs, resources: ``(layers, choices)`` arrays; a non-finite entry rules that choice out
            for that layer.
        budget: the most total resource allowed.

    Returns:
        The optimal ``Solution`` (ties: whichever HiGHS finds first).

    Raises:
        InfeasibleBudget: ``budget`` is below the smallest achievable total resource.

    Example:
        >>> solve([[1.0, 0.0], [5.0, 0.0]], [[4, 8], [4, 8]], 12).choice   # 8 bits where it hurts most
        (0, 1)
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    costs, resources, allowed = _checked(costs, resources)
    n_layers, n_choices = costs.shape
    smallest = _extreme(resources, allowed, np.min)
    slack = _REL_SLACK * max(1.0, abs(budget), float(np.abs(resources).sum()))
    if budget + slack < smallest:
        raise InfeasibleBudget(budget, smallest)
    one_each = np.kron(np.eye(n_layers), np.ones(n_choices))  # row l sums x[l, :]
    constraints = [LinearConstraint(one_each, 1, 1),
                   LinearConstraint(resources.reshape(1, -1), -np.inf, budget + slack)]
    result = milp(costs.ravel(), constraints=constraints, integrality=np.ones(costs.size),
                  bounds=Bounds(0, allowed.ravel().astype(float)), options={"mip_rel_gap": 0.0})
    if result.x is None:  # feasible by the check above; HiGHS failing otherwise is a bug worth seeing
        raise RuntimeError(f"scipy.optimize.milp found no solution: {result.message}")
    choice = tuple(int(i) for i in np.round(result.x).reshape(n_layers, n_choices).argmax(axis=1))
    return _solution(costs, resources, choice)


def _solution(costs: np.ndarray, resources: np.ndarray, choice: tuple[int, ...]) -> Solution:
    rows = np.arange(len(choice))
    return Solution(choice=choice, error=float(costs[rows, choice].sum()),
                    resource=float(resources[rows, choice].sum()))


def pareto_front(costs, resources, points: int = 12) -> list[Solution]:
    """Optimal assignments for ``points`` budgets evenly spaced from the smallest achievable
    resource to the resource of the unconstrained best assignment, deduplicated and reduced to
    the non-dominated ones (no other point has both less or equal resource and less or equal
    error, one strictly), in increasing resource.

    The sweep samples the front: between two budgets a point may be missed, never a dominated
    one reported.
    """
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}")
    costs_, resources_, allowed = _checked(costs, resources)
    low = _extreme(resources_, allowed, np.min)
    # The unconstrained optimum (per layer the least cost; least resource among equal costs)
    # needs no more budget: beyond it every solution is the same.
    masked = np.where(allowed, costs_, np.inf)
    best = tuple(int(min(np.flatnonzero(row == row.min()), key=lambda c, l=l: resources_[l, c]))
                 for l, row in enumerate(masked))
    high = _solution(costs_, resources_, best).resource
    budgets = np.linspace(low, high, points) if points > 1 else np.array([high])
    found = {s.choice: s for s in (solve(costs, resources, float(b)) for b in budgets)}
    return non_dominated(found.values())


def non_dominated(solutions) -> list[Solution]:
    """The solutions no other one dominates, in increasing resource (then error)."""
    ordered = sorted(solutions, key=lambda s: (s.resource, s.error))
    front: list[Solution] = []
    for s in ordered:  # increasing resource: s is dominated iff an earlier kept point has error <= its
        if front and front[-1].error <= s.error:
            continue
        front.append(s)
    return front
