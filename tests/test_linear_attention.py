"""The post-training attention forms (lrcc/rewrites/linear_attention.py) against exact softmax
attention: exact where the law says exact, converging where it says unbiased."""
import pytest
import torch
import torch.nn.functional as F

from lrcc.rewrites import linear_attention as la


def _qkv(L=50, d=16, scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, L, d, generator=gen) * scale for _ in range(3))
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, 40:] = False  # padding in the second sequence
    return q, k, v, mask


def rel(a, b, rows=slice(None)):
    return ((a - b)[..., rows, :].norm() / b[..., rows, :].norm()).item()


def test_exact_attention_is_sdpa_with_the_key_mask():
    q, k, v, mask = _qkv()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(la.exact_attention(q, k, v, mask), ref)


@pytest.mark.parametrize("chunk,span", [(16, 1 << 19), (128, 1 << 19), (16, 1 << 8)])
def test_a_window_covering_the_sequence_is_exact_and_scatterbrain_does_not_count_it_twice(chunk, span, monkeypatch):
    monkeypatch.setattr(la, "CHUNK", chunk)
    monkeypatch.setattr(la, "SPAN_ELEMENTS", span)  # whole heads per span, or one block of one head
    q, k, v, mask = _qkv(scale=1.0)
    ex = la.exact_attention(q, k, v, mask)
    w = la.orthogonal_features(16, 32, torch.Generator().manual_seed(1))
    assert rel(la.local_attention(q, k, v, 50, mask), ex) < 1e-5
    assert rel(la.scatterbrain_attention(q, k, v, w, 50, mask), ex) < 1e-5
    assert rel(la.clustered_attention(q, k, v, 50, mask, clusters=3), ex) < 1e-5


def test_local_attention_matches_a_banded_softmax():
    q, k, v, mask = _qkv(scale=1.0)
    L, window = q.shape[2], 5
    band = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs() <= window
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band[None, None] & mask[:, None, None, :])
    assert rel(la.local_attention(q, k, v, window, mask), ref, slice(0, 40)) < 1e-5


def test_performer_converges_to_softmax_as_features_grow():
    q, k, v, mask = _qkv(scale=0.3)
    ex = la.exact_attention(q, k, v, mask)
    errs = [rel(la.performer_attention(q, k, v, la.orthogonal_features(16, m, torch.Generator().manual_seed(2)), mask),
                ex, slice(0, 40)) for m in (16, 256, 4096)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.05, errs


def test_orthogonal_features_are_orthogonal_within_a_block():
    w = la.orthogonal_features(16, 40, torch.Generator().manual_seed(0))
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.t(), torch.eye(16), atol=1e-5, rtol=0)
    assert w.shape == (40, 16)


def test_elu_attention_is_its_formula_and_ignores_padded_keys():
    q, k, v, mask = _qkv()
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    weights = (fq @ fk.transpose(-1, -2)) * mask[:, None, None, :]
    ref = (weights @ v) / weights.sum(-1, keepdim=True)
    assert rel(la.elu_attention(q, k, v, mask), ref) < 1e-5


def test_large_scores_do_not_overflow():
    q, k, v, mask = _qkv(scale=6.0)  # scores in the hundreds: exp would overflow without the shifts
    w = la.orthogonal_features(16, 64, torch.Generator().manual_seed(3))
    for y in (la.scatterbrain_attention(q, k, v, w, 4, mask), la.performer_attention(q, k, v, w, mask),
              la.local_attention(q, k, v, 4, mask), la.scatterbrain_attention(q, k, v, w, 4, mask, 6, clusters=3),
              la.clustered_attention(q, k, v, 4, mask, 6, clusters=3), la.clustered_attention(q, k, v, None, mask,
                                                                                              clusters=3)):
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :, :40]).all()


def test_a_sequence_of_padding_only_comes_out_as_zeros():
    q, k, v, mask = _qkv(scale=3.0)
    mask[1] = False
    w = la.orthogonal_features(16, 16, torch.Generator().manual_seed(3))
    segments = la.fit_linformer_segments(q, k, 5)
    for y in (la.performer_attention(q, k, v, w, mask), la.local_attention(q, k, v, 3, mask, 4, clusters=2),
              la.scatterbrain_attention(q, k, v, w, 3, mask, 4, clusters=2), la.elu_attention(q, k, v, mask),
              la.clustered_attention(q, k, v, 3, mask, 4, clusters=2), la.clustered_attention(q, k, v, None, mask),
              la.linformer_attention(q, k, v, segments, mask)):
        assert torch.isfinite(y).all() and (y[1] == 0).all() and (y[0] != 0).any()


