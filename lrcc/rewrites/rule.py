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
    needs_wgrad = False

    def contributions(self, xf: torch.Tensor, gf: torch.Tensor) -> torch.Tensor:
        """c[s, i] = sigma_i sum_t (g_t . left_i)(x_t . right_i) for each sample s (xf, gf: bsz x T x n|m)."""
        return ((gf @ self.left) * (xf @ self.right)).sum(1) * self.sigma

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, U) with V r x n and U m x r such that U V is the rank-r truncation."""
        s = self.sigma[:r].sqrt()
        return (self.right[:, :r] * s).T.contiguous(), (self.left[:, :r] * s).contiguous()


@dataclass
class Delta:
    """An explicit change of the weight, dW = W' - W (m x n), and what the replacement stores.

    Its one contribution per sample is <dW, sum_t g_t x_t^T>, the first-order change of z . y
    (computed by the planner for all of a site's Deltas in one product).
    """

    dw: torch.Tensor
    parts: dict[str, torch.Tensor]   # the replacement's tensors by role (codes, scale, v, u, ...)
    attrs: dict[str, Any]            # the replacement's attributes (bits, group, ...)
    needs_wgrad = True


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
    family: str                # candidates sharing one Spectrum (or one Delta each)
    spectrum: Callable[[Any], "Spectrum | Delta"] = field(repr=False)  # stats -> Spectrum or Delta (shared per family)
    needs_calibration: bool = False
    error_index: int | None = None  # which term of the family's error table; None: knobs["rank"]
    refit: str = "lowrank"          # how the planner refits it on compressed inputs: lowrank | quant | lq | sparse | none
    cost: Any = None                # an OpCost in the graph's dims where the form is not a chain of products (attention)

    @property
    def index(self) -> int:
        return self.error_index if self.error_index is not None else int(self.knobs["rank"])


@dataclass(frozen=True)
class Rule:
    """A rewrite rule: which nodes it looks at, when it applies, what it offers."""

    name: str
    pattern: str                                             # the IR op it matches, or an aten node's target
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
            if n.op != rule.pattern and not (n.op == "aten" and n.attrs.get("target") == rule.pattern):
                continue
            site = site_of(n)
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
    # a rule declining a site that another rule handles is not news; report sites nobody handles
    rejected = [r for r in rejected if r[0] not in cands]
    return Match(cands, rejected, fired)


def site_of(n: Node) -> str:
    """The site name of a node rules match: a linear's attrs["site"], an attention's recorded site."""
    if "site" in n.attrs:
        return n.attrs["site"]
    return n.attrs.get("attention", {}).get("site", n.name)


def replace_site(g: Graph, node_name: str, parts: dict[str, torch.Tensor], attrs: dict[str, Any]) -> None:
    """Rewrite site `node_name` in place into compressed_linear(x, *parts, bias) with new param nodes."""
    import sympy

    from ..ir.graph import Node as _Node
    n = g[node_name]
    site = n.attrs["site"]
    roles, inputs, new_nodes = [], [n.inputs[0]], []
    for role, t in parts.items():
        ref = f"{site}.{role}"
        g.tensors[ref] = t
        p = _Node(f"{node_name}_{role}", "param", [], {"ref": ref, "kind": "parameter"},
                  tuple(sympy.Integer(int(d)) for d in t.shape), t.dtype)
        new_nodes.append(p)
        roles.append(role)
        inputs.append(p.name)
    if n.op == "linear" and len(n.inputs) > 2:
        roles.append("bias")
        inputs.append(n.inputs[2])
    new = _Node(node_name, "compressed_linear", inputs, {"site": site, "roles": roles, **attrs}, n.shape, n.dtype)
    g.replace(node_name, new_nodes + [new])
