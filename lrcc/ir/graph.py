"""lrcc's IR: a small typed dataflow graph.

A Graph is an ordered list of Nodes (always in topological order) plus the tensors its
`param` nodes name. Node kinds (``Node.op``):

- ``input``: a user input (``attrs["index"]``);
- ``param``: a constant tensor (``attrs["ref"]`` names it in ``Graph.tensors``);
- ``linear``: y = x W^T + b, inputs (x, W, b?), the sites rewrite rules look at;
- ``lowrank_linear``: y = (x V^T) U^T + b, inputs (x, V, U, b?), V is r x n, U is m x r;
- ``compressed_linear``: y = x M^T + (x V^T) U^T + b, where the main part M is quantised
  (codes, scale, zero, optional AWQ in_scale), sparse (values, cols, rowptr) or absent, and the
  low-rank branch (v, u) optional; ``attrs["roles"]`` names each input after x;
- ``aten``: any other ATen operator, kept opaque: ``attrs["target"]`` is the operator,
  ``attrs["args"]`` / ``attrs["kwargs"]`` its arguments with other nodes as ``Ref``s;
- ``output``: the graph's results, ``attrs["args"]`` a flat list of Refs.

Shapes are tuples of sympy expressions, so a dim may be a symbol such as B or L.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import sympy
import torch

from ..errors import LrccError

SITE_OPS = ("linear", "lowrank_linear", "compressed_linear")


@dataclass(frozen=True)
class Ref:
    """A reference to another node's value inside an argument template."""

    name: str

    def __repr__(self) -> str:
        return f"%{self.name}"


def refs_in(template: Any) -> list[str]:
    """The node names an argument template refers to, in order of appearance (with repeats)."""
    out: list[str] = []

    def walk(t: Any) -> None:
        if isinstance(t, Ref):
            out.append(t.name)
        elif isinstance(t, (list, tuple)):
            for x in t:
                walk(x)
        elif isinstance(t, dict):
            for x in t.values():
                walk(x)

    walk(template)
    return out


def map_refs(template: Any, fn) -> Any:
    """The template with each Ref replaced by fn(ref)."""
    if isinstance(template, Ref):
        return fn(template)
    if isinstance(template, list):
        return [map_refs(t, fn) for t in template]
    if isinstance(template, tuple):
        return tuple(map_refs(t, fn) for t in template)
    if isinstance(template, dict):
        return {k: map_refs(v, fn) for k, v in template.items()}
    return template


@dataclass
class Node:
    """One operation: name, kind, node inputs, attributes, output shape and dtype."""

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    shape: tuple | None = None  # tuple of sympy expressions; None for non-tensor values
    dtype: torch.dtype | None = None

    @property
    def is_site(self) -> bool:
        return self.op in SITE_OPS

    def target_name(self) -> str:
        if self.op == "aten":
            return str(self.attrs["target"])
        return self.op


@dataclass
class Graph:
    """An ordered, topologically sorted list of nodes and the tensors they name."""

    nodes: list[Node] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    symbols: dict[str, tuple[int, int]] = field(default_factory=dict)  # dim symbol -> (min, max)
    meta: dict[str, Any] = field(default_factory=dict)  # output pytree spec, input names, ...

    def __post_init__(self) -> None:
        self._index: dict[str, Node] = {n.name: n for n in self.nodes}

    # --- access -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, name: str) -> Node:
        try:
            return self._index[name]
        except KeyError:
            raise LrccError(f"IR: no node named {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def add(self, node: Node) -> Node:
        if node.name in self._index:
            raise LrccError(f"IR: a node named {node.name!r} already exists")
        self.nodes.append(node)
        self._index[node.name] = node
        return node

    def replace(self, name: str, new_nodes: list[Node]) -> None:
        """Replace node `name` by new_nodes (the last one takes over its name and users)."""
        i = next(k for k, n in enumerate(self.nodes) if n.name == name)
        del self._index[name]
        for n in new_nodes:
            if n.name in self._index:
                raise LrccError(f"IR: a node named {n.name!r} already exists")
            self._index[n.name] = n
        self.nodes[i:i + 1] = new_nodes

    def remove_unused_params(self) -> None:
        used = {i for n in self.nodes for i in n.inputs}
        keep = []
        for n in self.nodes:
            if n.op == "param" and n.name not in used:
                self._index.pop(n.name)
                self.tensors.pop(n.attrs["ref"], None)
                continue
            keep.append(n)
        self.nodes = keep

    def inputs(self) -> list[Node]:
        return sorted((n for n in self.nodes if n.op == "input"), key=lambda n: n.attrs["index"])

    def sites(self) -> list[Node]:
        return [n for n in self.nodes if n.is_site]

    def tensor(self, node_name: str) -> torch.Tensor:
        return self.tensors[self[node_name].attrs["ref"]]

    def users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.name)
        return out

    def copy(self) -> "Graph":
        """A structural copy: new Node objects, the same (shared, read-only) tensors."""
        nodes = [Node(n.name, n.op, list(n.inputs), dict(n.attrs), n.shape, n.dtype) for n in self.nodes]
        return Graph(nodes, dict(self.tensors), dict(self.symbols), dict(self.meta))

    # --- sizes ------------------------------------------------------------------------
    def param_count(self, node: Node) -> int:
        """Parameters held by a site node (its weight factors and bias)."""
        total = 0
        for i in node.inputs[1:]:
            p = self[i]
            if p.op == "param":
                total += self.tensors[p.attrs["ref"]].numel()
        return total

    def __str__(self) -> str:
        return print_graph(self)


