"""Tile sizes, warps and pipeline stages for each kernel, decided from the shape and the GPU.

Each function returns a short list of configs: the first is the heuristic pick (used under the
interpreter, for ahead-of-time compiles, and when autotuning is off); on a GPU the rest are timed
once per shape bucket and the fastest kept (lrcc.codegen.triton.kernels.tune). The reasoning:
- Tensor-core products need every tile extent >= 16; tiles are powers of two.
- Large M is compute-bound: big output tiles (128 x 128 / 128 x 256) with 8 warps amortise the
  operand loads, and 3-4 pipeline stages hide the load latency (shared memory allows it: a
  128x64 + 64x256 fp16 stage is 48 KB, and Hopper has 228 KB per SM, Ampere 164 KB).
- M <= 16 (decoding) is bound by reading the weights once: a 16-row tile (the smallest tensor-core
  tile), narrow column blocks and a split K loop give enough programs (>= 2 per SM) to keep
  enough loads in flight.
- M <= GEMV_MAX_M (decoding a few sequences) quantised: the GEMV kernel (quant_gemv.py.j2) on the
  CUDA cores is offered first, ahead of the 16-row tensor-core tile, which would be at least 3/4
  padding there; autotuning keeps whichever is faster.
"""
from __future__ import annotations

import math

MIN_TILE = 16
SMALL_M = 16        # at or below: weight-streaming (GEMV-shaped) configs
FUSED_MAX_RANK = 128  # widest rank-r intermediate a program keeps in registers (BLOCK_M x BLOCK_R fp32)
PROGRAMS_PER_SM = 2
# At or below: the quantised GEMV kernel (one row per program) is offered first. Up to SMALL_M it is
# still offered, after the 16-row tensor-core tile: its rows after the first re-read the weights
# from L2, which autotuning weighs against the tile's padding.
GEMV_MAX_M = 4
# Output columns per thread in the GEMV kernel (each thread holds one 16-byte vector of codes per
# column and K block; the x values it loads serve all its columns). Fewer registers first: at 4,
# int4 group-128 issues 4.8 instructions per code in the main loop on sm_90 (80 registers; 4.9
# with PREFETCH); at 8, 4.2 (128 registers; 4.4 and 140 with PREFETCH). An H100 SXM issues about
# 5 thread-instructions per int4 code that its peak bandwidth delivers (132 SMs x 4 schedulers x
# 32 lanes x 1.98 GHz / 6.7e12 codes/s), so these counts bound the kernel near that peak, where
# the GEMV before them (9.0) bound it at about half. Counted in the SASS by benchmarks/gemv_sass.py;
# autotuning picks on the GPU.
GEMV_COLUMNS_PER_THREAD = (4, 8)
# Decode steps are short (a few microseconds); 4 programs per SM give each SM several slabs of
# weight bytes in flight at once, which is what bandwidth needs when the loop itself is not
# software-pipelined (no tensor-core dot to pipeline towards).
GEMV_PROGRAMS_PER_SM = 4
# At or above: a quantised layer is also offered as dequantise-once then matmul (dequantize.py.j2 +
# matmul.py.j2), first. By byte and FLOP counts on an H100 the dequantised copy costs about a
# tenth of the product's time at 2048 rows of a 4096 x 4096 layer and falls as 1 / rows; the fused
# kernel measured about a third of cuBLAS's rate at M >= 2048 on an H200, since each dequantised
# tile has to pass through shared memory on its way to the tensor cores.
DEQUANT_MIN_M = 1024
DEQUANT_BLOCK_N = 128  # columns per dequantising program: 64 x 128 bytes of codes, 16 B per thread-load


def pow2(n: int, lo: int = MIN_TILE, hi: int | None = None) -> int:
    """The next power of two >= n, clamped to [lo, hi]."""
    p = lo
    while p < n:
        p *= 2
    return min(p, hi) if hi else p


