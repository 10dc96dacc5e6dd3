"""Cheaper forms of softmax attention, post-training (no retraining), in plain torch.

Each function computes non-causal multi-head attention of q, k: [B, H, L, d], v: [B, H, L, dv]
with an optional key padding mask [B, L] (True = attend), the same contract as
``F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])``.

Laws:
- Linear attention (Katharopoulos et al. 2020, arXiv:2006.16236): with a feature map phi,
  softmax(q k^T) v ~ phi(q) (phi(k)^T v) / (phi(q) . sum_j phi(k_j)), O(L) time and memory.
  elu(x) + 1 is the simplest positive map (it changes the kernel: not an estimate of softmax).
- Performer FAVOR+ (Choromanski et al. 2021, arXiv:2009.14794): with x' = x / d^(1/4) and w_r
  drawn orthogonal Gaussian, phi(x)_r = exp(w_r . x' - |x'|^2 / 2) / sqrt(m) gives
  E[phi(q) . phi(k)] = exp(q . k / sqrt(d)): an unbiased, positive estimate of softmax's kernel.
- Scatterbrain (Chen et al. 2021, arXiv:2110.15343): sparse + low-rank. On a sparse support S
  (here a local window) use the exact exp(q . k) minus the low-rank estimate, elsewhere the
  low-rank estimate, so the support is not counted twice: on S the result is exact, off S it is
  Performer's. Numerator and normaliser are accumulated on a per-query scale exp(-c_i), c_i the
  largest log-term of row i, so nothing overflows (the normaliser in log space).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def orthogonal_features(d: int, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """m x d random features: blocks of orthonormal rows (QR of Gaussians), each row rescaled to
    the norm of a Gaussian vector (FAVOR+'s orthogonal random features)."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        blocks.append(q.t())
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).float()


def _log_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """log phi(x) * sqrt(m): w . x' - |x'|^2 / 2 with x' = x / d^(1/4)."""
    xs = x.float() / x.shape[-1] ** 0.25
    return xs @ w.t().to(xs) - 0.5 * (xs * xs).sum(-1, keepdim=True)


def _key_mask(mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(k.shape[0], 1, k.shape[2], 1, dtype=torch.bool, device=k.device)
    return mask[:, None, :, None].to(torch.bool)


def exact_attention(q, k, v, mask=None):
    """Softmax attention (the reference)."""
    attn = None if mask is None else mask[:, None, None, :].to(torch.bool)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn)


def elu_attention(q, k, v, mask=None, eps: float = 1e-6):
    """Linear attention with phi = elu + 1, O(L)."""
    km = _key_mask(mask, k)
    fq, fk = F.elu(q.float()) + 1, (F.elu(k.float()) + 1) * km
    kv = fk.transpose(-1, -2) @ v.float()
    z = fk.sum(-2)
    return (fq @ kv) / ((fq * z[..., None, :]).sum(-1, keepdim=True) + eps)


def performer_attention(q, k, v, w: torch.Tensor, mask=None):
    """FAVOR+ with the random features w (m x d), O(L m)."""
    return scatterbrain_attention(q, k, v, w, window=0, mask=mask)


def local_attention(q, k, v, window: int, mask=None):
    """Exact softmax restricted to keys within `window` positions of the query, O(L window)."""
    return _windowed(q, k, v, window, mask, w=None)


def scatterbrain_attention(q, k, v, w: torch.Tensor, window: int, mask=None):
    """Local window (exact) + FAVOR+ low-rank elsewhere, the window not counted twice."""
    return _windowed(q, k, v, window, mask, w=w)


CHUNK = 128  # queries per block of the windowed part: memory O(L (CHUNK + 2 window)), linear in L


def _windowed(q, k, v, window: int, mask, w: torch.Tensor | None):
    B, H, L, d = q.shape
    qf, kf, vf = q.float(), k.float(), v.float()
    km = _key_mask(mask, k)  # [B, 1, L, 1]
    num = torch.zeros(B, H, L, v.shape[-1], device=q.device)
    den = torch.zeros(B, H, L, 1, device=q.device)
    low_log = None
    if w is not None:
        m = w.shape[0]
        lq = _log_features(qf, w)  # [B, H, L, m]
        lk = _log_features(kf, w).masked_fill(~km, float("-inf"))
        a = lq.amax(-1, keepdim=True)  # per-query shift
        b = lk.amax(dim=(-2, -1), keepdim=True)  # per-(batch, head) key shift
        fq, fk = torch.exp(lq - a), torch.exp(lk - b)
        low_log = a + b - math.log(m)  # log of the factor that phi(q) . phi(k) carries
    c = low_log if low_log is not None else torch.zeros(B, H, L, 1, device=q.device)
    blocks = []
    if window > 0:
        # the window's exact scores, block by block of queries; c_i = max(low-rank scale, window max)
        for c0 in range(0, L, CHUNK):
            c1 = min(L, c0 + CHUNK)
            r0, r1 = max(0, c0 - window), min(L, c1 + window)
            s_blk = qf[:, :, c0:c1] @ kf[:, :, r0:r1].transpose(-1, -2) / math.sqrt(d)  # [B, H, C, R]
            off = torch.arange(r0, r1, device=q.device)[None, :] - torch.arange(c0, c1, device=q.device)[:, None]
            band = (off.abs() <= window)[None, None] & km[:, :, r0:r1, 0][:, :, None, :]
            s_blk = s_blk.masked_fill(~band, float("-inf"))
            blocks.append((c0, c1, r0, r1, s_blk, band))
            top = s_blk.amax(-1, keepdim=True)
            c_blk = c[:, :, c0:c1]
            c = c.clone() if c0 == 0 else c
            c[:, :, c0:c1] = top if low_log is None else torch.maximum(c_blk, top)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    if w is not None:
        scale = torch.exp(low_log - c)
        num = num + scale * (fq @ (fk.transpose(-1, -2) @ vf))
        den = den + scale * (fq @ fk.sum(-2)[..., None])
    for c0, c1, r0, r1, s_blk, band in blocks:
        e = torch.exp(s_blk - c[:, :, c0:c1])  # exact terms on the window, 0 off it
        if w is not None:  # minus the low-rank estimate there: the window is not counted twice
            e = e - scale[:, :, c0:c1] * (fq[:, :, c0:c1] @ fk[:, :, r0:r1].transpose(-1, -2)) * band
        num[:, :, c0:c1] += e @ vf[:, :, r0:r1]
        den[:, :, c0:c1] += e.sum(-1, keepdim=True)
    return num / den.clamp(min=torch.finfo(torch.float32).tiny)
