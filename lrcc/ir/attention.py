"""Attention, however a model writes it, as one canonical IR form.

Models write attention in many ways: by hand as ``softmax(q @ k.transpose(-2, -1) * scale + mask)
@ v`` (the scale as ``/ sqrt(d)``, folded into q, or absent; the mask added, filled in with
``masked_fill(..., -inf)`` or ``where``), through ``F.scaled_dot_product_attention``, through
``nn.MultiheadAttention`` (whose eval-mode export is one of those two, with the heads merged into the
batch dim and the mask passed to ``baddbmm``), or as HF BERT's eager attention. `normalize_attention`
runs after import and rewrites each form it can prove equivalent into the IR's
``aten.scaled_dot_product_attention`` node, which every backend (torch, C, ONNX, cost model) already
handles, so that later rules match one pattern:

    q, k, v           rank 4, [B, H, L, d]: a rank-3 attention gets its heads split out of the batch
    attrs["attention"] what was recognised: form ("sdpa" or "softmax"), written (the normalising
                      steps taken), source, heads, head_dim, value_dim, seq_q, seq_k, scale (the
                      value in effect), causal, mask ("none", "causal", "padding", "causal+padding"
                      or "general"), mask_dtype

How. The skeleton is written by example (`_example`), traced once through torch.export into IR and
matched node by node against the graph. Small normalising rules let each edge of the pattern see
through what does not change the result: no-ops (eval-mode dropout, clone, contiguous), scalar
scales on q, k or the scores, masks on the scores (added, filled with -inf, selected with ``where``,
baddbmm's input), bmm for matmul, a k^T that is not a transpose (transposed back).

Masks are carried exactly: the new node takes the model's own mask tensors (several are combined by
`and` / `+`), never a reconstruction. Their kind is only described: "causal" when the mask depends on
nothing but sizes and evaluates to the causal pattern (exact at static sizes; at symbolic sizes
checked at several lengths in the dim's range); "padding" when it provably holds the same value for
every query (a key padding mask). ``attrs["attention"]["causal"]`` is true for ``is_causal=True`` and
for a mask proven causal, so a rule may drop such a mask; the IR itself keeps it.

One difference remains and is intended: a query row whose every key is masked gives NaN in the
hand-written form and zeros in SDPA.

What is not provably equivalent is left as written, with the reason in
``g.meta["attention_skipped"]``: active dropout (training mode, or SDPA's dropout_p), attention
weights used elsewhere (``need_weights=True``), softmax over another dim or in another dtype, a
masked_fill with a finite value (it replaces scores; SDPA's masks add to them), a scale applied
after the mask, broadcast batch dims between q, k and v.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from ..errors import LrccError
from .graph import Graph, Node, Ref, concrete, map_refs, refs_in
from .targets import resolve_target

SDPA = "aten.scaled_dot_product_attention.default"
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
MASK_KINDS = ("none", "causal", "padding", "causal+padding", "general")

_NOOPS = {"clone", "contiguous", "alias", "detach", "lift_fresh_copy"}
_VIEWS = {"view", "reshape", "_unsafe_view"}
_EFFECTFUL = {"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
              "sym_constrain_range_for_size", "_print"}
# ops whose result at a position depends only on their operands at the (broadcast) same position
_ELEMENTWISE = {"add", "sub", "mul", "div", "neg", "rsub", "minimum", "maximum", "where", "masked_fill", "eq", "ne",
                "lt", "le", "gt", "ge", "__and__", "__or__", "__xor__", "__invert__", "logical_and", "logical_or",
                "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "to",
                "_to_copy", "type_as", "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "exp", "log",
                "abs"}
_SAMPLE_LENGTHS = (1, 2, 3, 5, 8, 13)


# --- the pattern, by example --------------------------------------------------------------------
def _example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention as people write it; traced once into the pattern the matcher follows."""
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


@dataclass(frozen=True)
class _P:
    """A pattern node: a canonical op over pattern arguments, or a slot (q, k, v) binding any node."""

    op: str
    args: tuple = ()
    slot: str = ""


@functools.lru_cache(maxsize=1)
def _pattern() -> _P:
    """`_example` traced through torch.export and lrcc's importer, as a tree of canonical ops."""
    import warnings

    from .from_torch import import_exported

    class Example(torch.nn.Module):
        def forward(self, q, k, v):
            return _example(q, k, v)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = import_exported(torch.export.export(Example(), (q, k, v), strict=False))

    def build(name: str) -> _P:
        n = g[name]
        if n.op == "input":
            return _P("slot", slot=n.name)
        op, ins = _canonical(g, n)
        return _P(op, tuple(build(i) for i in ins))

    return build(g.nodes[-1].inputs[0])


# --- small helpers ------------------------------------------------------------------------------
def _short(n: Node) -> str:
    if n.op != "aten":
        return ""
    parts = str(n.attrs["target"]).split(".")
    return parts[1] if len(parts) >= 2 else parts[0]


def _eq(a, b) -> bool:
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _same_shape(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))


