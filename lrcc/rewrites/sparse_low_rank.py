"""Sparse plus low-rank weights: W ~ S + U V.

Law (robust PCA / Scatterbrain-style decompositions; for weights, e.g. LoSparse, Li et al. 2023,
arXiv:2306.11222): a low-rank part captures the weight's coherent structure and a sparse part its
largest remaining entries. We fit U V by whitened SVD (SVD-LLM) and take S as the top-k entries of
the residual W - U V ranked by their effect on the output, |R_ij| * rms(x_j); the planner then
refits U V on the compressed model's inputs with S fixed. Storage: S in CSR (fp16 values, int16 or
int32 column indices, int32 row pointers), U and V in fp16.

Option ``sparse_block=(bo, bi)`` (default None: entry-wise S) keeps whole bo x bi blocks instead
(bo output x bi input features), ranked by the summed score of their entries. Law: block sparsity
gives up some accuracy (a block's small entries ride along with its large ones) for dense tiles that
tensor cores multiply at full rate; Pixelated Butterfly (Dao et al. 2022, arXiv:2112.00029) and
Scatterbrain (Chen et al. 2021, arXiv:2110.15343) use block-sparse patterns for this reason.
Entry-wise S at 5% leaves almost every 16 x 16 block non-empty (1 - 0.95^256 ~ 1), so a block
kernel would do dense work on it. S is stored in the same CSR parts either way.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import LrccError
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


def sparse_block(options: dict[str, Any]) -> tuple[int, int] | None:
    """The sparse_block option as (out, in) block sizes, or None for entry-wise sparsity."""
    block = options.get("sparse_block")
    if block is None:
        return None
    ok = isinstance(block, (tuple, list)) and len(block) == 2 and all(isinstance(b, int) and b >= 1 for b in block)
    if not ok:
        raise LrccError(f"option sparse_block={block!r}: give (out, in) block sizes as two positive ints, "
                        "e.g. (16, 16), or None for entry-wise sparsity")
    return int(block[0]), int(block[1])


def top_blocks(score: torch.Tensor, count: int, block: tuple[int, int]) -> torch.Tensor:
    """Mask of the `count` whole bo x bi blocks of `score` (m x k) with the largest summed score.

    Only full blocks compete: a ragged edge block would store fewer entries, and the stored size
    must be known before calibration (for layer widths that are multiples of the block, i.e.
    nearly all, nothing is left out)."""
    bo, bi = block
    m, k = score.shape
    mb, kb = m // bo, k // bi
    sums = score[: mb * bo, : kb * bi].reshape(mb, bo, kb, bi).sum((1, 3))
    keep = torch.zeros(mb * kb, dtype=torch.bool)
    keep[torch.topk(sums.flatten(), count).indices] = True
    mask = torch.zeros(m, k, dtype=torch.bool)
    mask[: mb * bo, : kb * bi] = keep.reshape(mb, kb).repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    return mask


def _offer(g: Graph, n: Node, options: dict[str, Any]) -> list[Candidate]:
    from .low_rank import whitened_for
    w, m, k, site, bias = site_weight(g, n)
    spectrum = lambda stats: whitened_for(stats, w, site)
    block = sparse_block(options)

    out: list[Candidate] = []
    for density, ranks in options.get("sparse_configs", SPARSE_CONFIGS):
        nnz = round(density * m * k)
        if block is not None:
            # whole blocks within the density budget
            area = block[0] * block[1]
            nnz = min(nnz // area, (m // block[0]) * (k // block[1])) * area
            if nnz == 0:
                continue
        for r in ranks:
            if r >= min(m, k) // 2:
                continue
            attrs = {"m": m, "n": k, "rank": r, "density": density}
            if block is not None:
                attrs["block"] = list(block)

            def fn(stats, r=r, nnz=nnz):
                v, u = spectrum(stats).factors(r)
                v, u = v.half(), u.half()
                residual = w - u.float() @ v.float()
                rms = (stats.xtx(site).diagonal().float() / max(stats.tokens[site], 1)).sqrt()
                if block is not None:
                    score = residual.abs() * rms[None, :]
                    mask = top_blocks(score, nnz // (block[0] * block[1]), block)
                    return {**csr_parts(residual, mask), "v": v, "u": u}
                score = (residual.abs() * rms[None, :]).flatten()
                mask = torch.zeros(m * k, dtype=torch.bool)
                mask[torch.topk(score, nnz).indices] = True
                return {**csr_parts(residual, mask.reshape(m, k)), "v": v, "u": u}
            params = nnz + r * (m + k) + (m if bias else 0)
            nbytes = sparse_bytes(m, k, nnz) + 2 * r * (m + k) + bias
            kind, family, knobs = "sparse", f"{site}:sparse:{density}:{r}", {"density": density, "rank": r}
            if block is not None:
                kind = f"block-sparse {block[0]}x{block[1]}"
                family += f":block{block[0]}x{block[1]}"
                knobs["block"] = block
            out.append(Candidate(site=site, node=n.name, rule="sparsify_lowrank",
                                 choice=f"{density:.0%} {kind} + rank {r} fp16", form="sparse+lowrank",
                                 knobs=knobs, params=params, bytes=nbytes,
                                 weight_shapes=[(m, k), (r, k), (m, r)], family=family,
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
