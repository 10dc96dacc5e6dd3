"""MiniLM (all-MiniLM-L6-v2): quality per parameter and per byte of lrcc's plans, all in one run.

Table "lowrank":

For keep fractions of the 36 encoder Linear layers' parameters: mean and 5th-percentile cosine of
sentence embeddings against the original model on a held-out evaluation set, for uniform plain
SVD, uniform whitened SVD (the SVD-LLM-style baseline) and lrcc's planner; CPU latency of each
against dense eager at batch 32 x sequence 128. Prints a table and rewrites the MiniLM section of
docs/benchmarks.md.

Table "bytes": at byte budgets (fractions of the 36 Linear layers' fp32 bytes), mean and p5
cosine for uniform round-to-nearest int8 per channel and int4 g128, and for lrcc's planner
restricted to low-rank forms, restricted to quantised forms, and choosing across all forms (the
joint plan); plus a Pareto plot, docs/minilm_pareto.png.

    python benchmarks/minilm.py [--tables lowrank bytes] [--keep 0.75 0.5 0.35]
                                [--bytes 0.25 0.125 0.08] [--threads 2] [--no-write]
"""
from __future__ import annotations

import argparse
import platform
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
from lrcc.rewrites import factorize_linear, quantize_linear  # noqa: E402
from lrcc.zoo.baselines import uniform_lowrank, uniform_quant  # noqa: E402
from docs_sections import write_section  # noqa: E402


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
    ap.add_argument("--tables", nargs="+", default=["lowrank", "bytes"], choices=["lowrank", "bytes"])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.35])
    ap.add_argument("--bytes", type=float, nargs="+", default=[0.25, 0.125, 0.08])
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
    if "lowrank" in args.tables:
        lowrank_table(args, model, cal_batches, eval_batches)
    if "bytes" in args.tables:
        bytes_table(args, model, cal_batches, eval_batches)


def lowrank_table(args, model, cal_batches, eval_batches) -> None:
    gen = torch.Generator().manual_seed(0)
    speed_inputs = (torch.randint(1000, 30000, (32, 128), generator=gen), torch.ones(32, 128, dtype=torch.long))

    rows = []
    dense_fast = torch.compile(model, dynamic=None)
    with torch.inference_mode():
        dense_fast(*speed_inputs)
    models = {"dense eager": model, "dense + inductor": dense_fast}
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
            if build is None:
                # the same plan run through inductor (the first call pays inductor's compile time)
                fast = lrcc.CompiledModel(cm.graph, cm.report, cm.target, cm.budget, backend="inductor")
                t = time.perf_counter()
                with torch.inference_mode():
                    fast(*speed_inputs)
                rows.append({**rows[-1], "method": "lrcc planner + inductor",
                             "compile_s": t_compile + time.perf_counter() - t})
                models[f"lrcc planner + inductor @ {keep}"] = fast
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
    lines.append(f"| 1.00 | dense + inductor | 1.000 | 1.0000 | 1.0000 | - | {lat['dense + inductor'] * 1e3:.1f} | "
                 f"{base / lat['dense + inductor']:.2f}x |")
    for r in rows:
        lines.append(f"| {r['keep']:.2f} | {r['method']} | {r['kept']:.3f} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} | "
                     f"{r['compile_s']:.1f} | {r['latency_s'] * 1e3:.1f} | {r['speedup']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    header = (f"## MiniLM low-rank: quality and CPU latency\n\n"
              f"`python benchmarks/minilm.py --tables lowrank` on {platform.processor() or platform.machine()}, "
              f"{args.threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
              f"all-MiniLM-L6-v2, 36 encoder Linear layers; calibration {args.calibration} and evaluation "
              f"{args.evaluation} disjoint sentences of the offline corpus; cosine of sentence embeddings "
              f"against the original on the evaluation set; latency median of {args.repeats} interleaved runs. "
              f"'+ inductor' rows run the same plan (the same weights and quality) through torch.compile's "
              f"inductor; their compile time includes inductor's first-call compile.\n\n")
    write_section(ROOT / "docs" / "benchmarks.md", "minilm", header + table + "\n")