def _is_int(e) -> bool:
    return isinstance(e, int) or (isinstance(e, sympy.Basic) and e.is_Integer)


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """The broadcast of two shapes, or None where that cannot be proven."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else sympy.Integer(1)
        y = b[-i] if i <= len(b) else sympy.Integer(1)
        if _eq(x, 1):
            out.append(y)
        elif _eq(y, 1) or _eq(x, y):
            out.append(x)
        else:
            return None
    return tuple(reversed(out))


def sdpa_arguments(n: Node) -> dict[str, Any]:
    """The arguments of a scaled_dot_product_attention node by name (tensors as Refs), defaults filled in."""
    out: dict[str, Any] = dict(zip(SDPA_PARAMS, n.attrs["args"]))
    out.update(n.attrs["kwargs"])
    for key, default in _SDPA_DEFAULTS.items():
        out.setdefault(key, default)
    return out


class _Reject(Exception):
    """A candidate site is not (provably) attention; the message says why."""


# --- constant evaluation (masks and scales that depend on sizes and parameters only) -------------
class _NotConstant(Exception):
    pass


class _Folder:
    """Evaluates nodes that depend on no input (only on sizes and params) at concrete dims."""

    MAX_NODES = 400

    def __init__(self, g: Graph) -> None:
        self.g = g
        self._dep: dict[str, bool] = {}
        self._memo: dict[tuple, Any] = {}

    def depends_on_input(self, name: str) -> bool:
        if name in self._dep:
            return self._dep[name]
        stack = [name]
        while stack:  # iterative post-order: deep graphs must not hit the recursion limit
            cur = stack.pop()
            if cur in self._dep:
                continue
            n = self.g[cur]
            deps = [] if n.op in ("input", "param") or _short(n) == "sym_size" else n.inputs
            pending = [d for d in deps if d not in self._dep]
            if pending:
                stack.append(cur)
                stack.extend(pending)
                continue
            self._dep[cur] = n.op == "input" or any(self._dep[d] for d in deps)
        return self._dep[name]

    def symbols(self, name: str) -> set[str]:
        """The dim symbols the value of `name` may depend on."""
        seen, out, stack = set(), set(), [name]
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            n = self.g[cur]
            if n.shape is not None:
                out |= {str(s) for d in n.shape for s in sympy.sympify(d).free_symbols}
            if _short(n) == "sym_size":
                src = self.g[n.inputs[0]]
                out |= {str(s) for s in sympy.sympify(src.shape[n.attrs["args"][1]]).free_symbols}
                continue
            if n.op not in ("input", "param"):
                stack.extend(n.inputs)
        return out

    def value(self, name: str, env: dict[str, int]):
        """The value of node `name` at the dims `env`; raises _NotConstant."""
        if self.depends_on_input(name):
            raise _NotConstant(name)
        self._count = 0
        return self._value(name, env)

    def _value(self, name: str, env: dict[str, int]):
        key = (name, tuple(sorted(env.items())))
        if key in self._memo:
            return self._memo[key]
        self._count += 1
        if self._count > self.MAX_NODES:
            raise _NotConstant(name)
        n = self.g[name]
        try:
            if n.op == "param":
                out = self.g.tensor(name)
            elif n.op != "aten":
                raise _NotConstant(name)
            elif _short(n) == "sym_size":
                src = self.g[n.inputs[0]]
                out = concrete(src.shape[n.attrs["args"][1]], env)
            elif _short(n) in _EFFECTFUL:
                out = None
            else:
                args = list(map_refs(n.attrs["args"], lambda r: self._value(r.name, env)))
                kwargs = map_refs(n.attrs["kwargs"], lambda r: self._value(r.name, env))
                if _short(n).endswith("_") and args and isinstance(args[0], torch.Tensor):
                    args[0] = args[0].clone()  # an in-place op must not touch a parameter
                with torch.no_grad():
                    out = resolve_target(n.attrs["target"])(*args, **kwargs)
        except (_NotConstant, LrccError, RuntimeError, TypeError, ValueError, IndexError) as e:
            raise _NotConstant(name) from e
        self._memo[key] = out
        return out

    def scalar(self, arg) -> float | None:
        """The value of a scalar argument (a number or a one-element constant tensor), else None."""
        if isinstance(arg, bool):
            return None
        if isinstance(arg, (int, float)):
            return float(arg)
        if not isinstance(arg, Ref):
            return None
        try:
            t = self.value(arg.name, {})
        except _NotConstant:
            return None
        if isinstance(t, torch.Tensor) and t.numel() == 1 and t.dtype != torch.bool and not t.dtype.is_complex:
            return float(t.item())
        return None

    def envs(self, name: str) -> list[dict[str, int]]:
        """Dims to evaluate `name` at: one env at static sizes, several lengths otherwise."""
        syms = sorted(self.symbols(name))
        if not syms:
            return [{}]
        out = []
        for length in _SAMPLE_LENGTHS:
            env = {}
            for s in syms:
                lo, hi = self.g.symbols.get(s, (1, 1 << 31))
                env[s] = min(max(length, lo), hi)
            if env not in out:
                out.append(env)
        return out


# --- canonical ops (the pattern's vocabulary) -----------------------------------------------------
def _softmax_problem(g: Graph, n: Node) -> str | None:
    """None if n is a softmax over the last dim in the input's dtype, else what differs."""
    args, kwargs = n.attrs["args"], n.attrs["kwargs"]
    x = g[args[0].name]
    rank = len(x.shape)
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(dim, int) or dim % rank != rank - 1:
        return f"the softmax %{n.name} is over dim {dim}, not the last (key) dim"
    if _short(n) == "_softmax":
        if (args[2] if len(args) > 2 else kwargs.get("half_to_float", False)):
            return f"the softmax %{n.name} converts half to float"
    else:
        dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
        if dtype is not None and dtype != x.dtype:
            return f"the softmax %{n.name} computes in {dtype}, not the scores' {x.dtype}"
    return None


def _swaps_last_two(g: Graph, n: Node) -> bool:
    args = n.attrs["args"]
    x = g[args[0].name]
    if x.shape is None:
        return False
    rank = len(x.shape)
    if rank < 2:
        return False
    s = _short(n)
    if s == "transpose":
        return {args[1] % rank, args[2] % rank} == {rank - 2, rank - 1}
    if s == "permute":
        perm = [d % rank for d in args[1]]
        return perm == list(range(rank - 2)) + [rank - 1, rank - 2]
    return s == "t" and rank == 2


def _canonical(g: Graph, n: Node) -> tuple[str, list[str]] | None:
    """(canonical op, tensor inputs) of a node the pattern may contain, else None."""
    if n.op != "aten" or not n.attrs["args"] or not isinstance(n.attrs["args"][0], Ref):
        return None
    s, args = _short(n), n.attrs["args"]
    if s in ("matmul", "bmm") and len(args) == 2 and isinstance(args[1], Ref) and not n.attrs["kwargs"]:
        return "matmul", [args[0].name, args[1].name]
    if s in ("softmax", "_softmax") and _softmax_problem(g, n) is None:
        return "softmax", [args[0].name]
    if s in ("transpose", "permute", "t") and _swaps_last_two(g, n):
        return "mT", [args[0].name]
    return None


