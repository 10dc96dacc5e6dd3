"""The multiple-choice knapsack solver against brute force on small random instances."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lrcc.errors import BudgetError, LrccError
from lrcc.planner.solve import Option, minimum_reachable, solve

RESOURCES = ("params", "bytes", "latency")
REL = 1e-9


@st.composite
def instances(draw, resources=RESOURCES, min_sites=2, max_sites=5, continuous=False):
    n_sites = draw(st.integers(min_sites, max_sites))
    sites: dict[str, list[Option]] = {}
    for s in range(n_sites):
        n_opts = draw(st.integers(1, 4))
        opts = []
        for _ in range(n_opts):
            if continuous:
                err = draw(st.floats(0, 10, allow_nan=False, allow_infinity=False))
            else:
                err = draw(st.integers(0, 40)) / 4
            costs = {r: float(draw(st.integers(0, 100))) for r in resources}
            opts.append(Option(err, costs, payload=(s, len(opts))))
        sites[f"layers.{s}.fc"] = opts
    return sites


def _total(sites, alloc, key):
    if key == "error":
        return sum(sites[s][j].error for s, j in alloc.items())
    return sum(sites[s][j].costs[key] for s, j in alloc.items())


def _all_allocations(sites):
    names = list(sites)
    for combo in itertools.product(*(range(len(sites[n])) for n in names)):
        yield dict(zip(names, combo))


def _feasible(sites, alloc, caps, fixed):
    return all(fixed.get(r, 0.0) + _total(sites, alloc, r) <= cap for r, cap in caps.items())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b), 1.0)


def _check_allocation(sites, caps, fixed, choice):
    # (a) exactly one option per site, a valid index
    assert set(choice) == set(sites)
    for s, j in choice.items():
        assert isinstance(j, int) and 0 <= j < len(sites[s])
    # (b) every cap holds
    for r, cap in caps.items():
        assert fixed.get(r, 0.0) + _total(sites, choice, r) <= cap * (1 + 1e-9) + 1e-9, r


@st.composite
def capped(draw, continuous=False):
    sites = draw(instances(continuous=continuous))
    resources = draw(st.lists(st.sampled_from(RESOURCES), min_size=1, max_size=3, unique=True))
    fixed = {"latency": float(draw(st.integers(0, 20)))} if draw(st.booleans()) else {}
    caps = {}
    for r in resources:
        lo = minimum_reachable(sites, r, fixed.get(r, 0.0))
        hi = fixed.get(r, 0.0) + sum(max(o.costs[r] for o in opts) for opts in sites.values())
        caps[r] = float(draw(st.integers(int(lo), int(hi) + 1)))
    return sites, caps, fixed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capped())
def test_error_objective_matches_brute_force(inst) -> None:
    sites, caps, fixed = inst
    feasible = [a for a in _all_allocations(sites) if _feasible(sites, a, caps, fixed)]
    if not feasible:
        # every cap is individually reachable, but not all of them at once
        with pytest.raises(BudgetError):
            solve(sites, caps, fixed)
        return
    best = min(_total(sites, a, "error") for a in feasible)
    choice = solve(sites, caps, fixed)
    _check_allocation(sites, caps, fixed, choice)
    assert _close(_total(sites, choice, "error"), best), (choice, best)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capped(continuous=True))
def test_error_objective_matches_brute_force_continuous_errors(inst) -> None:
    sites, caps, fixed = inst
    feasible = [a for a in _all_allocations(sites) if _feasible(sites, a, caps, fixed)]
    assume(feasible)
    best = min(_total(sites, a, "error") for a in feasible)
    choice = solve(sites, caps, fixed)
    _check_allocation(sites, caps, fixed, choice)
    # HiGHS works to ~1e-7 of the largest (scaled) objective coefficient, so errors that small are
    # indistinguishable from 0 to it (plus its 1e-6 absolute gap); with arbitrary float errors we allow that much slack
    scale = max(o.error for opts in sites.values() for o in opts)
    assert _total(sites, choice, "error") <= best + 1e-5 * max(scale, 1e-30) + REL * best, (choice, best)


@settings(max_examples=100, deadline=None)
@given(instances(), st.sampled_from(RESOURCES), st.integers(1, 50))
def test_cap_below_minimum_raises(sites, resource, shortfall) -> None:
    least = minimum_reachable(sites, resource)
    cap = least - shortfall
    with pytest.raises(BudgetError, match="smallest reachable") as e:
        solve(sites, {resource: cap})
    assert isinstance(e.value, LrccError)
    assert f"{least:.6g}" in str(e.value)


@settings(max_examples=50, deadline=None)
@given(instances())
def test_cap_exactly_at_minimum_is_met(sites) -> None:
    cap = minimum_reachable(sites, "params")
    choice = solve(sites, {"params": cap})
    assert _total(sites, choice, "params") == cap
    best = min(_total(sites, a, "error") for a in _all_allocations(sites) if _total(sites, a, "params") <= cap)
    assert _close(_total(sites, choice, "error"), best)


@st.composite
def error_capped(draw):
    sites = draw(instances(resources=("params", "bytes")))
    least_err = sum(min(o.error for o in opts) for opts in sites.values())
    most_err = sum(max(o.error for o in opts) for opts in sites.values())
    error_cap = draw(st.integers(int(least_err * 4), int(most_err * 4) + 1)) / 4
    caps = {}
    if draw(st.booleans()):
        lo = minimum_reachable(sites, "bytes")
        hi = sum(max(o.costs["bytes"] for o in opts) for opts in sites.values())
        caps["bytes"] = float(draw(st.integers(int(lo), int(hi))))
    return sites, error_cap, caps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(error_capped())
def test_params_objective_matches_brute_force(inst) -> None:
    sites, error_cap, caps = inst
    feasible = [a for a in _all_allocations(sites)
                if _total(sites, a, "error") <= error_cap and _feasible(sites, a, caps, {})]
    if not feasible:
        with pytest.raises(BudgetError):
            solve(sites, caps, objective="params", error_cap=error_cap)
        return
    best = min(_total(sites, a, "params") for a in feasible)
    choice = solve(sites, caps, objective="params", error_cap=error_cap)
    _check_allocation(sites, caps, {}, choice)
    assert _total(sites, choice, "error") <= error_cap * (1 + 1e-9) + 1e-9
    assert _close(_total(sites, choice, "params"), best), (choice, best)


@settings(max_examples=50, deadline=None)
@given(instances(resources=("params",)))
def test_params_objective_error_cap_below_minimum_raises(sites) -> None:
    least_err = sum(min(o.error for o in opts) for opts in sites.values())
    with pytest.raises(BudgetError):
        solve(sites, {}, objective="params", error_cap=least_err - 0.5)


def test_hand_instance() -> None:
    # two sites: keeping both costs 200 params; the cap forces exactly one cheap form,
    # and the cheaper-in-error one is on site b
    sites = {
        "a": [Option(0.0, {"params": 100}), Option(5.0, {"params": 40})],
        "b": [Option(0.0, {"params": 100}), Option(1.0, {"params": 50}), Option(9.0, {"params": 10})],
    }
    assert solve(sites, {"params": 150}) == {"a": 0, "b": 1}
    assert solve(sites, {"params": 200}) == {"a": 0, "b": 0}
    assert solve(sites, {"params": 90}) == {"a": 1, "b": 1}
    assert solve(sites, {"params": 50}) == {"a": 1, "b": 2}
    with pytest.raises(BudgetError, match="smallest reachable is 50"):
        solve(sites, {"params": 49})
    assert solve(sites, {}, objective="params", error_cap=1.0) == {"a": 0, "b": 1}
    assert solve(sites, {}, objective="params", error_cap=6.0) == {"a": 1, "b": 1}


def test_empty_and_bad_arguments() -> None:
    assert solve({}, {}) == {}
    sites = {"a": [Option(0.0, {"params": 1})]}
    with pytest.raises(ValueError):
        solve(sites, {}, objective="params")
    with pytest.raises(ValueError):
        solve(sites, {}, objective="latency")
