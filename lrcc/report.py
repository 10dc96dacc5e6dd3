"""The compile report: one row per site, totals, and what the error was measured on."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


def _fmt_int(v) -> str:
    return f"{int(v):,}"


@dataclass
class Report:
    """Per-site decisions and totals. str() is a readable table; .rows a list of dicts."""

    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    target: str
    budget: str
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    # every option the planner priced, one dict per (site, option): site, rule, choice, params, bytes,
    # est_latency_s, error (predicted), chosen; the kept dense form is rule "-", choice "dense"
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # MCU targets: the static arena's buffers, one dict each: name, offset, bytes, and optionally
    # first/last (the steps it is live in); empty where the backend records none
    arena: list[dict[str, Any]] = field(default_factory=list)
    # attention sites: one dict per distinct shape: sites, heads, head_dim, value_dim, length (the
    # sequence length priced), and forms: [{"choice", "crossover": {target: L or None}}], L the
    # estimated sequence length from which the form beats exact attention on that target
    attention: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, timings: bool = True) -> str:
        """The report as JSON; timings=False leaves out the wall-clock timings, the one part that
        differs between two runs of the same compile (CompiledModel.save writes them apart, in
        timings.json, so that report.json is reproducible byte for byte)."""
        d = {"target": self.target, "budget": self.budget, "rows": self.rows, "totals": self.totals,
             "verification": self.verification, "notes": self.notes, "timings": self.timings,
             "rejected": self.rejected, "arena": self.arena, "attention": self.attention}
        if not timings:
            del d["timings"]
        head = json.dumps(d, indent=2)  # key order kept: str() prints timings in order
        # candidates last, one per line: thousands of them on a large model
        cands = ",\n".join("    " + json.dumps(c) for c in self.candidates)
        return head[:-2] + ',\n  "candidates": ' + (f"[\n{cands}\n  ]" if cands else "[]") + "\n}"

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """A Report from to_json()'s text; keys added since (candidates, arena) default to empty."""
        d = json.loads(text)
        return cls(d["rows"], d["totals"], d["target"], d["budget"], d.get("notes", []), d.get("verification", {}),
                   d.get("timings", {}), d.get("rejected", []), d.get("candidates", []), d.get("arena", []),
                   d.get("attention", []))

    def __str__(self) -> str:
        return self.text()

    def text(self, timings: bool = True) -> str:
        """The readable table str() gives; timings=False leaves out the wall-clock time line."""
        head = ["site", "choice", "params", "after", "est. latency", "error"]
        body = []
        for r in self.rows:
            body.append([r["site"], r["choice"], _fmt_int(r["params_before"]), _fmt_int(r["params_after"]),
                         f"{r['est_latency_s'] * 1e3:.3f} ms", f"{r['error']:.2e}"])
        t = self.totals
        body.append(["TOTAL", f"{t['params_after'] / max(t['params_before'], 1):.3f} of params",
                     _fmt_int(t["params_before"]), _fmt_int(t["params_after"]),
                     f"{t['est_latency_s'] * 1e3:.3f} ms", f"{t['error']:.2e}"])
        widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
        lines = [f"lrcc report: target {self.target}, budget {self.budget}"]
        fmt = lambda row: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        lines.append(fmt(head))
        lines.append("  ".join("-" * w for w in widths))
        lines += [fmt(r) for r in body[:-1]]
        lines.append("  ".join("-" * w for w in widths))
        lines.append(fmt(body[-1]))
        lines.append(f"model latency (roofline, {self.target}): {t['model_latency_before_s'] * 1e3:.3f} ms -> "
                     f"{t['model_latency_after_s'] * 1e3:.3f} ms")
        if "arena_bytes" in t:
            lines.append(f"int8 C: arena {_fmt_int(t['arena_bytes'])} B (greedy-by-size {_fmt_int(t['arena_bytes_greedy'])} B, "
                         f"no reuse {_fmt_int(t['arena_bytes_naive'])} B) + stack ~{_fmt_int(t['stack_bytes_estimate'])} B; "
                         f"flash ~{_fmt_int(t['flash_bytes'])} B ({_fmt_int(t['const_bytes'])} B of constants)")
        v = self.verification
        if v:
            lines.append(f"measured output error on {v['data']}: relative squared error {v['rel_error']:.3e}, "
                         f"cosine mean {v['cosine_mean']:.4f} (p5 {v['cosine_p5']:.4f}) over {v['samples']} samples")
        lines.append("error column: predicted contribution to the output's relative squared error "
                     "(first-order, from output gradients on calibration data)")
        lines += self._attention_lines()
        if self.rejected:
            lines.append(f"{len(self.rejected)} site(s) not rewritten (rule guards, or the planner):")
            lines += [f"  {r['site']}: {r['rule']}: {r['reason']}" for r in self.rejected]
        lines += [f"note: {n}" for n in self.notes]
        if timings and self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        return "\n".join(lines)

    def _attention_lines(self) -> list[str]:
        """Per attention shape: from which sequence length each form is estimated to beat exact attention."""
        lines = []
        for a in self.attention:
            targets = sorted({t for f in a["forms"] for t in f["crossover"]}, key=lambda t: (t != self.target, t))
            sites = a["sites"]
            named = ", ".join(sites[:3]) + (f" and {len(sites) - 3} more" if len(sites) > 3 else "")
            lines.append(f"attention crossovers ({a['heads']} heads x {a['head_dim']}, priced at L={a['length']}; "
                         f"{named}): sequence length from which each form is estimated faster than exact attention")
            head = ["form"] + targets
            body = [[f["choice"]] + [("-" if f["crossover"].get(t) is None else f"L >= {f['crossover'][t]:,}")
                                     for t in targets] for f in a["forms"]]
            widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
            fmt = lambda row: "  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                               for i, (c, w) in enumerate(zip(row, widths)))
            lines.append(fmt(head))
            lines += [fmt(r) for r in body]
        return lines