def _is_softmax(n: Node) -> bool:
    return _short(n) in ("softmax", "_softmax") and isinstance(n.attrs["args"][0], Ref)


def _noop_input(g: Graph, n: Node) -> str | None:
    """The input of a node that passes its input through unchanged; raises _Reject on active dropout."""
    if n.op != "aten" or not n.attrs["args"] or not isinstance(n.attrs["args"][0], Ref):
        return None
    s, args = _short(n), n.attrs["args"]
    x = g[args[0].name]
    if s in ("dropout", "native_dropout", "feature_dropout"):
        p = args[1] if len(args) > 1 else n.attrs["kwargs"].get("p", 0.5)
        train = args[2] if len(args) > 2 else n.attrs["kwargs"].get("train", True)
        if train and p:
            raise _Reject(f"dropout %{n.name} (p={p}) is active (training mode): random, not provably equivalent")
        return x.name
    if s in _NOOPS and n.dtype == x.dtype:
        return x.name
    if s in ("to", "_to_copy", "type_as") and n.dtype == x.dtype and _same_shape(n.shape, x.shape):
        return x.name
    if s in _VIEWS and _same_shape(n.shape, x.shape):
        return x.name
    return None


# --- matching -------------------------------------------------------------------------------------
@dataclass
class _Match:
    """What matching one site found."""

    binds: dict[str, str] = field(default_factory=dict)   # slot (q, k, v) -> node
    k_transposed: bool = False                              # binds["k"] holds k^T (to be transposed back)
    scale: float = 1.0
    scaled: bool = False                                    # a scale was met on the scores, walking down
    masks: list[tuple[str, str]] = field(default_factory=list)  # (add | sub | keep | drop, node)
    interior: list[str] = field(default_factory=list)      # nodes computing scores and weights
    steps: list[str] = field(default_factory=list)         # how it was written, for the report


def _edge(parent: _P, child: _P) -> str:
    """Which normalising rules apply on a pattern edge."""
    if parent.op == "softmax":
        return "scores"     # masks, then scales, then q @ k^T
    if child.op == "softmax":
        return "weights"    # no-ops only; nothing else may use them
    if child.op == "slot" and child.slot == "v":
        return "value"
    return "operand"        # scalar scales on q, k or k^T


def _match(g: Graph, fold: _Folder, name: str, p: _P, m: _Match, canon=None) -> _Match:
    """m extended by matching node `name` against pattern node p; raises _Reject."""
    if p.op == "slot":
        m.binds[p.slot] = name
        return m
    n = g[name]
    canon = canon or _canonical(g, n)
    if p.op == "mT" and (canon is None or canon[0] != "mT") and p.args[0].op == "slot":
        m.binds[p.args[0].slot] = name  # k^T written without a transpose: transpose it back
        m.k_transposed = True
        m.steps.append("k^T given directly")
        return m
    if canon is None or canon[0] != p.op:
        raise _Reject(_why_not(g, n, p.op))
    if p.op != "mT":
        m.interior.append(name)
    if _short(n) == "bmm":
        m.steps.append("bmm")
    for child, arg in zip(p.args, canon[1]):
        m = _follow(g, fold, arg, child, m, _edge(p, child))
    return m


def _why_not(g: Graph, n: Node, want: str) -> str:
    if want == "softmax" and _is_softmax(n):
        return _softmax_problem(g, n) or f"%{n.name} is not a softmax over the keys"
    what = {"matmul": "a product", "softmax": "the softmax", "mT": "k^T"}[want]
    return f"%{n.name} ({n.target_name()}) stands where {what} of the attention pattern should be"


def _follow(g: Graph, fold: _Folder, name: str, p: _P, m: _Match, edge: str) -> _Match:
    if edge == "scores":
        return _scores(g, fold, name, p, m)
    if edge == "weights":
        while (inner := _noop_input(g, g[name])) is not None:
            m.interior.append(name)
            name = inner
        return _match(g, fold, name, p, m)
    if edge == "operand":
        cur, factor = name, 1.0
        while True:
            inner = _noop_input(g, g[cur])
            if inner is None:
                scaled = _scalar_factor(g, fold, g[cur])
                if scaled is None:
                    break
                inner, f = scaled
                factor *= f
            cur = inner
        if factor != 1.0:
            m.scale *= factor
            m.steps.append(f"scale on {p.slot or 'k^T'}")
        if factor != 1.0 or p.op != "slot":
            name = cur  # a slot keeps the no-ops around it when nothing was peeled
    return _match(g, fold, name, p, m)


def _scalar_factor(g: Graph, fold: _Folder, n: Node) -> tuple[str, float] | None:
    """(x, c) for a node computing x * c or x / c with c a constant scalar, else None."""
    s = _short(n)
    if s not in ("mul", "div") or n.attrs["kwargs"] or len(n.attrs["args"]) != 2:
        return None
    args = n.attrs["args"]
    for i in ((0, 1) if s == "mul" else (0,)):
        x, c = args[i], args[1 - i]
        if not isinstance(x, Ref):
            continue
        value = fold.scalar(c)
        xn = g[x.name]
        if value is None or not math.isfinite(value) or value == 0:
            continue
        if xn.dtype != n.dtype or not _same_shape(xn.shape, n.shape):
            continue
        return x.name, value if s == "mul" else 1.0 / value
    return None


