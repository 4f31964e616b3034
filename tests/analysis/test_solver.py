"""The mixed-precision ILP against brute force, a hand instance and its edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lowbit.analysis._solver import InfeasibleBudget, non_dominated, pareto_front, smallest_resource, solve

pytest.importorskip("scipy")


def brute_force(costs, resources, budget):
    """Least cost over every assignment that fits, or None."""
    best = None
    for choice in itertools.product(*(range(len(row)) for row in costs)):
        cost = sum(costs[l][c] for l, c in enumerate(choice))
        res = sum(resources[l][c] for l, c in enumerate(choice))
        if res <= budget + 1e-9 and math.isfinite(cost) and math.isfinite(res) and (best is None or cost < best):
            best = cost
    return best


def test_hand_instance_known_optimum():
    # Three layers, choices (4 bits, 8 bits, float): 4-bit costs 1 / 10 / 2, 8-bit 0.1 / 1 / 0.2.
    costs = [[1.0, 0.1, 0.0], [10.0, 1.0, 0.0], [2.0, 0.2, 0.0]]
    params = [100, 100, 100]
    resources = [[p * b for b in (4, 8, 32)] for p in params]
    # Budget of 1600 bit-params: exactly one layer may go to 8 bits: the middle one (saves 9).
    sol = solve(costs, resources, 1600)
    assert sol.choice == (0, 1, 0) and sol.error == pytest.approx(4.0) and sol.resource == 1600
    # 2000: two at 8 bits (middle and last: cost 1 + 1 + 0.2), or middle at float (1 + 0 + 2 = 3, needs 4000).
    assert solve(costs, resources, 2000).choice == (0, 1, 1)
    # Everything at float when the budget allows: cost 0.
    assert solve(costs, resources, 9600).error == 0.0


@pytest.mark.parametrize("seed", range(30))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layers, n_choices = rng.integers(1, 6), rng.integers(1, 4)
    costs = rng.exponential(1.0, (n_layers, n_choices)).round(3)
    resources = rng.integers(1, 20, (n_layers, n_choices)).astype(float)
    if seed % 5 == 0 and n_choices > 1:  # some choices ruled out
        costs[0, 0] = np.inf
    low = smallest_resource(np.where(np.isfinite(costs), resources, np.inf))
    for budget in np.linspace(low, resources.max(axis=1).sum(), 4):
        expected = brute_force(costs.tolist(), resources.tolist(), budget)
        sol = solve(costs, resources, budget)
        assert sol.error == pytest.approx(expected, abs=1e-9)
        assert sol.resource <= budget + 1e-9


def test_infeasible_budget_names_the_smallest():
    with pytest.raises(InfeasibleBudget, match=r"smallest achievable is 8") as info:
        solve([[1.0, 0.0], [1.0, 0.0]], [[4, 32], [4, 32]], 7.5)
    assert info.value.smallest == 8
    assert isinstance(info.value, ValueError)


def test_bad_shapes_and_empty_layers():
    with pytest.raises(ValueError, match="one shape"):
        solve([[1.0, 2.0]], [[1.0]], 3)
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\]"):
        solve([[1.0, 2.0], [np.inf, np.nan]], [[1, 2], [1, 2]], 3)


def test_pareto_front_is_non_dominated_and_spans_the_range():
    rng = np.random.default_rng(7)
    costs = rng.exponential(1.0, (6, 3))
    costs[:, 2] = 0.0  # float: no error, most resource
    resources = np.outer(rng.integers(1, 9, 6), [4, 8, 32]).astype(float)
    front = pareto_front(costs, resources, points=25)
    assert front[0].resource == pytest.approx(smallest_resource(resources))
    assert front[-1].error == 0.0
    for a, b in itertools.pairwise(front):
        assert a.resource < b.resource and a.error > b.error
    # every point is the optimum at its own budget
    for p in front:
        assert p.error == pytest.approx(brute_force(costs.tolist(), resources.tolist(), p.resource))


def test_non_dominated_drops_dominated_and_duplicates():
    from lowbit.analysis._solver import Solution

    pts = [Solution((0,), 3.0, 1.0), Solution((1,), 2.0, 2.0), Solution((2,), 2.5, 3.0),
           Solution((3,), 2.0, 2.0), Solution((4,), 1.0, 4.0)]
    assert [s.choice for s in non_dominated(pts)] == [(0,), (1,), (4,)]
