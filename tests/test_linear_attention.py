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


@pytest.mark.parametrize("chunk", [16, 128])
def test_a_window_covering_the_sequence_is_exact_and_scatterbrain_does_not_count_it_twice(chunk, monkeypatch):
    monkeypatch.setattr(la, "CHUNK", chunk)
    q, k, v, mask = _qkv(scale=1.0)
    ex = la.exact_attention(q, k, v, mask)
    w = la.orthogonal_features(16, 32, torch.Generator().manual_seed(1))
    assert rel(la.local_attention(q, k, v, 50, mask), ex) < 1e-5
    assert rel(la.scatterbrain_attention(q, k, v, w, 50, mask), ex) < 1e-5


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
              la.local_attention(q, k, v, 4, mask)):
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :, :40]).all()