def split_k(programs: int, k_blocks: int, sms: int, per_sm: int = PROGRAMS_PER_SM) -> int:
    """K splits that bring the program count to per_sm per SM, keeping >= 2 blocks each."""
    want = math.ceil(per_sm * sms / max(programs, 1))
    return max(1, min(want, k_blocks // 2))


def matmul_configs(M: int, N: int, K: int, sms: int, *, kernel: str = "matmul") -> list[dict]:
    """Configs for y = x W^T (x: M x K, W: N x K). kernel: "matmul" (the plain product), "lowrank"
    (matmul.py.j2 with its second K loop over t) or "persistent" (matmul_persistent.py.j2), whose
    extra loop state costs registers: their big tiles spill on sm_80 (ptxas, counted by the tests),
    so they take the 128 x 128 tiles. Sizes that are not multiples of 16 (the JIT then assumes no
    alignment: scalar loads, an address register each) take small tiles, which do not spill."""
    bm_cap, bn_cap, bk_cap = pow2(M, hi=128), pow2(N, hi=256), pow2(K, hi=64)
    out = []
    if N % 16 or K % 16:
        shapes = ((16, 64, 32, 4, 3), (16, 32, 32, 4, 3)) if M <= SMALL_M else \
            ((64, 64, 32, 4, 3), (32, 64, 32, 4, 3)) if M <= 128 else ((128, 128, 32, 8, 2), (64, 64, 32, 4, 3))
    elif M <= SMALL_M:
        shapes = ((16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 32, 128, 4, 4))
    elif M <= 128:
        shapes = ((64, 128, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3))
    elif kernel == "matmul":
        shapes = ((128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
                  (256, 128, 64, 8, 3))
    else:
        shapes = ((128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3))
    for bm, bn, bk, warps, stages in shapes:
        cfg = {"BLOCK_M": min(bm, bm_cap), "BLOCK_N": min(bn, bn_cap), "BLOCK_K": min(bk, bk_cap), "GROUP_M": 8,
               "num_warps": warps, "num_stages": stages}
        if cfg not in out:
            out.append(cfg)
    return out


def lowrank_configs(M: int, N: int, K: int, R: int, sms: int) -> list[dict]:
    """Configs for the low-rank layer: fused (rank <= FUSED_MAX_RANK) and two-pass (t = x V^T to
    memory, then t U^T + b with matmul.py.j2), each with its own tiles."""
    out: list[dict] = []
    br = pow2(R)
    if br <= FUSED_MAX_RANK:
        bn_cap, bk_cap = pow2(N, hi=128), pow2(K, hi=64)
        bms = (16,) if M <= SMALL_M else (64, 32, 128) if M > 128 else (32, 64)
        for bm in bms:
            bm = min(bm, pow2(M, hi=128))
            m_blocks = math.ceil(M / bm)
            for bn in (128, 64):
                bn = min(bn, bn_cap)
                n_blocks = math.ceil(N / bn)
                # every row block recomputes t for each split: split only as far as the SMs need
                split = max(1, min(n_blocks, math.ceil(PROGRAMS_PER_SM * sms / m_blocks)))
                for n_split in sorted({split, max(1, split // 2)}):
                    cfg = {"strategy": "fused", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk_cap, "BLOCK_R": br,
                           "N_SPLIT": n_split, "num_warps": 4 if bm * br <= 64 * 64 else 8,
                           "num_stages": 3}
                    if cfg not in out:
                        out.append(cfg)
    first = matmul_configs(M, R, K, sms)
    second = matmul_configs(M, N, R, sms)
    for a, b in zip(first, second):
        out.append({"strategy": "two_pass", "first": a, "second": b})
    if M > SMALL_M:
        # the second product's K is the rank, a short loop: also offered persistent (one program per
        # SM, one pipeline across its tiles; matmul_persistent.py.j2) with its first two tile shapes
        for a, b in list(zip(first, matmul_configs(M, N, R, sms, kernel="persistent")))[:2]:
            out.append({"strategy": "two_pass", "first": a, "second": {**b, "PERSISTENT": True, "PROGRAMS": sms}})
    return out


def gemv_configs(M: int, N: int, K: int, block_k: int, bits: int, sms: int, rank: int = 0) -> list[dict]:
    """Configs for quant_gemv.py.j2 (M <= SMALL_M, one row per program; BLOCK_K is fixed by the
    packed layout). A warp's lanes cover SUB / 16 vectors along K (SUB = BLOCK_K * bits / 8 bytes
    of a column per block) and 32 / (SUB / 16) columns."""
    if M > SMALL_M:
        return []
    sub = block_k * bits // 8
    lanes_n = 32 // max(1, sub // 16)
    br = pow2(rank) if rank else 0
    k_blocks = math.ceil(K / block_k)
    out = []
    # 4 warps at 4 and 8 columns per thread, and 8 warps at 4 (the same loop, bigger programs)
    for warps, per_thread in [(4, c) for c in GEMV_COLUMNS_PER_THREAD] + [(8, GEMV_COLUMNS_PER_THREAD[0])]:
        width = min(lanes_n * warps * per_thread, pow2(N, lo=lanes_n * warps))
        split = split_k(math.ceil(N / width) * M, k_blocks, sms, GEMV_PROGRAMS_PER_SM)
        # split partials meet through a workspace and a semaphore in the one launch ("serial",
        # first), or by atomic adds into an output zeroed by a second launch ("atomic"); with or
        # without loading the next K block's codes before using this one's (PREFETCH)
        ways = [(split, "serial"), (split, "atomic"), (max(1, split // 2), "serial")] if split > 1 else [(1, "none")]
        for s, reduce in ways:
            for prefetch in (True, False):
                cfg = {"strategy": "gemv", "BLOCK_M": 1, "BLOCK_N": width, "SPLIT_K": s,
                       "REDUCE": reduce if s > 1 else "none", "PREFETCH": prefetch, "num_warps": warps,
                       "num_stages": 1, **({"BLOCK_R": br} if rank else {})}
                if cfg not in out:
                    out.append(cfg)
    return out


def gemv_scale_at(group: int, K: int, block_k: int) -> int:
    """quant_gemv.py.j2's SCALE_AT (its launcher applies the same rule): where a group's scale is
    applied: 0 after the loop (one group for all of K), 1 per K block (groups are whole blocks),
    2 per sub-tile."""
    return 0 if group >= K else 1 if group % block_k == 0 else 2


def quant_configs(M: int, N: int, K: int, block_k: int, sms: int, rank: int = 0, *, bits: int) -> list[dict]:
    """Configs for the quantised layer (BLOCK_K is fixed by the packed layout); "strategy" says which
    kernels: "gemv" (quant_gemv.py.j2, first where M <= GEMV_MAX_M, last up to SMALL_M), "dequant_matmul"
    (dequantize.py.j2 then matmul.py.j2, first where M >= DEQUANT_MIN_M; with a low-rank branch,
    t = x V^T by matmul.py.j2 in between), "mma" (the fused tensor-core kernel, quant_matmul.py.j2)."""
    k_blocks = math.ceil(K / block_k)
    extra = {"BLOCK_R": pow2(rank)} if rank else {}
    gemv = gemv_configs(M, N, K, block_k, bits, sms, rank)
    out = gemv if M <= GEMV_MAX_M else []
    if M >= DEQUANT_MIN_M:
        dequant = {"BLOCK_N": DEQUANT_BLOCK_N, "num_warps": 4, "num_stages": 1}
        # with a low-rank branch, t = x V^T first (a thin product), then one matmul adds t U^T
        first = {"first": matmul_configs(M, rank, K, sms)[0]} if rank else {}
        kind = "lowrank" if rank else "matmul"
        out += [{"strategy": "dequant_matmul", "dequant": dequant, "matmul": mm, **first}
                for mm in matmul_configs(M, N, K, sms, kernel=kind)[:3]]
    # tiles whose dequantised operand fits the registers on sm_80 and sm_90, with or without the
    # low-rank branch (128 x 256, and 64 x 128 with 4 warps, spill on sm_80: counted by the tests)
    if M <= SMALL_M:
        shapes = ((16, 64, 4, 4), (16, 32, 4, 4))
    elif M <= 128:
        shapes = ((64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 4))
    else:
        shapes = ((128, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4))
    for bm, bn, warps, stages in shapes:
        bm, bn = min(bm, pow2(M, hi=128)), min(bn, pow2(N, hi=256))
        programs = math.ceil(M / bm) * math.ceil(N / bn)
        splits = (split_k(programs, k_blocks, sms), 1) if M <= SMALL_M else (1,)
        for split in splits:
            cfg = {"strategy": "mma", "BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split, "GROUP_M": 8,
                   "num_warps": warps, "num_stages": stages, **extra}
            if cfg not in out:
                out.append(cfg)
    if GEMV_MAX_M < M <= SMALL_M:
        out += gemv[:4]  # after the tensor-core tile: see GEMV_MAX_M
    return out
