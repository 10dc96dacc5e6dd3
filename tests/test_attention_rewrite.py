"""Attention rewrites end to end: guards, costs symbolic in L, the planner's choice, save/load.

The models are small random BERT-style encoders (lrcc.zoo.minilm.MiniBert with tiny sizes), so the
whole file runs in well under a minute; the real MiniLM at L = 128 is in test_minilm.py.
"""
from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrcc
from lrcc.errors import LrccError
from lrcc.ir.from_torch import import_module
from lrcc.rewrites import approximate_attention, linformer_attention, match
from lrcc.rewrites import linear_attention as la
from lrcc.targets import get_target
from lrcc.targets.cost import attention_cost, crossover_length
from lrcc.zoo.minilm import BertConfig, MiniBert

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=1024)


def _encoder() -> MiniBert:
    torch.manual_seed(0)
    return MiniBert(CFG).eval()


def _batch(i: int, length: int, bsz: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    ids = torch.randint(0, CFG.vocab_size, (bsz, length), generator=g)
    mask = torch.ones(bsz, length, dtype=torch.long)
    mask[-1, length // 2 + i % 5:] = 0  # one padded sequence per batch
    return ids, mask


# --- float masks: every form weighs a key by exp(bias) -------------------------------------------------
@pytest.mark.parametrize("kind", ["min", "inf", "bias"])
def test_float_key_masks_match_sdpa(kind) -> None:
    torch.manual_seed(1)
    B, H, L, d = 2, 2, 19, 8
    q, k, v = torch.randn(B, H, L, d), torch.randn(B, H, L, d), torch.randn(B, H, L, d)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 11:] = False
    low = torch.finfo(torch.float32).min if kind == "min" else float("-inf")
    mask = torch.zeros(B, L).masked_fill(~keep, low)
    if kind == "bias":  # an arbitrary per-key bias as well as masked keys
        mask = mask + torch.randn(B, L)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    # the forms with every key in their exact support are exact attention
    assert torch.allclose(la.local_attention(q, k, v, L, mask), ref, atol=1e-5)
    assert torch.allclose(la.scatterbrain_attention(q, k, v, la.orthogonal_features(d, 4), L, mask), ref, atol=1e-5)
    assert torch.allclose(la.linformer_attention(q, k, v, torch.arange(L + 1), mask), ref, atol=1e-5)
    # global keys alone, all of them: exact as well
    assert torch.allclose(la.local_attention(q, k, v, None, mask, global_keys=L, clusters=2), ref, atol=1e-5)
    assert torch.allclose(la.clustered_attention(q, k, v, L, mask, clusters=2), ref, atol=1e-5)
    assert torch.allclose(la.clustered_attention(q, k, v, None, mask, global_keys=L, clusters=2), ref, atol=1e-5)
    # the centroid kernel off a partial support weighs key j by exp(qbar . k_j / sqrt(d) + b_j)
    centroids, cluster = la.cluster_queries(q, mask, 2)
    s = (centroids @ k.transpose(-1, -2) / d ** 0.5 + mask[:, None, None, :]).gather(
        2, cluster[..., None].expand(-1, -1, -1, L))
    band = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs() <= 2
    e = torch.where(band, q @ k.transpose(-1, -2) / d ** 0.5 + mask[:, None, None, :], s).exp()
    assert torch.allclose(la.clustered_attention(q, k, v, 2, mask, clusters=2), (e @ v) / e.sum(-1, keepdim=True),
                          atol=1e-5)
    # elu + 1 weighs key j by exp(b_j): check against the formula
    w = torch.exp(mask.masked_fill(mask <= torch.finfo(torch.float32).min, float("-inf")))[:, None, :, None]
    fq, fk = F.elu(q) + 1, (F.elu(k) + 1) * w
    want = (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2)[..., None])
    assert torch.allclose(la.elu_attention(q, k, v, mask), want, atol=1e-5)


def test_approximate_attention_scale_and_mask_layout() -> None:
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 5)
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[0, ..., 7:] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    got = la.approximate_attention(q, k, v, keep, None, form="window", scale=0.3, window=10)
    assert torch.allclose(got, ref, atol=1e-5)
    with pytest.raises(LrccError, match="varies over heads or queries"):
        la.approximate_attention(q, k, v, keep.expand(2, 3, 10, 10), None, form="window", window=3)
    with pytest.raises(LrccError, match="unknown form"):
        la.approximate_attention(q, k, v, None, None, form="nope")


