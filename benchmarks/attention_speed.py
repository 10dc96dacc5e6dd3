"""Attention forms on the CPU: measured against predicted crossovers, and long sequences end to end.

1. One attention layer of MiniLM's shape (12 heads of 32, batch 1, a key padding mask) at
   sequence lengths from 64 to 8192: the wall time of exact attention (torch's
   scaled_dot_product_attention) and of each form as a compiled model runs it
   (lrcc.rewrites.linear_attention.approximate_attention). The measured crossover is the least
   length on the grid from which the form is faster at every longer length, and the predicted one
   is lrcc's (lrcc.targets.cost.crossover_length on target "cpu"), which the planner uses.
2. An encoder with MiniLM's layer shapes and pretrained weights, its position table extended to
   8192 by repeating the 512 learned rows. lrcc.compile prices it at L = 4096 (the example input)
   under a latency budget, re-planning until the compiled model timed here meets the budget
   (options measured_latency; --estimated-only plans by the cost model alone), and measures errors
   on packed text of --calibration-length tokens; then
   the exact and the compiled model run at L = 1024 ... 8192: wall time (fastest of --repeats) and
   peak memory, each in a fresh process (peak RSS from VmHWM, minus the RSS after loading the
   model, one warm-up pass at 16 tokens and building the input), so the memory is the forward
   pass's own.

3. The planner's choices under Budget(latency=--choice-budget) as the priced length grows from 128
   to 4096: how many attention sites it replaces, with which forms, and how many linear
   parameters it keeps.

    python3 benchmarks/attention_speed.py [--budget 0.25 0.3 0.45] [--lengths 1024 2048 4096 8192]
                                          [--threads 2] [--skip-layer] [--skip-choices]
                                          [--skip-model] [--no-docs]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs_sections import write_section  # noqa: E402
import lrcc  # noqa: E402
from lrcc.compiler import read_timings  # noqa: E402
from lrcc.rewrites import linear_attention as la  # noqa: E402
from lrcc.targets import get_target  # noqa: E402
from lrcc.targets.cost import attention_cost, crossover_length  # noqa: E402
from lrcc.zoo import corpus, minilm  # noqa: E402

HEADS, HEAD_DIM = 12, 32
LAYER_LENGTHS = [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
MAX_POSITIONS = 8192


def layer_forms() -> list[tuple[str, dict, str]]:
    """(form, knobs, label) for the forms the planner offers by default (and Linformer)."""
    out = []
    for m in (16, 64):
        out.append(("performer", {"features": m}, f"Performer, {m} features"))
    out.append(("elu", {}, "linear attention, elu+1"))
    for b in (32, 64):
        r = (b - 1) // 2
        out.append(("window", {"window": r, "global_keys": 0, "clusters": 1}, f"local window of {2 * r + 1} keys"))
    for b in (32, 64):
        sb = la.split_budget(b)
        out.append(("scatterbrain", {"window": sb.window, "global_keys": sb.global_keys, "clusters": sb.clusters,
                                     "features": sb.features}, f"Scatterbrain, {b} per query"))
    for b in (32, 64):
        cl = la.clustered_budget(b)
        out.append(("clustered", {"window": cl.window, "global_keys": cl.global_keys, "clusters": cl.clusters},
                    f"sparse + centroids, {b} per query"))
    out.append(("linformer", {"segments": 64}, "Linformer, 64 segments"))
    return out


def _time(fn, repeats: int, min_seconds: float = 0.0, best: bool = False) -> float:
    """Wall time of fn over at least `repeats` runs, and as many as fit in min_seconds: the median,
    or with best=True the fastest run (noise on a shared machine only ever adds time)."""
    with torch.inference_mode():
        fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - start < min_seconds:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(times) if best else statistics.median(times)


def achieved() -> str:
    """What torch reaches on this CPU, against the cpu target's peak (lrcc.targets): fp32 matmuls of
    MiniLM's linear shapes at 4,096 tokens and exact attention at L = 4,096 (4 L^2 d FLOPs per head)."""
    gen = torch.Generator().manual_seed(1)
    rates = []
    for n_in, n_out in ((384, 1536), (1536, 384), (384, 384)):
        x, w = torch.randn(4096, n_in, generator=gen), torch.randn(n_out, n_in, generator=gen)
        rates.append(2 * 4096 * n_in * n_out / _time(lambda: F.linear(x, w), 5, 0.5, best=True) / 1e9)
    q, k, v = (torch.randn(1, HEADS, 4096, HEAD_DIM, generator=gen) for _ in range(3))
    sdpa = 4 * HEADS * 4096 ** 2 * HEAD_DIM / _time(lambda: F.scaled_dot_product_attention(q, k, v), 3, 0.5, best=True) / 1e9
    return (f"Achieved by torch here: fp32 matmuls of MiniLM's linear shapes at 4,096 tokens "
            f"{min(rates):.0f}-{max(rates):.0f} GFLOP/s, exact attention at L = 4,096 {sdpa:.0f} GFLOP/s; the cpu "
            f"target's roofline uses {get_target('cpu').peak_flops / 1e9:.0f} GFLOP/s and "
            f"{get_target('cpu').bandwidth / 1e9:.0f} GB/s.")


