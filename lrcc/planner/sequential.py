"""Sequential calibration: refit each chosen low-rank site on the compressed model's own inputs.

The original and the compressed graph module are walked node by node in lock step over all
calibration batches at once. When a compressed site is reached, its inputs in the compressed
model (Xc) and in the original (X) are both at hand, so its factors are refit in closed form to
reproduce the original layer's outputs from what the compressed model really feeds it
(see rewrites/low_rank.py: reduced_rank_regression). Later sites then see the refit earlier ones.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx.node import map_arg

from ..errors import LrccError
from ..rewrites.low_rank import reduced_rank_regression


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


def sequential_refit(original, compressed, batches: list[tuple], ranks: dict[str, int],
                     weights: dict[str, torch.Tensor], out_metrics: dict[str, torch.Tensor] | None = None,
                     ridge: float = 1e-3, progress: Callable[[str], None] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Refit the sites in `ranks` (site -> rank) in graph order; returns site -> (V, U).

    original / compressed: Lowered modules of the same graph before and after the rewrite.
    weights: site -> the original weight W. The compressed module's sites are updated in place.
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
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    done = 0
    shared: dict = {}
    with torch.no_grad():
        for i, (no, nc) in enumerate(zip(nodes_o, nodes_c)):
            if no.op != nc.op or no.target != nc.target:
                raise LrccError(f"sequential calibration: node {nc.name} differs between the two graphs")
            if nc.op == "output":
                break
            site = module_site.get(nc.target) if nc.op == "call_module" else None
            if site in ranks:
                # the original layer's output (less its bias) is the regression target Y
                bias = go.get_submodule(no.target).bias
                for k in range(len(batches)):
                    envs_o[k][no] = _eval(go, no, envs_o[k])
                xin_c = nc.args[0]
                n_in = weights[site].shape[1]
                if xin_c not in shared:  # sites fed by one value (q, k, v) share X^T X
                    h = torch.zeros(n_in, n_in, dtype=torch.float64)
                    for ec in envs_c:
                        xc = ec[xin_c].reshape(-1, n_in).float()
                        h += (xc.T @ xc).double()
                    shared.clear()
                    shared[xin_c] = h
                h = shared[xin_c]
                xty = torch.zeros(n_in, weights[site].shape[0], dtype=torch.float64)
                for ec, eo in zip(envs_c, envs_o):
                    xc = ec[xin_c].reshape(-1, n_in).float()
                    y = eo[no].reshape(-1, eo[no].shape[-1])
                    if bias is not None:
                        y = y - bias
                    xty += (xc.T @ y).double()
                metric = out_metrics.get(site) if out_metrics else None
                v, u = reduced_rank_regression(h, xty, ranks[site], metric, ridge, site)
                mod = gc.get_submodule(nc.target)
                mod.v, mod.u = v, u
                result[site] = (v, u)
                done += 1
                if progress:
                    progress(f"sequential refit: {done}/{len(ranks)} sites ({site}, rank {ranks[site]})")
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
