"""Scatterbrain attention (Chen et al. 2021, arXiv:2110.15343) on Triton, non-causal.

Sparse + low-rank: exact softmax terms on a support S (a local window |i - j| <= window, plus, if
asked, `global_keys` keys per cluster of queries), Performer FAVOR+ estimates (random features w,
m x d) everywhere else, and on S the exact term minus the estimate, so S is not counted twice. The
semantics, including the stable log-space normaliser (per-feature key shift b, per-query shift a,
row scale c = max(largest exact score on S, log of the low-rank total)), are those of the torch
reference :func:`lrcc.rewrites.linear_attention.scatterbrain_attention`.

Two stages, as linear attention's state-then-queries:
1. (torch, fp32, O(L m)) phi(k) = exp(log-features + key bias - b), b the per-feature maximum over
   the unmasked keys; the state KV = phi(k)^T v and z = sum_j phi(k_j).
2. (templates/triton/scatterbrain_attention.py.j2) one program per (batch*head, BLOCK_M queries):
   phi(q) from q, w and b; the low-rank total and numerator from the state; the window keys and
   values (and the global keys of the block's clusters) with their exact scores and low-rank
   estimates; the output. No L x L tensor exists: memory is O(L (d + m)).

The sparse + centroids form (clustered_attention_triton) runs the same kernel with the centroid
kernel as its low-rank part: stage 1 clusters the queries (cluster_queries) and builds the state
from phi(k)_c = exp(qbar_c . k / sqrt(d) + bias - b_c); in the kernel phi(q) is the one-hot of the
query's cluster. As lrcc.rewrites.linear_attention.clustered_attention.

Global keys are chosen in torch by :func:`~lrcc.rewrites.linear_attention.select_global_keys` (a
few k-means steps over the queries, O(L d clusters)); the kernel reads the chosen indices.
"""
from __future__ import annotations

import numbers
from types import ModuleType
from typing import Any

import torch

from ...errors import LrccError
from ...rewrites.linear_attention import centroid_scores, cluster_queries, select_global_keys
from . import kernels
from .attention import _ITEMSIZE, check_qkv, dtype_name
from .configs import pow2

TEMPLATE = "scatterbrain_attention"

# tl.dot needs every tile side >= 16.
_MIN_TILE = 16
# Head dims and features are each one tile (the fp32 feature matrix w^T, d x m, is loaded whole).
MAX_HEAD_DIM = 128
MAX_FEATURES = 128
# Queries per program: up to 64 rows amortise the block's setup (phi(q), the state products) over
# the window's key tiles, as a flash-attention query block; key tiles up to 64 wide.
_BLOCK_M = 64
_BLOCK_N = 64
# Bytes of one query block or key tile row set (rows x widest of d, dv, m, in the input dtype): 16 KiB.
# Measured ahead of time for sm_80 at d = dv = m = 128 with fp32 inputs: 64 x 64 tiles take 176 KiB of
# shared memory, more than an A100's 163 KiB; the 32 x 32 tiles this budget gives take 96 KiB (fp16,
# 64 x 64: 112 KiB on sm_80, 145 KiB of an H100's 227 KiB on sm_90).
_TILE_BYTES = 16 * 1024
# Tiles up to this many elements run on 4 warps, larger ones on 8. At 64 x 64 (fp16, d = dv = m = 64)
# 4 warps spill 552 bytes of registers per thread on sm_80 and 736 on sm_90; 8 warps spill 8 and 24
# (ptxas, read back with cuobjdump by tests/test_triton_scatterbrain.py).
_FOUR_WARP_TILE = 64 * 32
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "BLOCK_F", "BLOCK_G", "num_warps", "num_stages")


