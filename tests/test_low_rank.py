"""Rule factorize_linear: matching, guard, candidates, factorisations and refit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrcc.codegen.torch_module import lower_to_torch
from lrcc.ir.from_torch import import_module
from lrcc.ir.graph import print_graph, verify
from lrcc.rewrites import factorize_linear, match
from lrcc.rewrites.low_rank import (breakeven_rank, candidate_ranks, refit_factors, replace_with_lowrank,
                                    svd_spectrum, whitened_spectrum)


pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    """Two eligible linears (fc1, fc2), one with no saving rank at the default step (gate: 8 x 8)
    and one where no rank at all saves (head: 1 x 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.gate = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor):
        h = self.fc2(F.gelu(self.fc1(x)))
        return self.head(h), self.gate(h[..., :8])


BEFORE = """\
%p_fc1_weight = param @fc1.weight : f32[64, 32]
%p_fc1_bias = param @fc1.bias : f32[64]
%p_fc2_weight = param @fc2.weight : f32[32, 64]
%p_fc2_bias = param @fc2.bias : f32[32]
%p_gate_weight = param @gate.weight : f32[8, 8]
%p_head_weight = param @head.weight : f32[1, 32]
%p_head_bias = param @head.bias : f32[1]
%x = input #0 : f32[B, 32]
%linear = linear(%x, %p_fc1_weight, %p_fc1_bias) : f32[B, 64]
%gelu = aten.gelu.default(%linear) : f32[B, 64]
%linear_1 = linear(%gelu, %p_fc2_weight, %p_fc2_bias) : f32[B, 32]
%linear_2 = linear(%linear_1, %p_head_weight, %p_head_bias) : f32[B, 1]
%slice_1 = aten.slice.Tensor(%linear_1, 1, 0, 8) : f32[B, 8]
%linear_3 = linear(%slice_1, %p_gate_weight) : f32[B, 8]
return [%linear_2, %linear_3]
"""

AFTER = """\
%p_fc1_bias = param @fc1.bias : f32[64]
%p_fc2_weight = param @fc2.weight : f32[32, 64]
%p_fc2_bias = param @fc2.bias : f32[32]
%p_gate_weight = param @gate.weight : f32[8, 8]
%p_head_weight = param @head.weight : f32[1, 32]
%p_head_bias = param @head.bias : f32[1]
%x = input #0 : f32[B, 32]
%linear_v = param @fc1.lowrank_v : f32[8, 32]
%linear_u = param @fc1.lowrank_u : f32[64, 8]
%linear = lowrank_linear(%x, %linear_v, %linear_u, %p_fc1_bias, rank=8) : f32[B, 64]
%gelu = aten.gelu.default(%linear) : f32[B, 64]
%linear_1 = linear(%gelu, %p_fc2_weight, %p_fc2_bias) : f32[B, 32]
%linear_2 = linear(%linear_1, %p_head_weight, %p_head_bias) : f32[B, 1]
%slice_1 = aten.slice.Tensor(%linear_1, 1, 0, 8) : f32[B, 8]
%linear_3 = linear(%slice_1, %p_gate_weight) : f32[B, 8]
return [%linear_2, %linear_3]
"""


class Stats:
    """The calibration statistics interface a whitened candidate reads (x^T x per site)."""

    def __init__(self, xtx: dict[str, torch.Tensor]) -> None:
        self._xtx = xtx

    def xtx(self, site: str) -> torch.Tensor:
        return self._xtx[site]


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    g, _ = import_module(model, (torch.randn(4, 32),))
    return model, g


