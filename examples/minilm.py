"""The main job: compress the bundled all-MiniLM-L6-v2 sentence encoder with lrcc.

Compiles the real pretrained model with the default target ("cpu") and the default budget
(max_error=0.01: as few parameters as the output error allows), prints the report, then a
quality/speed table against the original on held-out sentences, and saves the result.

    python examples/minilm.py [--budget params=0.5] [--target cpu] [--out out/minilm]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lrcc  # noqa: E402
from lrcc.planner.calibrate import output_error  # noqa: E402
from lrcc.zoo import corpus, minilm  # noqa: E402


def median_latency(model, inputs, repeats: int = 5) -> float:
    with torch.inference_mode():
        model(*inputs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default=None, help="e.g. params=0.5 (default: max_error=0.01)")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--out", default="out/minilm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    calibration, evaluation = corpus.splits(1280, 512)
    model = minilm.load_encoder("plain")
    cal_batches = minilm.encode_batches(calibration, 64)
    eval_batches = minilm.encode_batches(evaluation, 64)

    t = time.perf_counter()
    cm = lrcc.compile(model, cal_batches[0], target=args.target, budget=args.budget, calibration=cal_batches, progress=True)
    compile_s = time.perf_counter() - t
    print(cm.report)

    q = output_error(model, cm, eval_batches)
    gen = torch.Generator().manual_seed(0)
    speed = (torch.randint(1000, 30000, (32, 128), generator=gen), torch.ones(32, 128, dtype=torch.long))
    dense_s, lrcc_s = median_latency(model, speed), median_latency(cm, speed)
    t = cm.report.totals
    print()
    print(f"| model | encoder Linear params | cosine mean | cosine p5 | latency 32x128 ({args.threads} threads) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| original | {t['params_before']:,} | 1.0000 | 1.0000 | {dense_s * 1e3:.1f} ms |")
    print(f"| lrcc ({cm.budget}) | {t['params_after']:,} ({t['params_after'] / t['params_before']:.3f}) | "
          f"{q['cosine_mean']:.4f} | {q['cosine_p5']:.4f} | {lrcc_s * 1e3:.1f} ms ({dense_s / lrcc_s:.2f}x) |")
    print(f"evaluation: {q['samples']} held-out sentences; compile time {compile_s:.1f} s")
    out = cm.save(args.out)
    again = lrcc.load(out)
    same = torch.equal(again(*eval_batches[0]), cm(*eval_batches[0]))
    print(f"saved to {out}; reloaded model {'matches' if same else 'DIFFERS'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