def bytes_table(args, model, cal_batches, eval_batches) -> None:
    rows = []
    for label, bits, group in (("uniform int8 per channel (RTN)", 8, 0), ("uniform int4 g128 (RTN)", 4, 128)):
        t = time.perf_counter()
        m, frac = uniform_quant(model, cal_batches[0], bits, group)
        q = output_error(model, m, eval_batches)
        rows.append({"budget": None, "method": label, "bytes": frac, "cos_mean": q["cosine_mean"], "cos_p5": q["cosine_p5"],
                     "compile_s": time.perf_counter() - t})
        print(f"{label:34s} bytes {frac:.3f} cosine mean {q['cosine_mean']:.4f} p5 {q['cosine_p5']:.4f}", flush=True)
    variants = (("lrcc low-rank only", [factorize_linear]), ("lrcc quantised only", [quantize_linear]), ("lrcc joint plan", None))
    for b in args.bytes:
        for label, rules in variants:
            opts = {} if rules is None else {"rules": rules}
            t = time.perf_counter()
            try:
                cm = lrcc.compile(model, cal_batches[0], budget=lrcc.Budget(bytes=b), calibration=cal_batches, options=opts)
            except lrcc.BudgetError as e:
                print(f"bytes {b}: {label}: {e}", flush=True)
                rows.append({"budget": b, "method": label, "bytes": float("nan"), "cos_mean": float("nan"),
                             "cos_p5": float("nan"), "compile_s": time.perf_counter() - t, "note": "budget unreachable"})
                continue
            dt = time.perf_counter() - t
            tt = cm.report.totals
            q = output_error(model, cm, eval_batches)
            forms = sorted({r["choice"].split(",")[0].split(" + sequential")[0] for r in cm.report.rows})
            rows.append({"budget": b, "method": label, "bytes": tt["bytes_after"] / tt["bytes_before"],
                         "cos_mean": q["cosine_mean"], "cos_p5": q["cosine_p5"], "compile_s": dt,
                         "note": ", ".join(forms[:6]) + (" ..." if len(forms) > 6 else "")})
            print(f"bytes {b:.3f} {label:22s} used {rows[-1]['bytes']:.4f} cosine mean {q['cosine_mean']:.4f} "
                  f"p5 {q['cosine_p5']:.4f} ({dt:.1f} s)", flush=True)
    lines = ["| budget (bytes) | method | bytes used | cosine mean | cosine p5 | compile s | forms chosen |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:.3f}"
        lines.append(f"| {budget} | {r['method']} | {r['bytes']:.4f} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} | "
                     f"{r['compile_s']:.1f} | {r.get('note', '')} |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    plot_pareto(rows, ROOT / "docs" / "minilm_pareto.png")
    header = (f"## MiniLM per byte: low-rank, quantised and joint plans\n\n"
              f"`python benchmarks/minilm.py --tables bytes` on {platform.processor() or platform.machine()}, "
              f"{args.threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Bytes are the stored "
              f"size of the 36 encoder Linear layers (packed codes, fp16 scales and zeros, CSR indices, biases) as a "
              f"fraction of their fp32 size; cosine of sentence embeddings against the original on {args.evaluation} "
              f"held-out sentences.\n\n![error vs bytes](minilm_pareto.png)\n\n")
    write_section(ROOT / "docs" / "benchmarks.md", "minilm-bytes", header + table + "\n")


def plot_pareto(rows: list[dict], path: Path) -> None:
    """Error (1 - mean cosine, log scale) against bytes for every method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["bytes"] == r["bytes"]:  # not NaN
            by_method.setdefault(r["method"], []).append((r["bytes"], max(1 - r["cos_mean"], 1e-5)))
    for method, pts in by_method.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("bytes, fraction of fp32 (36 encoder Linear layers)")
    ax.set_ylabel("1 - mean embedding cosine")
    ax.set_yscale("log")
    ax.set_title("all-MiniLM-L6-v2: error vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