def _scores(g: Graph, fold: _Folder, name: str, p: _P, m: _Match) -> _Match:
    """Match the scores edge: masks (outermost), then scales, then q @ k^T; backtracks over add's sides."""
    n = g[name]
    inner = _noop_input(g, n)
    if inner is not None:
        m.interior.append(name)
        return _scores(g, fold, inner, p, m)
    scaled = _scalar_factor(g, fold, n)
    if scaled is not None:
        m.interior.append(name)
        m.scale *= scaled[1]
        m.scaled = True
        m.steps.append("scale on the scores")
        return _scores(g, fold, scaled[0], p, m)
    if _short(n) == "baddbmm":
        return _baddbmm(g, fold, n, p, m)
    options = _mask_options(g, fold, n)
    if not options:
        return _match(g, fold, name, p, m)
    if m.scaled:
        raise _Reject(f"the scores are scaled after the mask %{n.name} is applied: the scale would change the mask")
    first: _Reject | None = None
    for inner, kind, mask in options:
        trial = copy.deepcopy(m)
        trial.interior.append(name)
        trial.masks.append((kind, mask))
        trial.steps.append({"add": "additive mask", "sub": "subtracted mask", "keep": "where mask",
                            "drop": "masked_fill mask"}[kind])
        try:
            return _scores(g, fold, inner, p, trial)
        except _Reject as e:
            first = first or e
    raise first


def _baddbmm(g: Graph, fold: _Folder, n: Node, p: _P, m: _Match) -> _Match:
    """baddbmm(M, a, b, beta, alpha) = beta M + alpha (a @ b): an additive mask and a scale."""
    args, kwargs = n.attrs["args"], n.attrs["kwargs"]
    if len(args) != 3 or not all(isinstance(a, Ref) for a in args):
        raise _Reject(f"baddbmm %{n.name} has unexpected arguments")
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if beta != 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha == 0:
        raise _Reject(f"baddbmm %{n.name} has beta={beta}, alpha={alpha}")
    if m.scaled:
        raise _Reject(f"the scores are scaled after the mask of %{n.name} is added: the scale would change the mask")
    mask = g[args[0].name]
    if mask.dtype != n.dtype or not mask.dtype.is_floating_point:
        raise _Reject(f"baddbmm %{n.name} adds a {mask.dtype} tensor to {n.dtype} scores")
    m.masks.append(("add", mask.name))
    m.scale *= float(alpha)
    m.steps.append("baddbmm")
    return _match(g, fold, n.name, p, m, canon=("matmul", [args[1].name, args[2].name]))


def _mask_options(g: Graph, fold: _Folder, n: Node) -> list[tuple[str, str, str]]:
    """The ways n applies a mask to scores: (scores input, kind, mask node); [] if it is no mask op."""
    s, args, kwargs = _short(n), n.attrs["args"], n.attrs["kwargs"]
    if s in ("add", "sub") and len(args) == 2:
        if kwargs.get("alpha", 1) != 1:
            raise _Reject(f"%{n.name} adds with alpha={kwargs['alpha']}")
        sides = ((0, 1), (1, 0)) if s == "add" else ((0, 1),)
        out = []
        for i, j in sides:
            x, mask = args[i], args[j]
            if not (isinstance(x, Ref) and isinstance(mask, Ref)):
                continue
            xn, mn = g[x.name], g[mask.name]
            if xn.dtype == n.dtype and _same_shape(xn.shape, n.shape) and mn.dtype == n.dtype and n.dtype.is_floating_point:
                out.append((x.name, "add" if s == "add" else "sub", mask.name))
        if not out:
            raise _Reject(f"%{n.name} adds a tensor to the scores that is no mask of their dtype and shape")
        return out
    if s == "masked_fill" and len(args) == 3 and isinstance(args[1], Ref):
        x, cond = g[args[0].name], g[args[1].name]
        value = fold.scalar(args[2])
        if cond.dtype != torch.bool:
            raise _Reject(f"masked_fill %{n.name} takes a {cond.dtype} condition")
        if value is None or value != -math.inf:
            raise _Reject(f"masked_fill %{n.name} writes {args[2]!r}, not -inf: it replaces the scores, while "
                          "SDPA's masks add to them (rows with every key masked would differ)")
        return [(x.name, "drop", cond.name)]
    if s == "where" and len(args) == 3 and isinstance(args[0], Ref):
        cond = g[args[0].name]
        if cond.dtype != torch.bool:
            return []
        for x, other, kind in ((args[1], args[2], "keep"), (args[2], args[1], "drop")):
            if isinstance(x, Ref) and fold.scalar(other) == -math.inf:
                xn = g[x.name]
                if xn.dtype == n.dtype and _same_shape(xn.shape, n.shape):
                    return [(x.name, kind, cond.name)]
        raise _Reject(f"where %{n.name} selects between the scores and something other than -inf")
    return []


def _live(g: Graph) -> set[str]:
    """Nodes whose values reach the graph's output."""
    live: set[str] = set()
    stack = [g.nodes[-1].name]
    while stack:
        cur = stack.pop()
        if cur in live:
            continue
        live.add(cur)
        stack.extend(g[cur].inputs)
    return live


def _match_site(g: Graph, fold: _Folder, softmax: str, users: dict, live: set[str]) -> tuple[str, _Match]:
    """(the product with v, the match) for the attention around a softmax node; raises _Reject."""
    cur = softmax
    while True:
        outs = [u for u in users[cur] if u in live]
        if len(outs) != 1:
            raise _Reject(f"the attention weights %{cur} are also used by "
                          f"{', '.join('%' + u for u in outs)} (e.g. need_weights=True returns them)")
        u = g[outs[0]]
        if _noop_input(g, u) == cur:
            cur = u.name
            continue
        canon = _canonical(g, u)
        if canon is not None and canon[0] == "matmul" and canon[1][0] == cur:
            root = u.name
            break
        raise _Reject(f"the softmax output feeds %{u.name} ({u.target_name()}), not a product with the values")
    m = _match(g, fold, root, _pattern(), _Match())
    m.interior = [i for i in m.interior if i != root]
    for i in m.interior:
        others = [u for u in users[i] if u in live and u not in m.interior and u != root]
        if others:
            raise _Reject(f"the attention scores %{i} are also used by %{others[0]}")
    _check_shapes(g, root, m)
    return root, m


def _k_shape(g: Graph, m: _Match) -> tuple:
    k = g[m.binds["k"]].shape
    return k[:-2] + (k[-1], k[-2]) if m.k_transposed else k


