"""Low-rank factorisation of linear layers: W (m x n) ~ U V with U m x r, V r x n.

Laws:
- Eckart-Young-Mirsky: the truncated SVD is the best rank-r approximation of W in Frobenius
  (and spectral) norm.
- Activation-aware, whitened SVD (SVD-LLM, Wang et al. 2024, arXiv:2403.07378): with inputs X and
  A = X^T X = L L^T (Cholesky), ||X (W - W')^T||_F = ||(W - W') L||_F, so the best rank-r W' in the
  layer's own output error is trunc_r(W L) L^{-1}.
- Refit on compressed inputs (sequential calibration as in GPTQ/SVD-LLM's update step): with
  inputs Xc of the already-compressed model and targets Y = X W^T of the original, the best rank-r
  B minimising ||(Xc B^T - Y) K|| (K K^T an output-side metric) is L^{-T} trunc_r(L^{-1} Xc^T Y K) K^{-1}
  transposed, where L L^T = Xc^T Xc (+ ridge): a reduced-rank regression, solved in closed form.
A rank-r factorisation stores r (m + n) numbers instead of m n, so only r < m n / (m + n) saves.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ir.graph import Graph, Node
from .rule import Candidate, Rule, Spectrum


def breakeven_rank(m: int, n: int) -> float:
    """The rank at which U V holds as many numbers as W."""
    return m * n / (m + n)


def candidate_ranks(m: int, n: int, step: int = 8) -> list[int]:
    """Ranks offered for an m x n weight: multiples of `step` strictly below the break-even rank."""
    limit = breakeven_rank(m, n)
    return [r for r in range(step, int(limit) + 1, step) if r < limit]


def _guard(g: Graph, n: Node) -> str | None:
    w = g.tensor(n.inputs[1])
    if not w.dtype.is_floating_point:
        return f"weight dtype {w.dtype} is not floating point"
    uses = sum(1 for m in g.nodes if n.inputs[1] in m.inputs)
    if uses > 1:
        return "weight is shared with other nodes (tied weights)"
    if not candidate_ranks(*w.shape, step=1):  # offer() applies the rank step from the options
        return f"weight {tuple(w.shape)} too small: no rank below {breakeven_rank(*w.shape):.1f} saves parameters"
    return None


def _cholesky(a: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric PSD matrix, damped until it succeeds."""
    a = 0.5 * (a + a.T)
    scale = float(a.diagonal().mean()) or 1.0
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    for damp in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        chol, info = torch.linalg.cholesky_ex(a + damp * scale * eye)
        if int(info) == 0:
            return chol
    raise ValueError(f"{what}: covariance is not positive definite even with damping")


def svd_spectrum(w: torch.Tensor) -> Spectrum:
    """Plain truncated SVD of W."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return Spectrum(s.float(), u.float(), vh.T.float())


def whitened_spectrum(w: torch.Tensor, xtx: torch.Tensor, what: str = "layer") -> Spectrum:
    """SVD-LLM: trunc_r(W L) L^{-1} with L L^T = X^T X."""
    chol = _cholesky(xtx.double(), what)
    u, s, vh = torch.linalg.svd(w.double() @ chol, full_matrices=False)
    # right_i = L^{-T} v_i
    right = torch.linalg.solve_triangular(chol.T, vh.T, upper=True)
    return Spectrum(s.float(), u.float(), right.float())


def whitened_for(stats, w: torch.Tensor, site: str) -> Spectrum:
    """The site's whitened spectrum, computed once per calibration statistics and shared by every
    rule that builds on it (factorize_linear, quantize_lowrank, sparsify_lowrank)."""
    build = lambda: whitened_spectrum(w, stats.xtx(site), site)
    return stats.memo(("whitened", site), build) if hasattr(stats, "memo") else build()


def refit_factors(w: torch.Tensor, xtx_c: torch.Tensor, xtx_cross: torch.Tensor, rank: int,
                  out_metric: torch.Tensor | None = None, ridge: float = 1e-3, what: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank regression of the original outputs on compressed inputs: returns (V, U).

    xtx_c = Xc^T Xc, xtx_cross = Xc^T X (X: the original model's inputs to this layer),
    out_metric: an m x m PSD weighting of output channels (None: identity).
    """
    return reduced_rank_regression(xtx_c, xtx_cross.double() @ w.double().T, rank, out_metric, ridge, what)


