"""Sequential calibration: refit each chosen low-rank site on the compressed model's own inputs.

The original and the compressed graph module are walked node by node in lock step over all
calibration batches at once. When a compressed site is reached, its inputs in the compressed
model (Xc) and in the original (X) are both at hand, so its factors are refit in closed form to
reproduce the original layer's outputs from what the compressed model really feeds it
(see planner/plan.py: the refit functions). Later sites then see the refit earlier ones.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx.node import map_arg

from ..errors import LrccError


def _eval(gm: torch.fx.GraphModule, node: torch.fx.Node, env: dict):
    args = map_arg(node.args, lambda a: env[a])
    kwargs = map_arg(node.kwargs, lambda a: env[a])
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise LrccError(f"sequential calibration: cannot evaluate FX node {node.name} ({node.op})")


Refit = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def sequential_refit(original, compressed, batches: list[tuple], fits: dict[str, Refit],
                     progress: Callable[[str], None] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Refit the sites in `fits` in graph order; returns site -> {role: new tensor}.

    original / compressed: Lowered modules of the same graph before and after the rewrite.
    fits: site -> fn(Xc^T Xc, Xc^T Y) giving the site's new tensors by role (Y: the original layer's
    output less its bias, Xc: the compressed model's input to it). The compressed module's sites
    are updated in place, so later sites see the refit earlier ones.
    """
    go, gc = original.gm, compressed.gm
    nodes_o, nodes_c = list(go.graph.nodes), list(gc.graph.nodes)
    if len(nodes_o) != len(nodes_c):
        raise LrccError("sequential calibration: original and compressed graphs differ in structure")
    module_site = {path: site for site, path in compressed.site_names.items()}
    position = {n: i for i, n in enumerate(nodes_c)}
    last_use: dict[torch.fx.Node, int] = {}
    for i, n in enumerate(nodes_c):
        for a in n.all_input_nodes:
            last_use[a] = i
    envs_o: list[dict] = [dict() for _ in batches]
    envs_c: list[dict] = [dict() for _ in batches]
    result: dict[str, dict[str, torch.Tensor]] = {}
    done = 0
    shared: dict = {}
    with torch.no_grad():
        for i, (no, nc) in enumerate(zip(nodes_o, nodes_c)):
            if no.op != nc.op or no.target != nc.target:
                raise LrccError(f"sequential calibration: node {nc.name} differs between the two graphs")
            if nc.op == "output":
                break
            site = module_site.get(nc.target) if nc.op == "call_module" else None
            if site in fits:
                # the original layer's output (less its bias) is the regression target Y
                bias = go.get_submodule(no.target).bias
                for k in range(len(batches)):
                    envs_o[k][no] = _eval(go, no, envs_o[k])
                xin_c = nc.args[0]
                n_in = envs_c[0][xin_c].shape[-1]
                m_out = envs_o[0][no].shape[-1]
                if xin_c not in shared:  # sites fed by one value (q, k, v) share X^T X
                    h = torch.zeros(n_in, n_in, dtype=torch.float64)
                    for ec in envs_c:
                        xc = ec[xin_c].reshape(-1, n_in).float()
                        h += (xc.T @ xc).double()
                    shared.clear()
                    shared[xin_c] = h
                h = shared[xin_c]
                xty = torch.zeros(n_in, m_out, dtype=torch.float64)
                for ec, eo in zip(envs_c, envs_o):
                    xc = ec[xin_c].reshape(-1, n_in).float()
                    y = eo[no].reshape(-1, eo[no].shape[-1])
                    if bias is not None:
                        y = y - bias
                    xty += (xc.T @ y).double()
                new = fits[site](h, xty)
                mod = gc.get_submodule(nc.target)
                for role, t in new.items():
                    setattr(mod, role, t)
                result[site] = new
                done += 1
                if progress:
                    progress(f"sequential refit: {done}/{len(fits)} sites ({site})")
            for k, batch in enumerate(batches):
                if nc.op == "placeholder":
                    idx = sum(1 for m in nodes_c[:i] if m.op == "placeholder")
                    envs_o[k][no] = batch[idx]
                    envs_c[k][nc] = batch[idx]
                    continue
                if no not in envs_o[k]:
                    envs_o[k][no] = _eval(go, no, envs_o[k])
                envs_c[k][nc] = _eval(gc, nc, envs_c[k])
            for a in nc.all_input_nodes:
                if last_use.get(a) == i:
                    j = position[a]
                    for env in envs_c:
                        env.pop(a, None)
                    for env in envs_o:
                        env.pop(nodes_o[j], None)
    return result
