"""Costs on ops: FLOPs and bytes moved as sympy expressions in the graph's dims (B, L, ...)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    host_bytes: sympy.Expr | None = None      # bytes where it runs op by op on a CPU (None: the same)

    def _launches(self, target: Target) -> sympy.Expr:
        return self.gpu_launches if target.kind == "gpu" and self.gpu_launches is not None else self.launches

    def _bytes(self, target: Target) -> sympy.Expr:
        return self.host_bytes if target.kind == "cpu" and self.host_bytes is not None else self.bytes

    def latency(self, target: Target, dims: dict[str, int]) -> float:
        extra = (concrete(self._launches(target), dims) - 1) * target.op_overhead_s
        return target.roofline_s(concrete(self.flops, dims), concrete(self._bytes(target), dims)) + extra

    def latency_expr(self, target: Target) -> sympy.Expr:
        """The roofline latency as a sympy expression in the cost's free dims."""
        return (sympy.Max(self.flops / target.peak_flops, self._bytes(target) / target.bandwidth)
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
# lrcc's torch code for the attention forms runs op by op: its bytes moved and operators launched are
# counted from the code itself (traced_attention) at these lengths, and taken linear in L between and
# beyond them.
TRACE_LENGTHS = (512, 2048)


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
    # (host_bytes, traced from the code, include reading q, k, v and writing the output)
    return OpCost(cost.flops, cost.bytes + _bytes_io(g, n), cost.launches, cost.gpu_launches, cost.host_bytes)


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


_GATHERS = {"index_select", "index", "gather"}
_FREE = _VIEWS | {"unfold", "as_strided", "lift_fresh", "empty", "empty_like", "new_empty",
                  "empty_strided", "arange", "_local_scalar_dense", "is_nonzero", "item"}


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class _Traffic(TorchDispatchMode):
    """Counts the operators dispatched and the bytes each reads and writes: every tensor argument
    read whole and every result written, except that a gather reads only the rows it returns and an
    index_copy_ writes only the rows it copies."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        self.launches += 1
        if name in _FREE:
            return out
        outs = sum(_nbytes(t) for t in torch.utils._pytree.tree_leaves(out))
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in _GATHERS:
            self.bytes += 2 * outs + sum(_nbytes(t) for t in ins if not t.is_floating_point())
        elif name == "index_copy_":
            self.bytes += 2 * _nbytes(ins[2]) + _nbytes(ins[1])
        else:
            self.bytes += outs + sum(_nbytes(t) for t in ins)
        return out


@functools.lru_cache(maxsize=512)
def traced_attention(form: str, knobs: tuple, heads: int, d: int, dv: int) -> dict[str, tuple[float, float]]:
    """Bytes moved and operators launched by lrcc's torch code for one attention in `form` (knobs as
    sorted (name, value) pairs), batch 1, with a key padding mask: {"bytes": (a, b), "launches": (a,
    b)} of a + b L, counted (_Traffic) at the TRACE_LENGTHS on random inputs."""
    from ..rewrites import linear_attention as la
    kn = dict(knobs)
    gen = torch.Generator().manual_seed(0)
    points = {}
    for L in TRACE_LENGTHS:
        q, k = (torch.randn(1, heads, L, d, generator=gen) for _ in range(2))
        v = torch.randn(1, heads, L, dv, generator=gen)
        param = None
        if form in ("performer", "scatterbrain") and kn.get("features"):
            param = la.orthogonal_features(d, int(kn["features"]), gen)
        elif form == "linformer":
            param = torch.linspace(0, L, int(kn["segments"]) + 1).round().long().expand(heads, -1)
        extra = {} if form in ("performer", "elu", "linformer") else {
            "window": kn.get("window"), "global_keys": int(kn.get("global_keys") or 0),
            "clusters": int(kn.get("clusters") or 1)}
        mask = torch.ones(1, 1, 1, L, dtype=torch.bool)
        with torch.no_grad(), _Traffic() as t:
            la.approximate_attention(q, k, v, mask, param, form=form, **extra)
        points[L] = (t.bytes, t.launches)
    (l1, (b1, n1)), (l2, (b2, n2)) = sorted(points.items())
    line = lambda y1, y2: (y1 - (y2 - y1) / (l2 - l1) * l1, (y2 - y1) / (l2 - l1))  # noqa: E731
    return {"bytes": line(b1, b2), "launches": line(n1, n2)}


def attention_cost(form: str, knobs: dict, B, H, Lq, Lk, d, dv) -> OpCost:
    """FLOPs, bytes moved beyond q, k, v and the output, and launches of one attention in `form`, as
    sympy expressions in the sizes (any of which may be symbols; H, d and dv concrete for the forms).
    FLOPs follow lrcc's implementations (lrcc.rewrites.linear_attention): products 2 FLOPs per
    multiply-add, an exp EXP_FLOPS. Bytes: fused (GPU kernels), the fp32 intermediates written and
    read once each; host_bytes and launches (CPU: the torch code, op by op) are traced_attention's.

    exact         4 Lq Lk d-ish products and Lq Lk exps; the fused kernel (flash attention on GPUs,
                  torch's blocked kernel on CPUs) keeps the scores on chip.
    performer     features of q and k (2 L d m each, m exps), the m x dv state and its product.
    elu           the same with d features and no exps.
    window        per block of queries (window_block), scores against block + 2 window keys; the
                  global keys per query, in blocks of one cluster (GLOBAL_BLOCK, a cluster's last
                  block part empty); choosing them: k-means (2 steps) and the centroids' scores.
    scatterbrain  window + performer, and the low-rank estimate on the support (m per pair).
    clustered     window + global keys; the centroid kernel as a rank-c low-rank part (c exps per key,
                  a c x dv state, c per pair on the support): scatterbrain with m = c, no features.
    linformer     pooling (L (d + dv)), scores and values against n segment means.
    """
    from ..rewrites.linear_attention import GLOBAL_BLOCK, window_block
    BH = B * H
    Lq, Lk, d, dv = (sympy.sympify(x) for x in (Lq, Lk, d, dv))
    f4 = 4  # bytes per fp32 element
    if form == "exact":
        return OpCost(BH * Lq * Lk * (2 * d + 2 * dv + EXP_FLOPS + 3), sympy.Integer(0), sympy.Integer(1))
    if form not in ("performer", "elu", "window", "scatterbrain", "clustered", "linformer"):
        raise LrccError(f"attention_cost: unknown form {form!r}")
    traced = traced_attention(form, tuple(sorted((str(a), b) for a, b in knobs.items() if not str(a).startswith("_"))),
                              int(H), int(d), int(dv))
    host = B * (traced["bytes"][0] + traced["bytes"][1] * Lq)
    launches = sympy.Max(1, sympy.ceiling(traced["launches"][0] + traced["launches"][1] * B * Lq))
    if form in ("performer", "elu"):
        m = sympy.Integer(knobs["features"]) if form == "performer" else d
        exp = EXP_FLOPS if form == "performer" else 2
        per = (Lq + Lk) * (2 * d * m + m * (exp + 3)) + 2 * Lk * m * dv + 2 * Lq * m * (dv + 1) + Lq * dv
        moved = 4 * (Lq + Lk) * m * f4
        # GPU: Performer runs the Scatterbrain kernel with an empty support (key state in torch, one
        # kernel); elu+1 runs its torch code
        return OpCost(BH * per, BH * moved, launches, sympy.Integer(8) if form == "performer" else None, host)
    if form in ("window", "scatterbrain", "clustered"):
        r = knobs.get("window")
        g = int(knobs.get("global_keys") or 0)
        c = int(knobs.get("clusters") or 1)
        m = int(knobs.get("features") or 0) if form == "scatterbrain" else c if form == "clustered" else 0
        pair = 2 * d + 2 * dv + EXP_FLOPS + 6 + (2 * m + 3 if m else 0)
        per, moved = sympy.Integer(0), sympy.Integer(0)
        if r is not None:
            C = window_block(int(r))
            rows = sympy.ceiling(Lq / C) * C
            per += rows * (C + 2 * int(r)) * pair
            moved += rows * (C + 2 * int(r)) * f4 * 3
        if form == "clustered" and not g:  # the clusters: k-means and the centroids' scores
            per += 6 * Lq * c * d
            moved += 6 * Lq * c * f4
        if g:
            slots = Lq + c * GLOBAL_BLOCK / 2  # each cluster's last block half empty, on average
            per += slots * g * pair + 6 * Lq * c * d + Lq * c * 4
            moved += slots * g * f4 * 3 + Lq * g * (d + dv + m) * f4 * 2 / GLOBAL_BLOCK + 6 * Lq * c * f4
        # GPU: Scatterbrain and sparse + centroids run the Triton kernel (codegen/triton/scatterbrain.py:
        # the key state in torch, the k-means in torch, one kernel); the window form runs its torch code
        cost = OpCost(BH * per, BH * moved, launches,
                      sympy.Integer(2 + (20 if g else 0)) if form == "scatterbrain" else None, host)
        if form == "clustered":  # centroid kernel: c exps per key, the c x dv state, a state row per query
            low = OpCost(BH * (Lk * c * (EXP_FLOPS + 3) + 2 * Lk * c * dv + 2 * Lq * c * (dv + 1)),
                         BH * 4 * (Lq + Lk) * c * f4, launches)
            cost = OpCost(cost.flops + low.flops, cost.bytes + low.bytes, cost.launches, sympy.Integer(2 + 20 + 6),
                          host)
        elif m:
            low = attention_cost("performer", {"features": m}, B, H, Lq, Lk, d, dv)
            cost = OpCost(cost.flops + low.flops, cost.bytes + low.bytes, cost.launches,
                          cost.gpu_launches + 6, host)
        return cost
    n = sympy.Integer(knobs["segments"])
    per = 2 * Lk * (d + dv + 1) + Lq * n * (2 * d + 2 * dv + EXP_FLOPS + 3)
    moved = (Lk * (d + dv) + 2 * Lq * n) * f4
    return OpCost(BH * per, BH * moved, launches, sympy.Integer(8), host)


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