# --- costs symbolic in L and the crossover ---------------------------------------------------------------
def test_costs_are_symbolic_in_length() -> None:
    L = sympy.Symbol("L", positive=True, integer=True)
    exact = attention_cost("exact", {}, 1, 12, L, L, 32, 32)
    perf = attention_cost("performer", {"features": 64}, 1, 12, L, L, 32, 32)
    assert sympy.degree(exact.flops, L) == 2 and sympy.degree(perf.flops, L) == 1
    lin = attention_cost("linformer", {"segments": 64}, 1, 12, L, L, 32, 32)
    assert sympy.degree(lin.flops, L) == 1
    with pytest.raises(LrccError, match="unknown form"):
        attention_cost("magic", {}, 1, 1, L, L, 1, 1)


@pytest.mark.parametrize("target", ["cpu", "a100"])
@pytest.mark.parametrize("form,knobs", [("performer", {"features": 64}), ("elu", {}),
                                        ("window", {"window": 15, "global_keys": 0, "clusters": 1}),
                                        ("clustered", {"window": 7, "global_keys": 16, "clusters": 4}),
                                        ("linformer", {"segments": 64})])
def test_crossover_is_where_the_form_starts_to_win(target, form, knobs) -> None:
    tgt = get_target(target)
    cross = crossover_length(form, knobs, tgt, 12, 32, 32)
    assert cross is not None and cross > 1

    def lat(f, kn, L):
        return attention_cost(f, kn, 1, 12, L, L, 32, 32).latency(tgt, {})
    assert lat(form, knobs, cross) < lat("exact", {}, cross)
    assert lat(form, knobs, cross - 1) >= lat("exact", {}, cross - 1)
    assert lat(form, knobs, 4 * cross) < lat("exact", {}, 4 * cross)
    # more features cost more: the crossover moves out
    if form == "performer":
        assert crossover_length(form, {"features": 128}, tgt, 12, 32, 32) > cross


# --- guards: never a silently wrong mask ------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, y):
        B, L, _ = x.shape
        heads = lambda t: t.view(t.shape[0], t.shape[1], 2, 8).transpose(1, 2)  # noqa: E731
        src = y if self.mode == "cross" else x
        q, k, v = heads(self.q(x)), heads(self.k(src)), heads(self.v(src))
        if self.mode == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mode == "general":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=(y @ x.transpose(1, 2))[:, None] > 0)
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("mode,reason", [("causal", "causal mask"), ("general", "mask is general"),
                                         ("cross", "cross-attention")])
def test_guards_leave_unsupported_attention_exact(mode, reason) -> None:
    x = torch.randn(2, 6, 16)
    y = torch.randn(2, 7 if mode == "cross" else 6, 16)
    g, _ = import_module(_Attn(mode).eval(), (x, y))
    m = match(g, [approximate_attention])
    assert not m.candidates
    assert len(m.rejected) == 1 and reason in m.rejected[0][2], m.rejected


def test_linformer_needs_a_fixed_length() -> None:
    model = _encoder()
    g, _ = import_module(model, _batch(0, 24))
    m = match(g, [linformer_attention])
    assert not m.candidates and all("dynamic" in why for _, _, why in m.rejected)


# --- the planner: a latency budget, the choice, the compiled model ------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    model = _encoder()
    L = 1024
    cal = [_batch(i, L, 1) for i in range(6)]
    cm = lrcc.compile(model, cal[0], budget=lrcc.Budget(latency=0.9), calibration=cal,
                      options={"attention_features": (16,), "attention_budgets": (16,), "sensitivity_samples": 8})
    return model, cm, cal


def test_latency_budget_replaces_attention(compiled) -> None:
    model, cm, cal = compiled
    rows = {r["site"]: r for r in cm.report.rows}
    att = [r for s, r in rows.items() if s in ("layers.0.attn", "layers.1.attn")]
    assert len(att) == 2
    chosen = [r for r in att if r["rule"] == "approximate_attention"]
    assert chosen, att
    for r in chosen:
        assert r["est_latency_s"] < r["est_latency_before_s"]
    t = cm.report.totals
    assert t["model_latency_after_s"] <= 0.9 * t["model_latency_before_s"] * (1 + 1e-9)
    # the compiled graph computes the chosen form: the approximate node's own function
    names = [n.attrs["attention"]["approximation"] for n in cm.graph.nodes if "approximation" in n.attrs.get("attention", {})]
    assert sorted(names) == sorted(r["choice"] for r in chosen)
    with torch.no_grad():
        y = cm(*cal[1])
    assert torch.isfinite(y).all() and y.shape == model(*cal[1]).shape
    assert cm.report.verification["rel_error"] < 0.5
    # the crossover table covers the compile target and the GPU targets
    forms = cm.report.attention[0]["forms"]
    assert {"cpu", "a100", "h100"} <= set(forms[0]["crossover"])
    assert "attention crossovers" in str(cm.report)


