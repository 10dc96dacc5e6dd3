"""Activation ranges for int8 quantisation: run the (planned) float graph node by node on
calibration inputs and record every value's min and max."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from ...ir.graph import Graph, Ref, map_refs
from ...ir.targets import resolve_target
from ..torch_module import site_module


class Ranges:
    """Running min/max per node name (and per low-rank site's intermediate, under "<node>.mid")."""

    def __init__(self) -> None:
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}

    def update(self, name: str, t: torch.Tensor) -> None:
        if t.numel() == 0:
            return
        lo, hi = float(t.min()), float(t.max())
        self.lo[name] = min(lo, self.lo.get(name, lo))
        self.hi[name] = max(hi, self.hi.get(name, hi))

    def get(self, name: str) -> tuple[float, float]:
        return self.lo[name], self.hi[name]

    def __contains__(self, name: str) -> bool:
        return name in self.lo


@torch.no_grad()
def run_float(g: Graph, inputs: tuple, ranges: Ranges | None = None) -> dict[str, torch.Tensor]:
    """Every node's float value for one input tuple; records ranges when given."""
    env: dict[str, object] = {}
    sites: dict[str, torch.nn.Module] = {}

    def value(ref: Ref):
        n = g[ref.name]
        if n.op == "param":
            return g.tensors[n.attrs["ref"]]
        return env[ref.name]

    for n in g.nodes:
        if n.op == "input":
            env[n.name] = inputs[n.attrs["index"]]
        elif n.op == "param":
            continue
        elif n.is_site:
            if n.name not in sites:
                sites[n.name] = site_module(g, n)
            x = env[n.inputs[0]]
            mod = sites[n.name]
            if n.op == "lowrank_linear" and ranges is not None:
                ranges.update(f"{n.name}.mid", F.linear(x, mod.v))
            env[n.name] = mod(x)
        elif n.op == "aten":
            fn = resolve_target(n.attrs["target"])
            env[n.name] = fn(*map_refs(n.attrs["args"], value), **map_refs(n.attrs["kwargs"], value))
        elif n.op == "output":
            continue
        if ranges is not None and isinstance(env.get(n.name), torch.Tensor) and env[n.name].is_floating_point():
            ranges.update(n.name, env[n.name])
    return env


def collect_ranges(g: Graph, batches: Iterable[tuple]) -> Ranges:
    """Min/max of every float value of the graph over the calibration batches."""
    r = Ranges()
    for b in batches:
        run_float(g, tuple(b), r)
    return r
