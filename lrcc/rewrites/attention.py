"""Rules for attention sites: cheaper forms of softmax attention, post-training.

They match the IR's canonical attention (``aten.scaled_dot_product_attention`` annotated by
lrcc.ir.attention.normalize_attention) and offer the forms of lrcc.rewrites.linear_attention, whose
docstring gives each one's law and paper:

- ``approximate_attention``: Performer FAVOR+ (Choromanski et al. 2021; the feature count is the
  knob), linear attention with elu + 1 (Katharopoulos et al. 2020), a local window (exact softmax
  on nearby keys, as Longformer's sliding window) and Scatterbrain (Chen et al. 2021: window and
  global keys exact, FAVOR+ elsewhere, the support not counted twice); the budget per query (keys
  plus features) is the knob.
- ``linformer_attention``: Linformer (Wang et al. 2020) with the segment projections fitted on
  calibration queries and keys; only for a fixed sequence length.

Keeping the exact attention is always the planner's other option. None of the forms changes a
parameter: they trade output error for time, so only a latency budget makes one worth choosing,
and the planner prices each at the model's output (lrcc.planner.calibrate) and on the target
(lrcc.targets.cost.attention_cost, symbolic in the sequence length).

Guards: a causal mask (the forms here are non-causal), a mask that varies over queries or heads
(only a key padding mask has an O(L) form), grouped-query or cross attention (Lq != Lk) and
unknown head sizes leave the site exact, with the reason in the report.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch

from ..errors import LrccError
from ..ir.attention import SDPA, sdpa_arguments
from ..ir.graph import Graph, Node, Ref
from ..targets.cost import APPROXIMATE_ATTENTION, attention_site_cost
from . import linear_attention as la
from .rule import Candidate, Rule


@dataclass
class AttentionChange:
    """A replacement of one attention site's computation: what the planner prices and applies.

    fn(q, k, v, mask) computes the replacement from the site's own inputs (SDPA's q, k, v and mask);
    its one contribution per sample is sum_t g_t . (fn - exact)_t, the first-order change of z . y
    (lrcc.planner.calibrate.collect_sensitivity), as for a linear site's Delta."""

    fn: Callable[..., torch.Tensor]
    param: torch.Tensor | None           # the form's tensor (random features, segment boundaries)
    kwargs: dict[str, Any] = field(default_factory=dict)  # approximate_attention's keyword arguments
    needs_wgrad = False
    kind = "attention"

    def contributions_at(self, inputs: tuple, exact: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """[bsz, 1]: sum over the sample's outputs of g . (replacement - exact)."""
        with torch.no_grad():
            approx = self.fn(*inputs).float()
        return ((approx - exact.float()) * g.float()).flatten(1).sum(1, keepdim=True)


def attention_info(n: Node) -> dict[str, Any] | None:
    """The canonical attention's description (normalize_attention), or None for other nodes."""
    if n.op != "aten" or n.attrs.get("target") != SDPA:
        return None
    return n.attrs.get("attention")


def _mask_ref(n: Node) -> str | None:
    mask = sdpa_arguments(n)["attn_mask"]
    return mask.name if isinstance(mask, Ref) else None


def _guard(g: Graph, n: Node) -> str | None:
    info = attention_info(n)
    if info is None:
        return "not a recognised attention (see the report's attention notes)"
    if info["causal"]:
        return ("causal mask: lrcc's linear and sparse attention forms are non-causal; left exact "
                "(a causal linear form needs prefix sums of the state)")
    if info["mask"] not in ("none", "padding"):
        return f"mask is {info['mask']}: only a key padding mask has an O(L) form; left exact"
    mask = _mask_ref(n)
    if mask is not None:
        shape = g[mask].shape
        if shape is None or len(shape) != 4 or shape[1] != 1 or shape[2] != 1:
            return (f"padding mask has shape {shape}: the forms take a key mask [B, 1, 1, L] (one value per key "
                    "for every head and query); left exact")
    if info["heads"] is None or info["head_dim"] is None or info["value_dim"] is None:
        return "heads or head size are not static; left exact"
    if info.get("kv_heads") not in (None, info["heads"]):
        return f"grouped-query attention ({info['heads']} query heads, {info['kv_heads']} key heads); left exact"
    if info["seq_q"] != info["seq_k"]:
        return f"cross-attention (queries {info['seq_q']}, keys {info['seq_k']}): the window forms need one sequence; left exact"
    return None


def _seed(site: str, salt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{site}:{salt}".encode()).digest()[:4], "little")


def _candidate(g: Graph, n: Node, rule: str, choice: str, knobs: dict, param_fn, needs_calibration: bool = False,
               param_bytes: int = 0) -> Candidate:
    info = attention_info(n)
    site = info["site"]
    cost = attention_site_cost(g, n, knobs["form"], knobs)
    kwargs = {"form": knobs["form"], "scale": float(info["scale"])}
    if knobs["form"] in ("window", "scatterbrain", "clustered"):
        kwargs.update(window=knobs["window"], global_keys=knobs["global_keys"], clusters=knobs["clusters"])

    def change(stats) -> AttentionChange:
        param = param_fn(stats)

        def fn(q, k, v, mask=None):
            return la.approximate_attention(q, k, v, mask, param, **kwargs)
        return AttentionChange(fn, param, kwargs)
    family = f"{site}:{knobs['form']}:" + ",".join(f"{k}={v}" for k, v in sorted(knobs.items()) if k != "form")
    return Candidate(site=site, node=n.name, rule=rule, choice=choice, form="attention", knobs=knobs, params=0,
                     bytes=param_bytes, weight_shapes=[], family=family, spectrum=change,
                     needs_calibration=needs_calibration, error_index=0, refit="none", cost=cost)


# the forms approximate_attention offers (options["attention_forms"] picks among them)
ATTENTION_FORMS = ("performer", "elu", "window", "scatterbrain", "clustered")


def check_attention_forms(forms: Any) -> None:
    """Refuse an options["attention_forms"] that is not a collection of ATTENTION_FORMS names."""
    if isinstance(forms, str) or not isinstance(forms, (list, tuple, set, frozenset)):
        raise LrccError(f"options attention_forms: a list of form names ({', '.join(ATTENTION_FORMS)}), got {forms!r}")
    bad = [f for f in forms if f not in ATTENTION_FORMS]
    if bad:
        raise LrccError(f"options attention_forms: unknown form(s) {', '.join(map(repr, bad))}; known: "
                        f"{', '.join(ATTENTION_FORMS)} (Linformer is the linformer_attention rule: "
                        "options fixed_length and linformer_segments)")


def _offer(g: Graph, n: Node, options: dict[str, Any]) -> list[Candidate]:
    info = attention_info(n)
    site = info["site"]
    d = int(info["head_dim"])
    seed = int(options.get("seed", 0))
    forms = options.get("attention_forms", ATTENTION_FORMS)
    out: list[Candidate] = []
    if "performer" in forms:
        for m in options.get("attention_features", (16, 32, 64, 128)):
            def features(stats, m=m):
                gen = torch.Generator().manual_seed(_seed(site, seed * 1000 + m))
                return la.orthogonal_features(d, m, gen)
            out.append(_candidate(g, n, "approximate_attention", f"Performer, {m} features",
                                  {"form": "performer", "features": m}, features, param_bytes=4 * m * d))
    if "elu" in forms:
        out.append(_candidate(g, n, "approximate_attention", "linear attention, elu+1", {"form": "elu"},
                              lambda stats: None))
    for b in options.get("attention_budgets", (32, 64, 128)):
        if "window" in forms:
            radius = (b - 1) // 2
            out.append(_candidate(g, n, "approximate_attention", f"local window of {2 * radius + 1} keys",
                                  {"form": "window", "window": radius, "global_keys": 0, "clusters": 1},
                                  lambda stats: None))
        if "scatterbrain" in forms:
            sb = la.split_budget(b)

            def features(stats, m=sb.features):
                gen = torch.Generator().manual_seed(_seed(site, seed * 1000 + 7 * m + 1))
                return la.orthogonal_features(d, m, gen)
            out.append(_candidate(g, n, "approximate_attention",
                                  f"Scatterbrain, {b} per query (window {2 * sb.window + 1}, {sb.global_keys} global "
                                  f"keys, {sb.features} features)",
                                  {"form": "scatterbrain", "window": sb.window, "global_keys": sb.global_keys,
                                   "clusters": sb.clusters, "features": sb.features}, features,
                                  param_bytes=4 * sb.features * d))
        if "clustered" in forms:
            cl = la.clustered_budget(b)
            out.append(_candidate(g, n, "approximate_attention",
                                  f"sparse + centroids, {b} per query (window {2 * cl.window + 1}, {cl.global_keys} "
                                  f"global keys, {cl.clusters} clusters' centroids)",
                                  {"form": "clustered", "window": cl.window, "global_keys": cl.global_keys,
                                   "clusters": cl.clusters}, lambda stats: None))
    return out


def _linformer_guard(g: Graph, n: Node) -> str | None:
    reason = _guard(g, n)
    if reason is not None:
        return reason
    info = attention_info(n)
    if not info["seq_k"].isdigit():
        return (f"sequence length {info['seq_k']} is dynamic: Linformer's projections fit one fixed length "
                "(compile with options={'fixed_length': True} to offer it)")
    return None


def _linformer_offer(g: Graph, n: Node, options: dict[str, Any]) -> list[Candidate]:
    info = attention_info(n)
    site = info["site"]
    L = int(info["seq_k"])
    H = int(info["heads"])
    scale, d = float(info["scale"]), int(info["head_dim"])
    out = []
    for segs in options.get("linformer_segments", (32, 64, 128)):
        if segs >= L:
            continue

        def fit(stats, segs=segs):
            q, k, mask = stats.attention_inputs(site)
            valid = None if mask is None else _valid_of(mask, k)
            return la.fit_linformer_segments(q * (scale * math.sqrt(d)), k, segs, valid)
        out.append(_candidate(g, n, "linformer_attention", f"Linformer, {segs} fitted segments",
                              {"form": "linformer", "segments": segs}, fit, needs_calibration=True,
                              param_bytes=8 * H * (segs + 1)))
    return out


def _valid_of(mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[N, L] bool from a captured SDPA key mask ([N or 1, 1, 1, L], bool or additive)."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m[:, 0, 0, :].expand(k.shape[0], k.shape[2])
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min


def replace_attention(g: Graph, node_name: str, cand: Candidate, change: AttentionChange) -> None:
    """Rewrite attention node `node_name` in place into approximate_attention(q, k, v, mask, param, ...)."""
    n = g[node_name]
    a = sdpa_arguments(n)
    info = dict(n.attrs["attention"])
    info["approximation"] = cand.choice
    new_nodes: list[Node] = []
    param_ref = None
    if change.param is not None:
        ref = f"{info['site']}.attention_{cand.knobs['form']}"
        g.tensors[ref] = change.param
        p = Node(f"{node_name}_{cand.knobs['form']}", "param", [], {"ref": ref, "kind": "buffer"},
                 tuple(sympy.Integer(int(s)) for s in change.param.shape), change.param.dtype)
        new_nodes.append(p)
        param_ref = Ref(p.name)
    args = (a["query"], a["key"], a["value"], a["attn_mask"], param_ref)
    inputs = [r.name for r in args if isinstance(r, Ref)]
    new = Node(node_name, "aten", inputs, {"target": APPROXIMATE_ATTENTION, "args": args,
                                           "kwargs": dict(change.kwargs), "attention": info}, n.shape, n.dtype)
    g.replace(node_name, new_nodes + [new])


approximate_attention = Rule(
    name="approximate_attention",
    pattern=SDPA,
    guard=_guard,
    offer=_offer,
    law="softmax(q k^T) v ~ phi(q)(phi(k)^T v) (Performer FAVOR+, arXiv:2009.14794; elu+1, arXiv:2006.16236); "
        "local window; Scatterbrain: exact on a sparse support, FAVOR+ off it (arXiv:2110.15343)",
)

linformer_attention = Rule(
    name="linformer_attention",
    pattern=SDPA,
    guard=_linformer_guard,
    offer=_linformer_offer,
    law="softmax(q (E k)^T)(F v) with E = F segment averages fitted on calibration data (Linformer, arXiv:2006.04768)",
)

RULES = [approximate_attention, linformer_attention]
