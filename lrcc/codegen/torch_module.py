"""Lower an lrcc Graph to a runnable torch module (an FX GraphModule).

Every rewrite site (linear, low-rank linear) becomes a submodule under ``sites`` holding its own
tensors, so that calibration can observe it with ordinary forward hooks and a later stage can swap
it; every other operator is called as the ATen op it was imported as.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import LrccError
from ..ir.graph import Graph, Node, Ref, map_refs, refs_in
from ..ir.targets import resolve_target
from ..targets.cost import APPROXIMATE_ATTENTION


def safe_name(name: str) -> str:
    return name.replace(".", "__")


class DenseLinear(nn.Module):
    """y = x W^T + b."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LowRankLinear(nn.Module):
    """y = (x V^T) U^T + b: two thin products, U V never materialised."""

    def __init__(self, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("v", v)
        self.register_buffer("u", u)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)


class CompressedLinear(nn.Module):
    """y = x M^T + (x V^T) U^T + b with M quantised (dequantised on the fly), sparse, or absent."""

    def __init__(self, parts: dict[str, torch.Tensor], m: int, n: int, bits: int | None, cols: int | None) -> None:
        super().__init__()
        for role in ("codes", "scale", "zero", "in_scale", "values", "cols", "rowptr", "v", "u", "bias"):
            self.register_buffer(role, parts.get(role))
        self.m, self.n, self.bits, self.cols_padded = m, n, bits, cols

    def main_weight(self) -> torch.Tensor | None:
        if self.codes is not None:
            from ..rewrites.quantize import dequantize, unpack
            w = dequantize(unpack(self.codes, self.bits, self.cols_padded), self.scale, self.zero, self.n)
            return w / self.in_scale.float() if self.in_scale is not None else w
        if self.values is not None:
            rows = torch.repeat_interleave(torch.arange(self.m), (self.rowptr[1:] - self.rowptr[:-1]).long())
            w = torch.zeros(self.m, self.n)
            w[rows, self.cols.long()] = self.values.float()
            return w
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.main_weight()
        bias = self.bias
        if self.v is None:
            return F.linear(x, w, bias)
        low = F.linear(F.linear(x, self.v.float()), self.u.float(), bias)
        return low if w is None else low + F.linear(x, w)


def site_module(g: Graph, n: Node, gpu: bool = False) -> nn.Module:
    """The torch module computing one site node; with gpu=True compressed sites call their Triton
    kernels (lrcc.codegen.triton)."""
    ts = [g.tensor(i) for i in n.inputs[1:]]
    if gpu:
        from .triton.modules import gpu_site_module
        if n.op == "lowrank_linear":
            parts = dict(zip(("v", "u", "bias"), ts))
        else:
            parts = dict(zip(n.attrs.get("roles", ()), ts))
        mod = gpu_site_module(n.op, parts, n.attrs, n.attrs["site"])
        if mod is not None:
            return mod
    if n.op == "linear":
        return DenseLinear(ts[0], ts[1] if len(ts) > 1 else None)
    if n.op == "lowrank_linear":
        return LowRankLinear(ts[0], ts[1], ts[2] if len(ts) > 2 else None)
    if n.op == "compressed_linear":
        return CompressedLinear(dict(zip(n.attrs["roles"], ts)), n.attrs["m"], n.attrs["n"], n.attrs.get("bits"),
                                n.attrs.get("cols"))
    raise LrccError(f"codegen torch: {n.name!r} ({n.op}) is not a site")


