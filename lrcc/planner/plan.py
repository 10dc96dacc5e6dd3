"""Plan: price every candidate (error at the model's output, cost on the target), choose one per
site under the budget, apply the choice and refit it on the compressed model's own inputs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..budget import Budget
from ..codegen.torch_module import lower_to_torch
from ..errors import BudgetError, LrccError
from ..ir.graph import Graph, verify
from ..rewrites.low_rank import reduced_rank_regression, replace_with_lowrank
from ..rewrites.quantize import QuantSpec, quant_parts, quantize_gptq, stored_weight
from ..rewrites.rule import Candidate, Delta, Match, replace_site
from ..targets import Target
from ..targets.cost import graph_latency, op_cost, site_cost
from . import calibrate
from .calibrate import take_samples
from .sequential import sequential_refit
from .solve import Option, minimum_reachable, solve


@dataclass
class Decision:
    """What the planner did with one site, and why."""

    site: str
    rule: str
    choice: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    latency_before: float
    latency_after: float
    predicted_error: float
    candidate: Candidate | None = None
    reason: str = ""


@dataclass
class PlanResult:
    graph: Graph
    decisions: list[Decision]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    caps: dict[str, float] = field(default_factory=dict)
    predicted_error: float = 0.0
    dropped: list[tuple[str, str]] = field(default_factory=list)  # sites left alone: (site, reason)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every priced option (see candidate_record)


def example_dims(g: Graph, example_inputs: tuple) -> dict[str, int]:
    """Concrete values of the graph's symbolic dims at the example inputs."""
    dims: dict[str, int] = {}
    for node, x in zip(g.inputs(), example_inputs):
        for d, size in zip(node.shape or (), x.shape):
            if getattr(d, "is_Symbol", False):
                dims[str(d)] = int(size)
    return dims


