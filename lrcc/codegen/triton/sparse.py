"""The sparse plus low-rank linear y = x S^T + (x V^T) U^T + b as one Triton kernel.

lrcc stores S (m x n: out x in features) in CSR (values, cols, rowptr; rewrites/sparse_low_rank.py).
The kernel (templates/triton/sparse_lowrank_linear.py.j2) reads S^T instead as dense
[block_k, block_n] tiles, block-compressed by output tile, so that the nonzero part runs on the
tensor cores; :func:`to_block_sparse` converts once per weight, at lowering time (:func:`prepare`),
and :func:`run` launches on the prepared weight. Any CSR pattern converts; the work is proportional
to the number of non-empty blocks, which the rule's ``sparse_block`` option keeps small.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import LrccError
from . import kernels
from .configs import PROGRAMS_PER_SM, SMALL_M, matmul_configs, pow2, split_k

MIN_BLOCK = 16           # smallest extent of a tensor-core product (tl.dot) along K and N
DEFAULT_BLOCK = (16, 16)  # (block_k, block_n): the rule's sparse_block (16, 16) gives exactly these blocks
# (on an H200, wider output tiles, 16 x 64 or 16 x 128, ran 1.1-1.7x faster for M >= 2048 despite their
# padding: the sparse loop is latency-bound; 16 x 16 was as fast or faster for decode-sized M)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_block(name: str, size: int) -> None:
    if not isinstance(size, int) or size < MIN_BLOCK or size & (size - 1):
        raise LrccError(f"sparse block size {name}={size!r}: use a power of two >= {MIN_BLOCK} "
                        f"(tensor-core tiles are at least {MIN_BLOCK} wide; Triton tiles are powers of two)")


def _check_csr(values: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor, m: int, n: int) -> None:
    if values.dim() != 1 or cols.shape != values.shape:
        raise LrccError(f"CSR values {tuple(values.shape)} and cols {tuple(cols.shape)} must be 1-D and equally long")
    if rowptr.shape != (m + 1,):
        raise LrccError(f"CSR rowptr has shape {tuple(rowptr.shape)}; a {m} x {n} matrix needs ({m + 1},)")
    ptr = rowptr.long()
    if int(ptr[0]) != 0 or int(ptr[-1]) != values.numel() or bool((ptr[1:] < ptr[:-1]).any()):
        raise LrccError(f"CSR rowptr must start at 0, never decrease and end at nnz = {values.numel()}; "
                        f"it runs {int(ptr[0])} .. {int(ptr[-1])}")
    if values.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n):
        raise LrccError(f"CSR column indices run {int(cols.min())} .. {int(cols.max())}, outside 0 .. {n - 1}")


def csr_to_dense(values: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The m x n matrix the CSR tensors hold, in the values' dtype."""
    _check_csr(values, cols, rowptr, m, n)
    rows = torch.repeat_interleave(torch.arange(m, device=values.device), (rowptr[1:] - rowptr[:-1]).long())
    dense = torch.zeros((m, n), dtype=values.dtype, device=values.device)
    dense[rows, cols.long()] = values
    return dense