def fitted_crossover(exact: dict[int, float], form: dict[int, float]) -> int | None:
    """The crossing of relative least-squares fits, exact ~ a + b L + c L^2 and form ~ a + b L, over the grid:
    the least integer L from which the fitted form is faster at every longer length up to the grid's
    end (None if it is not faster there)."""
    lengths = sorted(exact)
    xs = torch.tensor(lengths, dtype=torch.float64)
    def fit(cols, ys):  # relative least squares: each length's timing weighs alike, short or long
        y = torch.tensor(ys, dtype=torch.float64)
        return torch.linalg.lstsq(torch.stack(cols, 1) / y[:, None], torch.ones(len(ys), 1, dtype=torch.float64)).solution[:, 0]
    ce = fit([xs ** 0, xs, xs ** 2], [exact[L] for L in lengths])
    cf = fit([xs ** 0, xs], [form[L] for L in lengths])
    ell = torch.arange(1, lengths[-1] + 1, dtype=torch.float64)
    slower = (cf[0] + cf[1] * ell >= ce[0] + ce[1] * ell + ce[2] * ell * ell).nonzero()
    if len(slower) == 0:
        return 1
    last = int(slower[-1]) + 1  # the longest length at which the fitted form is not faster
    return None if last >= lengths[-1] else last + 1