def _check_shapes(g: Graph, root: str, m: _Match) -> None:
    q, v, out = g[m.binds["q"]], g[m.binds["v"]], g[root]
    if q.shape is None or v.shape is None or g[m.binds["k"]].shape is None:
        raise _Reject("q, k or v has no known shape")
    k = _k_shape(g, m)
    if len(q.shape) not in (3, 4) or len(k) != len(q.shape) or len(v.shape) != len(q.shape):
        raise _Reject(f"q, k, v have ranks {len(q.shape)}, {len(k)}, {len(v.shape)}; attention takes rank 3 or 4")
    if not (_same_shape(q.shape[:-2], k[:-2]) and _same_shape(q.shape[:-2], v.shape[:-2])):
        raise _Reject(f"q, k, v have different batch dims {q.shape[:-2]}, {k[:-2]}, {v.shape[:-2]} (broadcast)")
    if not (_eq(q.shape[-1], k[-1]) and _eq(k[-2], v.shape[-2])):
        raise _Reject(f"q {q.shape}, k {k}, v {v.shape} do not fit together")
    if not _same_shape(out.shape, q.shape[:-1] + (v.shape[-1],)):
        raise _Reject(f"the output {out.shape} is not [..., Lq, dv]")
    dtypes = {q.dtype, g[m.binds["k"]].dtype, v.dtype, out.dtype}
    if len(dtypes) != 1 or not q.dtype.is_floating_point:
        raise _Reject(f"q, k, v and the output have dtypes {sorted(map(str, dtypes))}")


def _looks_like_attention(g: Graph, softmax: str, users: dict) -> bool:
    """A softmax whose input comes from a product or whose output feeds one (a rejection worth reporting)."""
    products = ("matmul", "bmm", "baddbmm")
    frontier = [softmax]
    for _ in range(4):
        frontier = [i for f in frontier for i in g[f].inputs]
        if any(_short(g[i]) in products for i in frontier):
            return True
    frontier = [softmax]
    for _ in range(4):
        frontier = [u for f in frontier for u in users[f]]
        if any(_short(g[u]) in products for u in frontier):
            return True
    return False


