"""Import a torch.nn.Module into lrcc's IR through torch.export.

torch.export gives one ATen-level graph for the whole model, independent of how the model is
written (hand-written modules, transformers, functional calls), with symbolic dims for batch and
sequence length and every parameter lifted to an input; see docs/architecture.md for why we chose
it over torch.fx.symbolic_trace.
"""
from __future__ import annotations

import warnings
from typing import Any

import sympy
import torch
from torch.utils import _pytree as pytree

from ..errors import ImportError_, LrccError
from .attention import normalize_attention
from .graph import Graph, Node, Ref, refs_in, verify
from .targets import target_name

_LINEAR = "aten.linear.default"


def symbol(name: str) -> sympy.Symbol:
    """The sympy symbol lrcc uses for a dynamic dim."""
    return sympy.Symbol(name, integer=True, positive=True)


def default_dynamic_shapes(example_inputs: tuple) -> list[dict[int, Any] | None]:
    """Dynamic dims to ask torch.export for: dim 0 of every tensor is the batch B; dim 1 is the
    sequence L for integer (token) tensors of rank 2 and for float tensors of rank 3."""
    # Dim.AUTO lets export infer each dim's range (L <= 512 for a model with 512 positions) and
    # keep a dim static where the model needs it so, instead of failing.
    B = L = torch.export.Dim.AUTO
    spec: list[dict[int, Any] | None] = []
    for x in example_inputs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            spec.append(None)
            continue
        dims: dict[int, Any] = {0: B}
        is_int = not x.dtype.is_floating_point
        if x.dim() >= 2 and ((is_int and x.dim() == 2) or (not is_int and x.dim() == 3)):
            dims[1] = L
        spec.append(dims)
    return spec


def export_model(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes=None) -> tuple[torch.export.ExportedProgram, list[str]]:
    """torch.export the model, with symbolic B and L where it allows them.

    Tries B and L, then B only, then static shapes; returns the program and notes on what fell back.
    """
    notes: list[str] = []
    attempts: list[tuple[str, Any]] = []
    if dynamic_shapes is not None:
        attempts.append(("user dynamic_shapes", dynamic_shapes))
    else:
        full = default_dynamic_shapes(example_inputs)
        attempts.append(("dynamic B and L", full))
        batch_only = [None if d is None else {k: v for k, v in d.items() if k == 0} for d in full]
        if batch_only != full:
            attempts.append(("dynamic B only", batch_only))
        attempts.append(("static shapes", None))
    last: Exception | None = None
    for what, spec in attempts:
        try:
            shapes = tuple(spec) if spec else None
            if shapes is not None and _takes_varargs(model):
                shapes = (shapes,)  # forward(*inputs): export sees one tuple argument
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=shapes, strict=False)
            if notes:
                notes.append(f"exported with {what}")
            return ep, notes
        except Exception as e:  # torch.export raises many kinds; we report the first line
            last = e
            notes.append(f"export with {what} failed: {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}")
    raise ImportError_(f"cannot import {type(model).__name__} with torch.export: {notes[-1]}. "
                       "Check that forward runs on the example inputs; data-dependent Python control flow "
                       "must be rewritten with torch.cond or removed.") from last


def _takes_varargs(model: torch.nn.Module) -> bool:
    import inspect
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind == inspect.Parameter.VAR_POSITIONAL


def _dim_names(ep: torch.export.ExportedProgram) -> dict[sympy.Symbol, sympy.Symbol]:
    """Map export's internal symbols (s0, s31, ...) to readable names: B, L, then D<i>_<d>."""
    names: dict[sympy.Symbol, sympy.Symbol] = {}
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    taken: set[str] = set()
    for i, name in enumerate(user_inputs):
        val = placeholders[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if not isinstance(expr, sympy.Symbol) or expr in names:
                continue
            want = {0: "B", 1: "L"}.get(d, f"D{i}_{d}")
            if want in taken:
                want = f"D{i}_{d}"
            taken.add(want)
            names[expr] = symbol(want)
    return names


def _bound(value, default: int) -> int:
    """An int from a value-range bound; infinite or missing bounds give `default`."""
    try:
        return int(value) if value is not None and abs(float(value)) < float(1 << 62) else default
    except (TypeError, ValueError, OverflowError, AttributeError):
        return default


def _to_expr(size, names: dict) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr).xreplace(names)
    return sympy.Integer(int(size))


def _shape_of(val, names) -> tuple | None:
    if isinstance(val, torch.Tensor):
        return tuple(_to_expr(s, names) for s in val.shape)
    return None


