"""Attention normalisation (lrcc.ir.attention): however a model writes attention, import gives the one
canonical scaled_dot_product_attention node, with the right heads, scale and mask kind, and the lowered
graph computes what the model computes; what is not attention, or not provably equivalent, stays as
written (with the reason recorded)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrcc
from lrcc.codegen.torch_module import lower_to_torch
from lrcc.ir.attention import SDPA, attention_sites, attention_skipped
from lrcc.ir.from_torch import import_module
from lrcc.ir.graph import print_graph, verify
from lrcc.ir.serialize import graph_from_json, graph_to_json

pytestmark = pytest.mark.usefixtures("one_thread")

D, H = 16, 2          # model width and heads: head dim 8
HD = D // H
NEG = float("-inf")


def _padding(b: int, l: int, lengths: list[int]) -> torch.Tensor:
    """An int64 [B, L] attention mask: 1 for tokens, 0 for padding at the end."""
    m = torch.zeros(b, l, dtype=torch.long)
    for i, n in enumerate(lengths):
        m[i, :n] = 1
    return m


def _inputs(b: int, l: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, l, D, generator=gen), _padding(b, l, lengths)


EXAMPLE = _inputs(2, 5, [5, 3])
OTHER = _inputs(3, 7, [7, 2, 5], seed=1)  # another batch and length: B and L are symbolic


def _import(model: nn.Module, inputs: tuple):
    g, _ = import_module(model.eval(), inputs)
    verify(g)
    return g


def _ops(g, short: str) -> list[str]:
    return [n.name for n in g.nodes if n.op == "aten" and n.attrs["target"].split(".")[1] == short]


def _assert_same(model: nn.Module, g, *inputs_list) -> None:
    lowered = lower_to_torch(g)
    for inputs in inputs_list:
        with torch.no_grad():
            want, got = model(*inputs), lowered(*inputs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --- (a) hand-written attention ----------------------------------------------------------------------
class HandWritten(nn.Module):
    """softmax(q @ k^T ...) @ v in the usual spellings, heads split by view/transpose."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.register_buffer("tril", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        q, k, v = (p(x).view(b, l, H, HD).transpose(1, 2) for p in (self.q, self.k, self.v))
        keep = mask[:, None, None, :] != 0                                          # [B, 1, 1, L]
        additive = torch.zeros(b, 1, 1, l).masked_fill(~keep, NEG)
        causal = torch.triu(torch.full((l, l), NEG), diagonal=1)                    # [L, L]
        kt = k.transpose(-2, -1)
        s = {
            "mul_add": lambda: q @ kt * HD ** -0.5 + additive,
            "div": lambda: torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HD),
            "q_scaled": lambda: (q * HD ** -0.5) @ kt + additive,
            "no_scale": lambda: q @ kt,
            "masked_fill": lambda: (q @ kt / math.sqrt(HD)).masked_fill(mask[:, None, None, :] == 0, NEG),
            "where": lambda: torch.where(keep, q @ kt * 0.25, NEG),
            "causal_triu": lambda: q @ kt * HD ** -0.5 + causal,
            "causal_buffer": lambda: (q @ kt * HD ** -0.5).masked_fill(self.tril[:, :, :l, :l] == 0, NEG),
            "causal_padding": lambda: (q @ kt * HD ** -0.5 + causal).masked_fill(~keep, NEG),
        }[self.variant]()
        y = torch.softmax(s, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, l, D))


HAND_WRITTEN = {  # variant: (scale, mask kind, mask dtype)
    "mul_add": (HD ** -0.5, "padding", "float"),
    "div": (1 / math.sqrt(HD), "none", None),
    "q_scaled": (HD ** -0.5, "padding", "float"),
    "no_scale": (1.0, "none", None),
    "masked_fill": (1 / math.sqrt(HD), "padding", "bool"),
    "where": (0.25, "padding", "bool"),
    "causal_triu": (HD ** -0.5, "causal", "float"),
    "causal_buffer": (HD ** -0.5, "causal", "bool"),
    "causal_padding": (HD ** -0.5, "causal+padding", "float"),
}


