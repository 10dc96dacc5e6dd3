"""The HTML report: the planner's candidate record, report.json old and new, and the page itself,
rendered in a real headless browser (Debian's chromium; scripts/setup.sh installs it)."""
from __future__ import annotations

import io
import itertools
import json
import re
import shutil
import subprocess
import sys

import pytest

import lrcc
from lrcc.cli import main
from lrcc.compiler import Progress
from lrcc.report import Report
from lrcc.report_html import model_frontier, write_html
from tests.toy_models import NearlyLowRank, nearly_low_rank_batches

pytestmark = pytest.mark.usefixtures("one_thread")

# report.json as lrcc wrote it before the candidate record (and the arena map) were added
OLD_REPORT = {
    "target": "cpu", "budget": "params=0.5",
    "rows": [{"site": "a", "rule": "factorize_linear", "choice": "rank 8, whitened SVD + sequential refit",
              "params_before": 4160, "params_after": 1088, "bytes_before": 16640, "bytes_after": 4352,
              "est_latency_s": 1e-5, "est_latency_before_s": 2e-5, "error": 1.5e-4, "reason": "predicted ..."},
             {"site": "b", "rule": "-", "choice": "dense", "params_before": 1040, "params_after": 1040,
              "bytes_before": 4160, "bytes_after": 4160, "est_latency_s": 5e-6, "est_latency_before_s": 5e-6,
              "error": 0.0, "reason": "kept dense"}],
    "totals": {"params_before": 5200, "params_after": 2128, "bytes_before": 20800, "bytes_after": 8512,
               "est_latency_s": 1.5e-5, "error": 1.5e-4, "model_latency_before_s": 3e-5,
               "model_latency_after_s": 2e-5, "measured_error": 1e-4},
    "verification": {"rel_error": 1e-4, "cosine_mean": 0.9999, "cosine_p5": 0.9998, "samples": 40,
                     "data": "1 held-out calibration batch(es) (every 8th)"},
    "notes": ["a note with <markup> & an ampersand"], "timings": {"total": 1.0}, "rejected": [],
}


@pytest.fixture(scope="module")
def compiled():
    model = NearlyLowRank().eval()
    batches = nearly_low_rank_batches()
    return lrcc.compile(model, batches[0], budget="bytes=0.5", calibration=batches)


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    return compiled.save(tmp_path_factory.mktemp("report") / "out")


def test_candidates_are_recorded(compiled) -> None:
    report = compiled.report
    sites = [r["site"] for r in report.rows]
    assert report.candidates and {c["site"] for c in report.candidates} == set(sites)
    for c in report.candidates:
        assert {"site", "rule", "choice", "params", "bytes", "est_latency_s", "error", "chosen"} <= set(c)
        assert c["error"] >= 0 and c["bytes"] > 0
    for row in report.rows:  # exactly one chosen option per site, and it is the row's
        chosen = [c for c in report.candidates if c["site"] == row["site"] and c["chosen"]]
        assert len(chosen) == 1
        assert (chosen[0]["bytes"], chosen[0]["params"], chosen[0]["rule"]) == \
               (row["bytes_after"], row["params_after"], row["rule"])
        assert row["choice"].startswith(chosen[0]["choice"])
        assert any(c["site"] == row["site"] and c["choice"] == "dense" for c in report.candidates)


def test_report_json_round_trip_keeps_candidates(compiled, saved) -> None:
    again = Report.from_json(compiled.report.to_json())
    assert again == compiled.report
    on_disk = json.loads((saved / "report.json").read_text())
    assert on_disk["candidates"] == compiled.report.candidates and on_disk["arena"] == []
    assert lrcc.load(saved).report.candidates == compiled.report.candidates


def test_old_report_json_loads_and_renders(tmp_path, capsys) -> None:
    (tmp_path / "report.json").write_text(json.dumps(OLD_REPORT))
    report = Report.from_json((tmp_path / "report.json").read_text())
    assert report.candidates == [] and report.arena == [] and report.rows == OLD_REPORT["rows"]
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and f"html report: {tmp_path / 'report.html'}" in out
    page = (tmp_path / "report.html").read_text()
    assert 'id="no-plot"' in page and "compile again" in page and not (tmp_path / "pareto.png").exists()
    assert "a note with &lt;markup&gt; &amp; an ampersand" in page  # autoescaped
    assert 'id="arena"' not in page