def to_block_sparse(values: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor, m: int, n: int,
                    block_k: int, block_n: int) -> dict[str, torch.Tensor]:
    """S^T in block-compressed-column form, from S (m x n) in CSR.

    Returns block_ptr (int32, cdiv(m, block_n) + 1), block_k (int32, nnzb) and blocks (nnzb x
    block_k x block_n, the values' dtype): output tile j's nonzero blocks are block_ptr[j] ..
    block_ptr[j + 1], in increasing K order; block i is rows block_k[i] * block_k .. of S^T
    (input features) and columns j * block_n .. (output features), zero past n and m.
    """
    _check_block("block_k", block_k)
    _check_block("block_n", block_n)
    _check_csr(values, cols, rowptr, m, n)
    device = values.device
    k_blocks = -(-n // block_k)
    n_blocks = -(-m // block_n)
    rows = torch.repeat_interleave(torch.arange(m, device=device), (rowptr[1:] - rowptr[:-1]).long())
    c = cols.long()
    key = (rows // block_n) * k_blocks + c // block_k  # sorts by output tile, then K-block
    keys, which = torch.unique(key, sorted=True, return_inverse=True)
    block_ptr = torch.zeros(n_blocks + 1, dtype=torch.int32, device=device)
    block_ptr[1:] = torch.cumsum(torch.bincount(keys // k_blocks, minlength=n_blocks), 0).to(torch.int32)
    blocks = torch.zeros((keys.numel(), block_k, block_n), dtype=values.dtype, device=device)
    blocks[which, c % block_k, rows % block_n] = values
    return {"block_ptr": block_ptr, "block_k": (keys % k_blocks).to(torch.int32), "blocks": blocks}


@dataclass
class SparseLowRank:
    """A sparse plus low-rank weight laid out for the kernel (made once per weight by :func:`prepare`)."""

    m: int                      # output features
    n: int                      # input features
    r: int                      # rank
    block_k: int
    block_n: int
    block_ptr: torch.Tensor
    block_idx: torch.Tensor     # the layout's block_k: each block's K-block index
    blocks: torch.Tensor
    v: torch.Tensor             # r x n
    u: torch.Tensor             # m x r
    bias: torch.Tensor | None   # m, fp32

    @property
    def nnz_blocks(self) -> int:
        return int(self.block_idx.numel())


def prepare(parts: dict[str, torch.Tensor], block_k: int = DEFAULT_BLOCK[0], block_n: int = DEFAULT_BLOCK[1],
            device: torch.device | str | None = None) -> SparseLowRank:
    """Convert a sparse_low_rank site's parts (values, cols, rowptr, v, u, optional bias) for the kernel."""
    missing = [role for role in ("values", "cols", "rowptr", "v", "u") if parts.get(role) is None]
    if missing:
        raise LrccError(f"sparse + low-rank kernel: parts lack {missing}; it needs values, cols, rowptr, v and u")
    v, u, bias = parts["v"], parts["u"], parts.get("bias")
    if v.dim() != 2 or u.dim() != 2 or v.shape[0] != u.shape[1]:
        raise LrccError(f"sparse + low-rank kernel: v is {tuple(v.shape)} and u {tuple(u.shape)}; "
                        "they must be r x n and m x r")
    m, n, r = u.shape[0], v.shape[1], v.shape[0]
    if bias is not None and bias.shape != (m,):
        raise LrccError(f"sparse + low-rank kernel: bias is {tuple(bias.shape)}, expected ({m},)")
    device = device if device is not None else parts["values"].device
    layout = to_block_sparse(parts["values"], parts["cols"], parts["rowptr"], m, n, block_k, block_n)
    blocks = layout["blocks"]
    if blocks.shape[0] == 0:
        # the kernel never reads a block then (block_ptr is all zeros), but launches want real memory
        blocks = torch.zeros((1, block_k, block_n), dtype=blocks.dtype)
    return SparseLowRank(m, n, r, block_k, block_n, layout["block_ptr"].to(device), layout["block_k"].to(device),
                         blocks.to(device).contiguous(), v.to(device).contiguous(), u.to(device).contiguous(),
                         None if bias is None else bias.to(device, torch.float32).contiguous())


def sparse_config(M: int, N: int, K: int, R: int, block_k: int = DEFAULT_BLOCK[0],
                  block_n: int = DEFAULT_BLOCK[1], sms: int = 108) -> dict[str, Any]:
    """Tile sizes, num_warps and num_stages for M rows of x, N out and K in features, rank R, a
    layout of block_k x block_n blocks, and a GPU with `sms` multiprocessors."""
    # the layout fixes the sparse tiles: BLOCK_K is its block height, BLOCK_N its width
    _check_block("block_k", block_k)
    _check_block("block_n", block_n)
    # the whole rank in one tile, so t = x V^T is computed once per program and stays in registers
    block_r = pow2(R)
    # no padded rows for decode-sized M; 64 rows fill an mma tile and a Hopper warpgroup's wgmma
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    if block_r >= 128:
        block_m = min(block_m, 32)  # t is BLOCK_M x BLOCK_R fp32 in registers: fewer rows for wide ranks
    # the x V^T loop: 64-wide steps amortise loop overhead; narrower only when K itself is narrow
    block_kv = pow2(K, hi=64)
    # programs per row block: enough for PROGRAMS_PER_SM per SM; each extra one recomputes t = x V^T
    m_tiles = -(-M // block_m)
    n_tiles = -(-N // block_n)
    n_split = max(1, min(n_tiles, -(-PROGRAMS_PER_SM * sms // m_tiles)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_KV": block_kv, "BLOCK_R": block_r,
            "N_SPLIT": n_split,
            # one warpgroup: 4 warps cover a 64-row tile (wgmma's unit on Hopper); the tiles are no larger
            "num_warps": 4,
            # three buffers let the loads of the next x / V^T / S tile overlap the current product
            "num_stages": 3}


def sparse_candidates(M: int, N: int, K: int, R: int, block_k: int = DEFAULT_BLOCK[0],
                      block_n: int = DEFAULT_BLOCK[1], sms: int = 108) -> list[dict[str, Any]]:
    """The two ways to run the layer, the predicted faster first (autotuning on a GPU keeps the
    faster): "fused", one kernel (sparse_config) in which every program of a row block computes
    t = x V^T again; "two_pass", t first (matmul.py.j2, split K so a few rows still fill the GPU),
    then the sparse kernel reading it, one program per output tile. Fused is first only where it
    computes t once per row block (N_SPLIT = 1): each extra program reads all of V again (r K
    values) and redoes 2 r K FLOPs per row, which for a few rows is more than the layer's own work."""
    fused = {"strategy": "fused", **sparse_config(M, N, K, R, block_k, block_n, sms)}
    t_cfg = dict(matmul_configs(M, R, K, sms)[0])
    programs = -(-M // t_cfg["BLOCK_M"]) * -(-R // t_cfg["BLOCK_N"])
    t_cfg["SPLIT_K"] = split_k(programs, -(-K // t_cfg["BLOCK_K"]), sms)
    sparse = {**sparse_config(M, N, K, R, block_k, block_n, sms), "N_SPLIT": -(-N // block_n), "HAS_T": True}
    two_pass = {"strategy": "two_pass", "t": t_cfg, "sparse": sparse}
    return [fused, two_pass] if fused["N_SPLIT"] == 1 else [two_pass, fused]


def _kernel():
    """The loaded kernel module (kernels.kernel caches it: launches are on the hot path)."""
    return kernels.kernel("sparse_lowrank_linear")


def run(x: torch.Tensor, w: SparseLowRank, config: dict[str, Any] | None = None) -> torch.Tensor:
    """y = x S^T + (x V^T) U^T + b for x (..., n) in fp16, bf16 or fp32, on the prepared weight's device."""
    if x.dtype not in KERNEL_DTYPES:
        raise LrccError(f"sparse + low-rank kernel: x is {x.dtype}; use float16, bfloat16 or float32")
    if x.dim() < 1 or x.shape[-1] != w.n:
        raise LrccError(f"sparse + low-rank kernel: x has shape {tuple(x.shape)}; its last dimension must be "
                        f"the {w.n} input features")
    if x.device != w.v.device:
        raise LrccError(f"sparse + low-rank kernel: x is on {x.device} but the weight on {w.v.device}; "
                        "prepare the weight for x's device")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return torch.empty((*lead, w.m), dtype=x.dtype, device=x.device)
    if config is None:
        cands = lambda: sparse_candidates(M, w.m, w.n, w.r, w.block_k, w.block_n, kernels.sm_count(x.device))
        key = ("sparse_lowrank_linear", kernels._bucket(M), w.m, w.n, w.r, w.block_k, w.block_n, x.dtype)
        config = kernels.tune(key, cands, lambda cfg: _launch(x2, w, cfg), x.device, graphs=M <= SMALL_M)
    sparse = config["sparse"] if config.get("strategy") == "two_pass" else config
    if (sparse["BLOCK_K"], sparse["BLOCK_N"]) != (w.block_k, w.block_n) or sparse["BLOCK_R"] < w.r:
        raise LrccError(f"sparse + low-rank kernel: config BLOCK_K={sparse['BLOCK_K']}, BLOCK_N={sparse['BLOCK_N']}, "
                        f"BLOCK_R={sparse['BLOCK_R']} do not fit the weight (blocks {w.block_k} x {w.block_n}, "
                        f"rank {w.r}); take the config from sparse_config or sparse_candidates")
    return _launch(x2, w, config).reshape(*lead, w.m)


def _launch(x2: torch.Tensor, w: SparseLowRank, config: dict[str, Any]) -> torch.Tensor:
    """The layer on rows x2 (M x n, rows contiguous) with a config of sparse_config (fused) or of
    sparse_candidates (either strategy)."""
    if config.get("strategy") != "two_pass":
        return _kernel().launch(x2, w.v, w.u, w.block_ptr, w.block_idx, w.blocks, w.bias, config)
    t = kernels.matmul(x2, w.v, None, config["t"])  # x V^T: fp32 when split over K
    return _kernel().launch(x2, w.v, w.u, w.block_ptr, w.block_idx, w.blocks, w.bias, config["sparse"], t)


# id(values tensor) -> (that tensor, weakly; the other parts' ids and block sizes; the prepared weight)
_PREPARED: dict[int, tuple[weakref.ref, tuple, SparseLowRank]] = {}


def sparse_lowrank_linear(x: torch.Tensor, parts: dict[str, torch.Tensor] | SparseLowRank,
                          config: dict[str, Any] | None = None) -> torch.Tensor:
    """y = x S^T + (x V^T) U^T + b with the fused kernel. parts: a prepared weight, or the site's
    parts dict (converted on first use and cached for as long as its values tensor lives)."""
    if isinstance(parts, SparseLowRank):
        return run(x, parts, config)
    block_k, block_n = (config["BLOCK_K"], config["BLOCK_N"]) if config else DEFAULT_BLOCK
    values = parts.get("values")
    if values is None:
        raise LrccError("sparse + low-rank kernel: parts lack 'values'; it needs values, cols, rowptr, v and u")
    key = (tuple(id(parts.get(role)) for role in ("cols", "rowptr", "v", "u", "bias")), block_k, block_n, x.device)
    hit = _PREPARED.get(id(values))
    if hit is None or hit[0]() is not values or hit[1] != key:
        if hit is None or hit[0]() is not values:
            weakref.finalize(values, _PREPARED.pop, id(values), None)
        hit = (weakref.ref(values), key, prepare(parts, block_k, block_n, device=x.device))
        _PREPARED[id(values)] = hit
    return run(x, hit[2], config)


def sparse_lowrank_reference(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same product in plain torch (fp32 arithmetic, result in x's dtype)."""
    v, u, bias = parts["v"].float(), parts["u"].float(), parts.get("bias")
    s = csr_to_dense(parts["values"], parts["cols"], parts["rowptr"], u.shape[0], v.shape[1]).float()
    xf = x.float()
    y = xf @ s.T + (xf @ v.T) @ u.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def kernel_block(attrs: dict[str, Any]) -> tuple[int, int]:
    """(block_k, block_n) of the layout for a site: the rule's sparse_block (out, in) where the kernel
    can use it as a tile, else DEFAULT_BLOCK."""
    block = attrs.get("block")
    if block is not None:
        out_f, in_f = block
        if all(b >= MIN_BLOCK and not b & (b - 1) for b in (out_f, in_f)):
            return int(in_f), int(out_f)
    return DEFAULT_BLOCK


class TritonSparseLowRankLinear(nn.Module):
    """y = x S^T + (x V^T) U^T + b through sparse_lowrank_linear.py.j2. Holds the block-sparse
    layout as buffers (converted once, here), so ``.to("cuda")`` moves it like any module."""

    def __init__(self, parts: dict[str, torch.Tensor], attrs: dict[str, Any], site: str) -> None:
        super().__init__()
        block_k, block_n = kernel_block(attrs)
        w = prepare(parts, block_k, block_n)
        for key in ("block_ptr", "block_idx", "blocks", "v", "u", "bias"):
            self.register_buffer(key, getattr(w, key))
        self.m, self.n, self.r, self.block_k, self.block_n = w.m, w.n, w.r, block_k, block_n
        self.site = site

    def weight(self) -> SparseLowRank:
        return SparseLowRank(self.m, self.n, self.r, self.block_k, self.block_n, self.block_ptr, self.block_idx,
                             self.blocks, self.v, self.u, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.mode(x) == "reference":
            kernels.warn_reference("sparse + low-rank layers")
            return _reference_prepared(x, self.weight())
        return run(x, self.weight())

    def kernel_calls(self) -> list[dict[str, Any]]:
        m, n, r, bk, bn = self.m, self.n, self.r, self.block_k, self.block_n
        return [{"template": "sparse_lowrank_linear", "flags": {},
                 "shape": {"N": m, "K": n, "R": r, "BLOCK_K": bk, "BLOCK_N": bn},
                 "config": lambda M, sms: sparse_candidates(M, m, n, r, bk, bn, sms)[0]}]


def _reference_prepared(x: torch.Tensor, w: SparseLowRank) -> torch.Tensor:
    """The product in torch from the block layout (where neither a GPU nor the interpreter runs)."""
    k_blocks = -(-w.n // w.block_k)
    n_blocks = -(-w.m // w.block_n)
    tile = torch.repeat_interleave(torch.arange(n_blocks, device=w.blocks.device),
                                   (w.block_ptr[1:] - w.block_ptr[:-1]).long())
    st = torch.zeros((k_blocks, n_blocks, w.block_k, w.block_n), dtype=torch.float32, device=w.blocks.device)
    st[w.block_idx.long(), tile] = w.blocks[: w.nnz_blocks].float()
    st = st.permute(0, 2, 1, 3).reshape(k_blocks * w.block_k, n_blocks * w.block_n)[: w.n, : w.m]
    xf = x.float()
    y = xf @ st + (xf @ w.v.float().T) @ w.u.float().T
    if w.bias is not None:
        y = y + w.bias.float()
    return y.to(x.dtype)
