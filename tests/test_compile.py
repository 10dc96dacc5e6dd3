"""lrcc.compile end to end on toy models: budgets, report, save/load, and its error messages."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrcc
from lrcc import Budget, BudgetError, CalibrationError, LrccError
from tests.toy_models import NearlyLowRank, nearly_low_rank_batches

ROW_KEYS = {"site", "rule", "choice", "params_before", "params_after", "bytes_before", "bytes_after", "est_latency_s",
            "error"}


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        y = self.ln1(x)
        q, k, v = (p(y).view(b, l, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :])
        x = x + self.o(a.transpose(1, 2).reshape(b, l, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class ToyTransformer(nn.Module):
    """Float features and an int mask in, a masked mean-pooled projection out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(16, 32)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for blk in self.blocks:
            h = blk(h, mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def _batch(b: int, l: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(b, l, 16, generator=gen)
    mask = torch.ones(b, l, dtype=torch.long)
    for i in range(b):
        mask[i, int(torch.randint(1, l + 1, (1,), generator=gen)):] = 0
    return x, mask


SITES = ["emb"] + [f"blocks.{i}.{p}" for i in range(2) for p in ("q", "k", "v", "o", "up", "down")] + ["head"]


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = ToyTransformer().eval()
    gen = torch.Generator().manual_seed(1)
    example = _batch(2, 6, gen)
    shapes = [(12, 7), (9, 9), (16, 5), (10, 8), (12, 6), (9, 10), (14, 7), (11, 9)]  # none is the example's
    batches = [_batch(b, l, gen) for b, l in shapes]
    fresh = _batch(7, 11, gen)
    assert int((fresh[1] == 0).sum()) > 0
    return model, example, batches, fresh


@pytest.fixture(scope="module")
def half(toy):
    model, example, batches, _ = toy
    return lrcc.compile(model, example, budget=Budget(params=0.5), calibration=batches)


# --- params budget and report ---------------------------------------------------------------
def test_params_budget_holds(half, toy) -> None:
    t = half.report.totals
    # the budget is a fraction of the parameters lrcc may rewrite: every linear but head (8 x 32, too small)
    rewritable = [s for s in SITES if s != "head"]
    assert t["params_before"] == sum(p.numel() for s in rewritable for p in toy[0].get_submodule(s).parameters())
    assert t["params_after"] <= 0.5 * t["params_before"]
    assert t["params_after"] == sum(r["params_after"] for r in half.report.rows)
    # the graph it runs really holds that many numbers
    held = sum(half.graph.param_count(n) for n in half.graph.sites() if n.attrs["site"] != "head")
    assert held == t["params_after"]
    assert any(n.op == "lowrank_linear" for n in half.graph.sites())


def test_report_rows(half, toy) -> None:
    model = toy[0]
    rows = half.report.rows
    assert [r["site"] for r in rows] == [s for s in SITES if s != "head"]  # head (8 x 32) cannot shrink at step 8
    for r in rows:
        assert ROW_KEYS <= set(r), set(r)
        mod = model.get_submodule(r["site"])
        assert r["params_before"] == sum(p.numel() for p in mod.parameters())
        assert r["bytes_before"] == 4 * r["params_before"] and r["bytes_after"] == 4 * r["params_after"]
        assert r["params_after"] <= r["params_before"]
        assert r["est_latency_s"] > 0 and math.isfinite(r["error"]) and r["error"] >= 0
        if r["choice"] == "dense":
            assert r["params_after"] == r["params_before"] and r["error"] == 0
        else:
            assert r["rule"] == "factorize_linear" and "rank" in r["choice"]
    text = str(half.report)
    for site in SITES:
        assert site in text, site
    assert "TOTAL" in text and "params=0.5" in text
    attention = ("blocks.0", "blocks.1")
    assert [d["site"] for d in half.report.rejected if d["site"] not in attention] == ["head"]
    # the attention sites stay exact: their forms save time, and the budget asks for parameters
    kept = {d["site"]: d["reason"] for d in half.report.rejected if d["site"] in attention}
    assert sorted(kept) == ["blocks.0", "blocks.1"] and all("latency budget" in r for r in kept.values()), kept
    v = half.report.verification
    assert 0 <= v["rel_error"] < 1 and -1 <= v["cosine_mean"] <= 1 and v["samples"] > 0


def test_compiled_runs_on_new_shapes(half, toy) -> None:
    model, _, _, (x, mask) = toy
    with torch.no_grad():
        y, want = half(x, mask), model(x, mask)
    assert y.shape == want.shape == (7, 8) and torch.isfinite(y).all()
    assert not torch.allclose(y, want)  # it really was compressed
    cos = F.cosine_similarity(y, want, dim=1)
    assert float(cos.mean()) > 0.5


def test_save_load_round_trip(half, toy, tmp_path) -> None:
    _, _, _, (x, mask) = toy
    out = half.save(tmp_path / "plan")
    for f in ("plan.json", "weights.safetensors", "report.json", "report.txt", "graph.txt"):
        assert (out / f).is_file(), f
    loaded = lrcc.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(x, mask), half(x, mask))
    assert loaded.report.rows == half.report.rows
    assert str(loaded.report) == str(half.report)
    assert loaded.target.name == "cpu" and loaded.budget == half.budget
    assert str(loaded.graph) == str(half.graph)


def test_save_rejects_unimplemented(half, tmp_path) -> None:
    with pytest.raises(LrccError, match="no GPU kernels"):
        half.save(tmp_path / "x", arch="sm_90")
    with pytest.raises(LrccError, match="onnx"):  # the message lists the formats there are
        half.save(tmp_path / "x", format="tflite")


# --- params=1.0 keeps everything dense ---------------------------------------------------------
def test_full_budget_keeps_every_site_dense(toy) -> None:
    model, example, batches, (x, mask) = toy
    cm = lrcc.compile(model, example, budget=Budget(params=1.0), calibration=batches[:3],
                      options={"lowrank_methods": ("svd",)})
    assert all(r["choice"] == "dense" for r in cm.report.rows), [r["choice"] for r in cm.report.rows]
    assert cm.report.totals["params_after"] == cm.report.totals["params_before"]
    assert all(n.op == "linear" for n in cm.graph.sites())
    with torch.no_grad():
        torch.testing.assert_close(cm(x, mask), model(x, mask), rtol=0, atol=1e-6)


# --- latency budget on a100 ----------------------------------------------------------------------
class Wide(nn.Module):
    """Few, wide layers: on an A100 roofline its latency is mostly weight traffic, so rank cuts it."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(512, 2048)
        self.down = nn.Linear(2048, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def test_latency_budget_on_a100() -> None:
    torch.manual_seed(0)
    model = Wide().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(b, 512, generator=gen),) for b in (6, 9, 5)]
    cm = lrcc.compile(model, (torch.randn(2, 512),), target="a100", budget=Budget(latency=0.8), calibration=batches,
                      options={"lowrank_methods": ("svd",)})
    t = cm.report.totals
    assert cm.report.target == "a100"
    assert t["model_latency_after_s"] <= 0.8 * t["model_latency_before_s"]
    assert t["bytes_after"] < t["bytes_before"]  # cheaper forms (low-rank or quantised) were chosen
    x = torch.randn(3, 512)
    with torch.no_grad():
        assert cm(x).shape == (3, 512)


# --- errors ----------------------------------------------------------------------------------------
def test_unknown_target(toy) -> None:
    model, example, batches, _ = toy
    with pytest.raises(LrccError, match="unknown target 'tpu9'.*a100"):
        lrcc.compile(model, example, target="tpu9", budget=0.5, calibration=batches)


def test_unreachable_budget(toy) -> None:
    model, example, batches, _ = toy
    with pytest.raises(BudgetError, match="smallest reachable") as e:
        lrcc.compile(model, example, budget=Budget(params=0.001), calibration=batches[:2],
                     options={"lowrank_methods": ("svd",)})
    assert "params" in str(e.value)


def test_malformed_budget(toy) -> None:
    model, example, batches, _ = toy
    with pytest.raises(BudgetError, match="prams"):
        lrcc.compile(model, example, budget="prams=0.5", calibration=batches)


def test_nan_weight_names_parameter() -> None:
    torch.manual_seed(0)
    model = ToyTransformer().eval()
    with torch.no_grad():
        model.blocks[1].up.weight[3, 4] = float("nan")
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(LrccError, match=r"blocks\.1\.up\.weight.*NaN"):
        lrcc.compile(model, _batch(2, 5, gen), budget=0.5, calibration=[_batch(3, 4, gen)])


def test_nan_calibration_names_batch(toy) -> None:
    model, example, batches, _ = toy
    bad = list(batches[:4])
    x, mask = bad[2]
    x = x.clone()
    x[0, 1, 2] = float("nan")
    bad[2] = (x, mask)
    with pytest.raises(CalibrationError, match="batch 2") as e:
        lrcc.compile(model, example, budget=0.5, calibration=bad)
    assert "NaN" in str(e.value) and isinstance(e.value, LrccError)


def test_calibration_wrong_arity(toy) -> None:
    model, example, batches, _ = toy
    with pytest.raises(CalibrationError, match="batch 1: has 1 inputs, the model takes 2"):
        lrcc.compile(model, example, budget=0.5, calibration=[batches[0], (batches[1][0],)])


def test_calibration_empty(toy) -> None:
    model, example, _, _ = toy
    with pytest.raises(CalibrationError, match="no batches"):
        lrcc.compile(model, example, budget=0.5, calibration=[])


def test_non_module_model(toy) -> None:
    _, example, batches, _ = toy
    with pytest.raises(LrccError, match="torch.nn.Module"):
        lrcc.compile(lambda x, m: x, example, budget=0.5, calibration=batches)


def test_load_missing_directory(tmp_path) -> None:
    with pytest.raises(LrccError, match="missing") as e:
        lrcc.load(tmp_path / "does-not-exist")
    assert "does-not-exist" in str(e.value)


def test_load_corrupt_plan(half, tmp_path) -> None:
    out = half.save(tmp_path / "p")
    (out / "plan.json").write_text("{not json")
    with pytest.raises(LrccError, match="not valid JSON"):
        lrcc.load(out)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.other = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.fc(torch.relu(self.fc(x))))


def test_layer_called_twice_compiles_and_stays_dense() -> None:
    torch.manual_seed(0)
    model = CalledTwice().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(b, 32, generator=gen),) for b in (40, 30, 50)]
    cm = lrcc.compile(model, (torch.randn(2, 32),), budget=Budget(params=0.6), calibration=batches)
    assert [r["site"] for r in cm.report.rows] == ["other"]
    assert cm.report.rows[0]["choice"] != "dense"
    assert {d["site"] for d in cm.report.rejected} == {"fc", "fc#2"}
    assert all("tied" in d["reason"] for d in cm.report.rejected)
    kinds = {n.attrs["site"]: n.op for n in cm.graph.sites()}
    assert kinds == {"fc": "linear", "fc#2": "linear", "other": "lowrank_linear"}
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = model(x)
        assert torch.isfinite(cm(x)).all() and cm(x).shape == want.shape


def test_max_error_budget_compresses_within_the_measured_error() -> None:
    model = NearlyLowRank().eval()
    batches = nearly_low_rank_batches()
    cm = lrcc.compile(model, batches[0], budget=Budget(max_error=0.02), calibration=batches,
                      options={"rules": [lrcc.rewrites.factorize_linear]})
    t = cm.report.totals
    assert cm.report.verification["rel_error"] <= 0.02
    assert t["params_after"] < 0.5 * t["params_before"]  # rank-8 structure is found


def test_max_error_unreachable_raises_or_flags() -> None:
    model = NearlyLowRank().eval()
    batches = nearly_low_rank_batches()
    budget = Budget(params=0.5, max_error=1e-9)
    with pytest.raises(LrccError, match="max_error"):
        lrcc.compile(model, batches[0], budget=budget, calibration=batches)
    cm = lrcc.compile(model, batches[0], budget=budget, calibration=batches, options={"strict": False})
    assert any("FLAGGED" in n for n in cm.report.notes)


def test_no_calibration_falls_back_to_example_inputs_and_says_so() -> None:
    model = NearlyLowRank().eval()
    cm = lrcc.compile(model, (torch.randn(64, 64),), budget=Budget(params=0.5))
    assert any("no calibration data" in n for n in cm.report.notes)
    assert "calibration data itself" in cm.report.verification["data"]


def test_inductor_backend_runs_the_same_plan(half, toy, tmp_path) -> None:
    """backend="inductor": the same graph through torch.compile; same outputs, kept by save/load."""
    ex = toy[1]
    fast = lrcc.CompiledModel(half.graph, half.report, half.target, half.budget, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(fast(*ex), half(*ex), rtol=1e-4, atol=1e-5)
    fast.save(tmp_path / "fast")
    assert lrcc.load(tmp_path / "fast").backend == "inductor"
    with pytest.raises(LrccError, match="unknown CPU backend"):
        lrcc.CompiledModel(half.graph, half.report, half.target, half.budget, backend="tvm")


# --- a latency budget checked by the clock (target cpu) -------------------------------------------------
def test_measured_latency_replans_until_the_clock_meets_the_budget(monkeypatch) -> None:
    """options measured_latency: the compiled model is timed against the original and the plan is
    tightened by budget / measured until it fits. The clock is replaced here by a fixed sequence of
    readings, so the test is about the loop, not this machine's timing."""
    import lrcc.compiler as compiler
    readings = iter([0.95, 0.85, 0.79])
    seen: list[float] = []

    def fake_timer(reference, example_inputs):
        def ratio(graph):
            from lrcc.targets import get_target
            from lrcc.targets.cost import graph_latency
            seen.append(graph_latency(graph, get_target("cpu"), {"B": 2}))
            return next(readings)
        return ratio
    monkeypatch.setattr(compiler, "_latency_ratio", fake_timer)
    torch.manual_seed(0)
    model = Wide().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(b, 512, generator=gen),) for b in (6, 9, 5)]
    cm = lrcc.compile(model, (torch.randn(2, 512),), budget=Budget(latency=0.8), calibration=batches,
                      options={"lowrank_methods": ("svd",), "measured_latency": True})
    notes = [n for n in cm.report.notes if "latency" in n]
    assert len(seen) == 3 and seen[0] >= seen[1] >= seen[2] and seen[2] < seen[0], seen  # re-plans estimated faster
    assert sum("re-planned" in n for n in notes) == 2 and not any("FLAGGED" in n for n in notes), notes
    assert "measured latency 0.790 of the original" in " ".join(notes)
    with pytest.raises(LrccError, match="measured_latency: times the model on this machine"):
        lrcc.compile(model, (torch.randn(2, 512),), target="a100", budget=Budget(latency=0.8), calibration=batches,
                     options={"measured_latency": True})