@pytest.mark.parametrize("variant", sorted(HAND_WRITTEN))
def test_hand_written_attention_becomes_sdpa(variant: str) -> None:
    torch.manual_seed(0)
    model = HandWritten(variant).eval()
    g = _import(model, EXAMPLE)
    scale, kind, mask_dtype = HAND_WRITTEN[variant]
    sites = attention_sites(g)
    assert len(sites) == 1, print_graph(g)
    site = sites[0]
    assert (site.heads, site.head_dim, site.value_dim) == (H, HD, HD)
    assert site.form == "softmax" and site.mask_kind == kind and site.causal == (kind == "causal")
    assert site.scale == pytest.approx(scale, rel=1e-6)
    assert (site.seq_q, site.seq_k) == ("L", "L")
    assert g[site.name].attrs["attention"]["mask_dtype"] == mask_dtype
    assert (site.mask is None) == (kind == "none")
    # q, k, v are the head-split projections, and nothing of the written-out form is left
    assert [g[n].attrs["target"] for n in (site.q, site.k, site.v)] == ["aten.transpose.int"] * 3
    assert _ops(g, "softmax") == [] and _ops(g, "matmul") == []
    assert attention_skipped(g) == []
    _assert_same(model, g, EXAMPLE, OTHER)


def test_causal_mask_is_checked_at_every_length() -> None:
    """A causal mask built from the symbolic length stays causal (and exact) at other lengths."""
    torch.manual_seed(0)
    model = HandWritten("causal_triu").eval()
    g = _import(model, EXAMPLE)
    assert attention_sites(g)[0].causal
    _assert_same(model, g, *(_inputs(2, n, [n, max(1, n - 2)], seed=n) for n in (1, 2, 9, 16)))


class BandMask(HandWritten):
    """A constant mask that is not causal (a band): must not be called causal."""

    def forward(self, x, mask):
        b, l, _ = x.shape
        q, k, v = (p(x).view(b, l, H, HD).transpose(1, 2) for p in (self.q, self.k, self.v))
        i = torch.arange(l)
        band = (i[None, :] - i[:, None]).abs() <= 1
        y = torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~band, NEG), -1) @ v
        return self.o(y.transpose(1, 2).reshape(b, l, D))


def test_non_causal_constant_mask_is_general() -> None:
    torch.manual_seed(0)
    model = BandMask("no_scale").eval()
    g = _import(model, EXAMPLE)
    (site,) = attention_sites(g)
    assert site.mask_kind == "general" and not site.causal
    _assert_same(model, g, EXAMPLE, OTHER)


class PermutedHeads(nn.Module):
    """Heads split by reshape/permute, k^T formed by the permute itself, scale on q and k."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, mask):
        b, l, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.reshape(b, l, H, HD).permute(0, 2, 1, 3) * HD ** -0.25
        kt = k.reshape(b, l, H, HD).permute(0, 2, 3, 1) * HD ** -0.25     # [B, H, d, L]
        v = v.reshape(b, l, H, HD).permute(0, 2, 1, 3)
        a = torch.softmax(q @ kt, dim=-1) @ v
        return self.o(a.permute(0, 2, 1, 3).reshape(b, l, D))


def test_reshape_permute_heads_and_a_given_k_transpose() -> None:
    torch.manual_seed(0)
    model = PermutedHeads().eval()
    g = _import(model, EXAMPLE)
    (site,) = attention_sites(g)
    assert (site.heads, site.head_dim, site.mask_kind) == (H, HD, "none")
    assert site.scale == pytest.approx(HD ** -0.5, rel=1e-6)
    assert "k^T given directly" in g[site.name].attrs["attention"]["written"]
    assert g[site.k].attrs["target"] == "aten.transpose.int"  # k^T transposed back to k
    _assert_same(model, g, EXAMPLE, OTHER)


class SingleHead(nn.Module):
    """Rank-3 attention without heads: becomes rank 4 with one head."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))

    def forward(self, x, mask):
        q, k, v = self.q(x), self.k(x), self.v(x)
        s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(D)
        s = s.masked_fill(mask[:, None, :] == 0, NEG)
        return torch.bmm(torch.softmax(s, dim=2), v)


