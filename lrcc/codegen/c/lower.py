"""Lower a planned lrcc Graph to an int8 Program (program.py) for the C backend.

Walks the graph once, in order. Each IR value maps to a program tensor, possibly through a lazy
permutation (transpose/permute are not copied until an op needs them contiguous) or a reshape
alias (no copy). Producers absorb a following ReLU and a 2x2 max pool where they are the only
user (the fused output takes the final node's quantisation). Scaled-dot-product attention reads
q, k, v in the (tokens, heads x head_dim) layout of the linear layers that made them, so the
usual view/transpose head split and merge cost nothing. Ops the backend cannot emit are collected
and reported together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import LrccError
from ...ir.graph import Graph, Node, Ref, concrete
from . import fixedpoint as fx
from . import kernels
from .program import Op, Program, QTensor
from .ranges import Ranges

# ops that only re-view a contiguous tensor
_RESHAPES = {"view", "_unsafe_view", "reshape", "flatten", "unsqueeze", "squeeze", "contiguous", "clone", "alias",
             "detach", "dropout", "lift_fresh_copy"}
_SUPPORTED = sorted(_RESHAPES | {"transpose", "permute", "relu", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean",
                                  "add", "gelu", "layer_norm", "softmax", "_softmax", "scaled_dot_product_attention",
                                  "conv2d"}) + ["linear", "lowrank_linear", "compressed_linear (int4 per channel)"]


@dataclass
class Val:
    """An IR value in the program: tensor `tensor` holds it contiguously in shape `base`; the value
    is base.permute(perm) (perm None: the value is `base` itself)."""

    tensor: str
    shape: tuple[int, ...]
    perm: tuple[int, ...] | None = None
    base: tuple[int, ...] | None = None


def _short(target: str) -> str:
    parts = target.split(".")
    return parts[1] if len(parts) >= 2 else target


def unsupported_ops(g: Graph) -> list[tuple[str, str]]:
    """(node, operator) for every node the C backend cannot emit."""
    bad = []
    for n in g.nodes:
        if n.op in ("input", "param", "output", "linear", "lowrank_linear") or _is_shape_arith(n):
            continue
        if n.op == "compressed_linear":
            why = c_quant_unsupported(n)
            if why:
                bad.append((n.name, f"compressed_linear ({why})"))
            continue
        if n.op != "aten" or _short(n.attrs["target"]) not in _SUPPORTED:
            bad.append((n.name, n.target_name()))
    return bad


class Lowering:
    def __init__(self, g: Graph, ranges: Ranges, dims: dict[str, int], bits: dict[str, int] | None = None) -> None:
        self.g = g
        self.ranges = ranges
        self.dims = dims
        self.bits = bits or {}
        self.tensors: dict[str, QTensor] = {}
        self.aliases: dict[str, str] = {}
        self.ops: list[Op] = []
        self.vals: dict[str, Val] = {}
        self.users = g.users()
        self.fused: dict[str, str] = {}  # absorbed node -> the producer node that computes it

    # --- helpers -----------------------------------------------------------------------------
    def shape(self, n: Node) -> tuple[int, ...]:
        """The node's concrete shape without the batch dim."""
        if n.shape is None:
            raise LrccError(f"C backend: node {n.name!r} has no tensor shape")
        full = tuple(concrete(d, self.dims) for d in n.shape)
        if not full or full[0] != 1:
            raise LrccError(f"C backend: node {n.name!r} has shape {full}; the C backend runs batch 1 and expects "
                            "every activation to lead with the batch dim (give example inputs of batch 1)")
        return full[1:]

    def qparams(self, name: str, relu: bool = False) -> tuple[float, int]:
        if name not in self.ranges:
            raise LrccError(f"C backend: no calibrated range for {name!r}")
        lo, hi = self.ranges.get(name)
        return fx.choose_qparams(max(lo, 0.0) if relu else lo, hi)

    def new_tensor(self, name: str, shape: tuple[int, ...], q: tuple[float, int], const: np.ndarray | None = None) -> str:
        if name in self.tensors:
            raise LrccError(f"C backend: two tensors named {name!r}")
        self.tensors[name] = QTensor(name, tuple(int(s) for s in shape), float(q[0]), int(q[1]), const)
        return name

    def q_of(self, tensor: str) -> tuple[float, int]:
        t = self.tensors[tensor]
        return t.scale, t.zero_point

    def emit(self, op: Op, inputs: list[str], output: str) -> Op:
        op.inputs = list(inputs)
        op.output = output
        self.ops.append(op)
        return op

    def contiguous(self, v: Val, name: str, shape: tuple[int, ...] | None = None) -> str:
        """A tensor holding v contiguously (in `shape`, default v.shape): a permute copy where v is
        lazily permuted, a reshape alias where only the shape differs."""
        shape = tuple(shape or v.shape)
        if v.perm is not None:
            out = self.new_tensor(f"{name}.permuted", v.shape, self.q_of(v.tensor))
            src = self.alias(v.tensor, v.base)
            op = kernels.get("permute").build(f"{name}.permute", tuple(v.base), tuple(v.perm))
            self.emit(op, [src], out)
            v = Val(out, v.shape)
        return self.alias(v.tensor, shape)

    def alias(self, tensor: str, shape: tuple[int, ...]) -> str:
        """`tensor` seen in `shape` (same storage)."""
        t = self.tensors[tensor]
        shape = tuple(int(s) for s in shape)
        if t.shape == shape:
            return tensor
        if math.prod(t.shape) != math.prod(shape):
            raise LrccError(f"C backend: cannot view {tensor!r} of shape {t.shape} as {shape}")
        name = f"{tensor}@{'x'.join(map(str, shape)) or 'scalar'}"
        if name not in self.tensors:
            self.tensors[name] = QTensor(name, shape, t.scale, t.zero_point, t.const)
            self.aliases[name] = tensor
        return name

    def value(self, ref) -> Val:
        name = ref.name if isinstance(ref, Ref) else ref
        if name in self.vals:
            return self.vals[name]
        n = self.g[name]
        if n.op == "param":
            t = self.g.tensors[n.attrs["ref"]].detach().float()
            shape = tuple(t.shape)
            if shape and shape[0] == 1:
                shape = shape[1:]
            lo, hi = float(t.min()), float(t.max())
            q = fx.choose_qparams(lo, hi)
            const = fx.quantize_real(t.numpy().reshape(shape), *q)
            self.vals[name] = Val(self.new_tensor(name, shape, q, const), shape)
            return self.vals[name]
        raise LrccError(f"C backend: {name!r} is used before it is computed")

    def sole_user(self, name: str, op_short: str) -> Node | None:
        users = self.users.get(name, [])
        if len(users) != 1:
            return None
        u = self.g[users[0]]
        if u.op == "aten" and _short(u.attrs["target"]) == op_short:
            return u
        return None

    def fuse_tail(self, n: Node, allow_pool: bool) -> tuple[Node, bool, bool]:
        """The last node of n -> relu -> max_pool2d(2) that n can absorb, and whether relu/pool were."""
        last, relu, pool = n, False, False
        r = self.sole_user(n.name, "relu")
        if r is not None:
            last, relu = r, True
            self.fused[r.name] = n.name
        if allow_pool:
            p = self.sole_user(last.name, "max_pool2d")
            if p is not None and _is_pool2(p):
                last, pool = p, True
                self.fused[p.name] = n.name
        return last, relu, pool

    # --- the walk ----------------------------------------------------------------------------
    def run(self) -> Program:
        bad = unsupported_ops(self.g)
        if bad:
            lines = "\n".join(f"  {node}: {op}" for node, op in bad)
            raise LrccError(f"C backend: {len(bad)} operator(s) cannot be emitted as C:\n{lines}\n"
                            f"supported: {', '.join(_SUPPORTED)}")
        inputs = self.g.inputs()
        if len(inputs) != 1:
            raise LrccError(f"C backend: the model takes {len(inputs)} inputs; lrcc_model_run takes exactly one")
        for n in self.g.nodes:
            if n.name in self.fused:
                self.vals[n.name] = self.vals[self.fused[n.name]]
                continue
            if n.op == "input":
                shape = self.shape(n)
                self.vals[n.name] = Val(self.new_tensor(n.name, shape, self.qparams(n.name)), shape)
            elif n.op == "param" or _is_shape_arith(n):
                continue  # shape arithmetic (sym_size, ...): the C runs at fixed shapes
            elif n.op in ("linear", "lowrank_linear", "compressed_linear"):
                self.lower_linear(n)
            elif n.op == "aten":
                getattr(self, f"lower_{_short(n.attrs['target'])}", self.lower_reshape)(n)
            elif n.op == "output":
                outs = n.attrs["args"]
                if len(outs) != 1 or not isinstance(outs[0], Ref):
                    raise LrccError(f"C backend: the model returns {len(outs)} values; lrcc_model_run returns one tensor")
                v = self.value(outs[0])
                out = self.contiguous(v, "output")
                return self.finish(self.vals[inputs[0].name].tensor, out)
        raise LrccError("C backend: the graph has no output node")

    def finish(self, inp: str, out: str) -> Program:
        prog = Program(self.tensors, self.ops, inp, out, self.aliases)
        if prog.storage(out) == prog.storage(inp):
            raise LrccError("C backend: the model's output is its input; nothing to compile")
        return prog

    # --- operators -----------------------------------------------------------------------------
    def lower_linear(self, n: Node) -> None:
        x = self.value(n.inputs[0])
        shape_out = self.shape(n)
        last, relu, _ = self.fuse_tail(n, allow_pool=False)
        yq = self.qparams(last.name, relu)
        ts = [self.g.tensor(i) for i in n.inputs[1:]]
        k_in = int(x.shape[-1])
        rows = math.prod(shape_out[:-1]) if len(shape_out) > 1 else 1
        xin = self.contiguous(x, n.name + ".in", (rows, k_in))
        out = self.new_tensor(last.name, shape_out, yq)
        bits = int(self.bits.get(n.attrs.get("site", ""), 8))
        if n.op == "compressed_linear":
            from ...rewrites.quantize import unpack
            parts = dict(zip(n.attrs["roles"], ts))
            codes = unpack(parts["codes"], 4, int(n.attrs["cols"])).numpy()[:, :int(n.attrs["n"])]
            b = parts.get("bias")
            op = kernels.Linear.build_u4z(n.attrs.get("site", n.name), codes, parts["zero"].float().numpy().ravel(),
                                          parts["scale"].float().numpy().ravel(), None if b is None else b.numpy(),
                                          rows, self.q_of(xin), yq, relu=relu)
            self.emit(op, [xin], self.alias(out, (rows, shape_out[-1])))
        elif n.op == "linear":
            w, b = ts[0], (ts[1] if len(ts) > 1 else None)
            op = kernels.Linear.build(n.attrs.get("site", n.name), w.numpy(), None if b is None else b.numpy(), rows,
                                      self.q_of(xin), yq, relu=relu, bits=bits)
            self.emit(op, [xin], self.alias(out, (rows, shape_out[-1])))
        else:
            v, u, b = ts[0], ts[1], (ts[2] if len(ts) > 2 else None)
            mq = self.qparams(f"{n.name}.mid")
            mid = self.new_tensor(f"{n.name}.mid", (rows, int(v.shape[0])), mq)
            site = n.attrs.get("site", n.name)
            op1 = kernels.Linear.build(f"{site}.v", v.float().numpy(), None, rows, self.q_of(xin), mq, bits=bits)
            self.emit(op1, [xin], mid)
            op2 = kernels.Linear.build(f"{site}.u", u.float().numpy(), None if b is None else b.numpy(), rows, mq, yq,
                                       relu=relu, bits=bits)
            self.emit(op2, [mid], self.alias(out, (rows, shape_out[-1])))
        self.vals[n.name] = Val(out, shape_out)

    def lower_conv2d(self, n: Node) -> None:
        args = list(n.attrs["args"]) + [None] * 7
        x = self.value(args[0])
        w = self.g.tensor(args[1].name) if isinstance(args[1], Ref) else None
        b = self.g.tensor(args[2].name) if isinstance(args[2], Ref) else None
        if w is None:
            raise LrccError(f"C backend: {n.name}: conv2d weights must be constants")
        stride = _pair(args[3] if args[3] is not None else 1)
        padding = args[4] if args[4] is not None else 0
        dilation = _pair(args[5] if args[5] is not None else 1)
        groups = int(args[6] if args[6] is not None else 1)
        if isinstance(padding, str) or dilation != (1, 1):
            raise LrccError(f"C backend: {n.name}: conv2d with padding={padding!r}, dilation={dilation} is not supported "
                            "(use numeric padding and dilation 1)")
        ph, pw = _pair(padding)
        last, relu, pool = self.fuse_tail(n, allow_pool=True)
        yq = self.qparams(last.name, relu)
        xin = self.contiguous(x, n.name + ".in")
        out_shape = self.shape(last)
        out = self.new_tensor(last.name, out_shape, yq)
        op = kernels.get("conv2d").build(n.name, w.numpy(), None if b is None else b.numpy(), tuple(x.shape),
                                         self.q_of(xin), yq, stride=stride, pad=(ph, pw, ph, pw), groups=groups,
                                         relu=relu, pool=2 if pool else 0)
        self.emit(op, [xin], out)
        self.vals[n.name] = Val(out, out_shape)

    def lower_relu(self, n: Node) -> None:
        x = self.value(n.attrs["args"][0])
        xin = self.contiguous(x, n.name + ".in")
        out = self.new_tensor(n.name, x.shape, self.q_of(xin))
        self.emit(kernels.get("relu").build(n.name, math.prod(x.shape), self.q_of(xin)), [xin], out)
        self.vals[n.name] = Val(out, x.shape)

    def lower_max_pool2d(self, n: Node) -> None:
        args = list(n.attrs["args"]) + [None] * 6
        x = self.value(args[0])
        kernel = _pair(args[1])
        stride = _pair(args[2]) if args[2] not in (None, []) else kernel
        ph, pw = _pair(args[3] if args[3] is not None else 0)
        dilation = _pair(args[4] if args[4] is not None else 1)
        if dilation != (1, 1) or bool(args[5]):
            raise LrccError(f"C backend: {n.name}: max_pool2d with dilation or ceil_mode is not supported")
        xin = self.contiguous(x, n.name + ".in")
        shape = self.shape(n)
        out = self.new_tensor(n.name, shape, self.q_of(xin))
        self.emit(kernels.get("maxpool2d").build(n.name, tuple(x.shape), self.q_of(xin), kernel, stride,
                                                 (ph, pw, ph, pw)), [xin], out)
        self.vals[n.name] = Val(out, shape)

    def lower_avg_pool2d(self, n: Node) -> None:
        args = list(n.attrs["args"]) + [None] * 7
        kw = dict(n.attrs["kwargs"])
        x = self.value(args[0])
        kernel = _pair(args[1])
        stride = _pair(args[2]) if args[2] not in (None, []) else kernel
        pad = _pair(args[3] if args[3] is not None else 0)
        ceil_mode = bool(kw.get("ceil_mode", args[4]))
        divisor = kw.get("divisor_override", args[6])
        if pad != (0, 0) or ceil_mode or divisor is not None:
            raise LrccError(f"C backend: {n.name}: avg_pool2d with padding, ceil_mode or divisor_override is not "
                            "supported")
        xin = self.contiguous(x, n.name + ".in")
        shape = self.shape(n)
        yq = self.qparams(n.name)
        out = self.new_tensor(n.name, shape, yq)
        self.emit(kernels.get("avgpool2d").build(n.name, tuple(x.shape), self.q_of(xin), yq, kernel, stride), [xin], out)
        self.vals[n.name] = Val(out, shape)

    def lower_adaptive_avg_pool2d(self, n: Node) -> None:
        x = self.value(n.attrs["args"][0])
        if tuple(_pair(n.attrs["args"][1])) != (1, 1):
            raise LrccError(f"C backend: {n.name}: adaptive_avg_pool2d supports output size 1 only")
        c, h, w = x.shape
        self._mean(n, x, (c, h * w, 1))

    def lower_mean(self, n: Node) -> None:
        args = n.attrs["args"]
        x = self.value(args[0])
        dims = args[1] if len(args) > 1 else None
        rank = len(x.shape) + 1
        if not isinstance(dims, (list, tuple)) or len(dims) != 1:
            raise LrccError(f"C backend: {n.name}: mean over {dims!r}; only one dim is supported")
        d = int(dims[0]) % rank
        if d == 0:
            raise LrccError(f"C backend: {n.name}: mean over the batch dim is not supported")
        d -= 1
        s = x.shape
        self._mean(n, x, (math.prod(s[:d]), s[d], math.prod(s[d + 1:])))

    def _mean(self, n: Node, x: Val, view: tuple[int, int, int]) -> None:
        xin = self.contiguous(x, n.name + ".in")
        shape = self.shape(n)
        yq = self.qparams(n.name)
        out = self.new_tensor(n.name, shape, yq)
        self.emit(kernels.get("mean").build(n.name, *view, self.q_of(xin), yq), [xin], out)
        self.vals[n.name] = Val(out, shape)

    def lower_add(self, n: Node) -> None:
        args = n.attrs["args"]
        if len(args) < 2 or not all(isinstance(a, Ref) for a in args[:2]) or n.attrs["kwargs"].get("alpha", 1) != 1:
            raise LrccError(f"C backend: {n.name}: add supports two tensor operands (alpha 1) only")
        a, b = self.value(args[0]), self.value(args[1])
        shape = self.shape(n)
        if math.prod(a.shape) != math.prod(shape) or math.prod(b.shape) != math.prod(shape):
            raise LrccError(f"C backend: {n.name}: add with broadcasting ({a.shape} + {b.shape}) is not supported")
        last, relu, _ = self.fuse_tail(n, allow_pool=False)
        yq = self.qparams(last.name, relu)
        ain = self.contiguous(a, n.name + ".a", shape)
        bin_ = self.contiguous(b, n.name + ".b", shape)
        out = self.new_tensor(last.name, shape, yq)
        self.emit(kernels.get("add").build(n.name, math.prod(shape), self.q_of(ain), self.q_of(bin_), yq, relu=relu),
                  [ain, bin_], out)
        self.vals[n.name] = Val(out, shape)

    def lower_gelu(self, n: Node) -> None:
        x = self.value(n.attrs["args"][0])
        approx = n.attrs["kwargs"].get("approximate", "none")
        xin = self.contiguous(x, n.name + ".in")
        yq = self.qparams(n.name)
        out = self.new_tensor(n.name, x.shape, yq)
        fn = lambda t: torch.nn.functional.gelu(torch.as_tensor(t, dtype=torch.float64), approximate=approx).numpy()
        self.emit(kernels.get("lut").build(n.name, math.prod(x.shape), fn, self.q_of(xin), yq), [xin], out)
        self.vals[n.name] = Val(out, x.shape)

    def lower_layer_norm(self, n: Node) -> None:
        args = list(n.attrs["args"]) + [None] * 5
        x = self.value(args[0])
        shape = tuple(int(s) for s in args[1])
        if len(shape) != 1 or shape[0] != x.shape[-1]:
            raise LrccError(f"C backend: {n.name}: layer_norm over {shape}; only the last dim is supported")
        dim = shape[0]
        gamma = self.g.tensor(args[2].name).numpy() if isinstance(args[2], Ref) else np.ones(dim)
        beta = self.g.tensor(args[3].name).numpy() if isinstance(args[3], Ref) else np.zeros(dim)
        eps = float(args[4]) if args[4] is not None else 1e-5
        rows = math.prod(x.shape[:-1]) if len(x.shape) > 1 else 1
        xin = self.contiguous(x, n.name + ".in", (rows, dim))
        yq = self.qparams(n.name)
        out = self.new_tensor(n.name, x.shape, yq)
        op = kernels.get("layernorm").build(n.name, rows, dim, gamma, beta, eps, self.q_of(xin), yq)
        self.emit(op, [xin], self.alias(out, (rows, dim)))
        self.vals[n.name] = Val(out, x.shape)

    def lower_softmax(self, n: Node) -> None:
        args = n.attrs["args"]
        x = self.value(args[0])
        if int(args[1]) % (len(x.shape) + 1) != len(x.shape):
            raise LrccError(f"C backend: {n.name}: softmax over dim {args[1]}; only the last dim is supported")
        dim = x.shape[-1]
        rows = math.prod(x.shape[:-1]) if len(x.shape) > 1 else 1
        xin = self.contiguous(x, n.name + ".in", (rows, dim))
        out = self.new_tensor(n.name, x.shape, (1.0 / 256.0, -128))
        self.emit(kernels.get("softmax").build(n.name, rows, dim, self.q_of(xin)), [xin], self.alias(out, (rows, dim)))
        self.vals[n.name] = Val(out, x.shape)

    lower__softmax = lower_softmax

    def lower_scaled_dot_product_attention(self, n: Node) -> None:
        args = list(n.attrs["args"]) + [None] * 6
        kw = dict(n.attrs["kwargs"])
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        for i, key in enumerate(names):
            if key in kw:
                args[i] = kw[key]
        if args[3] is not None:
            raise LrccError(f"C backend: {n.name}: attention with an explicit attn_mask is not supported; the site "
                            "stays unsupported rather than silently ignoring the mask")
        if args[4] not in (None, 0, 0.0):
            raise LrccError(f"C backend: {n.name}: attention with dropout_p={args[4]} is not supported (export in eval mode)")
        causal = bool(args[5]) if args[5] is not None else False
        q, k, v = (self.value(a) for a in args[:3])
        if len(q.shape) != 3:
            raise LrccError(f"C backend: {n.name}: attention expects (heads, tokens, head_dim) per batch, got {q.shape}")
        h, nq, d = q.shape
        nk = k.shape[1]
        ins = [self._heads_layout(t, f"{n.name}.{role}") for t, role in ((q, "q"), (k, "k"), (v, "v"))]
        yq = self.qparams(n.name)
        out = self.new_tensor(n.name, (nq, h * d), yq)
        scale = float(args[6]) if args[6] is not None else None
        op = kernels.get("attention").build(n.name, h, nq, nk, d, self.q_of(ins[0]), self.q_of(ins[1]),
                                            self.q_of(ins[2]), yq, scale=scale, causal=causal)
        self.emit(op, ins, out)
        self.vals[n.name] = Val(out, (h, nq, d), (1, 0, 2), (nq, h, d))

    def _heads_layout(self, t: Val, name: str) -> str:
        """A (tokens, heads*head_dim) tensor holding t (heads, tokens, head_dim)."""
        h, n, d = t.shape
        if t.perm == (1, 0, 2):
            return self.alias(t.tensor, (n, h * d))
        src = self.contiguous(t, name)  # (h, n, d) contiguous: permute to (n, h, d)
        out = self.new_tensor(f"{name}.heads", (n, h, d), self.q_of(src))
        self.emit(kernels.get("permute").build(f"{name}.permute", (h, n, d), (1, 0, 2)), [src], out)
        return self.alias(out, (n, h * d))

    def lower_transpose(self, n: Node) -> None:
        args = n.attrs["args"]
        x = self.value(args[0])
        rank = len(x.shape) + 1
        d0, d1 = int(args[1]) % rank, int(args[2]) % rank
        if 0 in (d0, d1):
            raise LrccError(f"C backend: {n.name}: transposing the batch dim is not supported")
        perm = list(range(len(x.shape)))
        perm[d0 - 1], perm[d1 - 1] = perm[d1 - 1], perm[d0 - 1]
        self._permute(n, x, tuple(perm))

    def lower_permute(self, n: Node) -> None:
        args = n.attrs["args"]
        x = self.value(args[0])
        dims = [int(d) % (len(x.shape) + 1) for d in args[1]]
        if dims[0] != 0:
            raise LrccError(f"C backend: {n.name}: permuting the batch dim is not supported")
        self._permute(n, x, tuple(d - 1 for d in dims[1:]))

    def _permute(self, n: Node, x: Val, perm: tuple[int, ...]) -> None:
        base = x.base if x.perm is not None else x.shape
        composed = tuple(x.perm[p] for p in perm) if x.perm is not None else perm
        shape = self.shape(n)
        if composed == tuple(range(len(composed))):
            self.vals[n.name] = Val(x.tensor, tuple(base))
        else:
            self.vals[n.name] = Val(x.tensor, shape, composed, tuple(base))

    def lower_reshape(self, n: Node) -> None:
        short = _short(n.attrs["target"])
        if short not in _RESHAPES:
            raise LrccError(f"C backend: {n.name}: operator {n.attrs['target']} cannot be emitted as C")
        x = self.value(n.attrs["args"][0])
        shape = self.shape(n)
        if x.perm is not None and math.prod(shape) == math.prod(x.shape) and tuple(shape) == tuple(x.shape):
            self.vals[n.name] = x  # contiguous/clone/dropout of a lazily permuted value
            return
        if x.perm is not None:
            self.vals[n.name] = Val(self.contiguous(x, n.name + ".in", shape), shape)
            return
        self.vals[n.name] = Val(self.alias(x.tensor, shape), shape)


