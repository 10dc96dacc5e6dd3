"""Cheaper forms of softmax attention, post-training (no retraining), in plain torch.

Each function computes non-causal multi-head attention of q, k: [B, H, L, d], v: [B, H, L, dv]
with an optional key mask [B, L]: bool (True = attend) or float, added to every query's scores
(-inf, or anything at or below the dtype's lowest value, masks the key) — the same contract as
``F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])``. Rows of queries
whose keys are all masked come out as zeros. A float mask is a per-key bias b_j: every form weighs
key j by exp(b_j) (added to its log-features, exact scores or pooling weights).
``approximate_attention`` is what a rewritten graph calls: SDPA's arguments and one form.

Every form except ``exact_attention`` runs in memory linear in L: no L x L tensor is formed (the
sparse parts work on blocks of queries, a span of blocks at a time, the low-rank parts keep an m x dv state).

Laws:
- Linear attention (Katharopoulos et al. 2020, arXiv:2006.16236): with a feature map phi,
  softmax(q k^T) v ~ phi(q) (phi(k)^T v) / (phi(q) . sum_j phi(k_j)), O(L) time and memory.
  elu(x) + 1 is the simplest positive map (it changes the kernel: not an estimate of softmax).
- Performer FAVOR+ (Choromanski et al. 2021, arXiv:2009.14794): with x' = x / d^(1/4) and w_r
  drawn orthogonal Gaussian, phi(x)_r = exp(w_r . x' - |x'|^2 / 2) / sqrt(m) gives
  E[phi(q) . phi(k)] = exp(q . k / sqrt(d)): an unbiased, positive estimate of softmax's kernel.
- Scatterbrain (Chen et al. 2021, arXiv:2110.15343): sparse + low-rank. On a sparse support S
  use the exact exp(q . k) minus the low-rank estimate, elsewhere the low-rank estimate, so the
  support is not counted twice: on S the result is exact, off S it is Performer's. The paper
  finds S by LSH; here S is a local window plus a few global keys per sequence, head and cluster
  of queries (below). Numerator and normaliser are accumulated on a per-query scale exp(-c_i),
  c_i the larger of the row's largest exact score on S and the log of the row's low-rank total,
  with phi(k) shifted per feature and phi(q) per query so that each has a largest entry of 1:
  nothing overflows and the low-rank total is never below its scale (the normaliser in log space).
- Global keys (as Longformer's and BigBird's global tokens, but chosen per sequence and head at
  run time): the queries are grouped by a few Lloyd iterations of k-means (as the Routing
  Transformer routes them, Roy et al. 2021, arXiv:2003.05997), and each group's global keys are
  the keys with the largest score against its centroid qbar. By Jensen,
  log mean_{i in group} exp(q_i . k_j / sqrt(d)) >= qbar . k_j / sqrt(d): the ranking is by a
  lower bound of a key's mean unnormalised attention from that group. One group ranks by the mean
  query. Choosing costs O(L d clusters (iterations + 1)) time and O(L + clusters n) memory.
- Sparse + centroids (the "clustered" form): Scatterbrain's combination with the cluster
  centroid's kernel as the low-rank part, as improved clustered attention (Vyas et al. 2020,
  arXiv:2007.04825) keeps each cluster's top keys exact and gives the rest the centroid's
  attention: off the support, query i of cluster c weighs key j by exp(qbar_c . k_j / sqrt(d)).
  That matrix has rank <= clusters (phi(q_i) the one-hot of i's cluster, phi(k_j)_c =
  exp(qbar_c . k_j / sqrt(d))), so it runs through the same code as FAVOR+, and it is exact for a
  query at its centroid. FAVOR+'s estimate has relative variance exp(|q + k|^2 / sqrt(d)) - 1
  per entry, and |q + k|^2 / sqrt(d) averages 9 to 27 (by layer) over MiniLM's pairs of queries and
  keys on real text; the centroid kernel has no variance, only the bias
  of exp((q_i - qbar_c) . k_j / sqrt(d)) ~ 1, small where the clusters are tight. Post-training:
  the clusters are found per sequence at run time (the same k-means as the global keys').
- Linformer (Wang et al. 2020, arXiv:2006.04768): softmax(q (E K)^T) (F V) with E, F: n x L,
  attention over n projected keys, O(L n). Post-training we fit E = F = segment averaging
  (row s of E averages the keys of a contiguous segment of positions) with a log(count) logit
  term, so that segments of one position are exact and n = L is exact attention. The segment
  boundaries are fitted on calibration sequences by dynamic programming to minimise the
  within-segment scatter of the keys as the queries see them, sum_j (k_j - kbar)^T C_q
  (k_j - kbar) / d with C_q the queries' second moment: the second-order Jensen gap between
  log sum_j exp(q . k_j / sqrt(d)) and log n + q . kbar / sqrt(d). Keys with zero scatter in a
  segment make the pooling exact (both the normaliser and the average of the values).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import LrccError


def orthogonal_features(d: int, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """m x d random features: blocks of orthonormal rows (QR of Gaussians), each row rescaled to
    the norm of a Gaussian vector (FAVOR+'s orthogonal random features)."""
    q, _ = torch.linalg.qr(torch.randn(math.ceil(m / d), d, d, generator=generator, dtype=torch.float64))
    w = q.transpose(-1, -2).reshape(-1, d)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).float()


