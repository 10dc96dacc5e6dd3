"""Determinism: the same model, inputs, budget and seed compile to byte-identical saved files.

Two compiles in one process must write the same bytes in every file `CompiledModel.save` writes,
for a plain parameter budget and for a byte budget that makes lrcc both quantise and factorise.
Wall-clock timings are the one thing that legitimately differs between runs: they live in
timings.json, which is documented as excluded from this guarantee (docs/guide.md), and nowhere else.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrcc
from lrcc import Budget
from tests.toy_models import NearlyLowRank, nearly_low_rank_batches

pytestmark = pytest.mark.usefixtures("one_thread")

VOLATILE = {"timings.json"}  # wall-clock seconds: excluded from the byte-identity guarantee


def _digests(out: Path) -> dict[str, str]:
    """sha256 of every file under out, by path relative to it."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _compile_and_save(budget: Budget, out: Path, fmt: str | None = None) -> lrcc.CompiledModel:
    torch.manual_seed(0)  # NearlyLowRank's biases come from nn.Linear's default init
    model = NearlyLowRank().eval()
    batches = nearly_low_rank_batches()
    cm = lrcc.compile(model, batches[0], target="cpu", budget=budget, calibration=batches, options={"seed": 0})
    cm.save(out, format=fmt)
    return cm


def _assert_identical(a: Path, b: Path) -> dict[str, str]:
    da, db = _digests(a), _digests(b)
    assert sorted(da) == sorted(db), "the two saves wrote different files"
    differ = [name for name in da if name not in VOLATILE and da[name] != db[name]]
    assert not differ, f"files that differ between two identical compiles: {differ}"
    return da


@pytest.mark.parametrize("budget, rules", [
    (Budget(params=0.5), {"factorize_linear"}),
    (Budget(bytes=0.15), {"factorize_linear", "quantize_linear"}),
], ids=["params", "bytes-quantise-and-factorise"])
def test_two_compiles_save_identical_files(tmp_path, budget, rules) -> None:
    cm1 = _compile_and_save(budget, tmp_path / "a")
    cm2 = _compile_and_save(budget, tmp_path / "b")
    files = _assert_identical(tmp_path / "a", tmp_path / "b")
    assert {"plan.json", "weights.safetensors", "report.json", "report.txt", "graph.txt", "timings.json"} <= set(files)
    used = {r["rule"] for r in cm1.report.rows}
    assert rules <= used, f"the budget was meant to use {rules}, the plan used {used}"
    # the timings are real, and only in timings.json
    timings = json.loads((tmp_path / "a" / "timings.json").read_text())
    assert timings["total"] > 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert "timings" not in report
    assert "time:" not in (tmp_path / "a" / "report.txt").read_text()
    # the in-memory report keeps them, and load() brings them back
    assert cm1.report.timings and cm2.report.timings
    assert lrcc.load(tmp_path / "a").report.timings.keys() == cm1.report.timings.keys()


def test_save_twice_and_onnx_export_are_identical(tmp_path) -> None:
    """One compiled model saved twice (with the ONNX export) writes the same bytes."""
    pytest.importorskip("onnx")
    cm = _compile_and_save(Budget(bytes=0.15), tmp_path / "a", fmt="onnx")
    cm.save(tmp_path / "b", format="onnx")
    files = _assert_identical(tmp_path / "a", tmp_path / "b")
    assert "model.onnx" in files


def test_loaded_model_saves_the_same_files(tmp_path) -> None:
    """save -> load -> save gives the same bytes: nothing in the files depends on the process."""
    _compile_and_save(Budget(params=0.5), tmp_path / "a")
    lrcc.load(tmp_path / "a").save(tmp_path / "b")
    _assert_identical(tmp_path / "a", tmp_path / "b")


def test_compiled_outputs_match_bit_for_bit(tmp_path) -> None:
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(9))
    cm1 = _compile_and_save(Budget(bytes=0.15), tmp_path / "a")
    cm2 = _compile_and_save(Budget(bytes=0.15), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(cm1(x), cm2(x))


_SCRIPT = """
import sys
import torch
import lrcc
from tests.toy_models import NearlyLowRank, nearly_low_rank_batches
torch.set_num_threads(1)
torch.manual_seed(0)
batches = nearly_low_rank_batches()
cm = lrcc.compile(NearlyLowRank().eval(), batches[0], budget=sys.argv[2], calibration=batches, options={"seed": 0})
cm.save(sys.argv[1], format="onnx")
"""


def test_two_processes_with_different_hash_seeds_save_identical_files(tmp_path) -> None:
    """Set and dict-of-set iteration order follows PYTHONHASHSEED, which differs between processes:
    two processes with different seeds must still write the same bytes."""
    pytest.importorskip("onnx")
    root = Path(__file__).resolve().parents[1]
    for seed, name in (("1", "a"), ("2", "b")):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(root))
        subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / name), "bytes=0.15"], cwd=root, env=env,
                       check=True, capture_output=True, timeout=300)
    _assert_identical(tmp_path / "a", tmp_path / "b")


def test_mcu_compiles_write_identical_c(tmp_path) -> None:
    """The generated C, its arena plan and the int8 program are byte-identical across compiles."""
    from lrcc.zoo.digits import MLP

    def once(out: Path) -> None:
        torch.manual_seed(0)
        model = MLP().eval()
        g = torch.Generator().manual_seed(1)
        calib = [(torch.rand(32, 64, generator=g),) for _ in range(4)]
        cm = lrcc.compile(model, calib[0], target="stm32f746", budget="flash=56KB", calibration=calib,
                          options={"seed": 0})
        cm.save(out)

    once(tmp_path / "a")
    once(tmp_path / "b")
    files = _assert_identical(tmp_path / "a", tmp_path / "b")
    assert {"lrcc_model.c", "lrcc_model.h", "arena_map.txt", "program.json", "program.safetensors"} <= set(files)