def test_a_sequential_refit_that_worsens_the_held_out_error_is_dropped(monkeypatch, toy) -> None:
    """The sequential refit is fitted on the calibration batches; it is kept only if it also lowers
    the output error on the held-out ones. A refit spoiled on purpose (factors scaled by 3) is
    dropped: the model is then the plain factors', as with options sequential=False."""
    import sys
    plan = sys.modules["lrcc.planner.plan"]  # (the package's name plan is the function)
    model, example, batches, _ = toy
    normal = lrcc.compile(model, example, budget=Budget(params=0.5), calibration=batches)
    said = [n for n in normal.report.notes if n.startswith("sequential refit")]
    assert len(said) == 1 and "held-out output error" in said[0], normal.report.notes
    real = plan.sequential_refit

    def spoiled(*args, **kwargs):
        return {site: {role: 3 * t for role, t in parts.items()} for site, parts in real(*args, **kwargs).items()}
    monkeypatch.setattr(plan, "sequential_refit", spoiled)
    cm = lrcc.compile(model, example, budget=Budget(params=0.5), calibration=batches)
    assert any(n.startswith("sequential refit dropped") for n in cm.report.notes), cm.report.notes
    assert not any("sequential refit" in r["choice"] for r in cm.report.rows)
    plain = lrcc.compile(model, example, budget=Budget(params=0.5), calibration=batches,
                         options={"sequential": False})
    assert [r["choice"] for r in cm.report.rows] == [r["choice"] for r in plain.report.rows]
    assert cm.report.totals["measured_error"] == pytest.approx(plain.report.totals["measured_error"], rel=1e-6)
