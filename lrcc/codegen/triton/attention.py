"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs") on Triton.

    out_i = phi(q_i)^T S / (phi(q_i)^T z + eps),  S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)

with j over the whole sequence (non-causal) or j <= i (causal), phi = elu + 1 ("elu1") or the
identity ("identity", for features computed before the kernel, e.g. Performer's positive random
features). Two serial templates, one program per (batch*head, value block) walking the whole sequence:
``linear_attention`` (state first, then every query against it) and ``causal_linear_attention``
(chunked, as flash-linear-attention's fused_chunk). With few heads those leave most of the GPU idle,
so two sequence-parallel templates cut the sequence into SPLIT segments of whole chunks, a program
per (batch*head, value block, segment):

- ``linear_attention_split``: phase 1 each segment's partial state phi(K)^T V, z; phase 2 each segment's
  queries against the sum of all partials (summed in a fixed order: deterministic, no atomics);
- ``causal_linear_attention_split`` (as fla's chunk mode): phase 1 each segment's local state; phase 2
  the exclusive prefix over segments (one program per head and value block); phase 3 each segment
  from the state of the earlier ones, chunk by chunk as fused_chunk within it.

Their scratch is B*H*SPLIT*(Dk*Dv + Dk) fp32 values (non-causal; causal twice that: local states and
prefixes); with one chunk per segment (fla's chunk mode, SPLIT = L / BLOCK_L) that would be 8 MiB per
head at L = 16384, head size 64, so :func:`attention_config` gives each segment several chunks and
only as many segments as it needs programs (under 8 MiB per buffer, and capped at _MAX_SCRATCH).
Tile sizes, SPLIT and launch parameters are decided here, by :func:`attention_config`; the templates
only carry them out.
"""
from __future__ import annotations

import numbers
from types import ModuleType
from typing import Any

import torch

from ...errors import LrccError
from . import kernels
from .configs import pow2

FEATURES = ("elu1", "identity")
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

# tl.dot needs every tile side >= 16.
_MIN_TILE = 16
# The key dimension is one tile (the denominator needs all of it). At 512 the state is 512 x 16 with
# 16-row chunks; at 1024 the fp32 kernels need more shared memory than an A100 (164 KiB) has.
MAX_DK = 512
# The largest fp32 register tile a program keeps (the state S, a chunk's phi(Q) or scores): 64 x 128
# elements = 32 KiB, 64 registers per thread at 8 warps, leaving room for the other live tiles under
# the 255-register limit without spilling.
_MAX_TILE = 64 * 128
# Up to 64 x 64 fp32 elements per tile, 4 warps suffice (32 registers per thread per tile); larger
# tiles get 8 warps.
_FOUR_WARP_TILE = 64 * 64
# Causal chunk: 64 rows balances the intra-chunk work (C^2 (Dk + Dv) per chunk, i.e. C (Dk + Dv) per
# row) against the inter-chunk work (2 Dk Dv per row) at the usual head size 64, as fla's fused_chunk.
_CAUSAL_CHUNK = 64
# Non-causal rows per step: no C x C tile exists, so a longer step only means fewer loop trips.
_NONCAUSAL_CHUNK = 128
# Enough programs to fill an A100 (108 SMs) or H100 (132 SMs) once; below that, split the value
# columns (each split re-reads q and k and, causal, recomputes phi(Q_c) phi(K_c)^T: worth it only for
# parallelism).
_MIN_PROGRAMS = 128
# Splitting stops at 32 value columns: narrower, the recomputed Dk-wide products outweigh the gain.
_MIN_SPLIT_DV = 32
# Sequence-parallel (split) variants, for when B*H*n_dv programs are fewer than _MIN_PROGRAMS even with
# the value columns split down to _MIN_SPLIT_DV (so every shape the serial kernels were measured on,
# B*H >= 64 at head size 64, keeps them): as many segments as bring the programs to _MIN_PROGRAMS,
# within the limits below. A segment spans at least 4 chunks, so its state tile (Dk x Dv fp32, written
# once and read once or twice: 16 KiB at head size 64) stays small against the q, k, v, o rows it
# covers (4 x 64 rows x 4 x 64 x 2 bytes = 128 KiB causal fp16); it also means L must span 8 chunks
# before a split is chosen.
_MIN_SEGMENT_CHUNKS = 4
# At most 32 segments: every non-causal query program sums all the segments' partial states (the
# price of a deterministic sum without a third launch): at B*H = 2, L = 16384, head size 64 that is
# 32 x 64 x 32 fp32 = 256 KiB of L2 reads per program, already more than its own 512 rows of q and o.
_MAX_SPLIT = 32
# The scratch a split may take (its state buffers, fp32): aiming at _MIN_PROGRAMS programs keeps
# B*H*n_dv*SPLIT under 2 x _MIN_PROGRAMS, so a buffer under 2 x _MIN_PROGRAMS x Dk x BLOCK_DV x 4 bytes
# <= 8 MiB (2 MiB at B*H = 8, head size 64); the cap is a guard should those constants change: beyond
# it the serial kernels run, which need none.
_MAX_SCRATCH = 64 << 20
# Shared memory the software pipeline may take for its buffered q/k/v chunks: well under an A100's
# 164 KiB per SM (H100: 228 KiB), leaving room for the dots' operand tiles. Measured on an H200 at
# head size 64 (fp16, B*H = 64 and 128), three stages beat two by 6-18% in every case.
_PIPELINE_SMEM = 96 * 1024


def dtype_name(dtype: torch.dtype | str, what: str = "linear attention") -> str:
    """"fp32", "fp16" or "bf16" for a torch dtype or one of those names; `what` names the kernel in the error."""
    if isinstance(dtype, str) and dtype in _ITEMSIZE:
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise LrccError(f"{what} supports {', '.join(_ITEMSIZE)}, not {dtype}")


def attention_config(shape: tuple[int, int, int, int, int], dtype: torch.dtype | str, causal: bool, *,
                     allow_split: bool = True) -> dict[str, int]:
    """Tile sizes and launch parameters for linear attention of shape (B, H, L, Dk, Dv) with inputs of
    `dtype` (torch dtype or "fp16" / "bf16" / "fp32"): BLOCK_L, BLOCK_DK, BLOCK_DV, SPLIT (1: the serial
    kernels; n >= 2: the sequence-parallel ones with n segments), num_warps, num_stages. allow_split=False
    gives the serial kernels' config whatever the shape (to compare the two)."""
    B, H, L, Dk, Dv = (int(d) for d in shape)
    if Dk > MAX_DK:
        raise LrccError(f"linear attention keeps the key dimension in one tile: Dk={Dk} > {MAX_DK}; "
                        f"use fewer features or split the heads")
    itemsize = _ITEMSIZE[dtype_name(dtype)]
    # the whole key dimension in one tile: the denominator phi(q)^T z needs all of it
    block_dk = pow2(Dk)
    # value columns: all of them while the fp32 state S (BLOCK_DK x BLOCK_DV) fits the register tile
    block_dv = pow2(Dv)
    while block_dk * block_dv > _MAX_TILE and block_dv > _MIN_TILE:
        block_dv //= 2
    n_dv = -(-Dv // block_dv)
    chunk = _CAUSAL_CHUNK if causal else _NONCAUSAL_CHUNK
    # too few programs to fill the GPU even with the value columns split as far as they go (the
    # serial kernels' only parallelism besides B*H): segments of the sequence (the split kernels),
    # when it spans enough chunks and their scratch is within its cap. Segments come before value
    # blocks there: they cost a state tile each, value blocks re-read q and k and recompute products.
    split = 1
    if allow_split and B * H * -(-Dv // min(block_dv, _MIN_SPLIT_DV)) < _MIN_PROGRAMS:
        chunks = -(-L // min(chunk, pow2(L)))
        split = min(-(-_MIN_PROGRAMS // (B * H * n_dv)), chunks // _MIN_SEGMENT_CHUNKS, _MAX_SPLIT)
        scratch = (2 if causal else 1) * B * H * split * (Dk * Dv + Dk) * 4
        if split < 2 or scratch > _MAX_SCRATCH:
            split = 1
    # fewer value columns per program while there are too few programs (with segments: where they
    # stopped short of _MIN_PROGRAMS)
    while B * H * n_dv * split < _MIN_PROGRAMS and block_dv > _MIN_SPLIT_DV:
        block_dv //= 2
        n_dv = -(-Dv // block_dv)
    # rows per chunk: no more than the sequence needs, and phi(Q_c) / V_c (C x Dk, C x Dv fp32) within
    # the register tile
    block_l = min(chunk, pow2(L))
    while block_l * max(block_dk, block_dv) > _MAX_TILE and block_l > _MIN_TILE:
        block_l //= 2
    if split > 1:
        # the segment count the launch makes of SPLIT with these chunks (whole chunks, none empty)
        chunks = -(-L // block_l)
        split = -(-chunks // -(-chunks // split))
    largest = max(block_dk * block_dv, block_l * block_dk, block_l * block_dv, block_l * block_l if causal else 0)
    num_warps = 4 if largest <= _FOUR_WARP_TILE else 8
    # the chunk loop carries only S and z, so the next chunk's loads overlap this chunk's dots;
    # a third buffer when it fits the pipeline's share of shared memory
    stage_bytes = block_l * ((2 * block_dk if causal else block_dk) + block_dv) * itemsize
    num_stages = 3 if 3 * stage_bytes <= _PIPELINE_SMEM else 2
    return {"BLOCK_L": block_l, "BLOCK_DK": block_dk, "BLOCK_DV": block_dv, "SPLIT": split,
            "num_warps": num_warps, "num_stages": num_stages}


def kernel_module(causal: bool, split: bool = False) -> ModuleType:
    """The loaded kernel module: causal_linear_attention or linear_attention, or with `split` their
    sequence-parallel forms (cached by kernels.kernel)."""
    return kernels.kernel(template_name(causal, split))


def template_name(causal: bool, split: bool = False) -> str:
    """The Triton template for causal or non-causal linear attention (with `split`: the
    sequence-parallel one, config SPLIT >= 2)."""
    name = "causal_linear_attention" if causal else "linear_attention"
    return f"{name}_split" if split else name


def kernel_launches(config: dict[str, Any], causal: bool) -> list[tuple[str, dict[str, Any]]]:
    """(template, render flags) of every kernel linear_attention launches with `config`, in launch
    order: what ahead-of-time compiles (aot.AotJob) of it need. A split template's flag `phase` picks
    the kernel its module exposes as KERNEL."""
    if config.get("SPLIT", 1) == 1:
        return [(template_name(causal), {})]
    name = template_name(causal, split=True)
    return [(name, {"phase": phase}) for phase in kernels.kernel(name).PHASES]


def check_qkv(what: str, q, k, v) -> None:
    """The checks every attention kernel makes of q, k [B, H, L, d] and v [B, H, L, dv]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise LrccError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise LrccError(f"{what}: {name} must be [B, H, L, d], got rank {t.dim()} shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise LrccError(f"{what}: {name} is {t.dtype}; use float32, float16 or bfloat16")
    if q.shape != k.shape:
        raise LrccError(f"{what}: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:3] != q.shape[:3]:
        raise LrccError(f"{what}: v {tuple(v.shape)} must share B, H, L with q {tuple(q.shape)}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise LrccError(f"{what}: head dims must be >= 1, got d={q.shape[-1]}, dv={v.shape[-1]}")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature: str, eps: float) -> None:
    check_qkv("linear_attention", q, k, v)
    if q.shape[-1] > MAX_DK:
        raise LrccError(f"linear_attention: Dk={q.shape[-1]} > {MAX_DK}: the kernels keep the key dimension "
                        f"in one tile; use fewer features or split the heads")
    if q.dtype != k.dtype:
        raise LrccError(f"linear_attention: q is {q.dtype} but k is {k.dtype}; cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise LrccError(f"linear_attention: q, k, v are on {q.device}, {k.device}, {v.device}; move them to one")
    if feature not in FEATURES:
        raise LrccError(f"linear_attention: unknown feature {feature!r}; known: {', '.join(FEATURES)}")
    if not eps > 0:
        raise LrccError(f"linear_attention: eps must be > 0, got {eps}")


def _check_config(config: dict[str, Any], Dk: int) -> None:
    missing = [key for key in ("BLOCK_L", "BLOCK_DK", "BLOCK_DV", "num_warps", "num_stages") if key not in config]
    if missing:
        raise LrccError(f"linear_attention: config lacks {', '.join(missing)}; start from attention_config()")
    for key in ("BLOCK_L", "BLOCK_DK", "BLOCK_DV"):
        size = config[key]
        if size < _MIN_TILE or size & (size - 1):
            raise LrccError(f"linear_attention: config {key}={size} must be a power of two >= {_MIN_TILE}")
    if config["BLOCK_DK"] < Dk:
        raise LrccError(f"linear_attention: config BLOCK_DK={config['BLOCK_DK']} < Dk={Dk}; the kernel keeps "
                        f"the whole key dimension in one tile")
    split = config.get("SPLIT", 1)
    if not isinstance(split, numbers.Integral) or isinstance(split, bool) or split < 1:
        raise LrccError(f"linear_attention: config SPLIT={split!r} must be an int >= 1 (1: one program per head "
                        f"and value block walks the whole sequence; n >= 2: at most n sequence segments in "
                        f"parallel)")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, feature: str = "elu1",
                     eps: float = 1e-6, config: dict[str, Any] | None = None) -> torch.Tensor:
    """Linear attention of q, k [B, H, L, Dk] and v [B, H, L, Dv] on Triton (any strides): returns a new
    [B, H, L, Dv] tensor in v's dtype, accumulated in fp32. q and k share a dtype; v may differ, and
    the dots run in v's. config defaults to attention_config(); its SPLIT (default 1) picks the serial
    kernels (1) or the sequence-parallel ones (>= 2)."""
    _check(q, k, v, feature, eps)
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    if config is None:
        config = attention_config((B, H, L, Dk, Dv), v.dtype, causal)
    _check_config(config, Dk)
    if B * H * L == 0:
        return torch.empty((B, H, L, Dv), dtype=v.dtype, device=v.device)
    return kernel_module(bool(causal), config.get("SPLIT", 1) > 1).launch(q, k, v, float(eps), feature, config)


def _phi(x: torch.Tensor, feature: str) -> torch.Tensor:
    x = x.float()
    return torch.nn.functional.elu(x) + 1.0 if feature == "elu1" else x


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                               feature: str = "elu1", eps: float = 1e-6) -> torch.Tensor:
    """The law in plain torch, fp32 math, result in v's dtype: the non-causal form through the state S,
    the causal one through the masked L x L scores (so neither shares the kernels' association)."""
    if feature not in FEATURES:
        raise LrccError(f"linear_attention_reference: unknown feature {feature!r}; known: {', '.join(FEATURES)}")
    phi_q, phi_k, v32 = _phi(q, feature), _phi(k, feature), v.float()
    if causal:
        scores = torch.tril(phi_q @ phi_k.transpose(-1, -2))
        out = (scores @ v32) / (scores.sum(-1, keepdim=True) + eps)
    else:
        s = phi_k.transpose(-1, -2) @ v32
        z = phi_k.sum(-2)
        out = (phi_q @ s) / ((phi_q @ z.unsqueeze(-1)) + eps)
    return out.to(v.dtype)
