"""MiniLM (all-MiniLM-L6-v2) quality and CPU speed of low-rank compression, all in one run.

For keep fractions of the 36 encoder Linear layers' parameters: mean and 5th-percentile cosine of
sentence embeddings against the original model on a held-out evaluation set, for uniform plain
SVD, uniform whitened SVD (the SVD-LLM-style baseline) and lrcc's planner; CPU latency of each
against dense eager at batch 32 x sequence 128. Prints a table and rewrites the MiniLM section of
docs/benchmarks.md.

    python benchmarks/minilm.py [--keep 0.75 0.5 0.35] [--threads 2] [--no-write]
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lrcc  # noqa: E402
from lrcc.planner.calibrate import output_error  # noqa: E402
from lrcc.zoo import corpus, minilm  # noqa: E402
from lrcc.zoo.baselines import uniform_lowrank  # noqa: E402


def time_models(models: dict, inputs, repeats: int) -> dict[str, float]:
    """Median seconds per call of each model, measured interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(*inputs)
        for _ in range(repeats):
            for k, m in models.items():
                t = time.perf_counter()
                m(*inputs)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.35])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration", type=int, default=1280)
    ap.add_argument("--evaluation", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cal, ev = corpus.splits(args.calibration, args.evaluation)
    model = minilm.load_encoder("plain")
    cal_batches = minilm.encode_batches(cal, 64)
    eval_batches = minilm.encode_batches(ev, 64)
    gen = torch.Generator().manual_seed(0)
    speed_inputs = (torch.randint(1000, 30000, (32, 128), generator=gen), torch.ones(32, 128, dtype=torch.long))

    rows = []
    models = {"dense eager": model}
    for keep in args.keep:
        for name, build in (("uniform SVD", lambda: uniform_lowrank(model, cal_batches[0], keep, "svd")),
                            ("uniform whitened SVD", lambda: uniform_lowrank(model, cal_batches[0], keep, "whitened", cal_batches)),
                            ("lrcc planner", None)):
            t = time.perf_counter()
            if build is None:
                cm = lrcc.compile(model, cal_batches[0], budget=lrcc.Budget(params=keep), calibration=cal_batches)
                t_compile = time.perf_counter() - t
                kept = cm.report.totals["params_after"] / cm.report.totals["params_before"]
            else:
                cm = build()
                t_compile = time.perf_counter() - t
                kept = keep
            q = output_error(model, cm, eval_batches)
            rows.append({"keep": keep, "method": name, "kept": kept, "cos_mean": q["cosine_mean"], "cos_p5": q["cosine_p5"],
                         "compile_s": t_compile})
            models[f"{name} @ {keep}"] = cm
            print(f"keep {keep:.2f}  {name:22s} cosine mean {q['cosine_mean']:.4f}  p5 {q['cosine_p5']:.4f}  "
                  f"({t_compile:.1f} s)", flush=True)
    lat = time_models(models, speed_inputs, args.repeats)
    base = lat["dense eager"]
    for r in rows:
        r["latency_s"] = lat[f"{r['method']} @ {r['keep']}"]
        r["speedup"] = base / r["latency_s"]

    lines = ["| keep | method | params kept | cosine mean | cosine p5 | compile s | latency ms (32x128) | vs dense eager |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| 1.00 | dense eager | 1.000 | 1.0000 | 1.0000 | - | {base * 1e3:.1f} | 1.00x |")
    for r in rows:
        lines.append(f"| {r['keep']:.2f} | {r['method']} | {r['kept']:.3f} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} | "
                     f"{r['compile_s']:.1f} | {r['latency_s'] * 1e3:.1f} | {r['speedup']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    header = (f"## MiniLM low-rank: quality and CPU latency\n\n"
              f"`python benchmarks/minilm.py` on {platform.processor() or platform.machine()}, "
              f"{args.threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
              f"all-MiniLM-L6-v2, 36 encoder Linear layers; calibration {args.calibration} and evaluation "
              f"{args.evaluation} disjoint sentences of the offline corpus; cosine of sentence embeddings "
              f"against the original on the evaluation set; latency median of {args.repeats} interleaved runs.\n\n")
    write_section(ROOT / "docs" / "benchmarks.md", "minilm", header + table + "\n")


def write_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the section between <!-- key:begin --> and <!-- key:end --> markers."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# lrcc benchmarks\n\nEvery number here is written by a script under benchmarks/.\n"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