# --- printing ---------------------------------------------------------------------------
_DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
                torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool"}


def format_type(node: Node) -> str:
    if node.shape is None:
        return "sym" if node.dtype is None else _DTYPE_SHORT.get(node.dtype, str(node.dtype))
    dt = _DTYPE_SHORT.get(node.dtype, str(node.dtype))
    return f"{dt}[{', '.join(str(d) for d in node.shape)}]"


def _format_arg(a: Any) -> str:
    if isinstance(a, Ref):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_format_arg(x) for x in a) + "]"
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, torch.dtype):
        return _DTYPE_SHORT.get(a, str(a))
    return str(a)


def print_graph(g: Graph) -> str:
    """A stable, readable text form of the graph (one line per node)."""
    lines = []
    for n in g.nodes:
        t = format_type(n)
        if n.op == "input":
            lines.append(f"%{n.name} = input #{n.attrs['index']} : {t}")
        elif n.op == "param":
            lines.append(f"%{n.name} = param @{n.attrs['ref']} : {t}")
        elif n.op == "output":
            lines.append(f"return {_format_arg(n.attrs['args'])}")
        elif n.op == "aten":
            args = [_format_arg(a) for a in n.attrs["args"]]
            args += [f"{k}={_format_arg(v)}" for k, v in n.attrs["kwargs"].items()]
            lines.append(f"%{n.name} = {n.attrs['target']}({', '.join(args)}) : {t}")
        else:
            extra = "".join(f", {k}={v}" for k, v in sorted(n.attrs.items()) if k != "site")
            args = ", ".join(f"%{i}" for i in n.inputs)
            lines.append(f"%{n.name} = {n.op}({args}{extra}) : {t}")
    return "\n".join(lines) + "\n"


# --- verification -----------------------------------------------------------------------
def verify(g: Graph) -> None:
    """Check the graph's invariants; raise LrccError naming the first broken one."""
    seen: set[str] = set()
    outputs = 0
    for n in g.nodes:
        if n.name in seen:
            raise LrccError(f"IR verify: duplicate node name {n.name!r}")
        for i in n.inputs:
            if i not in seen:
                raise LrccError(f"IR verify: node {n.name!r} uses {i!r} before it is defined")
        if n.op == "aten":
            expected = refs_in((n.attrs["args"], n.attrs["kwargs"]))
            if expected != n.inputs:
                raise LrccError(f"IR verify: node {n.name!r}: inputs {n.inputs} do not match its arguments {expected}")
        elif n.op == "output":
            outputs += 1
            if refs_in(n.attrs["args"]) != n.inputs:
                raise LrccError("IR verify: output inputs do not match its arguments")
        elif n.op == "param":
            ref = n.attrs.get("ref")
            if ref not in g.tensors:
                raise LrccError(f"IR verify: param node {n.name!r} names a missing tensor {ref!r}")
            t = g.tensors[ref]
            if n.shape is not None and tuple(int(d) for d in n.shape) != tuple(t.shape):
                raise LrccError(f"IR verify: param {n.name!r} shape {n.shape} differs from its tensor {tuple(t.shape)}")
        elif n.op == "linear":
            _verify_linear(g, n)
        elif n.op == "lowrank_linear":
            _verify_lowrank(g, n)
        elif n.op == "compressed_linear":
            _verify_compressed(g, n)
        elif n.op != "input":
            raise LrccError(f"IR verify: node {n.name!r} has unknown op {n.op!r}")
        seen.add(n.name)
    if outputs != 1 or g.nodes[-1].op != "output":
        raise LrccError("IR verify: the graph must end with exactly one output node")