# --- rewriting ------------------------------------------------------------------------------------
class _Builder:
    """New nodes for one rewrite, named uniquely, with shapes."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.nodes: list[Node] = []
        self._by_name: dict[str, Node] = {}

    def get(self, name: str) -> Node:
        return self._by_name[name] if name in self._by_name else self.g[name]

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.g or name in self._by_name:
            i += 1
            name = f"{base}_{i}"
        return name

    def aten(self, base: str, target: str, args: tuple, kwargs: dict, shape: tuple | None, dtype) -> str:
        n = Node(self.fresh(base), "aten", refs_in((args, kwargs)), {"target": target, "args": args, "kwargs": kwargs},
                 shape, dtype)
        self.nodes.append(n)
        self._by_name[n.name] = n
        return n.name


def _transpose_last(b: _Builder, name: str) -> str:
    x = b.get(name)
    shape = x.shape[:-2] + (x.shape[-1], x.shape[-2])
    return b.aten(f"{name}_mT", "aten.transpose.int", (Ref(name), -2, -1), {}, shape, x.dtype)


def _combine_masks(b: _Builder, masks: list[tuple[str, str]]) -> str | None:
    """One SDPA mask equal to applying `masks` to the scores: a bool keep-mask, or an additive float mask."""
    keeps, adds = [], []
    for kind, name in masks:
        x = b.get(name)
        if kind == "keep":
            keeps.append(name)
        elif kind == "drop":
            keeps.append(b.aten(f"{name}_keep", "aten.logical_not.default", (Ref(name),), {}, x.shape, torch.bool))
        elif kind == "add":
            adds.append(name)
        else:
            adds.append(b.aten(f"{name}_neg", "aten.neg.default", (Ref(name),), {}, x.shape, x.dtype))
    out = None
    for name in adds:
        if out is None:
            out = name
            continue
        shape = _broadcast(b.get(out).shape, b.get(name).shape)
        if shape is None:
            raise _Reject("the masks do not broadcast together")
        out = b.aten("attn_mask", "aten.add.Tensor", (Ref(out), Ref(name)), {}, shape, b.get(name).dtype)
    for name in keeps:
        if out is None:
            out = name
            continue
        shape = _broadcast(b.get(out).shape, b.get(name).shape)
        if shape is None:
            raise _Reject("the masks do not broadcast together")
        if b.get(out).dtype == torch.bool:
            out = b.aten("attn_mask", "aten.logical_and.default", (Ref(out), Ref(name)), {}, shape, torch.bool)
        else:
            out = b.aten("attn_mask", "aten.where.ScalarOther", (Ref(name), Ref(out), -math.inf), {}, shape,
                         b.get(out).dtype)
    return out


def _heads_of_merged(g: Graph, name: str) -> int:
    """Heads folded into dim 0 of a rank-3 q [B*H, L, d], found where its producers split them off; 1 if none."""
    q = g[name]
    d = q.shape[-1]
    cur = q
    for _ in range(12):
        if cur.op == "aten" and _short(cur) in _VIEWS | {"flatten"} and cur.inputs:
            src = g[cur.inputs[0]]
            if src.shape is not None and _is_int(src.shape[-1]) and _is_int(d):
                if int(src.shape[-1]) != int(d) and int(src.shape[-1]) % int(d) == 0:
                    return int(src.shape[-1]) // int(d)
                if len(src.shape) == 4 and len(cur.shape) == 3 and _is_int(src.shape[1]) and _eq(src.shape[-1], d):
                    return int(src.shape[1])
        if cur.op != "aten" or not cur.inputs:
            break
        cur = g[cur.inputs[0]]
    return 1


def _to_rank4(b: _Builder, q: str, k: str, v: str, mask: str | None, heads: int):
    """q, k, v [N, L, d] and a mask broadcasting to [N, Lq, S] as [N/h, h, L, d] and a matching mask."""
    n = b.get(q).shape[0]
    if heads > 1 and not sympy.simplify(n / heads).is_integer:
        heads = 1

    def split(name: str) -> str:
        x = b.get(name)
        if heads == 1:
            return b.aten(f"{name}_heads", "aten.unsqueeze.default", (Ref(name), 1), {},
                          (x.shape[0], sympy.Integer(1)) + x.shape[1:], x.dtype)
        shape = (sympy.simplify(x.shape[0] / heads), sympy.Integer(heads)) + x.shape[1:]
        return b.aten(f"{name}_heads", "aten.unflatten.int", (Ref(name), 0, [-1, heads]), {}, shape, x.dtype)

    q4, k4, v4 = split(q), split(k), split(v)
    if mask is not None:
        ms = b.get(mask).shape
        if len(ms) == 3 and not _eq(ms[0], 1):
            if not _eq(ms[0], n):
                raise _Reject(f"the mask {ms} does not broadcast over the merged batch and heads {n}")
            mask = split(mask)
    return q4, k4, v4, mask, heads


def _rename_uses(g: Graph, old: str, new: str) -> None:
    def swap(r: Ref) -> Ref:
        return Ref(new) if r.name == old else r

    for n in g.nodes:
        if old not in n.inputs:
            continue
        n.inputs = [new if i == old else i for i in n.inputs]
        if n.op in ("aten", "output"):
            n.attrs["args"] = map_refs(n.attrs["args"], swap)
        if n.op == "aten":
            n.attrs["kwargs"] = map_refs(n.attrs["kwargs"], swap)


def _emit(g: Graph, b: _Builder, root: str, q: str, k: str, v: str, mask: str | None, *, scale, is_causal: bool,
          dropout_p: float = 0.0, steps: list[str]) -> tuple[str, list[str]]:
    """Replace node `root` by canonical SDPA of q, k, v (rank 3 ones reshaped to rank 4).

    Returns the SDPA node and the normalising steps, these included."""
    out = g[root]
    rank = len(b.get(q).shape)
    heads = None
    if rank == 3:
        heads = _heads_of_merged(g, q)
        q, k, v, mask, heads = _to_rank4(b, q, k, v, mask, heads)
        steps = steps + [f"rank 3 split into {heads} head(s)" if heads > 1 else "rank 3 as one head"]
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs["attn_mask"] = Ref(mask)
    if dropout_p:
        kwargs["dropout_p"] = dropout_p
    if is_causal:
        kwargs["is_causal"] = True
    if scale is not None:
        kwargs["scale"] = float(scale)
    qn, vn = b.get(q), b.get(v)
    shape = qn.shape[:-1] + (vn.shape[-1],)
    sdpa = b.aten("attention", SDPA, (Ref(q), Ref(k), Ref(v)), kwargs, shape, out.dtype)
    last = sdpa
    if rank == 3:
        if heads == 1:
            last = b.aten("attention_out", "aten.squeeze.dim", (Ref(sdpa), 1), {}, out.shape, out.dtype)
        else:
            last = b.aten("attention_out", "aten.flatten.using_ints", (Ref(sdpa), 0, 1), {}, out.shape, out.dtype)
    g.replace(root, b.nodes)
    _rename_uses(g, root, last)
    return sdpa, steps


# --- describing masks -----------------------------------------------------------------------------
def _keep_of(t: torch.Tensor) -> torch.Tensor | None:
    """A bool keep-mask equal to t (bool, or additive float of 0 and -inf), else None."""
    if t.dtype == torch.bool:
        return t
    if not t.dtype.is_floating_point:
        return None
    masked = t == -math.inf
    if t.dtype in (torch.float32, torch.float64, torch.bfloat16):
        masked |= t <= torch.finfo(t.dtype).min  # underflows to exactly 0 after exp, as -inf does
    if not bool(((t == 0) | masked).all()):
        return None
    return ~masked


def _query_invariant_value(t: torch.Tensor) -> bool:
    return t.dim() < 2 or t.shape[-2] == 1 or bool((t == t[..., :1, :]).all())


def _block_source(g: Graph, n: Node) -> str | None:
    """The input of a node that keeps every trailing [Lq, S] block of its input as it is (it only regroups,
    broadcasts or casts the leading dims, or takes a top-left block), else None."""
    if n.op != "aten" or not n.attrs["args"] or not isinstance(n.attrs["args"][0], Ref) or n.shape is None:
        return None
    short, args = _short(n), n.attrs["args"]
    x = g[args[0].name]
    if x.shape is None or len(x.shape) < 2 or len(n.shape) < 2:
        return None
    rank_in, rank_out = len(x.shape), len(n.shape)

    def lead(d, rank: int) -> bool:  # a dim before the trailing two
        return isinstance(d, int) and d % rank < rank - 2

    if short in _NOOPS | {"to", "_to_copy", "expand"}:
        return x.name
    if short in _VIEWS and _same_shape(x.shape[-2:], n.shape[-2:]):
        return x.name
    if short == "unsqueeze" and lead(args[1], rank_out):
        return x.name
    if short == "unflatten" and lead(args[1], rank_in):
        return x.name
    if short == "flatten" and len(args) == 3 and lead(args[2], rank_in):
        return x.name
    if short == "slice":  # slice.Tensor(x, dim=0, start=None, end=None, step=1)
        dim = args[1] if len(args) > 1 else 0
        start = args[2] if len(args) > 2 else None
        step = args[4] if len(args) > 4 else 1
        if lead(dim, rank_in) or (start in (None, 0) and step == 1):
            return x.name
    return None


class _Masks:
    """Describes SDPA masks: causal, padding (the same for every query), or general."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.fold = _Folder(g)
        self._inv: dict[str, bool] = {}

    def kind(self, mask: str, lq, s) -> str:
        comps = self._components(mask, lq, s)
        if "general" in comps:
            return "general"
        return "+".join(sorted(comps - {"none"})) or "none"

    def _constant_kind(self, name: str, lq, s) -> str:
        """The kind of a mask that depends on sizes and parameters only, found by evaluating it."""
        kinds = set()
        for env in self.fold.envs(name):
            try:
                t = self.fold.value(name, env)
                lq_i, s_i = concrete(lq, env), concrete(s, env)
            except (_NotConstant, LrccError):
                return "general"
            if not isinstance(t, torch.Tensor):
                return "general"
            keep = _keep_of(t)
            if keep is not None and bool(keep.all()):
                kinds.add("none")
                continue
            causal = torch.ones(lq_i, s_i, dtype=torch.bool).tril()
            try:
                full = keep.expand(*keep.shape[:-2], lq_i, s_i) if keep is not None else None
            except RuntimeError:
                return "general"
            if full is not None and bool((full == causal).all()):
                kinds.add("causal")
            elif _query_invariant_value(t):
                kinds.add("padding")
            else:
                kinds.add("general")
        return kinds.pop() if len(kinds) == 1 else "general"

    def _components(self, name: str, lq, s) -> set[str]:
        """The kinds of the masks combined into `name` (by and, +, or where(keep, m, -inf))."""
        n = self.g[name]
        if not self.fold.depends_on_input(name):
            return {self._constant_kind(name, lq, s)}
        if self.query_invariant(name):
            return {"padding"}
        src = _block_source(self.g, n)
        if src is not None:
            return self._components(src, lq, s)
        short, args = _short(n), n.attrs.get("args", ())
        if short in ("__and__", "logical_and", "bitwise_and") or (short == "add" and n.dtype.is_floating_point):
            return set().union(*(self._components(a.name, lq, s) for a in args if isinstance(a, Ref)))
        if short == "where" and len(args) == 3 and isinstance(args[0], Ref) and self.g[args[0].name].dtype == torch.bool:
            keep, a, b = args
            if self.fold.scalar(b) == -math.inf and isinstance(a, Ref):         # where(keep, m, -inf)
                return self._components(keep.name, lq, s) | self._components(a.name, lq, s)
            low = self.fold.scalar(b)
            if self.fold.scalar(a) == 0 and low is not None and low <= torch.finfo(n.dtype).min:
                return self._components(keep.name, lq, s)                      # where(keep, 0, min)
        return {"general"}

    def query_invariant(self, name: str) -> bool:
        """Whether the value provably holds the same for every query (dim -2 broadcast or constant)."""
        if name not in self._inv:
            self._inv[name] = self._invariant(self.g[name])
        return self._inv[name]

    def _invariant(self, n: Node) -> bool:
        if n.shape is None or len(n.shape) < 2 or _eq(n.shape[-2], 1):
            return True
        if not self.fold.depends_on_input(n.name):
            try:
                return all(_query_invariant_value(self.fold.value(n.name, env)) for env in self.fold.envs(n.name))
            except (_NotConstant, TypeError, AttributeError):
                return False
        if n.op != "aten":
            return False
        src = _block_source(self.g, n)
        if src is not None:
            return self.query_invariant(src)
        if _short(n) in _ELEMENTWISE:
            return all(self.query_invariant(r) for r in refs_in(n.attrs["args"]) if self.g[r].shape is not None)
        return False


