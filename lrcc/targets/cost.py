"""Costs on ops: FLOPs and bytes moved as sympy expressions in the graph's dims (B, L, ...)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from ..ir.graph import Graph, Node, concrete, numel
from ..errors import LrccError
from . import Target

# Operators that only change how a tensor is viewed: no FLOPs, no bytes.
_VIEWS = {"view", "_unsafe_view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand",
          "slice", "select", "sym_size", "_assert_tensor_metadata", "getitem", "alias", "detach", "t",
          "contiguous", "clone", "dropout", "sym_numel", "size", "lift_fresh_copy", "_assert_scalar",
          "sym_constrain_range_for_size", "scalar_tensor"}


@dataclass(frozen=True)
class OpCost:
    flops: sympy.Expr
    bytes: sympy.Expr
    launches: sympy.Expr = sympy.Integer(1)  # operator launches (a form written as several ops pays each)
    gpu_launches: sympy.Expr | None = None    # launches where it runs as fused GPU kernels (None: the same)

    def _launches(self, target: Target) -> sympy.Expr:
        return self.gpu_launches if target.kind == "gpu" and self.gpu_launches is not None else self.launches

    def latency(self, target: Target, dims: dict[str, int]) -> float:
        extra = (concrete(self._launches(target), dims) - 1) * target.op_overhead_s
        return target.roofline_s(concrete(self.flops, dims), concrete(self.bytes, dims)) + extra

    def latency_expr(self, target: Target) -> sympy.Expr:
        """The roofline latency as a sympy expression in the cost's free dims."""
        return (sympy.Max(self.flops / target.peak_flops, self.bytes / target.bandwidth)
                + self._launches(target) * target.op_overhead_s)


def _itemsize(dtype) -> int:
    return dtype.itemsize if dtype is not None else 4


def _tensor_bytes(g: Graph, name: str) -> sympy.Expr:
    n = g[name]
    if n.shape is None:
        return sympy.Integer(0)
    return numel(n.shape) * _itemsize(n.dtype)


def _short(target: str) -> str:
    parts = target.split(".")
    return parts[1] if len(parts) >= 2 else target


def site_cost(rows: sympy.Expr, weight_shapes: list[tuple[int, int]], weight_bytes: int, act_in: sympy.Expr, act_out: sympy.Expr) -> OpCost:
    """Cost of a chain of products x -> x W1^T -> ... over `rows` rows (bias adds ignored)."""
    flops = sum((2 * rows * m * n for m, n in weight_shapes), sympy.Integer(0))
    inner = sum((rows * m * 4 for m, _ in weight_shapes[:-1]), sympy.Integer(0))  # intermediates, fp32
    return OpCost(flops, act_in + act_out + weight_bytes + 2 * inner)


def op_cost(g: Graph, n: Node) -> OpCost:
    """FLOPs and bytes of one node."""
    zero = sympy.Integer(0)
    if n.op in ("input", "param", "output"):
        return OpCost(zero, zero)
    if n.is_site:
        x = g[n.inputs[0]]
        rows = numel(x.shape[:-1])
        ws = [g.tensor(i) for i in n.inputs[1:]]
        mats = [tuple(w.shape) for w in ws if w.dim() == 2]
        if n.op == "compressed_linear":
            roles = dict(zip(n.attrs["roles"], ws))
            mats = [tuple(roles[r].shape) for r in ("v", "u") if r in roles]
            if "codes" in roles or "values" in roles:
                mats.append((n.attrs["m"], n.attrs["n"]))
        wbytes = sum(w.numel() * w.element_size() for w in ws)
        return site_cost(rows, mats, wbytes, _tensor_bytes(g, x.name), _tensor_bytes(g, n.name))
    name = _short(n.attrs["target"])
    if name in _VIEWS or n.shape is None:
        return OpCost(zero, zero)
    out = numel(n.shape)
    in_bytes = sum((_tensor_bytes(g, i) for i in n.inputs), zero)
    out_bytes = out * _itemsize(n.dtype)
    if name in ("scaled_dot_product_attention",) or n.attrs["target"] == APPROXIMATE_ATTENTION:
        return attention_site_cost(g, n)
    if name in ("matmul", "bmm", "mm"):
        a = g[n.inputs[0]]
        flops = 2 * out * a.shape[-1]
        return OpCost(flops, in_bytes + out_bytes)
    if name in ("embedding",):
        return OpCost(out, 2 * out_bytes)
    if name in ("softmax", "_softmax", "layer_norm", "native_layer_norm", "gelu"):
        return OpCost(8 * out, in_bytes + out_bytes)
    return OpCost(out, in_bytes + out_bytes)