def test_rank3_attention_gets_one_head() -> None:
    torch.manual_seed(0)
    model = SingleHead().eval()
    g = _import(model, EXAMPLE)
    (site,) = attention_sites(g)
    assert (site.heads, site.head_dim, site.mask_kind) == (1, D, "padding")
    assert len(g[site.q].shape) == 4 and len(g[site.mask].shape) == 4
    _assert_same(model, g, EXAMPLE, OTHER)


# --- (b) F.scaled_dot_product_attention --------------------------------------------------------------
class Sdpa(nn.Module):
    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, mask):
        b, l, _ = x.shape
        q, k, v = (t.view(b, l, H, HD).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if self.variant == "mask":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :])
        elif self.variant == "causal":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.variant == "scale":
            a = F.scaled_dot_product_attention(q, k, v, scale=0.1)
        else:  # heads merged into the batch: rank 3
            a = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)).view(b, H, l, HD)
        return self.o(a.transpose(1, 2).reshape(b, l, D))


SDPA_CASES = {  # variant: (scale, mask kind, causal)
    "mask": (HD ** -0.5, "padding", False),
    "causal": (HD ** -0.5, "causal", True),
    "scale": (0.1, "none", False),
    "rank3": (HD ** -0.5, "none", False),
}


@pytest.mark.parametrize("variant", sorted(SDPA_CASES))
def test_sdpa_is_recognised(variant: str) -> None:
    torch.manual_seed(0)
    model = Sdpa(variant).eval()
    g = _import(model, EXAMPLE)
    scale, kind, causal = SDPA_CASES[variant]
    (site,) = attention_sites(g)
    assert (site.heads, site.head_dim, site.form) == (H, HD, "sdpa")
    assert (site.mask_kind, site.causal) == (kind, causal)
    assert site.scale == pytest.approx(scale, rel=1e-6)
    assert len(g[site.q].shape) == 4
    _assert_same(model, g, EXAMPLE, OTHER)


def test_sdpa_arguments_are_kept_as_written() -> None:
    """An SDPA call already in rank 4 is only described: its node prints exactly as imported."""
    torch.manual_seed(0)
    model = Sdpa("mask").eval()
    plain, _ = import_module(model, EXAMPLE, normalize=False)
    g = _import(model, EXAMPLE)
    assert print_graph(g) == print_graph(plain)


# --- (c) nn.MultiheadAttention -----------------------------------------------------------------------
class Mha(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool, causal: bool = False, weights_out: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 4, batch_first=batch_first)
        self.batch_first, self.need_weights, self.causal, self.weights_out = batch_first, need_weights, causal, weights_out

    def forward(self, x, mask):
        pad = mask == 0                                           # True = ignore this key
        x = x if self.batch_first else x.transpose(0, 1)
        l = x.shape[1] if self.batch_first else x.shape[0]
        cm = nn.Transformer.generate_square_subsequent_mask(l) if self.causal else None
        y, w = self.attn(x, x, x, key_padding_mask=pad.float().masked_fill(pad, NEG) if self.causal else pad,
                         attn_mask=cm, need_weights=self.need_weights)
        y = y if self.batch_first else y.transpose(0, 1)
        return (y, w) if self.weights_out else y


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention(batch_first: bool, need_weights: bool) -> None:
    """Eval-mode export: need_weights=True writes bmm/baddbmm/softmax with heads in the batch dim (its
    averaged weights unused), need_weights=False calls SDPA; both become the same canonical node."""
    torch.manual_seed(0)
    model = Mha(batch_first, need_weights).eval()
    g = _import(model, EXAMPLE)
    (site,) = attention_sites(g)
    assert (site.heads, site.head_dim, site.mask_kind, site.causal) == (4, 4, "padding", False)
    assert site.form == ("softmax" if need_weights else "sdpa") and site.source == "nn.MultiheadAttention"
    assert site.scale == pytest.approx(0.5, rel=1e-6)
    assert _ops(g, "softmax") == [] and _ops(g, "mean") == []  # the unused averaged weights are gone too
    assert len(g[site.q].shape) == 4 and g[site.q].shape[1] == 4
    _assert_same(model, g, EXAMPLE, OTHER)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_causal_and_padding(need_weights: bool) -> None:
    torch.manual_seed(0)
    model = Mha(True, need_weights, causal=True).eval()
    g = _import(model, EXAMPLE)
    (site,) = attention_sites(g)
    assert site.mask_kind == "causal+padding" and not site.causal
    _assert_same(model, g, EXAMPLE, OTHER)