# --- the pass ---------------------------------------------------------------------------------------
def normalize_attention(g: Graph) -> None:
    """Rewrite every attention the graph computes into the canonical SDPA form, in place (see the module doc).

    Sites left as written are listed with their reasons in ``g.meta["attention_skipped"]``.
    """
    skipped: dict[str, str] = {}                      # node -> why it was left as written
    written: dict[str, tuple[str, list[str]]] = {}  # SDPA node -> (form, steps)
    fold = _Folder(g)
    users, live = g.users(), _live(g)
    matches = []
    for n in list(g.nodes):
        if not _is_softmax(n) or n.name not in live:
            continue
        try:
            matches.append(_match_site(g, fold, n.name, users, live))
        except _Reject as e:
            if _looks_like_attention(g, n.name, users):
                skipped[n.name] = str(e)
    scope: set[str] = set()
    for root, m in matches:
        b = _Builder(g)
        try:
            k = _transpose_last(b, m.binds["k"]) if m.k_transposed else m.binds["k"]
            mask = _combine_masks(b, m.masks)
            sdpa, steps = _emit(g, b, root, m.binds["q"], k, m.binds["v"], mask, scale=m.scale, is_causal=False,
                                steps=m.steps)
        except _Reject as e:
            skipped[root] = str(e)
            continue
        written[sdpa] = ("softmax", list(dict.fromkeys(steps)))
        scope |= _dead_descendants(m.interior, users, live)
    for n in list(g.nodes):  # attention called with rank-3 q, k, v: split the heads out of the batch
        if n.op != "aten" or n.attrs["target"] != SDPA or n.name in written:
            continue
        a = sdpa_arguments(n)
        q = g[a["query"].name]
        if q.shape is None or len(q.shape) != 3 or a["enable_gqa"] or a["dropout_p"] not in (None, 0, 0.0):
            continue
        b = _Builder(g)
        try:
            mask = a["attn_mask"].name if isinstance(a["attn_mask"], Ref) else None
            sdpa, steps = _emit(g, b, n.name, a["query"].name, a["key"].name, a["value"].name, mask,
                                scale=a["scale"], is_causal=bool(a["is_causal"]), steps=[])
        except _Reject as e:
            skipped[n.name] = str(e)
            continue
        written[sdpa] = ("sdpa", steps)
    _remove_dead(g, scope)
    masks = _Masks(g)
    for n in g.nodes:
        if n.op == "aten" and n.attrs["target"] == SDPA:
            form, steps = written.get(n.name, ("sdpa", []))
            reason = _annotate(g, n, masks, form, steps)
            if reason:
                skipped.setdefault(n.name, reason)
    g.meta.pop("attention_skipped", None)
    if skipped:
        g.meta["attention_skipped"] = [{"node": k, "reason": v} for k, v in skipped.items()]


def _dead_descendants(names: list[str], users: dict, live: set[str]) -> set[str]:
    out, stack = set(names), list(names)
    while stack:
        for u in users[stack.pop()]:
            if u not in live and u not in out:
                out.add(u)
                stack.append(u)
    return out


def _remove_dead(g: Graph, scope: set[str]) -> None:
    """Remove the nodes in scope (and the producers they leave unused) that nothing uses."""
    scope = set(scope)
    while True:
        users = g.users()
        dead = [n for n in g.nodes if n.name in scope and not users[n.name] and _removable(n)]
        if not dead:
            return
        for n in dead:
            scope |= set(n.inputs)
            g.replace(n.name, [])
            if n.op == "param" and not any(m.op == "param" and m.attrs["ref"] == n.attrs["ref"] for m in g.nodes):
                g.tensors.pop(n.attrs["ref"], None)


