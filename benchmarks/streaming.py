"""Compiling larger than memory, and factorising on several workers (lrcc.compile_blockwise).

1. Peak memory: a generated Llama-style decoder with Llama-7B's layer shapes (dim 4096, SwiGLU
   11008, 809 MB of float32 weights a block) and several GB in all is written as safetensors shards,
   then compiled block by block in a fresh process with the factorisations in that same process.
   Its peak RSS is compared with the bound 2 x (largest block + calibration activations), and with
   the process's RSS before compiling (Python, torch and the libraries, warmed up).
2. Workers: a smaller decoder compiled three times, in process and on 1 and 2 torch.distributed
   workers of one thread each; the wall time of the factorisation phase (the layer work) and of the
   whole compile, the speedup of 2 workers over 1, and whether the three results are identical
   byte for byte.

    python3 benchmarks/streaming.py [--blocks 3] [--skip-large] [--skip-workers] [--no-docs]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docs_sections import write_section  # noqa: E402

_RUN = """
import json, sys, torch
from lrcc.zoo import decoder as D
from lrcc.planner import blockwise as bw
ck, out, workers, batches, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = D.load_config(ck)
cal = D.calibration(cfg, batches=batches, batch=1, length=length)
w = torch.randn(64, 64, dtype=torch.float64); torch.linalg.eigh(w @ w.T)
D.build(D.DecoderConfig(vocab=32, dim=16, ffn=32, heads=2, blocks=1))(cal[0][0] % 32)
D.build(D.DecoderConfig(vocab=32, dim=16, ffn=32, heads=2, blocks=1), seed=None)  # the meta device's first use loads torch's meta kernels
base = bw.peak_rss_bytes()
res = bw.compile_blockwise(D.build(cfg, seed=None), cal, out, budget=0.5, checkpoint=ck, workers=workers,
                           progress=lambda m: print(m, file=sys.stderr, flush=True))
t = res.report.timings
print(json.dumps({"base": base, "peak": bw.peak_rss_bytes(), "timings": t, "error": res.report.verification,
                  "kept": res.report.totals["params_after"] / res.report.totals["params_before"]}))
"""


def run(ck: Path, out: Path, workers: int, batches: int, length: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN, str(ck), str(out), str(workers), str(batches), str(length)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"compile failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t0
    return res


def same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name != "timings.json")
    return names == sorted(p.name for p in b.iterdir() if p.name != "timings.json") and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def large(work: Path, blocks: int) -> str:
    from lrcc.zoo import decoder as D
    cfg = D.DecoderConfig(vocab=32000, blocks=blocks, **D.LLAMA7B_SHAPES)
    t0 = time.perf_counter()
    ck = D.write_checkpoint(cfg, work / "large-ck")
    size = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
    print(f"wrote {size / 1e9:.2f} GB of shards in {time.perf_counter() - t0:.0f} s", flush=True)
    batches, length = 8, 256
    res = run(ck, work / "large-out", 0, batches, length)
    block = 4 * cfg.block_params()
    acts = batches * length * cfg.dim * 4  # the calibration tokens' hidden states at one block boundary
    bound = 2 * (block + acts)
    t = res["timings"]
    rows = [
        ("checkpoint (safetensors shards)", f"{size / 1e9:.2f} GB", f"{cfg.blocks} blocks of {mib(block)} + embedding and head of {mib(4 * cfg.vocab * cfg.dim)} each"),
        ("calibration activations", mib(acts), f"{batches} x {length} tokens x {cfg.dim} float32: the hidden states at one block boundary"),
        ("bound: 2 x (largest block + activations)", mib(bound), ""),
        ("RSS before compiling (Python, torch, warmed up)", mib(res["base"]), ""),
        ("peak RSS while compiling", mib(res["peak"]), f"{res['peak'] / bound:.2f} of the bound; {res['peak'] / size:.2f} of the checkpoint"),
        ("peak RSS less the RSS before", mib(res["peak"] - res["base"]), f"{(res['peak'] - res['base']) / bound:.2f} of the bound"),
        ("compile time", f"{t['total_s']:.0f} s", f"factorisation {t['factorisation_s']:.0f} s, statistics {t['statistics_s']:.0f} s, apply {t['apply_s']:.0f} s"),
        ("kept / measured output error", f"{res['kept']:.3f} of the linear parameters", f"relative squared error {res['error']['rel_error']:.3e} on {res['error']['data']}"),
    ]
    lines = ["| | | |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    verdict = "holds" if res["peak"] <= bound else "does NOT hold"
    return (f"Llama-7B layer shapes (dim 4096, SwiGLU 11008, 32 heads), random power-law weights, budget params=0.5, "
            f"factorisations in the compiling process (workers=0, one thread per job). The bound {verdict}.\n\n"
            + "\n".join(lines) + "\n")


def speedup(work: Path) -> str:
    from lrcc.zoo import decoder as D
    cfg = D.DecoderConfig(vocab=4096, dim=1536, ffn=4096, heads=12, blocks=4)
    ck = D.write_checkpoint(cfg, work / "mid-ck")
    results = {}
    for workers in (0, 1, 2):
        results[workers] = run(ck, work / f"mid-{workers}", workers, 8, 128)
        t = results[workers]["timings"]
        print(f"workers={workers}: factorisation {t['factorisation_s']:.1f} s, total {t['total_s']:.1f} s", flush=True)
    identical = same(work / "mid-0", work / "mid-1") and same(work / "mid-0", work / "mid-2")
    lines = ["| workers | factorisation (wall) | sum of job times | whole compile | factorisation speedup vs 1 worker |",
             "|---|---|---|---|---|"]
    f1 = results[1]["timings"]["factorisation_s"]
    for workers, label in ((0, "0 (in process)"), (1, "1"), (2, "2")):
        t = results[workers]["timings"]
        lines.append(f"| {label} | {t['factorisation_s']:.1f} s | {t['factorisation_job_s']:.1f} s | {t['total_s']:.1f} s | "
                     f"{f1 / t['factorisation_s']:.2f}x |")
    return (f"Decoder dim {cfg.dim}, SwiGLU {cfg.ffn}, {cfg.blocks} blocks ({cfg.blocks * 7} linear layers), params=0.5, "
            f"8 x 128 calibration tokens; each worker is a process with one thread. The three results are "
            f"{'identical byte for byte' if identical else 'NOT identical'}.\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=3, help="blocks of the large decoder (809 MB each)")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-workers", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    a = ap.parse_args()
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="lrcc-streaming-"))
    work.mkdir(parents=True, exist_ok=True)
    # each part keeps its table in benchmarks/results, so either can be rerun alone
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU only"
    try:
        if not a.skip_workers:
            (results / "streaming_workers.md").write_text(f"Machine: {machine}.\n\n" + speedup(work))
        if not a.skip_large:
            (results / "streaming_large.md").write_text(f"Machine: {machine}.\n\n" + large(work, a.blocks))
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    body = ""
    for title, name in (("Workers", "streaming_workers.md"), ("Peak memory", "streaming_large.md")):
        if (results / name).is_file():
            body += f"### {title}\n\n" + (results / name).read_text() + "\n"
    print(body)
    if not a.no_docs and body:
        write_section(ROOT / "docs" / "benchmarks.md", "streaming",
                      "## Compiling larger than memory (benchmarks/streaming.py)\n\n" + body)


if __name__ == "__main__":
    main()