def test_multihead_attention_weights_returned_stay_as_written() -> None:
    torch.manual_seed(0)
    model = Mha(True, True, weights_out=True).eval()
    g = _import(model, EXAMPLE)
    assert attention_sites(g) == [] and len(_ops(g, "softmax")) == 1
    (skip,) = attention_skipped(g)
    assert "also used" in skip["reason"]
    lowered = lower_to_torch(g)
    with torch.no_grad():
        for got, want in zip(lowered(*EXAMPLE), model(*EXAMPLE)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --- (d) BERT-style attention ------------------------------------------------------------------------
def test_minilm_attention_is_recognised() -> None:
    from lrcc.zoo.minilm import BertConfig, MiniBert

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    model = MiniBert(cfg).eval()
    ids = torch.randint(0, 64, (2, 6))
    g = _import(model, (ids, _padding(2, 6, [6, 4])))
    sites = attention_sites(g)
    assert len(sites) == 2
    for s in sites:
        assert (s.heads, s.head_dim, s.mask_kind, s.form, s.causal) == (4, 8, "padding", "sdpa", False)
        assert s.scale == pytest.approx(8 ** -0.5)
    assert g[sites[0].mask].dtype == torch.bool
    _assert_same(model, g, (ids, _padding(2, 6, [6, 4])), (torch.randint(0, 64, (3, 9)), _padding(3, 9, [9, 1, 5])))


class HfBertSelfAttention(nn.Module):
    """HF BERT's eager self-attention (transpose_for_scores, extended additive mask, dropout module)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size = H, HD
        self.all_head_size = D
        self.query, self.key, self.value = (nn.Linear(D, D) for _ in range(3))
        self.dropout = nn.Dropout(0.1)

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_x_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extended = (1.0 - attention_mask[:, None, None, :].to(hidden_states.dtype)) * torch.finfo(hidden_states.dtype).min
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        attention_scores = attention_scores + extended
        attention_probs = self.dropout(nn.functional.softmax(attention_scores, dim=-1))
        context_layer = torch.matmul(attention_probs, value_layer).permute(0, 2, 1, 3).contiguous()
        return context_layer.view(context_layer.size()[:-2] + (self.all_head_size,))


def test_hf_bert_like_hand_written_attention() -> None:
    torch.manual_seed(0)
    model = HfBertSelfAttention().eval()
    g = _import(model, EXAMPLE)
    (site,) = attention_sites(g)
    assert (site.heads, site.head_dim, site.mask_kind, site.form) == (H, HD, "padding", "softmax")
    assert site.scale == pytest.approx(1 / math.sqrt(HD))
    _assert_same(model, g, EXAMPLE, OTHER)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_bert(impl: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                                  intermediate_size=32, max_position_embeddings=32, attn_implementation=impl)
    bert = transformers.BertModel(cfg, add_pooling_layer=False).eval()

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    model = Encoder().eval()
    example = (torch.randint(0, 64, (2, 6)), _padding(2, 6, [6, 4]))
    g = _import(model, example)
    sites = attention_sites(g)
    assert [(s.heads, s.head_dim, s.mask_kind) for s in sites] == [(H, HD, "padding")] * 2
    assert {s.form for s in sites} == {"softmax" if impl == "eager" else "sdpa"}
    _assert_same(model, g, example, (torch.randint(0, 64, (3, 9)), _padding(3, 9, [9, 1, 5])))


# --- not attention, or not provably equivalent -------------------------------------------------------
class NotAttention(nn.Module):
    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))

    def forward(self, x, mask):
        b, l, _ = x.shape
        q, k, v = (p(x).view(b, l, H, HD).transpose(1, 2) for p in (self.q, self.k, self.v))
        s = q @ k.transpose(-2, -1) / math.sqrt(HD)
        additive = torch.zeros(b, 1, 1, l).masked_fill(mask[:, None, None, :] == 0, NEG)
        if self.variant == "wrong_dim":
            y = torch.softmax(s, dim=-2) @ v
        elif self.variant == "no_softmax":
            y = s @ v
        elif self.variant == "mask_after_softmax":
            y = (torch.softmax(s, dim=-1) * mask[:, None, None, :]) @ v
        elif self.variant == "active_dropout":
            y = F.dropout(torch.softmax(s, dim=-1), 0.1, training=True) @ v
        elif self.variant == "finite_fill":
            y = torch.softmax(s.masked_fill(mask[:, None, None, :] == 0, -1e9), dim=-1) @ v
        elif self.variant == "scale_after_mask":
            y = torch.softmax((s + additive) * 0.5, dim=-1) @ v
        elif self.variant == "sdpa_dropout":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        else:  # a classifier's softmax
            return torch.softmax(x.sum(1), dim=-1)
        return y.transpose(1, 2).reshape(b, l, D)


NOT_ATTENTION = {  # variant: what the recorded reason says (None: nothing attention-like to report)
    "wrong_dim": "not the last (key) dim",
    "no_softmax": None,
    "mask_after_softmax": "not a product with the values",
    "active_dropout": "training mode",
    "finite_fill": "not -inf",
    "scale_after_mask": "scaled after the mask",
    "sdpa_dropout": "dropout_p=0.5",
    "classifier": None,
}


@pytest.mark.parametrize("variant", sorted(NOT_ATTENTION))
def test_not_matched(variant: str) -> None:
    torch.manual_seed(0)
    model = NotAttention(variant).eval()
    g = _import(model, EXAMPLE)
    assert attention_sites(g) == []
    plain, _ = import_module(model, EXAMPLE, normalize=False)
    assert print_graph(g) == print_graph(plain)  # left exactly as written
    reasons = [s["reason"] for s in attention_skipped(g)]
    if NOT_ATTENTION[variant] is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and NOT_ATTENTION[variant] in reasons[0], reasons
    if variant not in ("active_dropout", "sdpa_dropout"):  # random: nothing to compare
        _assert_same(model, g, EXAMPLE, OTHER)


# --- the graph stays a graph -------------------------------------------------------------------------
def test_normalised_graph_serialises() -> None:
    torch.manual_seed(0)
    model = Mha(True, True, causal=True).eval()
    g = _import(model, EXAMPLE)
    data = json.loads(json.dumps(graph_to_json(g)))
    g2 = graph_from_json(data, g.tensors)
    verify(g2)
    assert print_graph(g2) == print_graph(g)
    assert attention_sites(g2) == attention_sites(g)
    assert [n.name for n in g.nodes if n.op == "aten" and n.attrs["target"] == SDPA] == [attention_sites(g)[0].name]


class Block(nn.Module):
    """A pre-norm transformer block with hand-written, padding-masked attention."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x, mask):
        b, l, _ = x.shape
        q, k, v = (t.view(b, l, H, HD).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        s = (q @ k.transpose(-2, -1) / math.sqrt(HD)).masked_fill(mask[:, None, None, :] == 0, NEG)
        x = x + self.o((torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, l, D))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


def test_compile_end_to_end(tmp_path) -> None:
    torch.manual_seed(0)
    model = Block().eval()
    batches = [_inputs(4, n, [n] * 3 + [max(1, n - 3)], seed=10 + n) for n in (5, 6, 7, 8, 6, 5, 7, 8)]
    cm = lrcc.compile(model, EXAMPLE, budget=lrcc.Budget(params=0.8), calibration=batches)
    (site,) = attention_sites(cm.graph)
    assert (site.heads, site.mask_kind, site.form) == (H, "padding", "softmax")
    x, mask = OTHER
    with torch.no_grad():
        y, want = cm(x, mask), model(x, mask)
    assert y.shape == want.shape and torch.isfinite(y).all()
    assert float(F.cosine_similarity(y.flatten(1), want.flatten(1)).mean()) > 0.9
    cm.save(tmp_path / "out")
    cm2 = lrcc.load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(cm2(x, mask), y)
    assert attention_sites(cm2.graph) == attention_sites(cm.graph)