# --- attention, symbolic in the sequence length ----------------------------------------------------------
APPROXIMATE_ATTENTION = "lrcc.rewrites.linear_attention.approximate_attention"
EXP_FLOPS = 8  # a vectorised exp (range reduction and a polynomial) costs about 8 multiply-adds
# Operators each form dispatches in lrcc's torch code (counted with a TorchDispatchMode, views
# included): fixed, and per block of CHUNK queries for the window and global-key parts.
LAUNCHES = {"performer": 92, "elu": 31, "linformer": 69, "window": 6, "window_chunk": 52, "global": 38,
            "global_chunk": 110, "global_dense": 64, "global_dense_chunk": 88}


def _bytes_io(g: Graph, n: Node) -> sympy.Expr:
    """Bytes of a node's inputs and output."""
    zero = sympy.Integer(0)
    return sum((_tensor_bytes(g, i) for i in n.inputs), zero) + (numel(n.shape) * _itemsize(n.dtype) if n.shape else zero)


def attention_site_cost(g: Graph, n: Node, form: str | None = None, knobs: dict | None = None) -> OpCost:
    """The cost of attention node n (canonical SDPA or approximate_attention) computed in `form` with
    `knobs` (default: what the node computes), its inputs and output included."""
    q, k, v = (g[r] for r in n.inputs[:3])
    B, H, Lq, d = q.shape
    Lk, dv = k.shape[-2], v.shape[-1]
    if form is None:
        approx = n.attrs["target"] == APPROXIMATE_ATTENTION
        form, knobs = (n.attrs["kwargs"]["form"], _form_knobs(g, n)) if approx else ("exact", {})
    cost = attention_cost(form, knobs or {}, B, H, Lq, Lk, d, dv)
    return OpCost(cost.flops, cost.bytes + _bytes_io(g, n), cost.launches, cost.gpu_launches)


def _form_knobs(g: Graph, n: Node) -> dict:
    """The knobs attention_cost reads, from an approximate_attention node."""
    kw = n.attrs["kwargs"]
    knobs = {"window": kw.get("window"), "global_keys": kw.get("global_keys", 0), "clusters": kw.get("clusters", 1)}
    param = n.attrs["args"][4] if len(n.attrs["args"]) > 4 else None
    if param is not None and hasattr(param, "name"):
        t = g.tensor(param.name)
        knobs["features" if kw["form"] in ("performer", "scatterbrain") else "segments"] = int(
            t.shape[0] if kw["form"] != "linformer" else t.shape[1] - 1)
    return knobs


