"""The long fuzz campaign over lrcc's front doors: the ONNX importer and the budget parser / CLI.

Runs the mutators of tests/test_fuzz.py many more times than the default test run: N mutated ONNX
files through `lrcc.ir.from_onnx.onnx_to_module` (and the imported module on its example inputs),
and N budget inputs through Budget.parse, Budget.coerce, parse_size and `lrcc compile --budget`.
The contract is that each input is accepted or refused with an LrccError; anything else is a
crash, listed with the case that reproduces it (`tests.test_fuzz.replay("seed:i")` rebuilds an
ONNX mutant). Prints a table of outcomes and writes the "fuzz" section of docs/benchmarks.md.

    python benchmarks/fuzz.py --onnx 10000 --budget 10000 [--seed 1000] [--no-write]

The process runs under an address-space limit (--memory-gb, default 16), so a mutant that makes
lrcc ask for absurd memory shows up as an error instead of the kernel's out-of-memory killer.
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_sections import write_section  # noqa: E402


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=int, default=10000, help="mutated ONNX files")
    ap.add_argument("--budget", type=int, default=10000, help="budget inputs")
    ap.add_argument("--seed", type=int, default=1000, help="ONNX case ids are SEED:0 .. SEED:N-1")
    ap.add_argument("--random", action="store_true", help="hypothesis draws fresh budget inputs (default: derandomized)")
    ap.add_argument("--memory-gb", type=float, default=16.0, help="address-space limit of this process")
    ap.add_argument("--top", type=int, default=12, help="rejection kinds listed per campaign")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    limit = int(args.memory_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import onnx
    import torch
    torch.set_num_threads(1)
    from tests.test_fuzz import budget_campaign, onnx_campaign, seed_models

    seeds = seed_models()
    t0 = time.perf_counter()

    def progress(i: int) -> None:
        if (i + 1) % 1000 == 0:
            print(f"  onnx {i + 1}/{args.onnx} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    onnx_result = onnx_campaign(args.onnx, seed=args.seed, seeds=seeds, progress=progress)
    t_onnx = time.perf_counter() - t0
    t1 = time.perf_counter()
    budget_result = budget_campaign(args.budget, derandomize=not args.random)
    t_budget = time.perf_counter() - t1

    # ONNX: outcomes, then the most common kinds of LrccError
    o = onnx_result.outcomes()
    n = sum(o.values())
    body = [f"`python benchmarks/fuzz.py --onnx {args.onnx} --budget {args.budget} --seed {args.seed}` on "
            f"{platform.machine()}, 1 thread, torch {torch.__version__}, onnx {onnx.__version__}, "
            f"Python {platform.python_version()}, {date.today().isoformat()}. Mutants of {len(seeds)} seed models "
            f"({', '.join(sorted(seeds))}): 20% byte-level (truncate, flip, insert, delete, splice), 80% through the "
            "protobuf API (operators swapped, unknown or given odd attributes; initializers with wrong dims, "
            "element types, NaN/Inf, zero-size or huge values; dangling, duplicate and cyclic names; broken graph "
            "inputs/outputs, opsets and external data). Contract: each input is accepted or refused with an "
            "LrccError; a crash is any other exception, or an LrccError wrapping a torch error on a model that "
            "onnxruntime and the ONNX reference evaluator both run.\n\n"]
    body.append(_table(["ONNX importer", "cases", "share"],
                       [[k, f"{v:,}", f"{v / max(n, 1):.1%}"] for k, v in
                        [("accepted (imported and ran)", o["accepted"]),
                         ("LrccError at import", o["rejected at import"]),
                         ("LrccError at run", o["rejected at run"]),
                         ("**crash**", o["CRASH"]),
                         ("total", n)]]))
    body.append(f"\n{t_onnx:.0f} s ({1e3 * t_onnx / max(n, 1):.1f} ms a case); slowest case "
                f"{onnx_result.slowest[0]:.1f} s ({onnx_result.slowest[1]}).\n\n")
    kinds = Counter({k: v for k, v in onnx_result.counts.items() if k[0].startswith("rejected")})
    body.append(_table(["most common LrccError kinds (file, names and numbers blanked)", "where", "cases"],
                       [[f"`{_cell(d)}`", w.removeprefix("rejected "), f"{c:,}"]
                        for (w, d), c in kinds.most_common(args.top)]))
    body.append(f"\n{len(kinds)} distinct kinds in all.\n\n")

    # budgets: per entry point
    b = budget_result.counts
    entries = ["Budget.parse", "Budget.coerce", "parse_size", "cli"]
    rows = []
    for e in entries:
        mine = {k: v for k, v in b.items() if k[0].startswith(e + ":")}
        total = sum(mine.values())
        ok = sum(v for k, v in mine.items() if "accepted" in k[0])
        crash = sum(v for k, v in mine.items() if "CRASH" in k[0])
        rows.append([e if e != "cli" else "`lrcc compile --budget`", f"{total:,}", f"{ok:,}", f"{total - ok - crash:,}",
                     f"{crash:,}"])
    body.append(_table(["budget entry point", "inputs", "accepted", "refused (BudgetError / exit 2)", "**crash**"], rows))
    nb = sum(b.values())
    body.append(f"\n{t_budget:.0f} s for {nb:,} inputs (hypothesis, "
                f"{'random' if args.random else 'derandomized'}: text, near-valid specs, unicode digits, huge "
                "exponents, nan/inf, empty parts, duplicate keys; ints past float range, numpy scalars, Fractions, "
                "Decimals, complex, dicts with odd keys).\n\n")
    bkinds = Counter({k: v for k, v in b.items() if "accepted" not in k[0] and "CRASH" not in k[0]})
    body.append(_table(["most common refusals", "entry point", "inputs"],
                       [[f"`{_cell(d)}`", w.split(":")[0], f"{c:,}"] for (w, d), c in bkinds.most_common(args.top)]))

    crashes = onnx_result.crashes + budget_result.crashes
    if crashes:
        body.append(f"\n**{len(crashes)} crash(es)**; the first:\n\n```\n" + "\n\n".join(c[:1500] for c in crashes[:3])
                    + "\n```\n")
    text = "## Fuzzing the ONNX importer and the budget parser\n\n" + "".join(body)
    print(text)
    if crashes:
        print("\n\n".join(crashes), file=sys.stderr)
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", "fuzz", text)
        print("wrote docs/benchmarks.md (fuzz)", file=sys.stderr)
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    main()