def _weight(g: Graph, n: Node, k: int) -> torch.Tensor:
    p = g[n.inputs[k]]
    if p.op != "param":
        raise LrccError(f"IR verify: {n.op} {n.name!r} input {k} must be a param, got {p.op}")
    return g.tensors[p.attrs["ref"]]


def _verify_linear(g: Graph, n: Node) -> None:
    if len(n.inputs) not in (2, 3):
        raise LrccError(f"IR verify: linear {n.name!r} takes (x, W[, b])")
    w = _weight(g, n, 1)
    x = g[n.inputs[0]]
    if x.shape is not None and sympy.simplify(x.shape[-1] - w.shape[1]) != 0:
        raise LrccError(f"IR verify: linear {n.name!r}: input features {x.shape[-1]} != weight columns {w.shape[1]}")
    if len(n.inputs) == 3 and _weight(g, n, 2).shape != (w.shape[0],):
        raise LrccError(f"IR verify: linear {n.name!r}: bias shape does not match weight rows")


def _verify_lowrank(g: Graph, n: Node) -> None:
    if len(n.inputs) not in (3, 4):
        raise LrccError(f"IR verify: lowrank_linear {n.name!r} takes (x, V, U[, b])")
    v, u = _weight(g, n, 1), _weight(g, n, 2)
    if v.shape[0] != u.shape[1]:
        raise LrccError(f"IR verify: lowrank_linear {n.name!r}: V is {tuple(v.shape)}, U is {tuple(u.shape)}: ranks differ")
    x = g[n.inputs[0]]
    if x.shape is not None and sympy.simplify(x.shape[-1] - v.shape[1]) != 0:
        raise LrccError(f"IR verify: lowrank_linear {n.name!r}: input features {x.shape[-1]} != V columns {v.shape[1]}")


_COMPRESSED_ROLES = {"codes", "scale", "zero", "in_scale", "values", "cols", "rowptr", "v", "u", "bias"}


def _verify_compressed(g: Graph, n: Node) -> None:
    roles = n.attrs.get("roles", [])
    if len(roles) != len(n.inputs) - 1 or set(roles) - _COMPRESSED_ROLES or len(set(roles)) != len(roles):
        raise LrccError(f"IR verify: compressed_linear {n.name!r}: roles {roles} do not match its {len(n.inputs) - 1} tensors")
    have = set(roles)
    for group in ({"codes", "scale", "zero"}, {"values", "cols", "rowptr"}, {"v", "u"}):
        if have & group and not group <= have:
            raise LrccError(f"IR verify: compressed_linear {n.name!r}: needs all of {sorted(group)}, has {sorted(have & group)}")
    if not have & {"codes", "values", "v"}:
        raise LrccError(f"IR verify: compressed_linear {n.name!r}: has no quantised, sparse or low-rank part")
    for k in range(1, len(n.inputs)):
        _weight(g, n, k)
    for key in ("m", "n"):
        if not isinstance(n.attrs.get(key), int):
            raise LrccError(f"IR verify: compressed_linear {n.name!r}: attribute {key!r} missing")


def numel(shape: tuple) -> sympy.Expr:
    """The element count of a (possibly symbolic) shape."""
    return sympy.Mul(*shape) if shape else sympy.Integer(1)


def concrete(expr, env: dict[str, int]) -> int:
    """Evaluate a symbolic size at concrete dims (env maps symbol names to ints)."""
    e = sympy.sympify(expr)
    if env:
        e = e.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in env.items()})
        e = e.subs({sympy.Symbol(k): v for k, v in env.items()})
    if not e.is_number:
        raise LrccError(f"size {expr} still has free symbols {sorted(map(str, e.free_symbols))} after substituting {env}")
    return int(math.ceil(float(e)))