def attention_cost(form: str, knobs: dict, B, H, Lq, Lk, d, dv) -> OpCost:
    """FLOPs, bytes moved beyond q, k, v and the output, and launches of one attention in `form`, as
    sympy expressions in the sizes (any of which may be symbols). The counts follow lrcc's torch
    implementations (lrcc.rewrites.linear_attention): products 2 FLOPs per multiply-add, an exp
    EXP_FLOPS, the fp32 intermediates written and read once each.

    exact         4 Lq Lk d-ish products and Lq Lk exps; the fused kernel (flash attention on GPUs,
                  torch's blocked kernel on CPUs) keeps the scores on chip.
    performer     features of q and k (2 L d m each, m exps), the m x dv state and its product.
    elu           the same with d features and no exps.
    window        per block of CHUNK queries, scores against CHUNK + 2 window keys; global keys per
                  query; choosing them: k-means (2 steps) and the centroids' scores, 6 L clusters d.
    scatterbrain  window + performer, and the low-rank estimate on the support (m per pair).
    linformer     pooling (L (d + dv)), scores and values against n segment means.
    """
    from ..rewrites.linear_attention import CHUNK, DENSE_GLOBAL
    BH = B * H
    Lq, Lk, d, dv = (sympy.sympify(x) for x in (Lq, Lk, d, dv))
    f4 = 4  # bytes per fp32 element
    if form == "exact":
        return OpCost(BH * Lq * Lk * (2 * d + 2 * dv + EXP_FLOPS + 3), sympy.Integer(0), sympy.Integer(1))
    if form in ("performer", "elu"):
        m = sympy.Integer(knobs["features"]) if form == "performer" else d
        exp = EXP_FLOPS if form == "performer" else 2
        per = (Lq + Lk) * (2 * d * m + m * (exp + 3)) + 2 * Lk * m * dv + 2 * Lq * m * (dv + 1) + Lq * dv
        moved = 4 * (Lq + Lk) * m * f4
        # GPU: Performer runs the Scatterbrain kernel with an empty support (key state in torch, one
        # kernel); elu+1 runs its torch code
        return OpCost(BH * per, BH * moved, sympy.Integer(LAUNCHES["performer" if form == "performer" else "elu"]),
                      sympy.Integer(8) if form == "performer" else None)
    if form in ("window", "scatterbrain"):
        r = int(knobs.get("window") or 0)
        g = int(knobs.get("global_keys") or 0)
        c = int(knobs.get("clusters") or 1)
        m = int(knobs.get("features") or 0) if form == "scatterbrain" else 0
        block = sympy.Min(CHUNK, Lq) + 2 * r if knobs.get("window") is not None else 0
        pair = 2 * d + 2 * dv + 2 * m + EXP_FLOPS + 4
        dense = c * g <= DENSE_GLOBAL  # all clusters' keys scored densely per block, else gathered per query
        per_query = c * g if dense else g
        per = Lq * (block + per_query) * pair
        moved = Lq * (block + per_query) * f4 * 3
        moved += (c * g if dense else Lq * g) * (d + dv + m) * f4 * 2  # the global rows, gathered
        if g:
            per += 6 * Lq * c * d + Lq * c * 4
            moved += 6 * Lq * c * f4
        chunks = sympy.ceiling(Lq / CHUNK)
        launches = LAUNCHES["window"] + LAUNCHES["window_chunk"] * chunks
        if g:
            kind = "global_dense" if dense else "global"
            launches += LAUNCHES[kind] + LAUNCHES[kind + "_chunk"] * chunks
        # GPU: Scatterbrain runs the Triton kernel (codegen/triton/scatterbrain.py: the key state in torch,
        # the global keys' k-means in torch, one kernel); the window form runs its torch code there too
        cost = OpCost(BH * per, BH * moved, launches, None if form == "window" else sympy.Integer(2 + (20 if g else 0)))
        if m:
            low = attention_cost("performer", {"features": m}, B, H, Lq, Lk, d, dv)
            cost = OpCost(cost.flops + low.flops, cost.bytes + low.bytes, cost.launches + low.launches,
                          cost.gpu_launches + 6)
        return cost
    if form == "linformer":
        n = sympy.Integer(knobs["segments"])
        per = 2 * Lk * (d + dv + 1) + Lq * n * (2 * d + 2 * dv + EXP_FLOPS + 3)
        moved = (Lk * (d + dv) + 2 * Lq * n) * f4
        return OpCost(BH * per, BH * moved, sympy.Integer(LAUNCHES["linformer"]), sympy.Integer(8))
    raise LrccError(f"attention_cost: unknown form {form!r}")


def crossover_length(form: str, knobs: dict, target: Target, heads: int, d: int, dv: int,
                     batch: int = 1, limit: int = 1 << 24) -> int | None:
    """The least sequence length L (queries = keys) from which `form` is estimated faster than exact
    attention on `target`, and stays faster up to `limit`; None if it is not faster at `limit`.
    Both latencies are sympy expressions in L; their difference is bracketed on powers of two and
    the crossing found by bisection on integers."""
    ell = sympy.Symbol("L", integer=True, positive=True)
    diff = (attention_cost(form, knobs, batch, heads, ell, ell, d, dv).latency_expr(target)
            - attention_cost("exact", {}, batch, heads, ell, ell, d, dv).latency_expr(target))
    f = sympy.lambdify(ell, diff, modules=[{"ceiling": math.ceil, "Max": max, "Min": min}, "math"])
    if f(limit) >= 0:
        return None
    hi = limit
    lo = hi
    while lo > 1 and f(lo) < 0:  # the largest power of two below the crossing (or 1)
        lo //= 2
    if f(lo) < 0:
        return lo
    hi = lo * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if f(mid) >= 0 else (lo, mid)
    return hi


def graph_latency(g: Graph, target: Target, dims: dict[str, int]) -> float:
    """The roofline latency of the whole graph at concrete dims."""
    return sum(op_cost(g, n).latency(target, dims) for n in g.nodes if n.op not in ("input", "param", "output")
               and not (n.op == "aten" and _short(n.attrs["target"]) in _VIEWS))
