"""`torch.compile(model, backend="lrcc", options={...})`.

Dynamo hands a backend a graph and example inputs, and at run time calls what the backend
returns with the parameters and the user's inputs as arguments. Activation statistics cannot come
from tracing, so lrcc compiles lazily: the first real call (or the calibration data given up
front as options["calibration"], a list of input tuples as the model's forward takes them) is what
lrcc calibrates on. The result is cached by the identity and shape of the parameters, the target
and the budget, so recompiles (new shapes, graph breaks re-entering) never repeat the factorisation.

options: target (default "cpu"), budget (a Budget, float or SPEC string; default max_error=0.01),
calibration (optional), and any lrcc.compile option.
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

_CACHE: dict[tuple, Any] = {}


def _param_path(placeholder: str) -> str:
    """L_self_modules_layers_modules_0_modules_q_parameters_weight_ -> layers.0.q.weight."""
    name = re.sub(r"^[Ll]_(self|fn|model)_", "", placeholder).rstrip("_")
    name = re.sub(r"_(modules|parameters|buffers)_", ".", name)
    name = re.sub(r"^(modules|parameters|buffers)_", "", name)
    return name.replace("modules.", "") or placeholder


class _Bound(nn.Module):
    """A dynamo graph with its parameter inputs held as the module's own parameters, named as in
    the original model, so lrcc imports them as weights; forward takes the other inputs only."""

    def __init__(self, gm: torch.fx.GraphModule, params: dict[int, torch.Tensor], names: dict[int, str], n_args: int):
        super().__init__()
        self.gm = gm
        self._slots: list[tuple[str, int]] = []  # per graph argument: ("param", i) or ("user", k)
        self._paths: dict[int, str] = {}
        k = 0
        for i in range(n_args):
            if i in params:
                path = names[i]
                owner = self
                parts = path.split(".")
                for p in parts[:-1]:
                    if not hasattr(owner, p) or not isinstance(getattr(owner, p), nn.Module):
                        owner.add_module(p, nn.Module())
                    owner = getattr(owner, p)
                owner.register_parameter(parts[-1], nn.Parameter(params[i].detach(), requires_grad=False))
                self._paths[i] = path
                self._slots.append(("param", i))
            else:
                self._slots.append(("user", k))
                k += 1

    def forward(self, *user):
        args = [self.get_parameter(self._paths[i]) if kind == "param" else user[i] for kind, i in self._slots]
        return self.gm(*args)


def backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None):
    """The lrcc backend for torch.compile (registered as "lrcc" through an entry point)."""
    opts = dict(options or {})
    if not any(n.op == "call_function" and "linear" in str(n.target) for n in gm.graph.nodes):
        return gm.forward  # nothing lrcc rewrites in this fragment
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    param_pos = [i for i, e in enumerate(example_inputs) if isinstance(e, nn.Parameter)]
    state: dict[str, Any] = {}

    def run(*args):
        if any(not isinstance(args[i], torch.Tensor) for i in range(len(args)) if i not in param_pos):
            return gm(*args)  # symbolic sizes passed as values: run the graph as traced
        user = tuple(a for i, a in enumerate(args) if i not in param_pos)
        if "compiled" not in state:
            state["compiled"] = _compile(gm, args, param_pos, placeholders, user, opts)
        return state["compiled"](*user)

    return run


def _match_calibration(calibration: list, names: list[str], user: tuple) -> list | None:
    """The calibration batches re-ordered as this graph takes its inputs, or None when they do not
    fit it (another fragment of a graph with breaks, or inputs the graph does not take directly)."""
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration]
    order = [re.fullmatch(r"L_args_(\d+)_", n) for n in names]
    if all(order):
        pick = [int(m.group(1)) for m in order]
        if all(p < len(b) for b in batches for p in pick):
            batches = [tuple(b[p] for p in pick) for b in batches]
    fits = all(len(b) == len(user) and all(isinstance(t, torch.Tensor) and t.dtype == u.dtype and t.dim() == u.dim()
                                           for t, u in zip(b, user)) for b in batches)
    return batches if fits else None


def _compile(gm, args, param_pos, placeholders, user, opts):
    import lrcc
    key = (tuple((args[i].data_ptr(), tuple(args[i].shape)) for i in param_pos), str(opts.get("target", "cpu")),
           str(opts.get("budget")), len(user))
    if key in _CACHE:
        return _CACHE[key]
    names = {i: _param_path(placeholders[i]) for i in param_pos}
    bound = _Bound(gm, {i: args[i] for i in param_pos}, names, len(args)).eval()
    given = opts.get("calibration")
    user_names = [placeholders[i] for i in range(len(args)) if i not in param_pos]
    calibration = _match_calibration(given, user_names, user) if given is not None else None
    if given is not None and calibration is None:
        warnings.warn("lrcc backend: the calibration data does not fit this graph's inputs (a fragment after a "
                      "graph break?); calibrating this graph on its first call's inputs instead")
    rest = {k: v for k, v in opts.items() if k not in ("target", "budget", "calibration")}
    cm = lrcc.compile(bound, user, target=opts.get("target", "cpu"), budget=opts.get("budget"),
                      calibration=calibration, options=rest)
    _CACHE[key] = cm
    return cm
