"""The `lrcc` command: compile, report, targets, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lrcc.cli import main


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    gen = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("cal") / "cal.pt"
    torch.save([(torch.randn(b, 32, generator=gen),) for b in (16, 24, 16, 20, 16, 24, 16, 16)], path)
    return path


def test_compile_then_report(calibration, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path.parent)
    out = tmp_path / "out"
    rc = main(["compile", "tests.cli_models:factory", "--calibration", str(calibration), "--budget", "params=0.5",
               "-o", str(out), "--quiet"])
    assert rc == 0
    assert (out / "plan.json").is_file() and (out / "weights.safetensors").is_file()
    capsys.readouterr()
    assert main(["report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["params_after"] <= 0.5 * report["totals"]["params_before"]
    assert main(["report", str(out)]) == 0
    assert "TOTAL" in capsys.readouterr().out


def test_compile_format_onnx_writes_a_model_onnxruntime_runs(calibration, tmp_path, monkeypatch) -> None:
    import onnxruntime as ort

    import lrcc
    monkeypatch.chdir(tmp_path.parent)
    out = tmp_path / "out"
    assert main(["compile", "tests.cli_models:factory", "--calibration", str(calibration), "--budget", "bytes=0.2",
                 "--format", "onnx", "-o", str(out), "--quiet", "--no-html"]) == 0
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 32)
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert (torch.from_numpy(y) - lrcc.load(out)(x)).abs().max().item() < 1e-4


def test_compile_writes_the_html_report_and_logs_progress(calibration, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path.parent)
    out = tmp_path / "out"
    argv = ["compile", "tests.cli_models:factory", "--calibration", str(calibration), "--budget", "params=0.5"]
    assert main(argv + ["-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert (out / "report.html").is_file() and (out / "pareto.png").is_file()
    assert f"html report: {out / 'report.html'}" in captured.out
    # stderr is not a terminal here: one-line progress messages, no bars
    assert "[lrcc" in captured.err and "verification done" in captured.err and "%|" not in captured.err
    assert main(argv + ["-o", str(tmp_path / "quiet"), "--quiet", "--no-html"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert not (tmp_path / "quiet" / "report.html").exists()


def test_targets(capsys) -> None:
    assert main(["targets", "--json"]) == 0
    names = {t["name"] for t in json.loads(capsys.readouterr().out)}
    assert {"cpu", "a100", "h100"} <= names


@pytest.mark.parametrize("argv, message", [
    (["compile", "tests.cli_models:factory", "--budget", "params=2", "-o", "X"], "params"),
    (["compile", "tests.cli_models:factory", "--budget", "speed=1", "-o", "X"], "unknown key 'speed'"),
    (["compile", "tests.cli_models:factory", "--target", "tpu9", "-o", "X"], "unknown target 'tpu9'"),
    (["compile", "tests.cli_models:nothing", "-o", "X"], "no attribute 'nothing'"),
    (["compile", "tests.cli_models:not_a_model", "-o", "X"], "not a torch.nn.Module"),
    (["compile", "nosuchmodule:factory", "-o", "X"], "cannot import module 'nosuchmodule'"),
    (["compile", "factory", "-o", "X"], "expected module:attribute"),
    (["compile", "model.onnx", "-o", "X"], "model.onnx: no such file"),
    (["compile", "tests.cli_models:factory", "--measured-latency", "-o", "X"], "needs target cpu and a latency budget"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, calibration, capsys, tmp_path) -> None:
    argv = [a.replace("X", str(tmp_path / "o")) for a in argv] + ["--calibration", str(calibration)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_calibration_files(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    for path, message in ((tmp_path / "missing.pt", "no such file"), (bad, "not a torch.save() file")):
        assert main(["compile", "tests.cli_models:factory", "--calibration", str(path), "-o", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err


def test_report_of_a_missing_directory(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no report.json" in capsys.readouterr().err


def test_usage_errors_exit_2_in_a_real_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "lrcc.cli", "compile"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "required" in proc.stderr and "Traceback" not in proc.stderr