def _anisotropic(rows: int, n: int, spread: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features whose scales span 10**spread (float64)."""
    gen = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    scales = torch.logspace(0, spread, n, dtype=torch.float64)
    return (torch.randn(rows, n, generator=gen, dtype=torch.float64) * scales) @ rot


def _weight(m: int, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=gen) / n ** 0.5


def _out_err(x: torch.Tensor, w: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> float:
    """||X (W - U V)^T||_F^2 in float64."""
    return float((x @ (w.double() - u.double() @ v.double()).T).pow(2).sum())


# --- (a) golden IR before / after ------------------------------------------------------------
def test_golden_rewrite_to_rank_8(mlp) -> None:
    model, g = mlp
    assert print_graph(g) == BEFORE
    m = match(g, [factorize_linear])
    cand = next(c for c in m.candidates["fc1"] if c.knobs == {"rank": 8, "method": "svd", "dtype": "float32"})
    assert cand.node == "linear" and cand.params == 8 * (64 + 32) + 64 and cand.bytes == 4 * cand.params
    assert cand.weight_shapes == [(8, 32), (64, 8)] and not cand.needs_calibration
    v, u = cand.spectrum(None).factors(8)
    assert v.shape == (8, 32) and u.shape == (64, 8)
    new = g.copy()
    replace_with_lowrank(new, cand.node, v, u)
    new.remove_unused_params()
    verify(new)
    assert print_graph(new) == AFTER, print_graph(new)
    # the original graph is untouched and the rewritten one computes the rank-8 layer
    assert print_graph(g) == BEFORE and "fc1.weight" in g.tensors and "fc1.weight" not in new.tensors
    assert new.param_count(new["linear"]) == cand.params
    x = torch.randn(5, 32)
    with torch.no_grad():
        h = F.linear(F.linear(x, v), u, model.fc1.bias)
        want = (model.head(model.fc2(F.gelu(h))), model.gate(model.fc2(F.gelu(h))[..., :8]))
        got = lower_to_torch(new)(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- (b) fired count ---------------------------------------------------------------------------
def test_fired_count_equals_eligible_linears(mlp) -> None:
    _, g = mlp
    m = match(g, [factorize_linear])
    eligible = [n.attrs["site"] for n in g.sites() if candidate_ranks(*g.tensor(n.inputs[1]).shape)]
    assert eligible == ["fc1", "fc2"]
    assert m.fired == {"factorize_linear": len(eligible)}
    assert sorted(m.candidates) == sorted(eligible)
    reasons = {site: why for site, _, why in m.rejected}
    assert set(reasons) == {"gate", "head"}
    assert "too small" in reasons["head"] and "(1, 32)" in reasons["head"]
    assert "no candidate" in reasons["gate"]
    # a finer rank step makes the 8 x 8 layer eligible (ranks 2 < 4 = break-even); head never is
    m2 = match(g, [factorize_linear], {"rank_step": 2})
    assert m2.fired["factorize_linear"] == 3
    assert sorted({c.knobs["rank"] for c in m2.candidates["gate"]}) == [2]
    assert [s for s, _, _ in m2.rejected] == ["head"]


def test_candidates_cover_methods_and_ranks(mlp) -> None:
    _, g = mlp
    m = match(g, [factorize_linear], {"lowrank_methods": ("whitened",), "rank_step": 4})
    for site, (rows, cols) in {"fc1": (64, 32), "fc2": (32, 64)}.items():
        cands = m.candidates[site]
        assert {c.knobs["method"] for c in cands} == {"whitened"}
        assert [c.knobs["rank"] for c in cands] == [4, 8, 12, 16, 20]
        for c in cands:
            r = c.knobs["rank"]
            assert c.params == r * (rows + cols) + rows < rows * cols + rows
            assert c.needs_calibration and c.family == f"{site}:whitened"
    with pytest.raises(ValueError, match="unknown method"):
        match(g, [factorize_linear], {"lowrank_methods": ("magic",)})


# --- (c) full rank reproduces W ---------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(24, 16), (16, 24), (20, 20)])
@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_full_rank_is_exact(m: int, n: int, method: str) -> None:
    w = _weight(m, n)
    x = _anisotropic(200, n)
    spec = svd_spectrum(w) if method == "svd" else whitened_spectrum(w, x.T @ x)
    k = min(m, n)
    assert spec.sigma.shape == (k,) and spec.left.shape == (m, k) and spec.right.shape == (n, k)
    assert bool((spec.sigma[:-1] >= spec.sigma[1:]).all())
    v, u = spec.factors(k)
    assert v.shape == (k, n) and u.shape == (m, k)
    xs = x.float()[:50]
    want = xs @ w.T
    got = (xs @ v.T) @ u.T
    assert float((got - want).norm() / want.norm()) <= 1e-4
    assert float((u @ v - w).norm() / w.norm()) <= 1e-4


# --- (d) whitened truncation error --------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(24, 32), (40, 16), (32, 32)])
def test_whitened_truncation_error_is_dropped_spectrum(m: int, n: int) -> None:
    w = _weight(m, n, seed=m + n)
    x = _anisotropic(300, n, spread=1.0, seed=m)
    white = whitened_spectrum(w, x.T @ x)
    plain = svd_spectrum(w)
    total = float((x @ w.double().T).pow(2).sum())
    k = min(m, n)
    for r in range(0, k + 1):
        e_white = _out_err(x, w, *white.factors(r))
        dropped = float(white.sigma.double()[r:].pow(2).sum())
        assert abs(e_white - dropped) <= 1e-3 * dropped + 1e-7 * total, (r, e_white, dropped)
        e_plain = _out_err(x, w, *plain.factors(r))
        assert e_white <= e_plain * (1 + 1e-6) + 1e-7 * total, (r, e_white, e_plain)
    # the whitening matters: somewhere in the middle it is strictly better than plain SVD
    r = k // 4
    assert _out_err(x, w, *white.factors(r)) < 0.9 * _out_err(x, w, *plain.factors(r))


def test_plain_svd_truncation_is_eckart_young() -> None:
    w = _weight(24, 40)
    spec = svd_spectrum(w)
    for r in (0, 3, 12, 24):
        v, u = spec.factors(r)
        err = float((w.double() - u.double() @ v.double()).pow(2).sum())
        assert err == pytest.approx(float(spec.sigma.double()[r:].pow(2).sum()), rel=1e-4, abs=1e-9)


# --- (e) candidate ranks below break-even; guard for too-small layers ---------------------------
@pytest.mark.parametrize("m,n", [(64, 32), (32, 64), (384, 384), (384, 1536), (17, 9), (100, 3), (16, 16), (9, 8),
                                 (8, 8), (1, 32), (32, 1), (2, 2), (3, 3)])
@pytest.mark.parametrize("step", [1, 2, 8])
def test_candidate_ranks_below_breakeven(m: int, n: int, step: int) -> None:
    ranks = candidate_ranks(m, n, step)
    limit = m * n / (m + n)
    assert breakeven_rank(m, n) == pytest.approx(limit)
    assert all(r < limit and r % step == 0 and r >= step for r in ranks)
    assert all(r * (m + n) < m * n for r in ranks)
    # and none is missing: every multiple of step below the limit is offered
    assert ranks == [r for r in range(step, m * n, step) if r * (m + n) < m * n]


@pytest.mark.parametrize("shape,eligible", [((1, 32), False), ((32, 1), False), ((2, 2), False), ((3, 3), True),
                                            ((16, 16), True), ((64, 32), True)])
def test_guard_rejects_layers_no_rank_can_shrink(shape, eligible: bool) -> None:
    out_f, in_f = shape

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(in_f, out_f)

        def forward(self, x):
            return self.lin(x)

    g, _ = import_module(One().eval(), (torch.randn(3, in_f),))
    (node,) = g.sites()
    reason = factorize_linear.guard(g, node)
    if eligible:
        assert reason is None
        m = match(g, [factorize_linear], {"rank_step": 1})
        assert m.fired["factorize_linear"] == 1
        assert all(c.knobs["rank"] < breakeven_rank(out_f, in_f) for c in m.candidates["lin"])
    else:
        assert reason is not None and "too small" in reason and str(shape) in reason
        m = match(g, [factorize_linear], {"rank_step": 1})
        assert m.fired["factorize_linear"] == 0 and m.rejected == [("lin", "factorize_linear", reason)]


# --- (f) tied weights ------------------------------------------------------------------------
class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.other = nn.Linear(32, 32)

    def forward(self, x):
        return self.other(self.fc(torch.relu(self.fc(x))))


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("cls,free", [(CalledTwice, ["other"]), (TiedWeights, [])])
def test_guard_rejects_tied_weights(cls, free: list[str]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    g, _ = import_module(model, (torch.randn(3, 32),))
    m = match(g, [factorize_linear])
    assert sorted(m.candidates) == free
    assert m.fired["factorize_linear"] == len(free)
    tied = [(site, why) for site, _, why in m.rejected]
    assert len(tied) == 2 and all("tied" in why for _, why in tied)
    # the shared layer is two sites with distinct names, and the graph still lowers and runs
    names = [n.attrs["site"] for n in g.sites()]
    assert len(set(names)) == len(names)
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(lower_to_torch(g)(x), model(x), rtol=0, atol=1e-6)


# --- (g) refit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(24, 16), (16, 24)])
def test_refit_full_rank_reproduces_w(m: int, n: int) -> None:
    w = _weight(m, n)
    x = _anisotropic(200, n)
    a = x.T @ x
    v, u = refit_factors(w, a, a, min(m, n), None, ridge=0.0)
    assert v.shape == (min(m, n), n) and u.shape == (m, min(m, n))
    assert float((u @ v - w).norm() / w.norm()) <= 1e-4


@pytest.mark.parametrize("m,n", [(24, 16), (16, 24), (32, 32)])
def test_refit_at_rank_matches_whitened_truncation(m: int, n: int) -> None:
    w = _weight(m, n, seed=3)
    x = _anisotropic(250, n, seed=4)
    a = x.T @ x
    white = whitened_spectrum(w, a)
    total = float((x @ w.double().T).pow(2).sum())
    for r in (1, 4, min(m, n) // 2, min(m, n) - 2):
        e_refit = _out_err(x, w, *refit_factors(w, a, a, r, None, ridge=1e-12))
        e_white = _out_err(x, w, *white.factors(r))
        assert abs(e_refit - e_white) <= 1e-3 * e_white + 1e-7 * total, (r, e_refit, e_white)


def test_refit_on_shifted_inputs_beats_keeping_the_truncation() -> None:
    # compressed-model inputs Xc differ from the original X: the refit targets X W^T from Xc
    m, n, r = 24, 16, 6
    w = _weight(m, n, seed=5)
    x = _anisotropic(300, n, seed=6)
    gen = torch.Generator().manual_seed(7)
    xc = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y = x @ w.double().T
    white = whitened_spectrum(w, x.T @ x)
    v0, u0 = white.factors(r)
    v1, u1 = refit_factors(w, xc.T @ xc, xc.T @ x, r, None, ridge=1e-9)
    err0 = float((xc @ (u0.double() @ v0.double()).T - y).pow(2).sum())
    err1 = float((xc @ (u1.double() @ v1.double()).T - y).pow(2).sum())
    assert err1 < err0
    # and with an output metric it still returns factors of the right shapes, finite
    metric = torch.eye(m, dtype=torch.float64) * 2.0
    v2, u2 = refit_factors(w, xc.T @ xc, xc.T @ x, r, metric, ridge=1e-9)
    assert v2.shape == (r, n) and u2.shape == (m, r) and torch.isfinite(u2 @ v2).all()
    # an isotropic metric changes nothing
    torch.testing.assert_close(u2 @ v2, u1 @ v1, rtol=1e-4, atol=1e-5)