def _favor_dense(q, k, w):
    """phi(q) phi(k)^T of FAVOR+, written out (float64): exp(w.x' - |x'|^2/2)/sqrt(m), x' = x/d^(1/4)."""
    d, m = q.shape[-1], w.shape[0]
    q, k, w = q.double() / d ** 0.25, k.double() / d ** 0.25, w.double()
    phi = lambda x: torch.exp(x @ w.t() - 0.5 * (x * x).sum(-1, keepdim=True)) / m ** 0.5  # noqa: E731
    return phi(q) @ phi(k).transpose(-1, -2)


def _support(q, k, window, n_global, mask, clusters=1):
    """Window | the global keys of each query's cluster, as a dense [B, H, L, L] mask."""
    L = q.shape[2]
    band = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs() <= window
    glob = torch.zeros(*q.shape[:3], L, dtype=torch.bool)
    if n_global:
        keys, cluster = la.select_global_keys(q, k, n_global, mask, clusters)
        glob.scatter_(-1, keys.gather(2, cluster[..., None].expand(-1, -1, -1, keys.shape[-1])), True)
    return (band[None, None] | glob) & mask[:, None, None, :]


@pytest.mark.parametrize("chunk,clusters,span", [(16, 1, 1 << 19), (128, 1, 1 << 19), (16, 4, 1 << 19), (16, 4, 1 << 10)])
def test_scatterbrain_is_exact_on_its_support_and_performer_off_it(chunk, clusters, span, monkeypatch):
    monkeypatch.setattr(la, "CHUNK", chunk)
    monkeypatch.setattr(la, "SPAN_ELEMENTS", span)  # whole heads per span, or runs of blocks of one head
    q, k, v, mask = _qkv(scale=0.7)
    w = la.orthogonal_features(16, 24, torch.Generator().manual_seed(4))
    support = _support(q, k, 3, 5, mask, clusters)
    s = q.double() @ k.double().transpose(-1, -2) / 4
    weights = torch.where(support, s.exp(), _favor_dense(q, k, w)) * mask[:, None, None, :]
    ref = (weights @ v.double()) / weights.sum(-1, keepdim=True)
    got = la.scatterbrain_attention(q, k, v, w, 3, mask, global_keys=5, clusters=clusters)
    assert rel(got.double(), ref) < 1e-5
    band_only = la.local_attention(q, k, v, 3, mask, global_keys=5, clusters=clusters)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=support)
    assert rel(band_only, ref, slice(0, 40)) < 1e-5


def _centroid_dense(q, k, mask, clusters):
    """exp(qbar . k_j / sqrt(d)) for query i of the cluster with centroid qbar, [B, H, L, L] (float64)."""
    centroids, cluster = la.cluster_queries(q, mask, clusters)
    s = centroids.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, c, L]
    return s.gather(2, cluster[..., None].expand(-1, -1, -1, k.shape[2])).exp()


@pytest.mark.parametrize("chunk,clusters,span", [(16, 1, 1 << 19), (128, 3, 1 << 19), (16, 4, 1 << 10)])
def test_clustered_is_exact_on_its_support_and_the_centroid_kernel_off_it(chunk, clusters, span, monkeypatch):
    monkeypatch.setattr(la, "CHUNK", chunk)
    monkeypatch.setattr(la, "SPAN_ELEMENTS", span)
    q, k, v, mask = _qkv(scale=0.7)
    s = (q.double() @ k.double().transpose(-1, -2) / 4).exp()
    for window, n_global in ((3, 5), (None, 5), (3, 0), (None, 0)):
        support = _support(q, k, -1 if window is None else window, n_global, mask, clusters)
        weights = torch.where(support, s, _centroid_dense(q, k, mask, clusters)) * mask[:, None, None, :]
        ref = (weights @ v.double()) / weights.sum(-1, keepdim=True)
        got = la.clustered_attention(q, k, v, window, mask, global_keys=n_global, clusters=clusters)
        assert rel(got.double(), ref) < 1e-5, (window, n_global)


def test_the_centroid_kernel_is_exact_for_queries_at_their_centroid():
    """Two groups of equal queries: each group's centroid is its query, so with no support at all
    the clustered form is exact attention; with one cluster for both groups it is not."""
    gen = torch.Generator().manual_seed(9)
    k, v = torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    q = torch.randn(1, 2, 2, 16, generator=gen).repeat_interleave(20, dim=2)
    ex = la.exact_attention(q, k, v)
    assert rel(la.clustered_attention(q, k, v, None, clusters=2), ex) < 1e-5
    assert rel(la.clustered_attention(q, k, v, None, clusters=1), ex) > 0.05


