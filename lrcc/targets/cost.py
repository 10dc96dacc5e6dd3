"""Costs on ops: FLOPs and bytes moved as sympy expressions in the graph's dims (B, L, ...)."""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..ir.graph import Graph, Node, concrete, numel
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

    def latency(self, target: Target, dims: dict[str, int]) -> float:
        return target.roofline_s(concrete(self.flops, dims), concrete(self.bytes, dims))


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
    if name in ("scaled_dot_product_attention",):
        q, k = g[n.inputs[0]], g[n.inputs[1]]
        flops = 4 * numel(q.shape) * k.shape[-2]
        return OpCost(flops, in_bytes + out_bytes)
    if name in ("matmul", "bmm", "mm"):
        a = g[n.inputs[0]]
        flops = 2 * out * a.shape[-1]
        return OpCost(flops, in_bytes + out_bytes)
    if name in ("embedding",):
        return OpCost(out, 2 * out_bytes)
    if name in ("softmax", "_softmax", "layer_norm", "native_layer_norm", "gelu"):
        return OpCost(8 * out, in_bytes + out_bytes)
    return OpCost(out, in_bytes + out_bytes)


def graph_latency(g: Graph, target: Target, dims: dict[str, int]) -> float:
    """The roofline latency of the whole graph at concrete dims."""
    return sum(op_cost(g, n).latency(target, dims) for n in g.nodes if n.op not in ("input", "param", "output")
               and not (n.op == "aten" and _short(n.attrs["target"]) in _VIEWS))
