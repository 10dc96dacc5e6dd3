"""The allocation: one option per site, least predicted error, within the budget.

A multiple-choice knapsack, solved exactly as an integer program (scipy.optimize.milp / HiGHS):
binary x[s, j] = 1 when site s takes option j (option 0 keeps the site as it is),
  minimise   sum err[s, j] x[s, j]
  subject to sum_j x[s, j] = 1 for every site,
             sum cost_k[s, j] x[s, j] <= cap_k for every budgeted resource k.
With only an error cap (max_error) the roles swap: minimise parameters subject to the error cap.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import BudgetError


@dataclass
class Option:
    """One choice for one site: its predicted error and its cost in every resource."""

    error: float
    costs: dict[str, float]  # resource -> amount (params, bytes, latency)
    payload: object = None   # the Candidate, or None for "keep"


def minimum_reachable(sites: dict[str, list[Option]], resource: str, fixed: float = 0.0) -> float:
    """The least total of a resource any allocation can reach."""
    return fixed + sum(min(o.costs[resource] for o in opts) for opts in sites.values())


def solve(sites: dict[str, list[Option]], caps: dict[str, float], fixed: dict[str, float] | None = None,
          objective: str = "error", error_cap: float | None = None) -> dict[str, int]:
    """Pick one option index per site. caps: resource -> cap on (fixed + chosen sum).

    objective "error": minimise total error under the caps; objective "params": minimise parameters
    with total error <= error_cap (and the other caps). Raises BudgetError naming the smallest
    reachable value when a cap cannot be met.
    """
    fixed = fixed or {}
    names = list(sites)
    for res, cap in caps.items():
        least = minimum_reachable(sites, res, fixed.get(res, 0.0))
        if least > cap * (1 + 1e-9):
            raise BudgetError(f"budget {res} cannot be met: the smallest reachable is {least:.6g}, asked for {cap:.6g}")
    index: list[tuple[int, int]] = [(s, j) for s, name in enumerate(names) for j in range(len(sites[name]))]
    nv = len(index)
    if nv == 0:
        return {}
    err = np.array([sites[names[s]][j].error for s, j in index], dtype=float)
    rows, lo, hi = [], [], []
    # one choice per site
    for s, name in enumerate(names):
        row = np.zeros(nv)
        for v, (ss, _) in enumerate(index):
            if ss == s:
                row[v] = 1.0
        rows.append(row); lo.append(1.0); hi.append(1.0)
    for res, cap in caps.items():
        row = np.array([sites[names[s]][j].costs[res] for s, j in index], dtype=float)
        rows.append(row); lo.append(-np.inf); hi.append(cap - fixed.get(res, 0.0))
    if objective == "error":
        c = err
    elif objective == "params":
        if error_cap is None:
            raise ValueError("objective 'params' needs error_cap")
        c = np.array([sites[names[s]][j].costs["params"] for s, j in index], dtype=float)
        rows.append(err); lo.append(-np.inf); hi.append(error_cap)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    # scale rows for the solver's tolerances
    a = np.vstack(rows)
    scale = np.maximum(np.abs(a).max(axis=1), 1e-30)
    a = a / scale[:, None]
    lo_arr = np.array(lo) / scale
    hi_arr = np.array(hi) / scale
    cscale = max(np.abs(c).max(), 1e-30)
    res = milp(c / cscale, constraints=LinearConstraint(a, lo_arr, hi_arr), integrality=np.ones(nv),
               bounds=Bounds(0, 1), options={"time_limit": 60, "mip_rel_gap": 1e-9})
    if res.x is None:
        raise BudgetError(f"no allocation meets the budget ({res.message})")
    choice: dict[str, int] = {}
    for v, (s, j) in enumerate(index):
        if res.x[v] > 0.5:
            choice[names[s]] = j
    choice = _polish(sites, names, choice, caps, fixed, objective)
    # guard against solver tolerance: verify caps exactly
    for r, cap in caps.items():
        total = fixed.get(r, 0.0) + sum(sites[n][choice[n]].costs[r] for n in names)
        if total > cap * (1 + 1e-6) + 1e-9:
            raise BudgetError(f"the solver's allocation exceeds the {r} cap ({total:.6g} > {cap:.6g})")
    return choice


def _polish(sites, names, choice, caps, fixed, objective):
    """Undo the solver's tolerance: where another option of a site is strictly better on the
    objective and the swap keeps every cap, take it (HiGHS treats differences below ~1e-7 of the
    largest coefficient as zero, so e.g. a tiny error can stand in for an exact zero)."""
    key = (lambda o: o.error) if objective == "error" else (lambda o: o.costs["params"])
    totals = {r: fixed.get(r, 0.0) + sum(sites[n][choice[n]].costs[r] for n in names) for r in caps}
    for n in names:
        cur = sites[n][choice[n]]
        for j, o in enumerate(sites[n]):
            if key(o) >= key(cur):
                continue
            new_tot = {r: totals[r] - cur.costs[r] + o.costs[r] for r in caps}
            if all(new_tot[r] <= caps[r] for r in caps):
                if objective == "params":
                    continue  # the error cap couples sites; keep the solver's feasible choice
                choice[n], cur, totals = j, o, new_tot
    return choice