def test_clustered_budget_spends_exactly_the_budget():
    for b in (2, 8, 32, 64, 128):
        shape = la.clustered_budget(b)
        assert 2 * shape.window + 1 + shape.global_keys + 1 == b and shape.features == 0
        assert min(shape) >= 0 and shape.clusters == max(1, b // 8)
    with pytest.raises(la.LrccError, match="at least 2"):
        la.clustered_budget(1)


def test_scatterbrain_without_a_support_is_performer_and_performer_is_favor():
    q, k, v, mask = _qkv(scale=0.7)
    w = la.orthogonal_features(16, 24, torch.Generator().manual_seed(5))
    weights = _favor_dense(q, k, w) * mask[:, None, None, :]
    ref = (weights @ v.double()) / weights.sum(-1, keepdim=True)
    perf = la.performer_attention(q, k, v, w, mask)
    assert rel(perf.double(), ref) < 1e-5
    torch.testing.assert_close(la.scatterbrain_attention(q, k, v, w, None, mask), perf)


def test_global_keys_inside_the_window_are_not_counted_twice():
    q, k, v, mask = _qkv(scale=1.0)
    ex = la.exact_attention(q, k, v, mask)
    w = la.orthogonal_features(16, 16, torch.Generator().manual_seed(6))
    assert rel(la.local_attention(q, k, v, 50, mask, global_keys=10), ex) < 1e-5
    assert rel(la.scatterbrain_attention(q, k, v, w, 50, mask, global_keys=10), ex) < 1e-5
    assert rel(la.local_attention(q, k, v, None, mask, global_keys=50, clusters=3), ex) < 1e-5


def test_global_keys_rank_by_the_mean_query_and_skip_padding():
    q, k, _, mask = _qkv()
    keys, cluster = la.select_global_keys(q, k, 45, mask)
    assert keys.shape == (2, 3, 1, 45) and (cluster == 0).all()
    keys = keys[:, :, 0]
    assert (keys[1, :, :40] < 40).all() and (keys[1, :, 40:] >= 40).all()  # padded keys only after the 40 real ones
    assert keys[0, 0, 0] == (k[0, 0] @ q[0, 0].mean(0)).argmax()


def test_each_cluster_of_queries_gets_its_own_global_keys():
    gen = torch.Generator().manual_seed(8)
    u = torch.zeros(16)
    u[0] = 3.0
    q = torch.randn(1, 1, 40, 16, generator=gen) * 0.1
    q[0, 0, :20] += u  # two groups of queries, looking opposite ways
    q[0, 0, 20:] -= u
    k = torch.randn(1, 1, 40, 16, generator=gen) * 0.1
    k[0, 0, 7] += u
    k[0, 0, 31] -= u
    keys, cluster = la.select_global_keys(q, k, 1, clusters=2)
    assert cluster[0, 0, :20].unique().numel() == 1 and cluster[0, 0, 20:].unique().numel() == 1
    assert keys[0, 0, cluster[0, 0, 0], 0] == 7 and keys[0, 0, cluster[0, 0, 39], 0] == 31


def test_split_budget_spends_exactly_the_budget():
    for b in (8, 32, 64, 128):
        for share in (0.5, 0.75, 1.0):
            shape = la.split_budget(b, share)
            assert 2 * shape.window + 1 + shape.global_keys + shape.features == b
            assert min(shape) >= 0 and shape.clusters == b // 8


def test_linformer_with_one_segment_per_position_is_exact_attention_with_padding():
    q, k, v, mask = _qkv(scale=1.0)
    segments = la.fit_linformer_segments(q, k, 50, mask)
    assert segments.shape == (3, 51)
    assert rel(la.linformer_attention(q, k, v, segments, mask), la.exact_attention(q, k, v, mask)) < 1e-5


def test_linformer_fit_finds_blocks_of_equal_keys_and_is_then_exact():
    gen = torch.Generator().manual_seed(7)
    edges = [0, 3, 11, 12, 30, 50]
    keys = torch.randn(2, 3, len(edges) - 1, 16, generator=gen)
    k = torch.cat([keys[:, :, i:i + 1].expand(-1, -1, b - a, -1) for i, (a, b) in enumerate(zip(edges, edges[1:]))], 2)
    q, v = torch.randn(2, 3, 50, 16, generator=gen), torch.randn(2, 3, 50, 8, generator=gen)
    segments = la.fit_linformer_segments(q, k, len(edges) - 1)
    assert segments.tolist() == [edges] * 3
    assert rel(la.linformer_attention(q, k, v, segments), la.exact_attention(q, k, v)) < 1e-5


def test_linformer_ignores_padded_keys_and_refuses_another_length():
    q, k, v, mask = _qkv(scale=1.0)
    segments = la.fit_linformer_segments(q, k, 8, mask)
    y = la.linformer_attention(q, k, v, segments, mask)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 40:], v2[1, :, 40:] = 100.0, -100.0  # padding may hold anything
    torch.testing.assert_close(la.linformer_attention(q, k2, v2, segments, mask), y)
    ex = la.exact_attention(q, k, v, mask)
    errors = [rel(la.linformer_attention(q, k, v, la.fit_linformer_segments(q, k, n, mask), mask), ex, slice(0, 40))
              for n in (8, 25, 50)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors
    with pytest.raises(la.LrccError, match="fixed length"):
        la.linformer_attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], segments)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest(fn, L):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, L, 8, generator=gen) * 0.3 for _ in range(3))
    mask = torch.ones(1, L, dtype=torch.bool)
    with _LargestTensor() as mode:
        fn(q, k, v, mask)
    return mode.largest