def _log_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """log phi(x) * sqrt(m): w . x' - |x'|^2 / 2 with x' = x / d^(1/4)."""
    xf, d = x.float(), x.shape[-1]
    sq = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)  # one pass over x, not three
    return (xf @ (w.t().to(xf) / d ** 0.25)).sub_(sq.square_().mul_(0.5 / d ** 0.5))


def _valid_keys(mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
    """[B, 1, L] bool, True where a key may be attended."""
    return _key_bias(mask, k)[0]


def _key_bias(mask: torch.Tensor | None, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([B, 1, L] bool, True where a key may be attended; [B, 1, L] float bias added to its scores,
    -inf where masked, or None for a bool mask)."""
    if mask is None:
        return torch.ones(k.shape[0], 1, k.shape[2], dtype=torch.bool, device=k.device), None
    if mask.shape != (k.shape[0], k.shape[2]):
        raise LrccError(f"attention: key mask is {tuple(mask.shape)}, expected [B, L] = "
                        f"{[k.shape[0], k.shape[2]]}")
    if mask.dtype == torch.bool:
        return mask[:, None, :], None
    if not mask.dtype.is_floating_point:
        raise LrccError(f"attention: key mask must be bool or floating point, got {mask.dtype}")
    bias = mask.float()
    bias = bias.masked_fill(bias <= torch.finfo(mask.dtype).min, float("-inf"))[:, None, :]
    return bias > float("-inf"), bias


def _key_weights(mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
    """[B, 1, L] weights exp(b_j - max_j b_j) (0 where masked; the common factor cancels between
    numerator and normaliser), or the valid keys as 0/1 for a bool mask."""
    valid, bias = _key_bias(mask, k)
    if bias is None:
        return valid.float()
    top = bias.amax(-1, keepdim=True)
    return torch.exp(bias - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))


def exact_attention(q, k, v, mask=None):
    """Softmax attention (the reference; forms the L x L scores)."""
    attn = None if mask is None else mask[:, None, None, :]
    attn = attn if attn is None or attn.dtype == torch.bool else attn.float()
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn)


def elu_attention(q, k, v, mask=None, eps: float = 1e-6):
    """Linear attention with phi = elu + 1, O(L)."""
    km = _key_weights(mask, k)[..., None]
    fq, fk = F.elu(q.float()).add_(1), F.elu(k.float()).add_(1).mul_(km)  # (in place: elu made them)
    kv = fk.transpose(-1, -2) @ v.float()
    z = fk.sum(-2)[..., None]
    return (fq @ kv).div_((fq @ z).add_(eps))


def performer_attention(q, k, v, w: torch.Tensor, mask=None):
    """FAVOR+ with the random features w (m x d), O(L m)."""
    return _sparse_plus_low_rank(q, k, v, mask, None, 0, 1, w=w)


def local_attention(q, k, v, window: int | None, mask=None, global_keys: int = 0, clusters: int = 1):
    """Exact softmax restricted to keys within `window` positions of the query (2 window + 1 keys;
    None for no window) plus `global_keys` keys per cluster of queries (select_global_keys);
    O(L (window + global_keys))."""
    return _sparse_plus_low_rank(q, k, v, mask, window, global_keys, clusters, w=None)


def scatterbrain_attention(q, k, v, w: torch.Tensor, window: int | None, mask=None, global_keys: int = 0,
                           clusters: int = 1):
    """Sparse support (local window of radius `window`, None for none, plus `global_keys` keys per
    cluster of queries) exact, FAVOR+ low-rank with the features w elsewhere, the support not
    counted twice."""
    return _sparse_plus_low_rank(q, k, v, mask, window, global_keys, clusters, w=w)


def clustered_attention(q, k, v, window: int | None, mask=None, global_keys: int = 0, clusters: int = 1):
    """Sparse support (local window of radius `window`, None for none, plus `global_keys` keys per
    cluster of queries) exact, elsewhere the centroid kernel of the query's cluster (a rank-clusters
    low-rank part: exp(qbar . k_j / sqrt(d)) for every query of the cluster), the support not
    counted twice; O(L (window + global_keys + clusters))."""
    return _sparse_plus_low_rank(q, k, v, mask, window, global_keys, clusters, w=None, centroid=True)


def cluster_queries(q, mask=None, clusters: int = 1, iterations: int = 2):
    """([B, H, c, d] centroids, [B, H, L] each query's cluster), c = min(clusters, L): `iterations`
    Lloyd steps of k-means (assign each query to the nearest centroid, move each centroid to the
    mean of its queries at unpadded positions) started from evenly spaced queries."""
    if clusters < 1 or iterations < 1:
        raise LrccError(f"cluster_queries: need clusters >= 1 and iterations >= 1, got {clusters}, {iterations}")
    L = q.shape[2]
    valid = _valid_keys(mask, q)  # [B, 1, L] (queries and keys share the positions)
    qf, weights = q.float(), valid[..., None].float()
    clusters = min(clusters, L)
    centroids = qf[:, :, torch.linspace(0, L - 1, clusters).round().long()]  # [B, H, c, d]
    assign = torch.zeros(qf.shape[:3], dtype=torch.long, device=q.device)
    for _ in range(iterations):
        dist = (centroids * centroids).sum(-1)[..., None, :] - 2 * qf @ centroids.transpose(-1, -2)  # - |q|^2
        assign = dist.argmin(-1)  # [B, H, L]
        member = F.one_hot(assign, clusters).float() * weights  # [B, H, L, c]
        count = member.sum(-2)[..., None]
        centroids = torch.where(count > 0, member.transpose(-1, -2) @ qf / count.clamp(min=1), centroids)
    return centroids, assign


def centroid_scores(centroids, k, mask=None) -> torch.Tensor:
    """[B, H, c, L]: each centroid's scores qbar . k_j / sqrt(d) plus the keys' bias, -inf at
    masked keys: the log of the centroid kernel exp(qbar . k_j / sqrt(d) + b_j)."""
    valid, bias = _key_bias(mask, k)  # [B, 1, L]
    score = centroids @ k.float().transpose(-1, -2) / math.sqrt(k.shape[-1])
    if bias is not None:
        score = score + bias[:, :, None, :]
    return score.masked_fill(~valid[:, :, None, :], float("-inf"))


def select_global_keys(q, k, n: int, mask=None, clusters: int = 1, iterations: int = 2):
    """Global keys per cluster of queries: ([B, H, clusters, n] key indices, [B, H, L] each
    query's cluster). Queries are clustered by cluster_queries; a cluster's keys are the n with
    the largest score against its centroid, padded keys last (they are never attended)."""
    centroids, assign = cluster_queries(q, mask, clusters, iterations)
    return centroid_scores(centroids, k, mask).topk(min(n, q.shape[2]), dim=-1).indices, assign


class ScatterbrainBudget(NamedTuple):
    window: int  # radius: 2 window + 1 keys
    global_keys: int  # per cluster of queries
    clusters: int
    features: int


def split_budget(budget: int, sparse_share: float = 0.75) -> ScatterbrainBudget:
    """Scatterbrain's shape for `budget` entries per query: about sparse_share of them exact keys
    (2 window + 1 window keys and the global keys, about half and half), the rest random
    features; keys + features = budget exactly. Queries fall into budget / 8 clusters, so that
    choosing the global keys (two k-means steps and the centroids' scores: 3 dot products per
    cluster and query) costs about 3 budget / 8 head-size dot products per query, against the
    budget's 1 to 2 per entry."""
    sparse = max(1, min(budget, round(budget * sparse_share)))
    radius = sparse // 4
    return ScatterbrainBudget(radius, sparse - (2 * radius + 1), max(1, budget // 8), budget - sparse)


def clustered_budget(budget: int) -> ScatterbrainBudget:
    """The clustered form's shape for `budget` entries per query: budget - 1 exact keys (a window of
    about half of them, the rest global keys) and one entry for the query's cluster's state (its
    centroid kernel's sum_j k(qbar, k_j) v_j and sum_j k(qbar, k_j), read once per query); queries
    fall into budget / 8 clusters, as split_budget's."""
    if budget < 2:
        raise LrccError(f"clustered_budget: need a budget of at least 2 entries per query, got {budget}")
    sparse = budget - 1
    radius = sparse // 4
    return ScatterbrainBudget(radius, sparse - (2 * radius + 1), max(1, budget // 8), 0)


CHUNK = 128  # the most queries per block (blocks are the least power of two above the window's radius)
MIN_BLOCK = 16  # the fewest: smaller blocks make products too small to run well
GLOBAL_BLOCK = 32  # queries per block of the global-key part, every block's queries of one cluster
# A span of blocks is computed in one set of batched products with about this many scores in flight:
# small enough to stay in cache (larger spans run slower on CPUs), large enough that operator
# launches are few; memory O(SPAN_ELEMENTS) per step, O(L) in all.
SPAN_ELEMENTS = 1 << 18
# exp's arguments are clamped here: exp(-60) ~ 1e-26 is negligible beside the row's largest term, 1
EXP_FLOOR = -60.0


def window_block(window: int | None) -> int:
    """Queries per block for a window of radius `window` (None: no window, CHUNK): the least power
    of two above it (at least MIN_BLOCK, at most CHUNK). A block scores block + 2 window keys, so
    about 1.5x the 2 window + 1 each query needs once the block reaches the radius."""
    return CHUNK if window is None else max(MIN_BLOCK, min(CHUNK, 1 << max(0, window).bit_length()))


class BlockLayout(NamedTuple):
    """How _sparse_plus_low_rank lays out the rows of each of the B H heads: `pad` blocks of zero
    rows, the L rows padded to `real` whole blocks, `pad` more blocks; `blocks` = real + 2 pad in
    all. With pad blocks at least the radius long, each block's window (its rows from radius before
    to radius after) stays inside its own head, so the windows of all blocks of all heads are one
    strided view of the keys."""
    block: int
    real: int
    pad: int
    blocks: int


def block_layout(L: int, window: int | None) -> BlockLayout:
    C = window_block(window)
    real = -(-L // C)
    pad = -(-window // C) if window else 0
    return BlockLayout(C, real, pad, real + 2 * pad)


def spans(B: int, H: int, lay: BlockLayout, per_query: int) -> list[tuple[int, int, int, int]]:
    """The spans of blocks computed together: (first head, last head + 1, first block, last block + 1)
    over the B H heads (heads of one batch element at a time), so that a span holds about
    SPAN_ELEMENTS scores (per_query per query), at least one block. Whole heads (the pad blocks
    included) when a head fits, else runs of one head's real blocks."""
    n = max(1, SPAN_ELEMENTS // max(1, lay.block * per_query))  # blocks per span
    if n >= lay.blocks:
        heads = n // lay.blocks
        return [(b * H + h, b * H + min(H, h + heads), 0, lay.blocks) for b in range(B) for h in range(0, H, heads)]
    first, last = lay.pad, lay.pad + lay.real
    return [(bh, bh + 1, p, min(last, p + n)) for bh in range(B * H) for p in range(first, last, n)]


class Partial(NamedTuple):
    """A part of the support's share of attention, per query: sum_j e_j v_j and sum_j e_j with
    e_j = exp(s_j - c) (minus the low-rank estimate, for Scatterbrain) over the part's keys, on the
    query's own scale c (-inf where the part has nothing). Parts merge as flash attention's do."""
    c: torch.Tensor    # [..., L, 1]
    num: torch.Tensor  # [..., L, dv]
    den: torch.Tensor  # [..., L, 1]


def _global_part(qs, kf, vf, valid, bias, keys_of, cluster, r: int | None, low) -> Partial:
    """The global keys' part. qs: [N, L, d] queries (scale applied), kf, vf: [N, L, e] over N = B H
    heads; valid, bias: [N, L] (bias None for none); keys_of: [N, c, g] each cluster's keys; cluster:
    [N, L] each query's; r: the window's radius (its keys are left to the window part) or None;
    low: None, or (fq, fk [N, L, m], low_log [N, L, 1], z [N, m, 1]) for Scatterbrain's correction.
    The queries are sorted by (head, cluster) into blocks of GLOBAL_BLOCK of one cluster each (a
    cluster's last block part empty), so each block scores only its cluster's g keys: g per query,
    not c g as scoring every cluster's keys and masking would."""
    N, L, d = qs.shape
    n_c, g = keys_of.shape[1:]
    Cg, dev, dv = GLOBAL_BLOCK, qs.device, vf.shape[-1]
    group = (torch.arange(N, device=dev)[:, None] * n_c + cluster).flatten()  # [N L]: (head, cluster)
    order = torch.sort(group, stable=True).indices  # query rows, grouped
    counts = torch.bincount(group, minlength=N * n_c)
    nblocks = (counts + Cg - 1) // Cg
    first_block = torch.cumsum(nblocks, 0) - nblocks
    first_row = torch.cumsum(counts, 0) - counts
    sg = group[order]
    NB = int(nblocks.sum())
    empty = N * L  # empty slots write to this extra row (and read row 0)
    ids = torch.full((NB * Cg,), empty, dtype=torch.long, device=dev)
    ids[first_block[sg] * Cg + torch.arange(N * L, device=dev) - first_row[sg]] = order
    reads = torch.where(ids < empty, ids, torch.zeros_like(ids)).view(NB, Cg)
    ids = ids.view(NB, Cg)
    block_group = torch.repeat_interleave(torch.arange(N * n_c, device=dev), nblocks)  # [NB]
    head = block_group // n_c
    keys = keys_of.reshape(N * n_c, g)[block_group] + (head * L)[:, None]  # [NB, g] rows of [N L, e]

    def rows(x, at):  # x [N, L, e] at flat rows `at` [n, k]: [n, k, e] (one index per row)
        return x.reshape(N * L, -1).index_select(0, at.flatten()).view(*at.shape, x.shape[-1])

    key_add = torch.zeros(N, L, 1, device=dev) if bias is None else bias[..., None]
    key_add = key_add.masked_fill(~valid[..., None], float("-inf"))
    if low is not None:
        fq, fk, low_log, z = low
        z = z[head]  # [NB, m, 1]
    c_all = torch.full((N * L + 1, 1), float("-inf"), device=dev)
    num_all, den_all = torch.zeros(N * L + 1, dv, device=dev), torch.zeros(N * L + 1, 1, device=dev)
    step = max(1, SPAN_ELEMENTS // (Cg * g))
    for j0 in range(0, NB, step):
        j1 = min(NB, j0 + step)
        qi, ki = reads[j0:j1], keys[j0:j1]  # [n, Cg], [n, g]
        s = torch.baddbmm(rows(key_add, ki).transpose(-1, -2), rows(qs, qi), rows(kf, ki).transpose(-1, -2))
        if r is not None:  # a global key inside the query's window is left to the window part
            s = s.masked_fill_(((ki % L)[:, None, :] - (qi % L)[:, :, None]).abs_() <= r, float("-inf"))
        c = s.amax(-1, keepdim=True)  # [n, Cg, 1]
        if low is not None:  # (as in the main part: the correction stays on the query's scale)
            fqi, lowi = rows(fq, qi), rows(low_log, qi)
            c = torch.maximum(c, torch.log(fqi @ z[j0:j1]) + lowi)
        cc = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        sup = torch.isfinite(s)
        e = (s - cc).clamp_(min=EXP_FLOOR).exp_()
        if low is not None:
            e = e.sub_((fqi @ rows(fk, ki).transpose(-1, -2)).mul_(torch.exp(lowi - cc)))
        e = e.mul_(sup)
        at = ids[j0:j1].flatten()
        c_all.index_copy_(0, at, c.reshape(-1, 1))
        num_all.index_copy_(0, at, (e @ rows(vf, ki)).reshape(-1, dv))
        den_all.index_copy_(0, at, e.sum(-1).reshape(-1, 1))
    return Partial(c_all[:-1].view(N, L, 1), num_all[:-1].view(N, L, dv), den_all[:-1].view(N, L, 1))


def _sparse_plus_low_rank(q, k, v, mask, window: int | None, global_keys: int, clusters: int,
                          w: torch.Tensor | None, centroid: bool = False):
    """Shared body: exact scores on the support (window and global keys), off it FAVOR+ (if w) or
    the centroid kernel of the query's cluster (if centroid), or nothing.
    Queries go in blocks (block_layout); the window part of a block scores its keys from `window`
    before its first query to `window` after its last, a strided view of the padded keys (no copy);
    a span of blocks (spans) is one set of batched products. The global keys come as a Partial
    (_global_part), merged per query."""
    if window is not None and window < 0:
        raise LrccError(f"attention: window must be >= 0 (or None for no window), got {window}")
    if global_keys < 0:
        raise LrccError(f"attention: global_keys must be >= 0, got {global_keys}")
    B, H, L, d = q.shape
    dv, BH = v.shape[-1], B * H
    qf, kf, vf = q.float(), k.float(), v.float()
    valid, bias = _key_bias(mask, k)  # [B, 1, L]
    tiny = torch.finfo(torch.float32).tiny
    m = 0
    scores = cluster = None
    if global_keys > 0 or centroid:  # the queries' clusters and their centroids' scores [B, H, c, L]
        centroids, cluster = cluster_queries(qf, mask, clusters)
        scores = centroid_scores(centroids, kf, mask)
    low = w is not None or centroid
    if low:
        if centroid:  # features: phi(q) the one-hot of q's cluster, phi(k)_c = exp(qbar_c . k / sqrt(d) + b)
            m = scores.shape[2]
            lk = scores.transpose(-1, -2)  # (bias and padding already in)
            lq = torch.full((B, H, L, m), float("-inf"), device=q.device).scatter_(-1, cluster[..., None], 0.0)
            log_scale = 0.0
        else:
            m = w.shape[0]
            lk = _log_features(kf, w)
            if bias is not None:  # exp(b_j) phi(k_j): the bias joins the key's log-features
                lk = lk + bias[..., None]
            lk = lk.masked_fill(~valid[..., None], float("-inf"))  # [B, H, L, m]
            lq, log_scale = _log_features(qf, w), -math.log(m)
        b = lk.amax(-2, keepdim=True)  # per-feature key shift: each feature's largest phi(k) becomes 1
        b = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
        lq = lq + b  # the shift moves to the query side
        a = lq.amax(-1, keepdim=True)  # per-query shift: each query's largest phi(q) becomes 1
        fq, fk = torch.exp(lq - a), torch.exp(lk - b)
        kv, z = fk.transpose(-1, -2) @ vf, fk.sum(-2)[..., None]  # [B, H, m, dv], [B, H, m, 1]
        if window is None and global_keys == 0:  # low-rank alone: O(L m) in one step
            return (fq @ kv).div_((fq @ z).clamp_(min=tiny))  # all keys padding: kv = 0, so 0
        low_log = a + log_scale  # phi(q_i) . phi(k_j) = exp(low_log_i) fq_i . fk_j, [B, H, L, 1]
        kv, z = kv.reshape(BH, m, dv), z.reshape(BH, m, 1)
    r = None if window is None else min(window, L - 1)
    lay = block_layout(L, r)
    C, P = lay.block, lay.blocks
    Lh, front = P * C, lay.pad * C  # rows per head; where its L rows start

    def layout(x, edge: int = 0):  # [B, H, L, e] -> [edge + B H Lh + edge, e], head h's rows at edge + h Lh + front
        e = x.shape[-1]
        buf = x.new_zeros(BH * Lh + 2 * edge, e)
        buf[edge:edge + BH * Lh].view(BH, Lh, e)[:, front:front + L] = x.reshape(BH, L, e)
        return buf

    qs = qf / math.sqrt(d)  # the scores' scale, applied once
    qb = layout(qs).view(BH, Lh, d)
    fqb, lowb = (layout(fq).view(BH, Lh, m), layout(low_log).view(BH, Lh, 1)) if low else (None, None)
    glob = None
    if global_keys > 0:
        keys_of = scores.topk(min(global_keys, L), dim=-1).indices  # [B, H, c, g] (select_global_keys)
        parts = None if not low else (fq.reshape(BH, L, m), fk.reshape(BH, L, m), low_log.reshape(BH, L, 1), z)
        glob = _global_part(qs.reshape(BH, L, d), kf.reshape(BH, L, d), vf.reshape(BH, L, dv),
                            valid.expand(B, H, L).reshape(BH, L),
                            None if bias is None else bias.expand(B, H, L).reshape(BH, L),
                            keys_of.reshape(BH, *keys_of.shape[2:]), cluster.reshape(BH, L), r, parts)
        glob = Partial(*(layout(x.view(B, H, L, -1)).view(BH, Lh, -1) for x in glob))
    per_query = 0
    if r is not None:
        R = C + 2 * r  # keys per block: r before its first query to r after its last

        def windows(x):  # block G's keys, [B H P, R, e]: a strided view of the rows padded by r at both ends
            e = x.shape[-1]
            return layout(x, r).as_strided((BH * P, R, e), (C * e, e, 1))

        k_win, v_win = windows(kf), windows(vf)
        fk_win = windows(fk) if low else None
        ok = torch.zeros(B, Lh + 2 * r, dtype=torch.bool, device=q.device)
        ok[:, r + front:r + front + L] = valid[:, 0]
        off = torch.arange(R, device=q.device)[None, :] - torch.arange(C, device=q.device)[:, None]
        sup_win = (off >= 0) & (off <= 2 * r) & ok.unfold(-1, R, C)[:, :, None, :]  # [B, P, C, R]
        # what the window's scores get added: the key's bias on the support, -inf off it
        add_win = torch.zeros(B, P, 1, R, device=q.device) if bias is None else \
            F.pad(bias[:, 0], (r + front, r + Lh - front - L)).unfold(-1, R, C)[:, :, None, :]
        add_win = add_win.masked_fill(~sup_win, float("-inf"))
        sup_win = sup_win.float()
        per_query += R
    out = torch.empty(BH, Lh, dv, device=q.device)
    for h0, h1, p0, p1 in spans(B, H, lay, max(per_query, dv)):
        nh, n = h1 - h0, p1 - p0
        G0, G1, S, s0, s1 = h0 * P + p0, (h1 - 1) * P + p1, n * C, p0 * C, p1 * C
        c = num = den = None
        if r is not None:  # the window's scores [nh, S, R], -inf off the support
            s = (qb[h0:h1, s0:s1].reshape(nh * n, C, d) @ k_win[G0:G1].transpose(-1, -2)).view(nh, n, C, R)
            s = s.add_(add_win[h0 // H, p0:p1]).view(nh, S, R)
            c = s.amax(-1, keepdim=True)
        if low:  # the row's low-rank total / exp(low_log): >= 1 (the feature where fq is 1 has a
            fqc, lowc = fqb[h0:h1, s0:s1], lowb[h0:h1, s0:s1]
            low_den = fqc @ z[h0:h1]  # key where fk is 1), or 0 when every key is padding
            low_c = torch.log(low_den) + lowc
            c = low_c if c is None else torch.maximum(c, low_c)
        if glob is not None:
            gc = glob.c[h0:h1, s0:s1]
            c = gc if c is None else torch.maximum(c, gc)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        if low:
            scale = torch.where(low_den > 0, torch.exp(lowc - c), torch.zeros_like(low_den))
            num, den = scale * (fqc @ kv[h0:h1]), scale * low_den
        if r is not None:
            # exact terms on the support (s <= c there), 0 off it. exp runs several times slower on
            # -inf and on results below float32's normal range, hence the clamp and the product
            e = (s - c).clamp_(min=EXP_FLOOR).exp_()
            if low:  # minus the low-rank estimate there: the support is not counted twice
                pairs = (fqc.reshape(nh * n, C, m) @ fk_win[G0:G1].transpose(-1, -2)).view(nh, S, R)
                e = e.sub_(pairs.mul_(scale))
            e = e.mul_(sup_win[h0 // H, p0:p1].view(1, S, R))
            wv = (e.view(nh * n, C, R) @ v_win[G0:G1]).view(nh, S, dv)
            num, den = (wv, e.sum(-1, keepdim=True)) if num is None else (num + wv, den + e.sum(-1, keepdim=True))
        if glob is not None:  # the global keys' partial, moved to this scale (0 where it had nothing)
            f = torch.exp(gc - c)
            gn, gd = glob.num[h0:h1, s0:s1] * f, glob.den[h0:h1, s0:s1] * f
            num, den = (gn, gd) if num is None else (num + gn, den + gd)
        out[h0:h1, s0:s1] = num / den.clamp(min=tiny)
    return out[:, front:front + L].reshape(B, H, L, dv)


def fit_linformer_segments(q, k, n_segments: int, mask=None) -> torch.Tensor:
    """Linformer projections fitted on calibration queries and keys q, k: [N, H, L, d] (N
    sequences): [H, n_segments + 1] segment boundaries per head (0 first, L last), minimising the
    within-segment key scatter as the queries see it (module docstring). Fitting costs O(L^2)
    memory and O(n L^2) time per head, once; the attention itself is O(L n)."""
    _, H, L, d = k.shape
    if n_segments < 1:
        raise LrccError(f"fit_linformer_segments: n_segments must be >= 1, got {n_segments}")
    if q.shape[:3] != k.shape[:3]:
        raise LrccError(f"fit_linformer_segments: q {tuple(q.shape)} and k {tuple(k.shape)} must share N, H, L")
    if n_segments >= L:
        return torch.arange(L + 1).expand(H, L + 1).clone()
    valid = _valid_keys(mask, k)[:, 0].double()  # [N, L]
    bounds = torch.empty(H, n_segments + 1, dtype=torch.long)
    for h in range(H):
        qh, kh = q[:, h].double(), k[:, h].double()
        second = torch.einsum("nli,nlj,nl->ij", qh, qh, valid) / valid.sum().clamp(min=1)  # C_q
        lam, U = torch.linalg.eigh(second)
        x = kh @ (U * lam.clamp(min=0).sqrt()) / math.sqrt(d)  # |x_i - x_j|^2 = (k_i - k_j)^T C_q (k_i - k_j) / d
        bounds[h] = _segment_dp(x, valid, n_segments)
    return bounds


def _segment_dp(x: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Boundaries of the n contiguous segments of positions minimising the summed scatter of x
    ([N, L, e], per sequence, over valid positions only)."""
    N, L, _ = x.shape
    zero = lambda t: torch.cat([torch.zeros_like(t[:, :1]), t], 1)  # noqa: E731
    xm = x * valid[..., None]
    p0 = zero(valid.cumsum(1))  # [N, L + 1] counts
    p1 = zero((xm * x).sum(-1).cumsum(1))  # squared norms
    p2 = zero(xm.cumsum(1))  # [N, L + 1, e] sums
    cost = torch.zeros(L + 1, L + 1, dtype=torch.float64)  # cost[a, b]: one segment [a, b)
    for i in range(N):
        gram = p2[i] @ p2[i].t()
        sq = gram.diagonal()
        sum_sq = sq[:, None] + sq[None, :] - 2 * gram
        count = (p0[i][None, :] - p0[i][:, None]).clamp(min=1)
        cost += (p1[i][None, :] - p1[i][:, None]) - sum_sq / count
    a, b = torch.meshgrid(torch.arange(L + 1), torch.arange(L + 1), indexing="ij")
    cost = cost.clamp(min=0).masked_fill(a >= b, float("inf"))
    best = cost[0].clone()  # best[b]: positions [0, b) in t segments
    choice = torch.zeros(n + 1, L + 1, dtype=torch.long)
    for t in range(2, n + 1):
        total = best[:, None] + cost
        best, choice[t] = total.min(0)
    out = [L]
    for t in range(n, 1, -1):
        out.append(int(choice[t, out[-1]]))
    out.append(0)
    return torch.tensor(out[::-1])


def linformer_attention(q, k, v, segments: torch.Tensor, mask=None):
    """Linformer with E = F = segment averaging (fit_linformer_segments), O(L n): softmax over the
    n segment-mean keys with a log(count) logit, averaged values; padded keys are left out of the
    means and counts, so a segment of padding gets no attention."""
    B, H, L, d = q.shape
    bounds = segments if segments.dim() == 2 else segments.expand(H, -1)
    if bounds.shape[0] != H:
        raise LrccError(f"linformer_attention: segments are fitted for {bounds.shape[0]} heads, q has {H}")
    if (bounds[:, 0] != 0).any() or (bounds[:, -1] != L).any():
        raise LrccError(f"linformer_attention: the segments cover positions [0, {int(bounds[:, -1].max())}) but the "
                        f"sequence has L={L}; Linformer's projections are for one fixed length: fit them "
                        f"(fit_linformer_segments) on calibration sequences of length {L}, or pad to it with a mask")
    n = bounds.shape[1] - 1
    inner = bounds[:, 1:-1].to(q.device)  # [H, n - 1]: each position's segment counts the bounds at or below it
    seg = (torch.arange(L, device=q.device)[None, :, None] >= inner[:, None, :]).sum(-1)[None, :, :, None]  # [1, H, L, 1]
    valid = _key_weights(mask, k)[..., None]  # [B, 1, L, 1]: exp(b_j) up to a common factor, 0 if masked
    kf, vf = k.float() * valid, v.float() * valid

    def pool(x):
        return torch.zeros(B, H, n, x.shape[-1], device=q.device).scatter_add_(2, seg.expand(B, H, L, x.shape[-1]), x)

    count = pool(valid.expand(B, H, L, 1))  # [B, H, n, 1]: the segment's summed key weight
    tiny = torch.finfo(torch.float32).tiny
    kbar, vbar = pool(kf) / count.clamp(min=tiny), pool(vf) / count.clamp(min=tiny)
    logits = q.float() @ kbar.transpose(-1, -2) / math.sqrt(d) + torch.log(count).transpose(-1, -2)
    top = logits.amax(-1, keepdim=True)
    e = torch.exp(logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    return (e @ vbar) / e.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


FORMS = ("performer", "elu", "window", "scatterbrain", "clustered", "linformer")


def sdpa_form_inputs(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None):
    """(q with SDPA's scale folded in for the forms' 1/sqrt(d), the key mask [B, L]) from SDPA's
    arguments; a mask that varies over heads or queries has no O(L) form and is refused."""
    d = q.shape[-1]
    if scale is not None and scale * math.sqrt(d) != 1:  # the forms divide scores by sqrt(d): fold the scale into q
        q = q * (scale * math.sqrt(d))
    mask = None
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.shape[1] != 1 or m.shape[2] != 1:
            raise LrccError(f"approximate_attention: the mask {tuple(attn_mask.shape)} varies over heads or queries; "
                            "only a key mask [B, 1, 1, L] has an O(L) form")
        mask = m[:, 0, 0, :].expand(k.shape[0], k.shape[2])
    return q, mask


def approximate_attention(q, k, v, attn_mask=None, param=None, *, form: str, scale: float | None = None,
                          window: int | None = None, global_keys: int = 0, clusters: int = 1):
    """What a rewritten attention site computes: SDPA's q, k, v and attn_mask (a key mask that is the
    same for every query and head, broadcastable to [B, 1, 1, L]; bool or additive float), in one of
    FORMS. param: the form's tensor (Performer's and Scatterbrain's random features, m x d;
    Linformer's segment boundaries, H x (n + 1)), None for elu, window and clustered. The result has q's dtype."""
    if form not in FORMS:
        raise LrccError(f"approximate_attention: unknown form {form!r}; one of {', '.join(FORMS)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise LrccError(f"approximate_attention: q, k, v must be [B, H, L, d], got {tuple(q.shape)}, "
                        f"{tuple(k.shape)}, {tuple(v.shape)}")
    q, mask = sdpa_form_inputs(q, k, attn_mask, scale)
    if form == "performer":
        out = performer_attention(q, k, v, param, mask)
    elif form == "elu":
        out = elu_attention(q, k, v, mask)
    elif form == "window":
        out = local_attention(q, k, v, window, mask, global_keys, clusters)
    elif form == "scatterbrain":
        out = scatterbrain_attention(q, k, v, param, window, mask, global_keys, clusters)
    elif form == "clustered":
        out = clustered_attention(q, k, v, window, mask, global_keys, clusters)
    else:
        out = linformer_attention(q, k, v, param, mask)
    return out.to(q.dtype)