def scatterbrain_config(shape: tuple[int, int, int, int, int], features: int, window: int | None,
                        global_keys: int = 0, dtype: torch.dtype | str = torch.float16) -> dict[str, int]:
    """Tile sizes and launch parameters for Scatterbrain attention of shape (B, H, L, d, dv) with
    `features` random features, a window of radius `window` (None for none), `global_keys` keys per
    cluster and inputs of `dtype` (torch dtype or "fp16" / "bf16" / "fp32"): BLOCK_M, BLOCK_N,
    BLOCK_D, BLOCK_DV, BLOCK_F, BLOCK_G, num_warps, num_stages."""
    _, _, L, d, dv = (int(x) for x in shape)
    if max(d, dv) > MAX_HEAD_DIM:
        raise LrccError(f"scatterbrain_attention: head dims d={d}, dv={dv}; the kernel keeps each in one tile, "
                        f"at most {MAX_HEAD_DIM}: split the heads or use the torch form "
                        f"(lrcc.rewrites.linear_attention.scatterbrain_attention)")
    if features > MAX_FEATURES:
        raise LrccError(f"scatterbrain_attention: {features} random features > {MAX_FEATURES}, the kernel keeps "
                        f"them in one tile; use fewer features")
    itemsize = _ITEMSIZE[dtype_name(dtype, "scatterbrain_attention")]
    block_d, block_dv, block_f = pow2(d), pow2(dv), pow2(features)
    widest = max(block_d, block_dv, block_f)
    rows = max(_MIN_TILE, _TILE_BYTES // (widest * itemsize))
    block_m = min(_BLOCK_M, pow2(L), rows)
    # key tiles: no wider than the block's window span needs
    span = block_m + 2 * window if window is not None else _MIN_TILE
    block_n = min(_BLOCK_N, pow2(min(span, L)), rows)
    block_g = min(pow2(min(global_keys, L)), block_n) if global_keys > 0 else _MIN_TILE
    largest = max(block_m * widest, block_n * widest, block_d * block_f, block_m * block_n)
    num_warps = 4 if largest <= _FOUR_WARP_TILE else 8
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "BLOCK_DV": block_dv, "BLOCK_F": block_f,
            "BLOCK_G": block_g, "num_warps": num_warps, "num_stages": 2}


