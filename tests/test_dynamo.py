"""torch.compile(model, backend="lrcc"): entry point, lazy calibration, caching, graph breaks."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import lrcc
import lrcc.dynamo
from tests.toy_models import NearlyLowRank, nearly_low_rank_batches


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    lrcc.dynamo._CACHE.clear()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    torch._dynamo.reset()


def test_same_result_as_lrcc_compile_and_no_recompile_on_same_shape() -> None:
    model = NearlyLowRank(hidden=96, out=32).eval()
    cal = nearly_low_rank_batches()
    budget = lrcc.Budget(params=0.4)
    direct = lrcc.compile(model, cal[0], budget=budget, calibration=cal)
    compiled = torch.compile(model, backend="lrcc", dynamic=True, options={"budget": budget, "calibration": cal})
    x = torch.randn(7, 64)
    with torch.no_grad():
        y = compiled(x)
        assert len(lrcc.dynamo._CACHE) == 1
        cm = next(iter(lrcc.dynamo._CACHE.values()))
        torch.testing.assert_close(y, direct(x), rtol=1e-5, atol=1e-6)  # the same plan, the same weights
        assert [r["choice"] for r in cm.report.rows] == [r["choice"] for r in direct.report.rows]
        assert [r["site"] for r in cm.report.rows] == ["a", "b"]  # the model's own layer names
        compiled(torch.randn(7, 64))  # same shape: no new compile
        compiled(torch.randn(11, 64))  # new shape: dynamo may retrace, lrcc does not re-plan
    assert len(lrcc.dynamo._CACHE) == 1


class NormedLowRank(torch.nn.Module):
    """NearlyLowRank behind a LayerNorm: under dynamic shapes dynamo lifts the norm's eps (a float
    attribute) to a 0-d tensor input that the graph reads with .item()."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(64, eps=1e-3)
        self.body = NearlyLowRank(hidden=96, out=32)

    def forward(self, x):
        return self.body(self.norm(x))


def test_module_float_attributes_under_dynamic_shapes_are_folded_not_a_fallback() -> None:
    model = NormedLowRank().eval()
    cal = nearly_low_rank_batches()
    budget = lrcc.Budget(params=0.4)
    direct = lrcc.compile(model, cal[0], budget=budget, calibration=cal)
    compiled = torch.compile(model, backend="lrcc", dynamic=True, options={"budget": budget, "calibration": cal})
    x = torch.randn(9, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to the uncompressed graph would warn
        with torch.no_grad():
            y = compiled(x)
    cm = next(iter(lrcc.dynamo._CACHE.values()))
    assert [r["choice"] for r in cm.report.rows] == [r["choice"] for r in direct.report.rows]
    torch.testing.assert_close(y, direct(x), rtol=1e-5, atol=1e-6)
    model.norm.eps = 0.5  # a changed attribute is never silently ignored: dynamo retraces, lrcc re-plans
    with torch.no_grad():
        y_new = compiled(x)
        direct_new = lrcc.compile(model, cal[0], budget=budget, calibration=cal)
        torch.testing.assert_close(y_new, direct_new(x), rtol=1e-5, atol=1e-6)
    assert len(lrcc.dynamo._CACHE) == 2


def test_graph_break_still_gives_a_correct_model() -> None:
    class Broken(NearlyLowRank):
        def __init__(self):
            super().__init__(hidden=96, out=32)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            torch._dynamo.graph_break()
            return self.b(h)

    model = Broken().eval()
    compiled = torch.compile(model, backend="lrcc", options={"budget": lrcc.Budget(params=1.0)})
    x = torch.randn(16, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_registered_by_entry_point_in_a_fresh_process() -> None:
    code = ("import torch\n"
            "m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32)).eval()\n"
            "c = torch.compile(m, backend='lrcc', options={'budget': 1.0})\n"
            "x = torch.randn(64, 32)\n"
            "with torch.no_grad():\n"
            "    assert torch.allclose(c(x), m(x), atol=1e-5)\n"
            "import sys; assert 'lrcc' in sys.modules\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