def test_rewritten_attention_saves_and_loads(compiled, tmp_path) -> None:
    _, cm, cal = compiled
    cm.save(tmp_path / "m")
    cm2 = lrcc.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(cm2(*cal[2]), cm(*cal[2]))
    with pytest.raises(LrccError, match="no ONNX operator"):
        cm.save(tmp_path / "o", format="onnx")


def test_short_sequences_keep_attention_exact() -> None:
    """At L = 16 no form is estimated faster than exact attention: the planner says so, with the
    crossover, and spends the latency budget elsewhere."""
    model = _encoder()
    cal = [_batch(i, 16, 4) for i in range(4)]
    cm = lrcc.compile(model, cal[0], budget=lrcc.Budget(latency=0.99), calibration=cal,
                      options={"attention_features": (16,), "attention_budgets": (16,)})
    kept = {d["site"]: d["reason"] for d in cm.report.rejected if d["rule"] == "planner"}
    assert set(kept) == {"layers.0.attn", "layers.1.attn"}
    cross = min(f["crossover"]["cpu"] for f in cm.report.attention[0]["forms"] if f["crossover"]["cpu"])
    for why in kept.values():
        assert "at L=16" in why and f"from L={cross}" in why, why
    assert cross > 16
    assert all(n.attrs.get("target") != "lrcc.rewrites.linear_attention.approximate_attention" for n in cm.graph.nodes)