def plan(g: Graph, match: Match, target: Target, budget: Budget, fit_batches: list[tuple], sens_batches: list[tuple],
         dims: dict[str, int], options: dict[str, Any] | None = None,
         progress: Callable[[str], None] | None = None,
         check: Callable[[Graph], float] | None = None,
         latency_ratio: Callable[[Graph], float] | None = None) -> PlanResult:
    """Choose one form per site; returns the rewritten graph and the decisions.

    With a max_error budget (and no params/bytes/latency caps) the allocation minimises parameters
    under a predicted-error cap of 0.7 max_error; `check(graph)` measures the real output error on
    held-out data and the cap is tightened until the measured error fits (at most 4 tries).
    With a latency budget and `latency_ratio(graph)` (the measured wall time over the original's),
    the estimated-latency cap is scaled by budget / measured until the measured ratio fits, within
    2% (at most 3 tries).
    """
    options = options or {}
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    original = lower_to_torch(g)
    sites = [s for s in match.candidates]
    node_of = {n.attrs["site"]: n for n in g.sites()}
    for n in g.nodes:  # attention sites (lrcc.rewrites.attention)
        if n.op == "aten" and "attention" in n.attrs and n.attrs["attention"].get("site") in match.candidates:
            node_of[n.attrs["attention"]["site"]] = n
    attention_sites = {s for s in sites if not node_of[s].is_site}
    linear_sites = [s for s in sites if s not in attention_sites]

    # With sequential refit the final factors are fitted on all of fit_batches; the whitened spectra
    # only serve to price candidates, for which a spread-out subset is enough.
    stat_batches = fit_batches
    if options.get("sequential", True):
        stat_batches = take_samples(fit_batches, int(options.get("stats_samples", 512)))
    _stage(progress, "input statistics", len(stat_batches), "batch")
    stats = calibrate.collect_input_stats(original, stat_batches, linear_sites, progress)
    fitted = sorted({c.site for s in attention_sites for c in match.candidates[s] if c.needs_calibration})
    if fitted:
        calibrate.collect_attention_inputs(original, fit_batches, fitted, stats, int(options.get("attention_samples", 16)))
    timings["input statistics"] = time.perf_counter() - t0
    for site in linear_sites:
        n_in = stats.xtx(site).shape[0]
        if stats.tokens.get(site, 0) < n_in:
            notes.append(f"layer {site}: only {stats.tokens.get(site, 0)} calibration rows for {n_in} inputs; "
                         "activation-aware fits may over-fit: give more calibration data")

    # Costs are known before any factorisation: drop candidates that save nothing the budget asks for.
    # flash (MCU targets): int8 bytes of a site as the C backend stores it; options["flash_of"](m, n_or_shapes)
    # prices a site, options["flash_fixed"] is everything else in flash (code, other weights)
    flash_of = options.get("flash_of")
    if budget.flash is not None and flash_of is None:
        raise LrccError("a flash budget needs an MCU target (e.g. target='stm32f746')")
    resources = [r for r in ("params", "bytes", "latency", "flash") if getattr(budget, r) is not None] or ["params"]
    candidates: dict[str, list[Candidate]] = {}
    dropped: list[tuple[str, str]] = []
    for site, cands in match.candidates.items():
        n = node_of[site]
        keep_cost = _keep_costs(g, n, target, dims, flash_of)
        useful = []
        for c in cands:
            cost = _cand_costs(g, n, c, target, dims, flash_of)
            if any(cost[r] < keep_cost[r] for r in resources):
                useful.append(c)
        if useful:
            candidates[site] = useful
        elif site in attention_sites:
            dropped.append((site, _attention_kept(g, n, cands, resources, target, dims)))
        else:
            dropped.append((site, f"no candidate saves {' or '.join(resources)}"))
    sites = [s for s in sites if s in candidates]

    t1 = time.perf_counter()
    _stage(progress, "candidates", len(candidates), "site")
    families: dict[str, tuple[str, Any]] = {}
    for site, cands in candidates.items():
        for c in cands:
            if c.family not in families:
                try:
                    families[c.family] = (site, c.spectrum(stats))
                except ValueError as e:
                    raise LrccError(f"layer {site}: {e}") from None
        if progress:
            progress(f"candidates: {site} ({len(cands)})")
    timings["candidates"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    _stage(progress, "output sensitivity", len(sens_batches), "batch")
    sens = calibrate.collect_sensitivity(original, sens_batches, families, probes=int(options.get("probes", 3)),
                                         seed=int(options.get("seed", 0)), progress=progress)
    errors = {fam: sens.truncation_errors(fam) for fam in families}
    timings["output sensitivity"] = time.perf_counter() - t2

    # options per site: keep, or one of the candidates
    table: dict[str, list[Option]] = {}
    total_params = total_bytes = total_flash = 0
    for site in sites:
        n = node_of[site]
        keep = _keep_costs(g, n, target, dims, flash_of)
        total_params += keep["params"]
        total_bytes += keep["bytes"]
        total_flash += keep["flash"]
        opts = [Option(0.0, keep, None)]
        for c in candidates[site]:
            err = float(errors[c.family][c.index])
            opts.append(Option(err, _cand_costs(g, n, c, target, dims, flash_of), c))
        table[site] = opts
    model_latency = graph_latency(g, target, dims)
    fixed_latency = model_latency - sum(o[0].costs["latency"] for o in table.values())

    caps: dict[str, float] = {}
    if budget.params is not None:
        caps["params"] = budget.params * total_params
    if budget.bytes is not None:
        caps["bytes"] = budget.bytes * total_bytes
    if budget.latency is not None:
        caps["latency"] = budget.latency * model_latency
    flash_fixed = float(options.get("flash_fixed", 0.0))
    if budget.flash is not None:
        caps["flash"] = float(budget.flash)
    totals = {"params": total_params, "bytes": total_bytes, "latency": model_latency, "flash": total_flash + flash_fixed}
    fixed = {"latency": fixed_latency, "flash": flash_fixed}
    for res, cap in caps.items():
        least = minimum_reachable(table, res, fixed.get(res, 0.0))
        if least > cap and res == "flash":
            raise BudgetError(f"budget flash={int(cap):,} bytes cannot be met on target {target.name}: the smallest "
                              f"reachable flash is {int(least):,} bytes (weights at the lowest ranks offered plus "
                              f"{int(flash_fixed):,} bytes of code and other constants); the model as given needs "
                              f"{int(totals['flash']):,}")
        if least > cap:
            raise BudgetError(f"budget {res}={cap / totals[res]:.4g} cannot be met on target {target.name}: "
                              f"the smallest reachable is {res}={least / totals[res]:.4g} of the original "
                              f"({least:.6g} vs {totals[res]:.6g})")
    t3 = time.perf_counter()
    max_error = budget.max_error if budget.max_error is not None else (None if caps else 0.01)
    # with params/bytes/latency caps: least error within them (max_error is checked afterwards);
    # with max_error alone: fewest parameters within a predicted-error cap, tightened until measured fits
    error_cap = None if caps else float(options.get("error_cap", 0.7 * max_error))
    tries = 0
    while True:
        tries += 1
        if error_cap is None:
            choice = solve(table, caps, fixed, objective="error")
        else:
            choice = solve(table, caps, fixed, objective="params", error_cap=error_cap)
        timings["allocation"] = timings.get("allocation", 0.0) + time.perf_counter() - t3
        new, decisions, predicted, refit_note = _apply(g, sites, table, choice, families, node_of, original, sens,
                                                       fit_batches, options, timings, progress, check)
        if refit_note:
            notes.append(refit_note)
        if latency_ratio is not None and "latency" in caps:
            ratio = latency_ratio(new)
            estimate = sum(o.costs["latency"] for o in (table[s][choice[s]] for s in table)) + fixed_latency
            notes.append(f"measured latency {ratio:.3f} of the original here (estimated "
                         f"{estimate / model_latency:.3f}), budget {budget.latency}")
            least = minimum_reachable(table, "latency", fixed_latency)
            if ratio <= 1.02 * budget.latency or tries >= 3 or caps["latency"] <= least:
                if ratio > 1.02 * budget.latency:
                    notes.append(f"FLAGGED: measured latency {ratio:.3f} of the original exceeds the budget "
                                 f"{budget.latency} after {tries} plan(s)")
                break
            caps["latency"] = max(least, caps["latency"] * budget.latency / ratio)
            notes.append(f"re-planned with an estimated-latency cap of {caps['latency'] / model_latency:.3f}")
            t3 = time.perf_counter()
            continue
        if error_cap is None or check is None or tries >= 4:
            break
        measured = check(new)
        if measured <= max_error:
            break
        notes.append(f"allocation at predicted error {error_cap:.2e} measured {measured:.2e} > max_error "
                     f"{max_error:.2e}: re-planned with a tighter cap")
        error_cap *= 0.8 * max_error / measured
        t3 = time.perf_counter()
    return PlanResult(new, decisions, timings, notes, caps, predicted, dropped, candidate_record(table, choice))


def candidate_record(table: dict[str, list[Option]], choice: dict[str, int]) -> list[dict[str, Any]]:
    """Every option the planner priced, one dict per (site, option), for the report's Pareto plot:
    site, rule, choice, params, bytes, est_latency_s, error (predicted) and whether it was chosen."""
    record = []
    for site, opts in table.items():
        for j, o in enumerate(opts):
            c: Candidate | None = o.payload
            record.append({"site": site, "rule": c.rule if c else "-", "choice": c.choice if c else "dense",
                           "params": int(o.costs["params"]), "bytes": int(o.costs["bytes"]),
                           "est_latency_s": float(o.costs["latency"]), "error": float(o.error),
                           "chosen": j == choice.get(site)})
    return record


def _stage(progress, name: str, total: int, unit: str) -> None:
    """Open a progress stage where the callback supports them (lrcc.compiler.Progress); the callback's
    messages in the stage then advance it by one each."""
    stage = getattr(progress, "stage", None)
    if stage is not None:
        stage(name, total, unit)


def _apply(g, sites, table, choice, families, node_of, original, sens, fit_batches, options, timings, progress,
           check=None):
    """Rewrite the chosen candidates into a copy of g and refit them sequentially: (graph, decisions,
    predicted error, a note or None). With check (graph -> held-out output error) the refit is kept
    only if it lowers the held-out error: fitted on few calibration sequences it can reproduce their
    outputs closely and generalise worse than the plain factors."""
    new = g.copy()
    decisions: list[Decision] = []
    fits: dict[str, Any] = {}
    refs: dict[str, dict[str, str]] = {}  # site -> role -> tensor name in the graph
    predicted = 0.0
    damp = float(options.get("metric_damping", 0.1))
    ridge = float(options.get("ridge", 1e-3))
    for site in sites:
        opt = table[site][choice[site]]
        keep = table[site][0]
        c: Candidate | None = opt.payload
        predicted += opt.error
        if c is None:
            reason = "kept dense: no cheaper form was worth its predicted error under this budget"
            dense = "dense"
            if not node_of[site].is_site:
                reason, dense = "kept exact: no cheaper form was worth its predicted error under this budget", "exact attention"
            decisions.append(Decision(site, "-", dense, keep.costs["params"], keep.costs["params"], keep.costs["bytes"],
                                      keep.costs["bytes"], keep.costs["latency"], keep.costs["latency"], 0.0, None, reason))
            continue
        fam = families[c.family][1]
        if c.form == "attention":
            from ..rewrites.attention import replace_attention
            replace_attention(new, c.node, c, fam)
            reason = (f"predicted output error {opt.error:.2e} for {keep.costs['latency'] - opt.costs['latency']:.3g} s "
                      "of estimated latency saved")
            decisions.append(Decision(site, c.rule, c.choice, keep.costs["params"], opt.costs["params"],
                                      keep.costs["bytes"], opt.costs["bytes"], keep.costs["latency"],
                                      opt.costs["latency"], opt.error, c, reason))
            continue
        if isinstance(fam, Delta):
            replace_site(new, c.node, dict(fam.parts), dict(fam.attrs))
            refs[site] = {role: f"{site}.{role}" for role in fam.parts}
        else:
            v, u = fam.factors(c.knobs["rank"])
            if c.knobs.get("dtype") == "float16":
                w = g.tensor(node_of[site].inputs[1])
                replace_site(new, c.node, {"v": v.half(), "u": u.half()},
                             {"m": int(w.shape[0]), "n": int(w.shape[1]), "rank": int(c.knobs["rank"])})
                refs[site] = {"v": f"{site}.v", "u": f"{site}.u"}
            else:
                replace_with_lowrank(new, c.node, v, u)
                refs[site] = {"v": f"{site}.lowrank_v", "u": f"{site}.lowrank_u"}
        if options.get("sequential", True) and c.refit != "none" and (c.refit != "lowrank" or c.knobs.get("method") == "whitened"):
            metric = sens.out_metric.get(site) if options.get("output_metric", True) else None
            if metric is not None:
                metric = metric + damp * float(metric.diagonal().mean()) * torch.eye(metric.shape[0], dtype=metric.dtype)
            fits[site] = _refit_fn(c, fam, metric, ridge, site)
        reason = (f"predicted output error {opt.error:.2e} for {keep.costs['bytes'] - opt.costs['bytes']:,} bytes "
                  f"and {keep.costs['params'] - opt.costs['params']:,} parameters saved")
        decisions.append(Decision(site, c.rule, c.choice, keep.costs["params"], opt.costs["params"], keep.costs["bytes"],
                                  opt.costs["bytes"], keep.costs["latency"], opt.costs["latency"], opt.error, c, reason))
    new.remove_unused_params()
    verify(new)
    note = None
    if fits:
        t4 = time.perf_counter()
        compressed = lower_to_torch(new)
        _stage(progress, "sequential refit", len(fits), "site")
        refit = sequential_refit(original, compressed, fit_batches, fits, progress=progress)
        plain = new.copy()  # (the tensors dict is copied: the plain factors stay in it)
        for site, parts in refit.items():
            for role, t in parts.items():
                new.tensors[refs[site][role]] = t
        kept = True
        if check is not None:
            with_refit, without = check(new), check(plain)
            kept = with_refit <= without
            note = (f"sequential refit {'kept' if kept else 'dropped'}: held-out output error {with_refit:.3g} with it, "
                    f"{without:.3g} without" + ("" if kept else " (it fitted the calibration batches, not the rest)"))
            if not kept:
                new = plain
        if kept:
            for d in decisions:
                if d.site in refit:
                    d.choice += " + sequential refit"
        timings["sequential refit"] = timings.get("sequential refit", 0.0) + time.perf_counter() - t4
    return new, decisions, predicted, note


def _refit_fn(c: Candidate, fam, metric, ridge: float, site: str):
    """How a chosen candidate is refit on the compressed model's inputs (see sequential.py)."""
    if c.refit == "lowrank":
        r = int(c.knobs["rank"])
        half = c.knobs.get("dtype") == "float16"

        def lowrank(h, xty):
            v, u = reduced_rank_regression(h, xty, r, metric, ridge, site)
            return {"v": v.half(), "u": u.half()} if half else {"v": v, "u": u}
        return lowrank
    if c.refit == "quant":
        spec = QuantSpec(int(c.knobs["bits"]), int(c.knobs["group"]))

        def quant(h, xty):
            # least-squares weight for the compressed inputs, then GPTQ with their Hessian
            n = h.shape[0]
            reg = h + ridge * float(h.diagonal().mean()) * torch.eye(n, dtype=h.dtype)
            w_star = torch.linalg.solve(reg, xty).T.float()
            return quant_parts(*quantize_gptq(w_star, h, spec), spec)
        return quant
    if c.refit in ("lq", "sparse"):
        r = int(c.knobs["rank"])
        main = {k: v for k, v in fam.parts.items() if k not in ("v", "u")}
        fixed = stored_weight(main, {**fam.attrs}).double()  # the quantised / sparse part stays

        def low(h, xty):
            v, u = reduced_rank_regression(h, xty - h @ fixed.T, r, metric, ridge, site)
            return {"v": v.half(), "u": u.half()}
        return low
    raise LrccError(f"layer {site}: unknown refit kind {c.refit!r}")


def _keep_costs(g: Graph, n, target: Target, dims: dict[str, int], flash_of) -> dict[str, float]:
    """A site's costs as it stands: params, bytes, estimated latency, flash."""
    lat = op_cost(g, n).latency(target, dims)
    if not n.is_site:  # attention: no parameters of its own
        return {"params": 0, "bytes": 0, "latency": lat, "flash": 0}
    return {"params": g.param_count(n), "bytes": _site_bytes(g, n), "latency": lat,
            "flash": flash_of(_site_shapes(g, n)) if flash_of else 0}


def _cand_costs(g: Graph, n, c: Candidate, target: Target, dims: dict[str, int], flash_of) -> dict[str, float]:
    """A candidate's costs: params, bytes, estimated latency, flash."""
    if c.cost is not None:  # attention forms: their own cost, symbolic in the sequence length
        return {"params": c.params, "bytes": c.bytes, "latency": c.cost.latency(target, dims), "flash": 0}
    return {"params": c.params, "bytes": c.bytes, "latency": _cand_latency(g, n, c, target, dims),
            "flash": flash_of(c.weight_shapes, int(c.knobs.get("bits", 8))) if flash_of else 0}


def _attention_kept(g: Graph, n, cands: list[Candidate], resources: list[str], target: Target,
                    dims: dict[str, int]) -> str:
    """Why an attention site stays exact when no form saves what the budget asks for."""
    if "latency" not in resources:
        return ("kept exact: attention forms save time, not " + " or ".join(resources)
                + "; a latency budget lets the planner weigh them")
    from ..targets.cost import crossover_length
    info = n.attrs["attention"]
    L = dims.get(info["seq_k"], int(info["seq_k"]) if info["seq_k"].isdigit() else None)
    best = [crossover_length(c.knobs["form"], c.knobs, target, info["heads"], info["head_dim"], info["value_dim"])
            for c in cands]
    known = [x for x in best if x is not None]
    first = f"from L={min(known)}" if known else "at no length up to 2^24"
    return f"kept exact: at L={L} no form is estimated faster on {target.name} than exact attention (the first wins {first})"


def _site_shapes(g: Graph, n) -> list[tuple[int, int]]:
    """The weight matrices (m, n) a site multiplies by, as it stands."""
    ts = [g.tensor(i) for i in n.inputs[1:]]
    if n.op == "lowrank_linear":
        return [tuple(ts[0].shape), tuple(ts[1].shape)]
    return [tuple(ts[0].shape)]


def _site_bytes(g: Graph, n) -> int:
    return sum(g.tensor(i).numel() * g.tensor(i).element_size() for i in n.inputs[1:])


def _cand_latency(g: Graph, n, c: Candidate, target: Target, dims: dict[str, int]) -> float:
    x = g[n.inputs[0]]
    return site_cost(_rows_expr(x.shape), c.weight_shapes, c.bytes, _bytes_of(x), _bytes_of(n)).latency(target, dims)


def _rows_expr(shape):
    import sympy
    return sympy.Mul(*shape[:-1]) if shape and len(shape) > 1 else sympy.Integer(1)


def _bytes_of(node):
    from ..ir.graph import numel
    import sympy
    if node.shape is None:
        return sympy.Integer(0)
    return numel(node.shape) * (node.dtype.itemsize if node.dtype is not None else 4)
