"""`torch.compile(model, backend="lrcc", options={...})`.

Dynamo hands a backend a graph and example inputs, and at run time calls what the backend
returns with the parameters and the user's inputs as arguments. Activation statistics cannot come
from tracing, so lrcc compiles lazily: the first real call (or the calibration data given up
front as options["calibration"], a list of input tuples as the model's forward takes them) is what
lrcc calibrates on. The result is cached by the identity and shape of the parameters, the target
and the budget, so recompiles (new shapes, graph breaks re-entering) never repeat the factorisation.

options: target (default "cpu"), budget (a Budget, float or SPEC string; default max_error=0.01),
calibration (optional: a list of dicts keyed by the forward's argument names, or of tuples for a
model with one input), and any lrcc.compile option. Use torch.compile(..., dynamic=True) when
calibration batches differ in shape from the first call's inputs.
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from .errors import LrccError

_CACHE: dict[tuple, Any] = {}


def _param_path(placeholder: str) -> str:
    """L_self_modules_layers_modules_0_modules_q_parameters_weight_ -> layers.0.q.weight."""
    name = re.sub(r"^[Ll]_(self|fn|model)_", "", placeholder).rstrip("_")
    name = re.sub(r"_(modules|parameters|buffers)_", ".", name)
    name = re.sub(r"^(modules|parameters|buffers)_", "", name)
    return name.replace("modules.", "") or placeholder


class _Bound(nn.Module):
    """A dynamo graph with its parameter inputs held as the module's own parameters, named as in
    the original model, so lrcc imports them as weights; forward takes the tensor inputs only and
    recomputes any symbolic size the graph takes from those tensors' shapes."""

    def __init__(self, gm: torch.fx.GraphModule, params: dict[int, torch.Tensor], names: dict[int, str],
                 sizes: dict[int, tuple[int, int]], n_args: int, consts: dict[int, torch.Tensor] | None = None):
        super().__init__()
        consts = consts or {}
        self.gm = gm
        self._paths: dict[int, str] = {}
        user_of: dict[int, int] = {}
        for i in range(n_args):
            if i not in params and i not in sizes and i not in consts:
                user_of[i] = len(user_of)
        self._slots: list[tuple[str, object]] = []  # per graph argument: param i | user k | size (k, dim)
        for i in range(n_args):
            if i in params:
                owner, parts = self, names[i].split(".")
                for p in parts[:-1]:
                    if not isinstance(getattr(owner, p, None), nn.Module):
                        owner.add_module(p, nn.Module())
                    owner = getattr(owner, p)
                owner.register_parameter(parts[-1], nn.Parameter(params[i].detach(), requires_grad=False))
                self._paths[i] = names[i]
                self._slots.append(("param", i))
            elif i in consts:
                self.register_buffer(f"_const{i}", consts[i])
                self._slots.append(("const", f"_const{i}"))
            elif i in sizes:
                self._slots.append(("size", (user_of[sizes[i][0]], sizes[i][1])))
            else:
                self._slots.append(("user", user_of[i]))

    def forward(self, *user):
        args = []
        for kind, v in self._slots:
            if kind == "param":
                args.append(self.get_parameter(self._paths[v]))
            elif kind == "user":
                args.append(user[v])
            elif kind == "const":
                args.append(self.get_buffer(v))
            else:
                args.append(user[v[0]].shape[v[1]])
        return self.gm(*args)