def layer_table(repeats: int) -> tuple[str, list[dict]]:
    gen = torch.Generator().manual_seed(0)
    forms = layer_forms()
    times: dict[str, dict[int, float]] = {label: {} for _, _, label in forms}
    times["exact"] = {}
    for L in LAYER_LENGTHS:
        q, k, v = (torch.randn(1, HEADS, L, HEAD_DIM, generator=gen) for _ in range(3))
        mask = torch.ones(1, 1, 1, L, dtype=torch.bool)
        scale = HEAD_DIM ** -0.5
        times["exact"][L] = _time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeats, 0.5, best=True)
        for form, knobs, label in forms:
            param = None
            if form in ("performer", "scatterbrain"):
                param = la.orthogonal_features(HEAD_DIM, knobs["features"], gen)
            if form == "linformer":
                n = min(knobs["segments"], L)
                param = torch.linspace(0, L, n + 1).round().long().expand(HEADS, n + 1).contiguous()
            kw = {k: knobs[k] for k in ("window", "global_keys", "clusters") if k in knobs}
            times[label][L] = _time(lambda: la.approximate_attention(q, k, v, mask, param, form=form, scale=scale, **kw),
                                    repeats, 0.5, best=True)
        print(f"L={L}: exact {times['exact'][L] * 1e3:.2f} ms, " + ", ".join(
            f"{label} {times[label][L] * 1e3:.2f}" for _, _, label in forms), flush=True)
    cpu = get_target("cpu")
    rows = []
    for form, knobs, label in forms:
        predicted = crossover_length(form, knobs, cpu, HEADS, HEAD_DIM, HEAD_DIM)
        measured = None
        for L in reversed(LAYER_LENGTHS):
            if times[label][L] < times["exact"][L]:
                measured = L
            else:
                break
        rows.append({"form": label, "predicted": predicted, "measured": measured,
                     "fitted": fitted_crossover(times["exact"], times[label]),
                     "ratio_4096": times["exact"][4096] / times[label][4096] if 4096 in times[label] else None,
                     "predicted_4096": attention_cost(form, knobs, 1, HEADS, 4096, 4096, HEAD_DIM, HEAD_DIM).latency(cpu, {}),
                     "times": times[label]})
    lines = ["| form | predicted crossover (cpu target) | measured: fitted crossover | measured: on the grid | "
             "exact / form at L=512 | at L=2048 | at L=8192 | at L=4096: predicted ms / measured ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["times"]
        ratio = lambda L: f"{times['exact'][L] / t[L]:.2f}x" if L in t else "-"  # noqa: E731
        meas = f"L >= {r['measured']:,}" if r["measured"] else "not below 8,192"
        pred = f"L >= {r['predicted']:,}" if r["predicted"] else "none"
        fitted = f"L >= {r['fitted']:,}" if r["fitted"] else "not below 8,192"
        lines.append(f"| {r['form']} | {pred} | {fitted} | {meas} | {ratio(512)} | {ratio(2048)} | {ratio(8192)} | "
                     f"{r['predicted_4096'] * 1e3:.1f} / {t[4096] * 1e3:.1f} |")
    exact_ms = ", ".join(f"{L}: {times['exact'][L] * 1e3:.1f}" for L in (512, 2048, 4096, 8192))
    pred = attention_cost("exact", {}, 1, HEADS, 4096, 4096, HEAD_DIM, HEAD_DIM).latency(cpu, {}) * 1e3
    text = "\n".join(lines) + f"\n\nExact attention (ms): {exact_ms}; predicted at 4096: {pred:.1f}.\n\n" + achieved() + "\n"
    return text, rows


# --- the long-sequence encoder ------------------------------------------------------------------------------
def long_encoder() -> torch.nn.Module:
    """MiniLM's pretrained sentence encoder with its position table extended to MAX_POSITIONS (the
    512 learned rows repeated)."""
    plain = minilm.load_encoder("plain")
    cfg = dataclasses.replace(plain.encoder.config, max_position_embeddings=MAX_POSITIONS)
    state = dict(plain.encoder.state_dict())
    table = state["embeddings.position.weight"]
    state["embeddings.position.weight"] = table.repeat(-(-MAX_POSITIONS // table.shape[0]), 1)[:MAX_POSITIONS].clone()
    bert = minilm.MiniBert(cfg)
    bert.load_state_dict(state)
    return minilm.SentenceEncoder(bert).eval()


def model_inputs(L: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(L)
    ids = torch.randint(1000, 30000, (1, L), generator=gen)
    return ids, torch.ones(1, L, dtype=torch.long)


def child(kind: str, path: str, L: int, repeats: int, threads: int) -> None:
    """Run in a fresh process: time one model at length L and report its forward pass's peak memory."""
    torch.set_num_threads(threads)
    model = long_encoder() if kind == "exact" else lrcc.load(path)
    with torch.inference_mode():  # one-time costs (lazy imports, first-call set-up) are not the pass's memory
        model(*model_inputs(16))
    x = model_inputs(L)
    base = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(*x)
        first = time.perf_counter() - t0
    peak = _vm("VmHWM")
    seconds = _time(lambda: model(*x), repeats, best=True) if repeats else first
    print(json.dumps({"kind": kind, "L": L, "seconds": seconds, "peak_mib": (peak - base) / 1024}))


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {key} in /proc/self/status")


def model_table(args) -> str:
    model = long_encoder()
    sentences = corpus.splits(1280, 0)[0]
    cal = minilm.packed_batches(sentences, args.calibration, args.calibration_length, 4)
    example = tuple(torch.cat([x, x]) for x in model_inputs(args.price_length))  # batch 2: the batch dim stays symbolic
    summaries, dirs = [], []
    for budget in args.budget:
        out = ROOT / "out" / f"attention_speed_{budget}"
        t = time.perf_counter()
        if args.reuse and (out / "plan.json").is_file():  # time an earlier compile again
            cm = lrcc.load(out)
            compile_s = read_timings(out).get("total", float("nan"))
        else:
            cm = lrcc.compile(model, example, budget=lrcc.Budget(latency=budget), calibration=cal, progress=True,
                              options={"measured_latency": not args.estimated_only})
            compile_s = time.perf_counter() - t
            cm.save(out)
        print(cm.report)
        dirs.append(out)
        chosen: dict[str, int] = {}
        for r in cm.report.rows:
            if r["rule"] in ("approximate_attention", "linformer_attention"):
                chosen[r["choice"]] = chosen.get(r["choice"], 0) + 1
        weights = sum(1 for r in cm.report.rows if r["rule"] not in ("-", "approximate_attention", "linformer_attention"))
        t_ = cm.report.totals
        v = cm.report.verification
        att = ", ".join(f"{n} x {c}" for c, n in chosen.items()) or "none"
        clock = [n for n in cm.report.notes if n.startswith("measured latency")]
        clock = (f" Timed while compiling (batch 2 x {args.price_length}): {len(clock)} plan(s), the last "
                 f"{clock[-1].split(' of the original')[0].split()[-1]} of exact." if clock else "")
        summaries.append(f"- Budget(latency={budget}) (compile {compile_s:.0f} s): attention sites {att}; {weights} linear "
                         f"site(s) compressed, {t_['params_after'] / t_['params_before']:.2f} of their parameters "
                         f"kept; estimated latency {t_['model_latency_after_s'] / t_['model_latency_before_s']:.2f} of "
                         f"exact. Measured on held-out packed text of {args.calibration_length} tokens: relative "
                         f"squared error {v['rel_error']:.3g}, cosine {v['cosine_mean']:.3f}.{clock}")
    results = {}
    for L in args.lengths:
        for kind, path in [("exact", "-")] + [(f"lrcc {b}", str(d)) for b, d in zip(args.budget, dirs)]:
            child_kind = "exact" if kind == "exact" else "lrcc"
            cmd = [sys.executable, __file__, "--child", child_kind, path, str(L), str(args.repeats), str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if res.returncode != 0:
                raise SystemExit(f"child {kind} L={L} failed:\n{res.stderr[-3000:]}")
            results[(kind, L)] = json.loads(res.stdout.strip().splitlines()[-1])
            print(kind, results[(kind, L)], flush=True)
    names = [f"lrcc {b}" for b in args.budget]
    head = "| L | exact (s) | " + " | ".join(f"latency={b}: s (speed-up)" for b in args.budget) + \
        " | exact peak MiB | " + " | ".join(f"latency={b}: peak MiB" for b in args.budget) + " |"
    lines = [head, "|---:|---:|" + "---:|" * (2 * len(names) + 1)]
    for L in args.lengths:
        e = results[("exact", L)]
        cells = [f"{results[(n, L)]['seconds']:.3f} ({e['seconds'] / results[(n, L)]['seconds']:.2f}x)" for n in names]
        mem = [f"{results[(n, L)]['peak_mib']:.0f}" for n in names]
        lines.append(f"| {L:,} | {e['seconds']:.3f} | " + " | ".join(cells) + f" | {e['peak_mib']:.0f} | " +
                     " | ".join(mem) + " |")
    slope = []
    for n in ["exact"] + names:
        xs = [float(L) for L in args.lengths]
        ys = [results[(n, L)]["peak_mib"] for L in args.lengths]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        slope.append(f"{n} {1024 * b:.0f} MiB per 1,024 tokens")
    return (f"Priced at L={args.price_length}, calibrated on {args.calibration} packed sequences of "
            f"{args.calibration_length} tokens:\n\n" + "\n".join(summaries) + "\n\n" + "\n".join(lines) +
            "\n\nPeak memory grows linearly in L (least-squares slope over these lengths): " + "; ".join(slope) + ".\n")


def choices_table(args) -> str:
    """What the planner chooses under one latency budget as the sequence grows (priced at each L,
    errors measured on the same packed calibration text)."""
    model = long_encoder()
    cal = minilm.packed_batches(corpus.splits(1280, 0)[0], args.choice_calibration, 256, 8)
    lines = ["| L (priced) | attention sites replaced | their forms | linear parameters kept | "
             "estimated model latency after / before | measured output error (256 tokens) |",
             "|---:|---:|---|---:|---:|---:|"]
    for L in args.choice_lengths:
        example = tuple(torch.cat([x, x]) for x in model_inputs(L))
        cm = lrcc.compile(model, example, budget=lrcc.Budget(latency=args.choice_budget), calibration=cal)
        att = [r for r in cm.report.rows if r["rule"] in ("approximate_attention", "linformer_attention")]
        forms: dict[str, int] = {}
        for r in att:
            forms[r["choice"]] = forms.get(r["choice"], 0) + 1
        t = cm.report.totals
        lines.append(f"| {L:,} | {len(att)} of 6 | {', '.join(f'{n} x {c}' for c, n in forms.items()) or '-'} | "
                     f"{t['params_after'] / t['params_before']:.2f} | "
                     f"{t['model_latency_after_s'] / t['model_latency_before_s']:.2f} | {t['measured_error']:.3g} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, nargs="+", default=[0.25, 0.3, 0.45],
                    help="latency budgets of the long-sequence compiles")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--price-length", type=int, default=4096)
    ap.add_argument("--calibration", type=int, default=16, help="packed calibration sequences")
    ap.add_argument("--calibration-length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--choice-budget", type=float, default=0.5, help="latency budget of the choices-by-length table")
    ap.add_argument("--choice-calibration", type=int, default=64, help="packed 256-token calibration sequences")
    ap.add_argument("--choice-lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--skip-choices", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="time the compiled models an earlier run saved under out/")
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--estimated-only", action="store_true",
                    help="plan by the cost model alone (no measured_latency re-planning)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = f"{platform.machine()} CPU, {args.threads} thread(s), torch {torch.__version__}"
    def publish(key: str, heading: str, intro: str, text: str) -> None:
        print(text)
        if not args.no_docs:
            write_section(ROOT / "docs" / "benchmarks.md", key, f"## {heading} (benchmarks/attention_speed.py)\n\n"
                          + intro + "\n\n" + text)

    if not args.skip_layer:
        publish("attention-crossover", "Attention forms: predicted and measured crossovers",
                f"One attention layer of MiniLM's shape ({HEADS} heads of {HEAD_DIM}, batch 1, key "
                f"padding mask), {machine}; the fastest of at least {args.layer_repeats} runs and 0.5 s of them "
                "per form and length, on the grid "
                f"{', '.join(map(str, LAYER_LENGTHS))}. Predicted: the least L from which lrcc's cost model "
                "(roofline of the cpu target, symbolic in L) prices the form below exact attention; "
                "measured: where least-squares fits of the timings cross (exact a + b L + c L^2, the form "
                "a + b L), and the least grid length from which the form is faster at every longer one "
                "(noisier: one slow run at one length moves it).", layer_table(args.layer_repeats)[0])
    if not args.skip_choices:
        publish("attention-choices", "What the planner chooses as sequences grow",
                f"The MiniLM-shaped encoder above, Budget(latency={args.choice_budget}) on the cpu target, "
                f"priced at each length L (the example input), calibrated on {args.choice_calibration} packed "
                "sequences of 256 tokens (every 8th batch of 8 held out for the measured error). As Greenformers "
                "found, weight factorisation carries the budget for short sequences and attention forms take over "
                "for long ones; here it follows from lrcc's own cost model.", choices_table(args))
    if not args.skip_model:
        publish("attention-long", "Long sequences: MiniLM-shaped encoder at L = 1024 to 8192",
                f"{machine}. MiniLM's pretrained layers, position table extended to {MAX_POSITIONS} "
                f"(the 512 rows repeated); batch 1; time the fastest of {args.repeats} runs (noise on a shared "
                "machine only adds time), peak memory the forward pass's own (VmHWM in a fresh process, minus its "
                "RSS before the pass).", model_table(args))

if __name__ == "__main__":
    main()