def test_linear_forms_form_no_L_by_L_tensor(monkeypatch):
    monkeypatch.setattr(la, "SPAN_ELEMENTS", 1 << 12)  # spans of blocks far smaller than L x L / 32
    w = la.orthogonal_features(8, 16, torch.Generator().manual_seed(0))
    segments = torch.linspace(0, 1, 33)
    forms = {
        "elu+1": lambda q, k, v, m: la.elu_attention(q, k, v, m),
        "performer": lambda q, k, v, m: la.performer_attention(q, k, v, w, m),
        "local": lambda q, k, v, m: la.local_attention(q, k, v, 16, m, global_keys=8, clusters=4),
        "scatterbrain": lambda q, k, v, m: la.scatterbrain_attention(q, k, v, w, 16, m, global_keys=8, clusters=4),
        "clustered": lambda q, k, v, m: la.clustered_attention(q, k, v, 16, m, global_keys=8, clusters=4),
        "linformer": lambda q, k, v, m: la.linformer_attention(q, k, v, (segments * q.shape[2]).long(), m),
    }
    L = 4096
    assert _largest(lambda q, k, v, m: (q @ k.transpose(-1, -2)).softmax(-1) @ v, L) >= L * L  # it sees L x L
    for name, fn in forms.items():
        small, big = _largest(fn, L // 2), _largest(fn, L)
        assert big <= L * L // 32 and big <= 2 * small + 4096, (name, small, big)  # linear in L


def test_scatterbrain_beats_performer_on_a_real_minilm_layer():
    """Real text, 128 tokens, MiniLM's first layer, 32 entries per query: Scatterbrain (window +
    global keys exact, features elsewhere) has a lower attention-output error than Performer, and
    sparse + centroids (window + global keys exact, the centroid kernel elsewhere) has less than
    half Performer's and less than Scatterbrain's."""
    from lrcc.zoo import corpus, minilm

    sentences, _ = corpus.splits(200, 0)
    ids, mask = minilm.tokenizer().encode([" ".join(sentences[:40])], max_length=128)
    assert ids.shape[1] == 128
    model = minilm.load_minibert()
    att, box = model.layers[0].attn, {}
    hooks = [getattr(att, n).register_forward_hook(lambda mod, i, y, n=n: box.__setitem__(n, att._heads(y)))
             for n in ("q", "k", "v")]
    with torch.no_grad():
        model(ids, mask)
    for h in hooks:
        h.remove()
    q, k, v = box["q"], box["k"], box["v"]
    ex = la.exact_attention(q, k, v)
    shape, cl = la.split_budget(32), la.clustered_budget(32)
    perf, sb = [], []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        perf.append(rel(la.performer_attention(q, k, v, la.orthogonal_features(32, 32, gen)), ex))
        sb.append(rel(la.scatterbrain_attention(q, k, v, la.orthogonal_features(32, shape.features, gen),
                                                shape.window, global_keys=shape.global_keys,
                                                clusters=shape.clusters), ex))
    clustered = rel(la.clustered_attention(q, k, v, cl.window, global_keys=cl.global_keys, clusters=cl.clusters), ex)
    assert sum(sb) < sum(perf), (sb, perf)
    assert clustered < 0.5 * min(perf) and clustered < min(sb), (clustered, sb, perf)