def _size_inputs(gm: torch.fx.GraphModule, example_inputs: list, param_pos: list[int]) -> dict[int, tuple[int, int]] | None:
    """For each symbolic-size argument: (index of the tensor argument, dim) it is the size of, read
    off the traced (fake) values on the graph's placeholders; None when one cannot be traced back."""
    metas = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    out: dict[int, tuple[int, int]] = {}
    for i, e in enumerate(example_inputs):
        if not isinstance(e, torch.SymInt) and not isinstance(metas[i], torch.SymInt):
            continue
        expr = (metas[i] if isinstance(metas[i], torch.SymInt) else e).node.expr
        hit = None
        for j, t in enumerate(metas):
            if j in param_pos or not isinstance(t, torch.Tensor):
                continue
            for d, size in enumerate(t.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == expr:
                    hit = (j, d)
                    break
            if hit:
                break
        if hit is None:
            return None
        out[i] = hit
    return out


_ATTR = re.compile(r"^[Ll]_(self|fn|model)_")


def _scalar_attrs(placeholders: list[str], args: tuple, param_pos: list[int]) -> dict[int, float]:
    """Module attributes dynamo lifts to 0-d tensor inputs under dynamic shapes (a layer norm's eps,
    an embedding's norm_type): their values at the first real call."""
    out = {}
    for i, (name, a) in enumerate(zip(placeholders, args)):
        if i in param_pos or not _ATTR.match(name) or not isinstance(a, torch.Tensor) or a.dim() != 0:
            continue
        if a.dtype.is_floating_point or a.dtype in (torch.int32, torch.int64):
            out[i] = a.item()
    return out


def _fold_scalars(gm: torch.fx.GraphModule, scalars: dict[int, float]) -> torch.fx.GraphModule:
    """A copy of gm with each scalar input's `.item()` replaced by its value, so torch.export sees
    a constant (an `.item()` on an input is data-dependent to it)."""
    gm = torch.fx.GraphModule(gm, copy_graph(gm.graph))
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, value in scalars.items():
        for user in list(ph[i].users):
            if user.op == "call_method" and user.target == "item":
                for use in list(user.users):
                    use.args = torch.fx.node.map_arg(use.args, lambda a: value if a is user else a)
                    use.kwargs = torch.fx.node.map_arg(use.kwargs, lambda a: value if a is user else a)
                gm.graph.erase_node(user)
    gm.recompile()
    return gm


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None):
    """The lrcc backend for torch.compile (registered as "lrcc" through an entry point)."""
    opts = dict(options or {})
    if not any(n.op == "call_function" and "linear" in str(n.target) for n in gm.graph.nodes):
        return gm.forward  # nothing lrcc rewrites in this fragment
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    param_pos = [i for i, e in enumerate(example_inputs) if isinstance(e, nn.Parameter)]
    sizes = _size_inputs(gm, example_inputs, param_pos)
    if sizes is None or any(not isinstance(e, (torch.Tensor, torch.SymInt)) for e in example_inputs):
        warnings.warn("lrcc backend: this graph takes inputs lrcc cannot bind (sizes not read off a tensor, or "
                      "non-tensor values); it runs uncompressed")
        return gm.forward
    metas = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    dynamic = bool(sizes) or any(isinstance(d, torch.SymInt) for e in metas if isinstance(e, torch.Tensor) for d in e.shape)
    state: dict[str, Any] = {}

    def run(*args):
        if "fn" not in state:
            scalars = _scalar_attrs(placeholders, args, param_pos)
            skip = set(param_pos) | set(sizes) | set(scalars)
            user = tuple(a for i, a in enumerate(args) if i not in skip)
            try:
                cm = _compile(gm, args, param_pos, sizes, scalars, placeholders, user, opts, dynamic)

                def fn(*a):
                    if any(a[i].item() != v for i, v in scalars.items()):
                        warnings.warn("lrcc backend: a module attribute folded into the compiled graph changed "
                                      "value; this call runs uncompressed")
                        return gm(*a)
                    return cm(*(x for i, x in enumerate(a) if i not in skip))
                state["fn"] = fn
            except LrccError as e:
                warnings.warn(f"lrcc backend: {str(e).splitlines()[0]}; this graph runs uncompressed")
                state["fn"] = gm
        return state["fn"](*args)

    return run


def _match_calibration(calibration: list, names: list[str], user: tuple, dynamic: bool) -> list | None:
    """The calibration batches in the order this graph takes its inputs, or None when that order
    cannot be known for sure or they do not fit (another fragment of a graph with breaks, other
    shapes than a graph traced at static shapes runs at).

    Batches may be dicts keyed by the forward's argument names (unambiguous), or tuples in the
    forward's positional order, which are used only when the graph's inputs are positional
    arguments or there is one input: dynamo orders a graph's inputs by first use, not by signature.
    """
    picked = []
    for b in calibration:
        if isinstance(b, dict):
            keys = [re.fullmatch(r"L_(\w+?)_", n) for n in names]
            if not all(keys) or any(k.group(1) not in b for k in keys):
                return None
            picked.append(tuple(b[k.group(1)] for k in keys))
            continue
        b = tuple(b) if isinstance(b, (tuple, list)) else (b,)
        order = [re.fullmatch(r"L_args_(\d+)_", n) for n in names]
        if all(order) and all(int(m.group(1)) < len(b) for m in order):
            picked.append(tuple(b[int(m.group(1))] for m in order))
        elif len(b) == 1 and len(names) == 1:
            picked.append(b)
        else:
            return None
    fits = all(len(b) == len(user) and all(isinstance(t, torch.Tensor) and t.dtype == u.dtype and t.dim() == u.dim()
                                           for t, u in zip(b, user)) for b in picked)
    if fits and not dynamic:
        picked = [b for b in picked if all(t.shape == u.shape for t, u in zip(b, user))]
    return picked if fits and picked else None


def _compile(gm, args, param_pos, sizes, scalars, placeholders, user, opts, dynamic):
    import lrcc
    # a graph traced at static shapes compiles to a model for those shapes only: they are part of the key
    shapes = None if dynamic else tuple(tuple(u.shape) for u in user)
    key = (tuple((args[i].data_ptr(), tuple(args[i].shape)) for i in param_pos), str(opts.get("target", "cpu")),
           str(opts.get("budget")), len(user), shapes, tuple(sorted(scalars.items())))
    if key in _CACHE:
        return _CACHE[key]
    names = {i: _param_path(placeholders[i]) for i in param_pos}
    folded = _fold_scalars(gm, scalars) if scalars else gm
    bound = _Bound(folded, {i: args[i] for i in param_pos}, names, sizes, len(args),
                   {i: args[i].detach().clone() for i in scalars}).eval()
    given = opts.get("calibration")
    user_names = [placeholders[i] for i in range(len(args))
                  if i not in param_pos and i not in sizes and i not in scalars]
    calibration = _match_calibration(given, user_names, user, dynamic) if given is not None else None
    if given is not None and calibration is None:
        warnings.warn("lrcc backend: the calibration data does not fit this graph's inputs (a fragment after a "
                      "graph break, or batches of other shapes for a graph traced at static shapes: use "
                      "torch.compile(..., dynamic=True)); calibrating this graph on its first call's inputs instead")
    rest = {k: v for k, v in opts.items() if k not in ("target", "budget", "calibration")}
    cm = lrcc.compile(bound, user, target=opts.get("target", "cpu"), budget=opts.get("budget"),
                      calibration=calibration, options=rest)
    _CACHE[key] = cm
    return cm