def reduced_rank_regression(xtx_c: torch.Tensor, xty: torch.Tensor, rank: int, out_metric: torch.Tensor | None = None,
                            ridge: float = 1e-3, what: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r B minimising ||(Xc B^T - Y) K||_F (+ ridge) from xtx_c = Xc^T Xc and xty = Xc^T Y: (V, U), B = U V."""
    h = xtx_c.double()
    n = h.shape[0]
    h = h + ridge * float(h.diagonal().mean()) * torch.eye(n, dtype=h.dtype)
    chol = _cholesky(h, what)
    rhs = xty.double()  # Xc^T Y, n x m
    if out_metric is not None:
        k = _cholesky(out_metric.double(), what + " (output metric)")
        rhs = rhs @ k
    m_mat = torch.linalg.solve_triangular(chol, rhs, upper=False)  # L^{-1} Xc^T Y K
    p, s, qh = torch.linalg.svd(m_mat, full_matrices=False)
    s_r = s[:rank].sqrt()
    v = (p[:, :rank] * s_r).T  # r x n, still in whitened coordinates
    v = torch.linalg.solve_triangular(chol.T, v.T, upper=True).T  # right-multiply by L^{-1}
    u = qh[:rank].T * s_r  # m x r
    if out_metric is not None:
        u = torch.linalg.solve_triangular(k.T, u, upper=True)  # K^{-T} u
    return v.float().contiguous(), u.float().contiguous()


def _offer(g: Graph, n: Node, options: dict[str, Any]) -> list[Candidate]:
    w = g.tensor(n.inputs[1])
    m, k_in = w.shape
    has_bias = len(n.inputs) > 2
    site = n.attrs["site"]
    methods = options.get("lowrank_methods", ("whitened", "svd"))
    step = int(options.get("rank_step", 8))
    out: list[Candidate] = []
    for method in methods:
        family = f"{site}:{method}"
        if method == "svd":
            spectrum = _cached(family, lambda stats, w=w: svd_spectrum(w))
        elif method == "whitened":
            spectrum = _cached(family, lambda stats, w=w, site=site: whitened_for(stats, w, site))
        else:
            raise ValueError(f"factorize_linear: unknown method {method!r}")
        label = {"svd": "SVD", "whitened": "whitened SVD"}[method]
        dtypes = ("float32", "float16") if options.get("lowrank_fp16") else ("float32",)
        for r in candidate_ranks(m, k_in, step):
            params = r * (m + k_in) + (m if has_bias else 0)
            for dtype in dtypes:
                nbytes = 4 * params if dtype == "float32" else 2 * r * (m + k_in) + (4 * m if has_bias else 0)
                choice = f"rank {r}, {label}" + (", fp16" if dtype == "float16" else "")
                out.append(Candidate(site=site, node=n.name, rule="factorize_linear", choice=choice,
                                     form="lowrank", knobs={"rank": r, "method": method, "dtype": dtype}, params=params,
                                     bytes=nbytes, weight_shapes=[(r, k_in), (m, r)], family=family, spectrum=spectrum,
                                     needs_calibration=method == "whitened"))
    return out


def _cached(key: str, fn):
    box: dict[str, Spectrum] = {}

    def get(stats):
        if key not in box:
            box[key] = fn(stats)
        return box[key]

    get.family = key
    return get


def replace_with_lowrank(g: Graph, node_name: str, v: torch.Tensor, u: torch.Tensor) -> None:
    """Rewrite linear `node_name` in place into lowrank_linear(x, V, U, b) with new param nodes."""
    n = g[node_name]
    site = n.attrs["site"]
    v_ref, u_ref = f"{site}.lowrank_v", f"{site}.lowrank_u"
    g.tensors[v_ref] = v
    g.tensors[u_ref] = u
    dt = v.dtype
    v_node = Node(f"{node_name}_v", "param", [], {"ref": v_ref, "kind": "parameter"}, tuple(map(_int, v.shape)), dt)
    u_node = Node(f"{node_name}_u", "param", [], {"ref": u_ref, "kind": "parameter"}, tuple(map(_int, u.shape)), dt)
    inputs = [n.inputs[0], v_node.name, u_node.name] + n.inputs[2:]
    new = Node(node_name, "lowrank_linear", inputs, {"site": site, "rank": int(v.shape[0])}, n.shape, n.dtype)
    g.replace(node_name, [v_node, u_node, new])


def _int(d):
    import sympy
    return sympy.Integer(int(d))


factorize_linear = Rule(
    name="factorize_linear",
    pattern="linear",
    guard=_guard,
    offer=_offer,
    law="W ~ U V by truncated SVD (Eckart-Young) or whitened SVD (SVD-LLM, arXiv:2403.07378); "
        "saves only for r < mn/(m+n)",
)

RULES = [factorize_linear]
