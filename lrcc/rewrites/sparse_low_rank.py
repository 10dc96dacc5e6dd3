"""Sparse plus low-rank weights: W ~ S + U V.

Law (robust PCA / Scatterbrain-style decompositions; for weights, e.g. LoSparse, Li et al. 2023,
arXiv:2306.11222): a low-rank part captures the weight's coherent structure and a sparse part its
largest remaining entries. We fit U V by whitened SVD (SVD-LLM) and take S as the top-k entries of
the residual W - U V ranked by their effect on the output, |R_ij| * rms(x_j); the planner then
refits U V on the compressed model's inputs with S fixed. Storage: S in CSR (fp16 values, int16 or
int32 column indices, int32 row pointers), U and V in fp16.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ir.graph import Graph, Node
from .quantize import _delta_family, _guard, site_weight
from .rule import Candidate, Rule

SPARSE_CONFIGS = ((0.05, (16, 32, 64)), (0.1, (16, 32, 64)))


def csr_parts(dense: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """CSR tensors (values fp16, cols, rowptr) of dense[mask]."""
    m, n = dense.shape
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(rows, minlength=m)
    rowptr = torch.zeros(m + 1, dtype=torch.int32)
    rowptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    col_dtype = torch.int16 if n <= 32767 else torch.int32
    return {"values": dense[rows, cols].half(), "cols": cols.to(col_dtype), "rowptr": rowptr}


def sparse_bytes(m: int, n: int, nnz: int) -> int:
    return nnz * (2 + (2 if n <= 32767 else 4)) + (m + 1) * 4


def _offer(g: Graph, n: Node, options: dict[str, Any]) -> list[Candidate]:
    from .low_rank import whitened_for
    w, m, k, site, bias = site_weight(g, n)
    spectrum = lambda stats: whitened_for(stats, w, site)

    out: list[Candidate] = []
    for density, ranks in options.get("sparse_configs", SPARSE_CONFIGS):
        nnz = int(round(density * m * k))
        for r in ranks:
            if r >= min(m, k) // 2:
                continue
            attrs = {"m": m, "n": k, "rank": r, "density": density}

            def fn(stats, r=r, nnz=nnz):
                v, u = spectrum(stats).factors(r)
                v, u = v.half(), u.half()
                residual = w - u.float() @ v.float()
                rms = (stats.xtx(site).diagonal().float() / max(stats.tokens[site], 1)).sqrt()
                score = (residual.abs() * rms[None, :]).flatten()
                mask = torch.zeros(m * k, dtype=torch.bool)
                mask[torch.topk(score, nnz).indices] = True
                return {**csr_parts(residual, mask.reshape(m, k)), "v": v, "u": u}
            params = nnz + r * (m + k) + (m if bias else 0)
            nbytes = sparse_bytes(m, k, nnz) + 2 * r * (m + k) + bias
            out.append(Candidate(site=site, node=n.name, rule="sparsify_lowrank",
                                 choice=f"{density:.0%} sparse + rank {r} fp16", form="sparse+lowrank",
                                 knobs={"density": density, "rank": r}, params=params, bytes=nbytes,
                                 weight_shapes=[(m, k), (r, k), (m, r)], family=f"{site}:sparse:{density}:{r}",
                                 spectrum=_delta_family(w, fn, attrs), needs_calibration=True, error_index=0,
                                 refit="sparse"))
    return out


sparsify_lowrank = Rule(
    name="sparsify_lowrank",
    pattern="linear",
    guard=_guard,
    offer=_offer,
    law="W ~ S + U V: whitened low-rank fit plus the top-k residual entries by output effect "
        "(robust PCA; LoSparse, arXiv:2306.11222)",
)
