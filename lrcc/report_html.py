"""The compile report as a web page: OUT/report.html, and OUT/pareto.png plotting the candidates
the planner priced (lrcc.report.Report.candidates) against their predicted error.

Every number is formatted here; the template (lrcc/templates/report.html.j2) only lays them out.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jinja2

from .budget import Budget
from .errors import BudgetError
from .report import Report

TEMPLATE_DIR = Path(__file__).parent / "templates"
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=True)
PLOT_FILE = "pareto.png"
DASH = "\u2013"


def write_html(report: Report, out: str | os.PathLike) -> Path:
    """Write OUT/report.html (and OUT/pareto.png where the report has a candidate record and
    matplotlib is installed); returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot = _write_plot(report, out / PLOT_FILE)
    page = _ENV.get_template("report.html.j2").render(**_context(report, plot))
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def model_frontier(candidates: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """The lower convex hull of (total bytes, total predicted error) over all allocations (one option
    per site), from the least-error allocation to the fewest bytes.

    The planner's predicted error is a sum over sites, so the hull is every site's own hull walked
    in order of least error added per byte saved (the Lagrangian relaxation of the planner's
    knapsack). Each vertex is a real allocation; allocations between vertices may lie above it.
    """
    by_site: dict[str, list[tuple[int, float]]] = {}
    for c in candidates:
        by_site.setdefault(c["site"], []).append((int(c["bytes"]), float(c["error"])))
    total_bytes, total_error = 0, 0.0
    steps: list[tuple[float, int, float]] = []  # (error per byte saved, bytes saved, error added)
    for points in by_site.values():
        hull = _site_hull(points)
        total_bytes += hull[0][0]
        total_error += hull[0][1]
        for (b0, e0), (b1, e1) in zip(hull, hull[1:]):
            steps.append(((e1 - e0) / (b0 - b1), b0 - b1, e1 - e0))
    steps.sort(key=lambda s: s[0])
    curve = [(total_bytes, total_error)]
    for _, saved, added in steps:
        b, e = curve[-1]
        curve.append((b - saved, e + added))
    return curve


def _site_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """One site's options on its lower convex hull: bytes falling, error rising, slopes rising."""
    front: list[tuple[int, float]] = []
    for b, e in sorted(set(points), key=lambda p: (p[1], p[0])):  # least error first
        if not front or b < front[-1][0]:
            front.append((b, e))
    hull: list[tuple[int, float]] = []
    for b, e in front:  # x = bytes saved grows along front; keep the lower hull
        while len(hull) >= 2:
            (b0, e0), (b1, e1) = hull[-2], hull[-1]
            if (b0 - b1) * (e - e0) - (e1 - e0) * (b0 - b) > 0:
                break
            hull.pop()
        hull.append((b, e))
    return hull


def _write_plot(report: Report, path: Path) -> dict[str, Any]:
    """Draw the Pareto plot; returns what the page says about it (src None where there is none)."""
    if not report.candidates:
        return {"src": None, "why": "This report has no record of the planner's candidates (it was written by an "
                                    "older lrcc, or no site had a candidate); compile again to plot them."}
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return {"src": None, "why": "matplotlib is not installed, so there is no plot; "
                                    "pip install matplotlib and run `lrcc report` again."}
    cands = report.candidates
    dense = {c["site"]: int(c["bytes"]) for c in cands if c["rule"] == "-"}
    for c in cands:  # reports without a dense option: each site's largest option stands in
        if c["rule"] != "-":
            dense[c["site"]] = max(dense.get(c["site"], 0), int(c["bytes"]))
    original = sum(dense.values()) or 1
    curve = model_frontier(cands)
    chosen = [c for c in cands if c["chosen"]]
    plan_bytes = sum(int(c["bytes"]) for c in chosen)
    plan_error = sum(float(c["error"]) for c in chosen)
    measured = report.verification.get("rel_error")
    positive = [float(c["error"]) for c in cands if c["error"] > 0] + [e for _, e in curve if e > 0]
    positive += [v for v in (plan_error, measured) if v]
    floor = min(positive) / 10 if positive else 1e-12
    clip = lambda e: max(float(e), floor)  # noqa: E731  (log axes: zero error drawn at the floor)

    fig = Figure(figsize=(11, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.plot([b / original for b, _ in curve], [clip(e) for _, e in curve], "-o", ms=3, color="C0",
              label="best predicted error at each size")
    if chosen:
        left.plot([plan_bytes / original], [clip(plan_error)], "*", ms=14, color="C3", label="chosen plan, predicted")
    if measured is not None:
        left.plot([plan_bytes / original], [clip(measured)], "x", ms=10, mew=2, color="k",
                  label="chosen plan, measured")
    budget = _budget(report.budget)
    if budget is not None and budget.bytes is not None:
        left.axvline(budget.bytes, ls="--", color="C2", lw=1, label=f"budget bytes={budget.bytes:g}")
    if budget is not None and budget.max_error is not None:
        left.axhline(budget.max_error, ls=":", color="C3", lw=1, label=f"budget max_error={budget.max_error:g}")
    left.set(yscale="log", xlabel="weight bytes of the rewritable sites, fraction of the original",
             ylabel="predicted output error (rel. squared)", title="model: error/size Pareto curve")
    left.grid(True, which="major", alpha=0.3)
    left.legend(fontsize=8)

    others = [c for c in cands if not c["chosen"]]
    right.plot([int(c["bytes"]) / max(dense[c["site"]], 1) for c in others], [clip(c["error"]) for c in others],
               "o", ms=3, color="0.5", alpha=0.25, label="candidates priced")
    right.plot([int(c["bytes"]) / max(dense[c["site"]], 1) for c in chosen], [clip(c["error"]) for c in chosen],
               "o", ms=6, color="C3", mec="k", label="chosen, one per site")
    right.set(yscale="log", xlabel="bytes, fraction of the site's original", ylabel="predicted output error",
              title=f"per site: {len(cands)} options over {len(dense)} sites")
    right.grid(True, which="major", alpha=0.3)
    right.legend(fontsize=8)
    fig.savefig(path, format="png", metadata={"Software": None})

    caption = (f"Left: the model-level Pareto curve, the least total predicted output error the planner's additive "
               f"error model reaches at each total weight size of the {len(dense)} rewritable sites (the lower "
               f"convex hull over all allocations of the {len(cands)} priced options), with the chosen plan's "
               f"predicted error (star) and its error measured after sequential refit (cross). Right: every "
               f"priced option of every site as a faint point, bytes as a fraction of that site's original, and "
               f"the chosen one of each site highlighted. Errors of zero (a site kept dense) are drawn at "
               f"{floor:.1e}, the bottom of the log axis.")
    return {"src": PLOT_FILE, "why": "", "caption": caption}


def _budget(spec: str) -> Budget | None:
    try:
        return Budget.parse(spec)
    except BudgetError:
        return None


def _int(v) -> str:
    return DASH if v is None else f"{int(v):,}"


def _err(v) -> str:
    return DASH if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.2e}"


def _ratio(after, before) -> str:
    if after is None or not before:
        return DASH
    return f"{after / before:.3f}"


def _ms(v) -> str:
    return DASH if v is None else f"{float(v) * 1e3:.3f} ms"


def _context(report: Report, plot: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for r in report.rows:
        rows.append({"site": r.get("site", DASH), "rule": r.get("rule", DASH), "choice": r.get("choice", DASH),
                     "params_before": _int(r.get("params_before")), "params_after": _int(r.get("params_after")),
                     "params_ratio": _ratio(r.get("params_after"), r.get("params_before")),
                     "bytes_before": _int(r.get("bytes_before")), "bytes_after": _int(r.get("bytes_after")),
                     "bytes_ratio": _ratio(r.get("bytes_after"), r.get("bytes_before")),
                     "latency": _ms(r.get("est_latency_s")), "error": _err(r.get("error")),
                     "reason": r.get("reason", ""), "compressed": r.get("rule", "-") != "-"})
    t = report.totals
    totals = [
        {"what": "parameters", "before": _int(t.get("params_before")), "after": _int(t.get("params_after")),
         "ratio": _ratio(t.get("params_after"), t.get("params_before"))},
        {"what": "weight bytes", "before": _int(t.get("bytes_before")), "after": _int(t.get("bytes_after")),
         "ratio": _ratio(t.get("bytes_after"), t.get("bytes_before"))},
        {"what": f"model latency (roofline, {report.target})", "before": _ms(t.get("model_latency_before_s")),
         "after": _ms(t.get("model_latency_after_s")),
         "ratio": _ratio(t.get("model_latency_after_s"), t.get("model_latency_before_s"))},
    ]
    v = report.verification
    measured = None
    if v:
        measured = {"rel_error": _err(v.get("rel_error")), "data": v.get("data", "held-out data"),
                    "cosine_mean": f"{v['cosine_mean']:.4f}" if "cosine_mean" in v else DASH,
                    "cosine_p5": f"{v['cosine_p5']:.4f}" if "cosine_p5" in v else DASH,
                    "samples": _int(v.get("samples"))}
    return {"title": f"lrcc report: {report.target}, budget {report.budget}", "target": report.target,
            "budget": report.budget, "rows": rows, "totals": totals, "predicted_error": _err(t.get("error")),
            "checks": _budget_checks(report), "measured": measured, "notes": list(report.notes),
            "rejected": [{"site": r.get("site", DASH), "rule": r.get("rule", DASH), "reason": r.get("reason", "")}
                         for r in report.rejected],
            "timings": [{"stage": k, "seconds": f"{s:.1f} s"} for k, s in report.timings.items()],
            "plot": plot, "arena": _arena(report), "attention": _attention(report),
            "n_candidates": len(report.candidates), "n_sites": len({c["site"] for c in report.candidates})}


def _budget_checks(report: Report) -> list[dict[str, str]]:
    """Each budgeted quantity: its limit, what the compiled model reached, and whether it fits."""
    budget = _budget(report.budget)
    if budget is None:
        return []
    t = report.totals
    reached = {
        "params": (t.get("params_after"), t.get("params_before")),
        "bytes": (t.get("bytes_after"), t.get("bytes_before")),
        "latency": (t.get("model_latency_after_s"), t.get("model_latency_before_s")),
    }
    checks = []
    for name, (after, before) in reached.items():
        limit = getattr(budget, name)
        if limit is None:
            continue
        value = after / before if after is not None and before else None
        checks.append(_check(f"{name} (fraction of the original)", f"{limit:g}",
                             DASH if value is None else f"{value:.4f}", None if value is None else value <= limit * (1 + 1e-9)))
    if budget.max_error is not None:
        value = t.get("measured_error", report.verification.get("rel_error"))
        checks.append(_check("output error (measured, held out)", f"{budget.max_error:g}", _err(value),
                             None if value is None else value <= budget.max_error))
    for name, key in (("sram", "arena_bytes"), ("flash", "flash_bytes")):
        limit = getattr(budget, name)
        if limit is None:
            continue
        value = t.get(key)
        checks.append(_check(f"{name} bytes", _int(limit), "not recorded" if value is None else _int(value),
                             None if value is None else value <= limit))
    return checks


def _check(what: str, limit: str, reached: str, ok: bool | None) -> dict[str, str]:
    verdict = {True: "within", False: "OVER", None: DASH}[ok]
    return {"what": what, "limit": limit, "reached": reached, "verdict": verdict,
            "status": {True: "ok", False: "over", None: "unknown"}[ok]}


def _attention(report: Report) -> list[dict[str, Any]]:
    """Per attention shape: each form's crossover length per target, as table rows."""
    out = []
    for a in report.attention:
        targets = sorted({t for f in a["forms"] for t in f["crossover"]}, key=lambda t: (t != report.target, t))
        rows = [{"choice": f["choice"], "cells": [DASH if f["crossover"].get(t) is None else f"{f['crossover'][t]:,}"
                                                  for t in targets]} for f in a["forms"]]
        out.append({"shape": f"{a['heads']} heads x {a['head_dim']}", "length": a["length"],
                    "sites": ", ".join(a["sites"]), "targets": targets, "rows": rows})
    return out


def _arena(report: Report) -> dict[str, Any] | None:
    """The static arena's buffers laid out as bars (MCU targets); None where the report has none."""
    if not report.arena:
        return None
    end = max(int(b["offset"]) + int(b["bytes"]) for b in report.arena)
    size = max(int(report.totals.get("arena_bytes") or 0), end, 1)
    buffers = []
    for b in sorted(report.arena, key=lambda b: (int(b["offset"]), str(b.get("name", "")))):
        live = f"{b['first']}\u2013{b['last']}" if "first" in b and "last" in b else DASH
        buffers.append({"name": str(b.get("name", DASH)), "offset": _int(b["offset"]), "bytes": _int(b["bytes"]),
                        "live": live, "left": f"{100 * int(b['offset']) / size:.2f}",
                        "width": f"{max(100 * int(b['bytes']) / size, 0.2):.2f}"})
    return {"size": _int(size), "buffers": buffers}