def import_exported(ep: torch.export.ExportedProgram) -> Graph:
    """Translate an ExportedProgram into an lrcc Graph."""
    sig = ep.graph_signature
    kinds = torch.export.graph_signature.InputKind
    names = _dim_names(ep)
    g = Graph()
    g.symbols = {}
    for sym, readable in names.items():
        vr = ep.range_constraints.get(sym)
        lo = _bound(vr.lower if vr is not None else None, 1)
        hi = _bound(vr.upper if vr is not None else None, 1 << 31)
        g.symbols[str(readable)] = (lo, hi)

    consts = dict(ep.state_dict)
    consts.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    spec_of = {s.arg.name: s for s in sig.input_specs}
    user_index = 0
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            spec = spec_of[n.name]
            val = n.meta.get("val")
            if spec.kind == kinds.USER_INPUT:
                if not isinstance(val, torch.Tensor):
                    raise ImportError_(f"input {n.name!r}: only tensor inputs are supported, got {type(val).__name__}")
                g.add(Node(n.name, "input", [], {"index": user_index}, _shape_of(val, names), val.dtype))
                user_index += 1
                continue
            if spec.kind not in (kinds.PARAMETER, kinds.BUFFER, kinds.CONSTANT_TENSOR):
                raise ImportError_(f"input {n.name!r}: unsupported exported input kind {spec.kind.name}")
            ref = spec.target
            if ref not in consts:
                raise ImportError_(f"parameter {ref!r} is missing from the exported program's state")
            tensor = consts[ref].detach()
            g.tensors[ref] = tensor
            g.add(Node(n.name, "param", [], {"ref": ref, "kind": spec.kind.name.lower()}, _shape_of(tensor, {}), tensor.dtype))
        elif n.op == "call_function":
            val = n.meta.get("val")
            args = _template(n.args)
            kwargs = _template(dict(n.kwargs))
            name = target_name(n.target)
            dtype = val.dtype if isinstance(val, torch.Tensor) else None
            shape = _shape_of(val, names)
            if name == _LINEAR and _is_param_linear(g, args, kwargs):
                ins = [a.name for a in args if a is not None]
                site = g[ins[1]].attrs["ref"].removesuffix(".weight")
                taken = {m.attrs["site"] for m in g.nodes if m.op == "linear"}
                if site in taken:  # the same weight used again (a module called twice, tied weights)
                    site = next(f"{site}#{k}" for k in range(2, len(taken) + 3) if f"{site}#{k}" not in taken)
                g.add(Node(n.name, "linear", ins, {"site": site}, shape, dtype))
                continue
            attrs = {"target": name, "args": tuple(args), "kwargs": kwargs}
            if isinstance(val, (tuple, list)):
                attrs["multi"] = len(val)
            g.add(Node(n.name, "aten", refs_in((attrs["args"], kwargs)), attrs, shape, dtype))
        elif n.op == "output":
            outs = list(n.args[0]) if isinstance(n.args[0], (tuple, list)) else [n.args[0]]
            template = [Ref(o.name) if isinstance(o, torch.fx.Node) else o for o in outs]
            g.add(Node("output", "output", refs_in(template), {"args": template}))
        else:
            raise ImportError_(f"node {n.name!r}: unsupported FX node kind {n.op!r}")
    for spec in sig.output_specs:
        if spec.kind != torch.export.graph_signature.OutputKind.USER_OUTPUT:
            raise ImportError_(f"the model mutates {spec.kind.name.lower()} {spec.target!r} in forward; "
                               "lrcc compiles inference graphs without side effects (call model.eval())")
    g.meta["out_spec"] = pytree.treespec_dumps(ep.call_spec.out_spec) if ep.call_spec.out_spec is not None else None
    g.meta["num_inputs"] = user_index
    verify(g)
    return g


def _template(t):
    """FX arguments with nodes replaced by Refs (FX's immutable containers become plain ones)."""
    if isinstance(t, torch.fx.Node):
        return Ref(t.name)
    if isinstance(t, tuple):
        return tuple(_template(x) for x in t)
    if isinstance(t, list):
        return [_template(x) for x in t]
    if isinstance(t, dict):
        return {k: _template(v) for k, v in t.items()}
    return t


def _is_param_linear(g: Graph, args, kwargs) -> bool:
    if kwargs or len(args) not in (2, 3):
        return False
    if not isinstance(args[1], Ref) or g[args[1].name].op != "param":
        return False
    if len(args) == 3 and args[2] is not None and (not isinstance(args[2], Ref) or g[args[2].name].op != "param"):
        return False
    w = g.tensors[g[args[1].name].attrs["ref"]]
    return w.dim() == 2 and w.dtype.is_floating_point


def import_module(model: torch.nn.Module, example_inputs: tuple, dynamic_shapes=None, *,
                  normalize: bool = True) -> tuple[Graph, list[str]]:
    """Import a torch module: returns the IR graph and notes on how it was exported.

    normalize=True (the default) rewrites every attention into the canonical form
    (lrcc.ir.attention.normalize_attention); False gives the graph exactly as exported."""
    if not isinstance(model, torch.nn.Module):
        raise LrccError(f"expected a torch.nn.Module or a path to an .onnx file, got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise LrccError("example_inputs must be a non-empty tuple of tensors, as the model's forward takes them")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise LrccError(f"example_inputs[{i}] is a {type(x).__name__}; lrcc takes tensor inputs only")
    was_training = model.training
    model.eval()
    try:
        ep, notes = export_model(model, tuple(example_inputs), dynamic_shapes)
    finally:
        model.train(was_training)
    g = import_exported(ep)
    if normalize:
        normalize_attention(g)
        verify(g)
    return g, notes
