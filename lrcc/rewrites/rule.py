"""Rules as data: a pattern, a guard, and a function that offers candidate replacements.

A rule never decides whether a candidate is worth it; the planner does, with the cost model and
the error it measures at the model's output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..ir.graph import Graph, Node


@dataclass
class Spectrum:
    """W ~ sum_i sigma_i left_i right_i^T, best terms first; a rank-r candidate keeps the first r.

    left: m x k output directions, right: n x k input directions, sigma: k. Truncating to r terms
    changes W by dW = -sum_{i>=r} sigma_i left_i right_i^T, which is what the planner's error
    estimate needs.
    """

    sigma: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, U) with V r x n and U m x r such that U V is the rank-r truncation."""
        s = self.sigma[:r].sqrt()
        return (self.right[:, :r] * s).T.contiguous(), (self.left[:, :r] * s).contiguous()


@dataclass
class Candidate:
    """One replacement a rule offers for one site."""

    site: str                  # the site's name (e.g. "layers.0.attn.q")
    node: str                  # the IR node it replaces
    rule: str                  # the rule that offered it
    choice: str                # human-readable, e.g. "rank 64, whitened SVD"
    form: str                  # "lowrank", ...
    knobs: dict[str, Any]      # e.g. {"rank": 64, "method": "whitened"}
    params: int                # parameters after the rewrite (weights and bias)
    bytes: int                 # storage bytes after the rewrite
    weight_shapes: list[tuple[int, int]]  # the products it computes, for the cost model
    family: str                # candidates sharing one Spectrum
    spectrum: Callable[[Any], Spectrum] = field(repr=False)  # stats -> Spectrum (shared per family)
    needs_calibration: bool = False


@dataclass(frozen=True)
class Rule:
    """A rewrite rule: which nodes it looks at, when it applies, what it offers."""

    name: str
    pattern: str                                             # the IR op it matches
    guard: Callable[[Graph, Node], str | None]               # None to accept, else the reason it declines
    offer: Callable[[Graph, Node, dict[str, Any]], list[Candidate]]  # options -> candidates
    law: str                                                 # the law it relies on, with its paper


@dataclass
class Match:
    """What the rules made of one graph: candidates per site and every guard rejection."""

    candidates: dict[str, list[Candidate]]
    rejected: list[tuple[str, str, str]]  # (site, rule, reason)
    fired: dict[str, int]                 # rule -> number of sites it offered candidates for


def match(g: Graph, rules: list[Rule], options: dict[str, Any] | None = None) -> Match:
    """Run every rule over the graph and collect its candidates."""
    options = options or {}
    cands: dict[str, list[Candidate]] = {}
    rejected: list[tuple[str, str, str]] = []
    fired = {r.name: 0 for r in rules}
    for n in g.nodes:
        for rule in rules:
            if n.op != rule.pattern:
                continue
            site = n.attrs.get("site", n.name)
            reason = rule.guard(g, n)
            if reason is not None:
                rejected.append((site, rule.name, reason))
                continue
            offered = rule.offer(g, n, options)
            if not offered:
                rejected.append((site, rule.name, "no candidate saves anything"))
                continue
            cands.setdefault(site, []).extend(offered)
            fired[rule.name] += 1
    return Match(cands, rejected, fired)