def test_fixed_length_offers_fitted_linformer() -> None:
    model = _encoder()
    L = 1024
    cal = [_batch(i, L, 1) for i in range(4)]
    cm = lrcc.compile(model, cal[0], budget=lrcc.Budget(latency=0.95), calibration=cal,
                      options={"fixed_length": True, "attention_forms": (), "linformer_segments": (16,),
                               "sensitivity_samples": 8})
    lin = [r for r in cm.report.rows if r["rule"] == "linformer_attention"]
    assert lin, [(r["site"], r["choice"]) for r in cm.report.rows]
    seg = [cm.graph.tensors[k] for k in cm.graph.tensors if k.endswith("attention_linformer")]
    assert seg and all(s.shape == (CFG.num_attention_heads, 17) for s in seg)
    assert all(bool((s[:, 0] == 0).all() and (s[:, -1] == L).all()) for s in seg)
    with pytest.raises(LrccError, match="compiled for size 1024 in dim 1"):
        with torch.no_grad():
            cm(*_batch(9, L // 2))


@pytest.mark.parametrize("form", ["performer", "scatterbrain", "clustered"])
def test_gpu_lowering_runs_the_triton_kernel(form) -> None:
    """GPU targets lower Performer, Scatterbrain and sparse + centroids sites to the Triton kernel
    (here in the interpreter); it computes what the torch form computes."""
    from lrcc.codegen.torch_module import lower_to_torch
    from lrcc.codegen.triton.scatterbrain import approximate_attention_triton
    from lrcc.rewrites.attention import replace_attention

    from .conftest import device
    model = _encoder()
    x = _batch(3, 40)
    g, _ = import_module(model, x)
    m = match(g, [approximate_attention], {"attention_features": (16,), "attention_budgets": (32,)})
    for site, cands in m.candidates.items():
        c = next(c for c in cands if c.knobs["form"] == form)
        replace_attention(g, c.node, c, c.spectrum(None))
    cpu, gpu = lower_to_torch(g), lower_to_torch(g, gpu=True)
    fns = {type(mod).__name__: mod.fn for mod in gpu.modules() if hasattr(mod, "fn")}
    assert approximate_attention_triton in fns.values(), fns
    with torch.no_grad():
        want = cpu(*x)
        got = gpu.to(device())(*(t.to(device()) for t in x)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form,knobs", [
    ("performer", {"features": 4}), ("elu", {}), ("linformer", {"segments": 8}),
    ("window", {"window": 3, "global_keys": 0, "clusters": 1}),
    ("window", {"window": None, "global_keys": 5, "clusters": 2}),
    ("scatterbrain", {"window": 3, "global_keys": 5, "clusters": 2, "features": 4}),
    ("clustered", {"window": 3, "global_keys": 5, "clusters": 2}),
    ("clustered", {"window": None, "global_keys": 0, "clusters": 3})])
def test_traced_host_costs_extrapolate_in_length(form, knobs, monkeypatch) -> None:
    """The CPU cost of a form (bytes moved, operators launched) is counted from lrcc's torch code at
    two lengths and taken linear in L: at a longer length it must match a fresh count. (Spans small
    enough that these small heads need several, as MiniLM's do at these lengths: the launches grow
    with the spans, a step function the line follows once there are several.)"""
    from lrcc.targets.cost import _Traffic, traced_attention
    monkeypatch.setattr(la, "SPAN_ELEMENTS", 1 << 12)
    traced = traced_attention.__wrapped__(form, tuple(sorted(knobs.items())), 3, 8, 8)  # (not cached)
    L = 6144
    q, k, v = (torch.randn(1, 3, L, 8) for _ in range(3))
    param = None
    if "features" in knobs:
        param = la.orthogonal_features(8, knobs["features"])
    elif form == "linformer":
        param = torch.linspace(0, L, 9).round().long().expand(3, 9)
    extra = {} if form in ("performer", "elu", "linformer") else {
        "window": knobs["window"], "global_keys": knobs["global_keys"], "clusters": knobs["clusters"]}
    with _Traffic() as t:
        la.approximate_attention(q, k, v, torch.ones(1, 1, 1, L, dtype=torch.bool), param, form=form, **extra)
    for key, got in (("bytes", t.bytes), ("launches", t.launches)):
        a, b = traced[key]
        assert abs(a + b * L - got) <= 0.15 * got, (key, a + b * L, got)
    assert traced["bytes"][1] > 0  # linear in L, not constant


def test_unknown_attention_forms_are_refused_by_name() -> None:
    model, x = _encoder(), _batch(2, 16)
    for forms, message in ((("clustred",), "unknown form\\(s\\) 'clustred'; known: performer, elu, window, "
                                           "scatterbrain, clustered"),
                           ("clustered", "a list of form names")):
        with pytest.raises(LrccError, match=message):
            lrcc.compile(model, x, budget=lrcc.Budget(latency=0.5), options={"attention_forms": forms})


def test_traffic_counts_a_gather_by_the_rows_it_reads() -> None:
    from lrcc.targets.cost import _Traffic
    table, idx = torch.randn(1000, 16), torch.tensor([3, 7])
    with _Traffic() as t:
        table.index_select(0, idx)
    assert t.launches == 1 and t.bytes == 2 * (2 * 16 * 4) + 2 * 8
    with _Traffic() as t:
        table * 2
    assert t.bytes == 2 * 1000 * 16 * 4


@pytest.mark.parametrize("window,span", [(None, 1 << 19), (2, 1 << 19), (2, 1 << 10)])
def test_global_keys_agree_whatever_the_blocks_and_spans(monkeypatch, window, span) -> None:
    """The global-key part sorts queries into blocks of one cluster: the block size and the span
    of blocks per step change only the order of the sums."""
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 2, 300, 8), torch.randn(2, 2, 300, 8), torch.randn(2, 2, 300, 6)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 250:] = False
    w = la.orthogonal_features(8, 4)
    want = la.scatterbrain_attention(q, k, v, w, window, mask, global_keys=7, clusters=3)
    monkeypatch.setattr(la, "GLOBAL_BLOCK", 4)
    monkeypatch.setattr(la, "SPAN_ELEMENTS", span)
    got = la.scatterbrain_attention(q, k, v, w, window, mask, global_keys=7, clusters=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_html_report_lists_the_crossovers(compiled, tmp_path) -> None:
    from lrcc.report_html import write_html
    _, cm, _ = compiled
    page = write_html(cm.report, tmp_path / "r").read_text()
    assert 'id="attention"' in page and "Performer, 16 features" in page
    first = cm.report.attention[0]["forms"][0]["crossover"]["cpu"]
    assert f"{first:,}" in page