def kernel_module() -> ModuleType:
    """The loaded stage-2 kernel module (cached by kernels.kernel)."""
    return kernels.kernel(TEMPLATE)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check(q, k, v, w, window, mask, global_keys, clusters, name: str = "scatterbrain_attention") -> None:
    """Validate the arguments; w None for the clustered form (which then needs clusters >= 1)."""
    check_qkv(name, q, k, v)
    if w is None and name == "scatterbrain_attention":
        raise LrccError(f"{name}: w must be a torch.Tensor, got NoneType")
    if w is not None and not isinstance(w, torch.Tensor):
        raise LrccError(f"{name}: w must be a torch.Tensor, got {type(w).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise LrccError(f"{name}: q, k, v are {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype")
    if w is not None and (w.dim() != 2 or w.shape[1] != q.shape[-1] or w.shape[0] == 0):
        raise LrccError(f"{name}: the random features w must be [m, d] with m >= 1 and "
                        f"d={q.shape[-1]} (q's head dim), got {tuple(w.shape)}")
    if w is not None and not w.is_floating_point():
        raise LrccError(f"{name}: the random features w are {w.dtype}; they must be floating point")
    if w is None and (not _is_int(clusters) or clusters < 1):
        raise LrccError(f"{name}: clusters must be an int >= 1, got {clusters!r}")
    if window is not None and (not _is_int(window) or window < 0):
        raise LrccError(f"{name}: window must be an int >= 0 (the radius: 2 window + 1 keys) or "
                        f"None for no window, got {window!r}")
    if not _is_int(global_keys) or global_keys < 0:
        raise LrccError(f"{name}: global_keys must be an int >= 0, got {global_keys!r}")
    if global_keys > 0 and (not _is_int(clusters) or clusters < 1):
        raise LrccError(f"{name}: clusters must be an int >= 1 with global keys, got {clusters!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise LrccError(f"{name}: mask must be a torch.Tensor [B, L], got {type(mask).__name__}")
        if tuple(mask.shape) != (q.shape[0], q.shape[2]):
            raise LrccError(f"{name}: key mask is {tuple(mask.shape)}, expected [B, L] = "
                            f"{[q.shape[0], q.shape[2]]}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise LrccError(f"{name}: key mask must be bool (True = attend) or floating point "
                            f"(added to the scores), got {mask.dtype}")
    devices = {t.device for t in (q, k, v) + ((w,) if w is not None else ()) + ((mask,) if mask is not None else ())}
    if len(devices) > 1:
        raise LrccError(f"{name}: q, k, v{', w' if w is not None else ''}{', mask' if mask is not None else ''} are on "
                        f"{', '.join(sorted(str(d) for d in devices))}; move them to one device")
    if kernels.mode(q) == "reference":
        raise LrccError(f"{name}: q is on {q.device} and TRITON_INTERPRET is not set; the Triton "
                        f"kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before Python starts, to run it in "
                        f"Triton's interpreter). lrcc.rewrites.linear_attention.{name} is the "
                        f"torch form")


def _check_config(config: dict[str, Any], d: int, dv: int, m: int) -> None:
    missing = [key for key in _CONFIG_KEYS if key not in config]
    if missing:
        raise LrccError(f"scatterbrain_attention: config lacks {', '.join(missing)}; start from scatterbrain_config()")
    for key in _CONFIG_KEYS[:6]:
        size = config[key]
        if not isinstance(size, int) or size < _MIN_TILE or size & (size - 1):
            raise LrccError(f"scatterbrain_attention: config {key}={size!r} must be a power of two >= {_MIN_TILE}")
    for key, need, what in (("BLOCK_D", d, "d"), ("BLOCK_DV", dv, "dv"), ("BLOCK_F", m, "m")):
        if config[key] < need:
            raise LrccError(f"scatterbrain_attention: config {key}={config[key]} < {what}={need}; the kernel keeps "
                            f"it in one tile")


def key_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The key mask as an fp32 [B, L] bias added to the scores (-inf: never attended), or None: a bool
    mask gives 0 / -inf; a float one is itself, with values at or below its dtype's lowest -inf."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    bias = mask.float()
    return bias.masked_fill(bias <= torch.finfo(mask.dtype).min, float("-inf")).contiguous()


def key_state(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
    """Stage 1, in fp32: (shift b [B*H, m], phi(k) [B*H, L, m], KV [B*H, m, dv], z [B*H, m]) with
    phi(k_j) = exp(w . k_j' - |k_j'|^2 / 2 + bias_j - b) (k' = k / d^(1/4)), b each feature's largest
    value over the unmasked keys (0 where every key is masked), so the largest phi(k) is 1; masked
    keys get phi = 0."""
    d = k.shape[-1]
    ks = k.float() * d ** -0.25
    lk = ks @ w.t() - 0.5 * (ks * ks).sum(-1, keepdim=True)  # [B, H, L, m]
    if bias is not None:
        lk = lk + bias[:, None, :, None]
    return _state(lk, v)


def _state(lk: torch.Tensor, v: torch.Tensor):
    """key_state's tuple from the keys' log-features lk [B, H, L, m] (-inf at masked keys)."""
    B, H, L, m = lk.shape
    shift = lk.amax(2, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    fk = torch.exp(lk - shift)
    kv = fk.transpose(-1, -2) @ v.float()
    return (shift.reshape(B * H, m).contiguous(), fk.reshape(B * H, L, m).contiguous(),
            kv.reshape(B * H, m, -1).contiguous(), fk.sum(2).reshape(B * H, m).contiguous())


def scatterbrain_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                                  window: int | None, mask: torch.Tensor | None = None, global_keys: int = 0,
                                  clusters: int = 1, *, config: dict[str, Any] | None = None) -> torch.Tensor:
    """Scatterbrain attention of q, k [B, H, L, d] and v [B, H, L, dv] (one dtype: fp32, fp16 or bf16;
    any strides) with the random features w [m, d]: exact on the window |i - j| <= window (None for
    no window) and on `global_keys` keys per cluster of queries (`clusters` clusters,
    select_global_keys), FAVOR+ elsewhere, as lrcc.rewrites.linear_attention.scatterbrain_attention.
    mask: [B, L], bool (True = attend) or float (added to the scores); rows with every key masked
    give zeros. Returns a new [B, H, L, dv] tensor in v's dtype, accumulated in fp32. config defaults
    to scatterbrain_config(). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    _check(q, k, v, w, window, mask, global_keys, clusters)
    B, H, L, d = q.shape
    dv, m = v.shape[-1], w.shape[0]
    g = min(int(global_keys), L)
    if config is None:
        config = scatterbrain_config((B, H, L, d, dv), m, window, global_keys, v.dtype)
    _check_config(config, d, dv, m)
    if B * H * L == 0:
        return torch.empty((B, H, L, dv), dtype=v.dtype, device=v.device)
    w32 = w.float().contiguous()
    bias = key_bias(mask)
    state = key_state(k, v, w32, bias)
    keys = cluster = None
    if g > 0:
        keys_of, assign = select_global_keys(q, k, global_keys, mask, clusters)  # [B, H, c, g], [B, H, L]
        keys = keys_of.reshape(B * H, keys_of.shape[2], g).to(torch.int32).contiguous()
        cluster = assign.reshape(B * H, L).to(torch.int32).contiguous()
    return kernel_module().launch(q, k, v, w32, state, bias, None if window is None else int(window), keys, cluster,
                                  config)


def centroid_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, clusters: int):
    """Stage 1 of the clustered form, in fp32: (state as key_state's, with phi(k_j)_c =
    exp(qbar_c . k_j / sqrt(d) + bias_j - b_c) for the centroids qbar_c of the queries' clusters;
    the centroids' scores [B, H, c, L] (log phi(k) before the shift, -inf at masked keys); each
    query's cluster [B, H, L])."""
    centroids, assign = cluster_queries(q, mask, clusters)
    scores = centroid_scores(centroids, k, mask)  # [B, H, c, L]
    state = _state(scores.transpose(-1, -2), v)
    return state, scores, assign


def clustered_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                               mask: torch.Tensor | None = None, global_keys: int = 0, clusters: int = 1, *,
                               config: dict[str, Any] | None = None) -> torch.Tensor:
    """Sparse + centroids of q, k [B, H, L, d] and v [B, H, L, dv] (one dtype: fp32, fp16 or bf16):
    exact on the window and on `global_keys` keys per cluster of queries (`clusters` k-means
    clusters), elsewhere the centroid kernel of the query's cluster, as
    lrcc.rewrites.linear_attention.clustered_attention; the Scatterbrain kernel with CENTROID.
    mask, the result and config as scatterbrain_attention_triton's (config's BLOCK_F covers the
    clusters)."""
    _check(q, k, v, None, window, mask, global_keys, clusters, name="clustered_attention")
    B, H, L, d = q.shape
    dv, m = v.shape[-1], max(1, min(int(clusters), L))
    if clusters > MAX_FEATURES:
        raise LrccError(f"clustered_attention: {clusters} clusters > {MAX_FEATURES}, the kernel keeps their "
                        f"centroids' features in one tile; use fewer clusters")
    if config is None:
        config = scatterbrain_config((B, H, L, d, dv), m, window, global_keys, v.dtype)
    _check_config(config, d, dv, m)
    if B * H * L == 0:
        return torch.empty((B, H, L, dv), dtype=v.dtype, device=v.device)
    state, scores, assign = centroid_state(q, k, v, mask, clusters)
    keys = None
    if global_keys > 0:
        keys = scores.topk(min(int(global_keys), L), dim=-1).indices  # as select_global_keys
        keys = keys.reshape(B * H, keys.shape[2], keys.shape[3]).to(torch.int32).contiguous()
    cluster = assign.reshape(B * H, L).to(torch.int32).contiguous()
    return kernel_module().launch(q, k, v, None, state, key_bias(mask), None if window is None else int(window), keys,
                                  cluster, config, centroid=True)


def approximate_attention_triton(q, k, v, attn_mask=None, param=None, *, form: str, scale: float | None = None,
                                 window: int | None = None, global_keys: int = 0, clusters: int = 1):
    """lrcc.rewrites.linear_attention.approximate_attention for GPU targets: the Performer,
    Scatterbrain and sparse + centroids forms run this file's kernel (Performer is Scatterbrain with
    an empty support); the other forms (elu+1 with a key mask, window, Linformer) run their torch
    code on the device."""
    from ...rewrites import linear_attention as la
    if form not in ("performer", "scatterbrain", "clustered"):
        return la.approximate_attention(q, k, v, attn_mask, param, form=form, scale=scale, window=window,
                                        global_keys=global_keys, clusters=clusters)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise LrccError(f"approximate_attention: q, k, v must be [B, H, L, d], got {tuple(q.shape)}, "
                        f"{tuple(k.shape)}, {tuple(v.shape)}")
    qs, mask = la.sdpa_form_inputs(q, k, attn_mask, scale)
    if form == "clustered":
        return clustered_attention_triton(qs.to(v.dtype), k.to(v.dtype), v, window, mask, global_keys,
                                          clusters).to(q.dtype)
    if form == "performer":
        window, global_keys, clusters = None, 0, 1
    out = scatterbrain_attention_triton(qs.to(v.dtype), k.to(v.dtype), v, param, window, mask, global_keys, clusters)
    return out.to(q.dtype)