def test_report_no_html_and_json(tmp_path, capsys) -> None:
    (tmp_path / "report.json").write_text(json.dumps(OLD_REPORT))
    assert main(["report", str(tmp_path), "--no-html"]) == 0
    assert not (tmp_path / "report.html").exists()
    assert "html report" not in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rows"] == OLD_REPORT["rows"]  # stdout stays pure JSON
    assert "html report:" in captured.err and (tmp_path / "report.html").is_file()


def test_page_without_matplotlib_says_so(compiled, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    page = write_html(compiled.report, tmp_path).read_text()
    assert "matplotlib is not installed" in page and not (tmp_path / "pareto.png").exists()
    assert all(f'<td class="site">{r["site"]}</td>' in page for r in compiled.report.rows)


def test_arena_map_renders_only_when_recorded(tmp_path) -> None:
    report = Report.from_json(json.dumps(OLD_REPORT))
    report.arena = [{"name": "x", "offset": 0, "bytes": 256, "first": 0, "last": 2},
                    {"name": "h", "offset": 256, "bytes": 768, "first": 1, "last": 3}]
    page = write_html(report, tmp_path).read_text()
    assert 'id="arena-table"' in page and "<td>h</td>" in page and "1,024 bytes" in page


def test_model_frontier_is_the_lower_hull_of_all_allocations() -> None:
    options = {"a": [(100, 0.0), (60, 0.1), (40, 0.15), (30, 0.5), (50, 0.4)],
               "b": [(80, 0.0), (50, 0.02), (20, 0.3), (70, 0.05)]}
    cands = [{"site": s, "bytes": b, "error": e} for s, opts in options.items() for b, e in opts]
    curve = model_frontier(cands)
    combos = [(ba + bb, ea + eb) for (ba, ea), (bb, eb) in itertools.product(options["a"], options["b"])]
    assert curve[0] == (180, 0.0) and curve[-1] == (50, pytest.approx(0.8))
    for b, e in curve:  # every vertex is an allocation
        assert any(b == cb and abs(e - ce) < 1e-12 for cb, ce in combos)
    for (b0, e0), (b1, e1) in zip(curve, curve[1:]):  # no allocation lies below the curve
        assert b1 < b0 and e1 >= e0
        for cb, ce in combos:
            if b1 <= cb <= b0:
                assert ce >= e0 + (e1 - e0) * (b0 - cb) / (b0 - b1) - 1e-12


def test_progress_bars_and_lines() -> None:
    lines = io.StringIO()
    p = Progress(stream=lines)  # not a terminal: log lines, the stage opens no bar
    p.stage("input statistics", 3, "batch")
    p("input statistics: batch 1/3")
    p("verification done")
    assert lines.getvalue().count("[lrcc") == 2 and "%|" not in lines.getvalue()
    bars = io.StringIO()
    p = Progress(bars=True, stream=bars)
    p.stage("output sensitivity", 2, "batch")
    for k in (1, 2):
        p(f"output sensitivity: batch {k}/2")
    assert p._bar is None  # closed once complete
    assert "output sensitivity: 100%" in bars.getvalue()


def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: run scripts/setup.sh (it installs Debian's chromium)")
    return exe


def test_report_page_in_a_headless_browser(compiled, saved, tmp_path, capsys) -> None:
    chromium = _chromium()
    assert main(["report", str(saved)]) == 0
    assert f"html report: {saved / 'report.html'}" in capsys.readouterr().out
    assert (saved / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         (saved / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    table = re.search(r'<table id="decision-table">(.*?)</table>', dom, re.S)
    assert table, dom[:2000]
    sites = re.findall(r'<td class="site">([^<]*)</td>', table.group(1))
    assert sites == [r["site"] for r in compiled.report.rows] and sites
    assert re.search(r'<body[^>]*data-plot-loaded="true"', dom), re.search(r"<body[^>]*>", dom).group(0)
    assert 'id="budget-checks"' in dom and "within" in dom and 'id="measured-error"' in dom
    assert 'id="arena"' not in dom  # a CPU model has no arena map