class OpModule(nn.Module):
    """One operator as a module, so that an attention site can be watched (hooks see its tensor
    inputs and its output) and found by name like a linear site: forward(*tensors) calls the
    operator with the node's argument template, the i-th Ref filled with the i-th tensor. Refs
    named in `consts` (the form's own tensors, e.g. random features) are the module's buffers, so
    an exact and a rewritten site take the same inputs."""

    def __init__(self, fn, args, kwargs, consts: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.fn = fn
        consts = consts or {}
        names: dict[str, str] = {}
        for i, (ref, t) in enumerate(consts.items()):
            names[ref] = f"const{i}"
            self.register_buffer(f"const{i}", t)
        slots = iter(range(1 << 30))

        def slot(r: Ref):
            return _Slot(names[r.name]) if r.name in names else _Slot(next(slots))
        self.args = map_refs(args, slot)
        self.kwargs = map_refs(kwargs, slot)

    def forward(self, *xs):
        fill = lambda t: (getattr(self, t.index) if isinstance(t.index, str) else xs[t.index]) \
            if isinstance(t, _Slot) else t  # noqa: E731
        return self.fn(*_fill(self.args, fill), **_fill(self.kwargs, fill))


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index


def _fill(template, fn):
    if isinstance(template, _Slot):
        return fn(template)
    if isinstance(template, (list, tuple)):
        return type(template)(_fill(t, fn) for t in template)
    if isinstance(template, dict):
        return {k: _fill(v, fn) for k, v in template.items()}
    return template


class Lowered(nn.Module):
    """Holds the lowered graph module; calls it and restores the model's output structure."""

    def __init__(self, gm: torch.fx.GraphModule, out_spec: str | None, site_names: dict[str, str]) -> None:
        super().__init__()
        self.gm = gm
        self._out_spec = pytree.treespec_loads(out_spec) if out_spec else None
        self.site_names = site_names  # site name -> attribute path under gm

    def site(self, name: str) -> nn.Module:
        return self.gm.get_submodule(self.site_names[name])

    def forward(self, *inputs):
        outs = self.gm(*inputs)
        if self._out_spec is None:
            return outs[0] if len(outs) == 1 else outs
        return pytree.tree_unflatten(list(outs), self._out_spec)


def lower_to_torch(g: Graph, gpu: bool = False) -> Lowered:
    """A torch module that computes the graph; gpu=True lowers compressed sites to Triton kernels."""
    root = nn.Module()
    root.sites = nn.Module()
    root.attention = nn.Module()
    root.c = nn.Module()
    fx = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    site_names: dict[str, str] = {}

    def value(ref: Ref) -> torch.fx.Node:
        if ref.name not in env:
            p = g[ref.name]
            if p.op != "param":
                raise LrccError(f"codegen torch: {ref.name!r} used before it is computed")
            attr = safe_name(p.attrs["ref"])
            if not hasattr(root.c, attr):
                root.c.register_buffer(attr, g.tensors[p.attrs["ref"]])
            env[ref.name] = fx.get_attr(f"c.{attr}")
        return env[ref.name]

    for n in g.nodes:
        if n.op == "input":
            env[n.name] = fx.placeholder(n.name)
        elif n.op == "param":
            continue  # materialised on first use by a non-site node
        elif n.is_site:
            site = n.attrs["site"]
            attr = safe_name(site)
            if hasattr(root.sites, attr):
                raise LrccError(f"codegen torch: two sites named {site!r}")
            root.sites.add_module(attr, site_module(g, n, gpu))
            site_names[site] = f"sites.{attr}"
            env[n.name] = fx.call_module(f"sites.{attr}", (value(Ref(n.inputs[0])),))
        elif n.op == "aten" and "attention" in n.attrs:  # an attention site: a module hooks can watch
            site = n.attrs["attention"].get("site", n.name)
            attr = safe_name(site)
            if hasattr(root.attention, attr) or site in site_names:
                raise LrccError(f"codegen torch: two sites named {site!r}")
            fn = resolve_target(n.attrs["target"])
            if gpu and n.attrs["target"] == APPROXIMATE_ATTENTION:  # Performer / Scatterbrain on the Triton kernel
                from .triton.scatterbrain import approximate_attention_triton as fn
            refs = refs_in((n.attrs["args"], n.attrs["kwargs"]))
            consts = {r: g.tensors[g[r].attrs["ref"]] for r in refs if g[r].op == "param"}
            root.attention.add_module(attr, OpModule(fn, n.attrs["args"], n.attrs["kwargs"], consts))
            site_names[site] = f"attention.{attr}"
            tensors = [value(Ref(r)) for r in refs if r not in consts]
            env[n.name] = fx.call_module(f"attention.{attr}", tuple(tensors))
        elif n.op == "aten":
            fn = resolve_target(n.attrs["target"])
            args = map_refs(n.attrs["args"], value)
            kwargs = map_refs(n.attrs["kwargs"], value)
            env[n.name] = fx.call_function(fn, tuple(args), kwargs)
        elif n.op == "output":
            fx.output(tuple(map_refs(n.attrs["args"], value)))
        else:
            raise LrccError(f"codegen torch: cannot lower node {n.name!r} of kind {n.op!r}")
    gm = torch.fx.GraphModule(root, fx, class_name="LrccModel")
    return Lowered(gm, g.meta.get("out_spec"), site_names)