def c_quant_unsupported(n: Node) -> str | None:
    """Why the C backend cannot run this compressed_linear, or None: it runs 4-bit weights with a
    zero point and scale per output channel (quantize_linear with group 0), nothing else."""
    roles = set(n.attrs.get("roles", ()))
    if not roles <= {"codes", "scale", "zero", "bias"} or "codes" not in roles:
        return f"parts {sorted(roles)}; the C backend runs per-channel int4 weights only"
    if int(n.attrs.get("bits", 0)) != 4 or int(n.attrs.get("group", -1)) != 0:
        return f"int{n.attrs.get('bits')} group {n.attrs.get('group')}; the C backend runs int4 per channel only"
    return None


def _is_shape_arith(n: Node) -> bool:
    """Integer shape computations (sym_size, operator.mul on sizes, ...) that yield no tensor."""
    if n.op != "aten" or n.shape is not None:
        return False
    t = n.attrs["target"]
    return t.startswith("operator.") or _short(t) in ("sym_size", "sym_numel", "_assert_scalar",
                                                      "sym_constrain_range_for_size")


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _is_pool2(p: Node) -> bool:
    args = list(p.attrs["args"]) + [None] * 6
    kernel = _pair(args[1])
    stride = _pair(args[2]) if args[2] not in (None, []) else kernel
    pad = _pair(args[3] if args[3] is not None else 0)
    dil = _pair(args[4] if args[4] is not None else 1)
    return kernel == (2, 2) and stride == (2, 2) and pad == (0, 0) and dil == (1, 1) and not bool(args[5])


def lower_program(g: Graph, ranges: Ranges, dims: dict[str, int], bits: dict[str, int] | None = None) -> Program:
    """The int8 Program computing graph g (batch 1) with activation ranges from calibration."""
    return Lowering(g, ranges, dims, bits).run()