def _removable(n: Node) -> bool:
    if n.op == "param":
        return True
    if n.op != "aten":
        return False
    s = _short(n)
    return not s.endswith("_") and s not in _EFFECTFUL


def _linear_site(g: Graph, name: str) -> str | None:
    """The linear site a value comes from through views, transposes and other one-input ops."""
    cur = g[name]
    for _ in range(16):
        if cur.is_site:
            return cur.attrs.get("site")
        if cur.op != "aten" or not cur.inputs:
            return None
        cur = g[cur.inputs[0]]
    return None


def _site_name(g: Graph, n: Node, q: str, k: str, v: str) -> str:
    """A name for the attention site: the module path its q, k and v projections share (e.g.
    "encoder.layers.0.attn" for ...attn.q / .k / .v), else the node's own name."""
    sites = {s for s in (_linear_site(g, x) for x in (q, k, v)) if s}
    if not sites:
        return n.name
    parts = [x.split(".") for x in sites]
    common = []
    for bits in zip(*parts):
        if len(set(bits)) > 1:
            break
        common.append(bits[0])
    if len(sites) == 1:
        common = parts[0][:-1]
    name = ".".join(common) or f"{sorted(sites)[0]}.attention"
    linear = {m.attrs.get("site") for m in g.nodes if m.is_site}
    if name in linear:  # a module path that is also a linear's name (e.g. a top-level fused qkv)
        name = f"{name}.attention"
    taken = {m.attrs["attention"].get("site") for m in g.nodes if m is not n and "attention" in m.attrs} | linear
    while name in taken:  # two attentions fed by one projection module: keep the names apart
        name = f"{name}.{n.name}"
    return name


def _source(g: Graph, name: str) -> str | None:
    """The module that produced q, where it can be told (nn.MultiheadAttention's packed in_proj)."""
    cur = g[name]
    for _ in range(16):
        if cur.op == "linear":
            ref = g[cur.inputs[1]].attrs.get("ref", "")
            return "nn.MultiheadAttention" if ref.endswith("in_proj_weight") else None
        if not cur.inputs or cur.op not in ("aten",):
            return None
        cur = g[cur.inputs[0]]
    return None


def _annotate(g: Graph, n: Node, masks: _Masks, form: str, steps: list[str]) -> str | None:
    """Record what an SDPA node computes in attrs["attention"]; returns why it is left out, or None."""
    n.attrs.pop("attention", None)
    a = sdpa_arguments(n)
    if a["dropout_p"] not in (None, 0, 0.0):
        return f"dropout_p={a['dropout_p']}: random, not provably equivalent; left as written"
    q, k, v = (g[a[key].name] for key in ("query", "key", "value"))
    if any(t.shape is None or len(t.shape) != 4 for t in (q, k, v)):
        return f"q, k, v are not all [B, H, L, d] ({q.shape}, {k.shape}, {v.shape})"
    d = q.shape[-1]
    scale = a["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(int(d)) if _is_int(d) else None
    mask = a["attn_mask"]
    if isinstance(mask, Ref):
        kind = masks.kind(mask.name, q.shape[-2], k.shape[-2])
        mask_dtype = "bool" if g[mask.name].dtype == torch.bool else "float"
    else:
        kind, mask_dtype = ("causal" if a["is_causal"] else "none"), None
    heads = q.shape[-3]
    n.attrs["attention"] = {
        "site": _site_name(g, n, q.name, k.name, v.name),
        "form": form,
        "source": _source(g, q.name),
        "written": list(steps),
        "heads": int(heads) if _is_int(heads) else None,
        "kv_heads": int(k.shape[-3]) if _is_int(k.shape[-3]) else None,
        "head_dim": int(d) if _is_int(d) else None,
        "value_dim": int(v.shape[-1]) if _is_int(v.shape[-1]) else None,
        "seq_q": str(q.shape[-2]),
        "seq_k": str(k.shape[-2]),
        "scale": scale,
        "causal": bool(a["is_causal"]) or kind == "causal",
        "mask": kind,
        "mask_dtype": mask_dtype,
    }
    return None


# --- reading the result -----------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSite:
    """One canonical attention node, as later rules see it."""

    name: str                 # the scaled_dot_product_attention node
    site: str                 # the site's name in plans and reports (its projections' module path)
    heads: int | None
    head_dim: int | None
    value_dim: int | None
    q: str                    # producers of q, k, v ([B, H, L, d]) and of the mask
    k: str
    v: str
    mask: str | None
    mask_kind: str            # one of MASK_KINDS
    causal: bool              # is_causal, or a mask proven to be exactly the causal one
    scale: float | None       # the scale in effect (SDPA's default 1/sqrt(d) filled in)
    seq_q: str
    seq_k: str
    form: str                 # "sdpa" (called as such) or "softmax" (written out by hand)
    source: str | None        # e.g. "nn.MultiheadAttention"


def attention_sites(g: Graph) -> list[AttentionSite]:
    """The graph's canonical attention nodes, in order."""
    out = []
    for n in g.nodes:
        info = n.attrs.get("attention") if n.op == "aten" and n.attrs["target"] == SDPA else None
        if info is None:
            continue
        a = sdpa_arguments(n)
        mask = a["attn_mask"].name if isinstance(a["attn_mask"], Ref) else None
        out.append(AttentionSite(n.name, info.get("site", n.name), info["heads"], info["head_dim"], info["value_dim"], a["query"].name,
                                 a["key"].name, a["value"].name, mask, info["mask"], info["causal"], info["scale"],
                                 info["seq_q"], info["seq_k"], info["form"], info["source"]))
    return out


def attention_skipped(g: Graph) -> list[dict[str, str]]:
    """Softmax sites that look like attention but were left as written, with the reason for each."""
    return list(g.meta.get("attention_skipped", []))
