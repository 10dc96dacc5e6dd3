"""ONNX import conformance: the ONNX backend node tests through lrcc's ONNX import.

For every node test case shipped with the onnx package whose operators are all in
lrcc.ir.from_onnx.SUPPORTED_OPS: import it, torch.export it into lrcc's IR, lower it back to torch
and compare with the expected outputs (see lrcc/ir/onnx_conformance.py). Prints a summary and
writes docs/onnx_conformance.md: one row per operator (cases, passed, failed, first failure).

    python benchmarks/onnx_conformance.py [--ops Gemm MatMul ...] [--no-write] [--verbose]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lrcc.ir.from_onnx import SUPPORTED_OPS  # noqa: E402
from lrcc.ir.onnx_conformance import RTOL, RTOL_FP16, Conformance, node_test_cases, run_conformance  # noqa: E402

DOC = ROOT / "docs" / "onnx_conformance.md"


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render(result: Conformance, seconds: float) -> str:
    """The markdown page: how it was run, totals, and the per-operator table."""
    import onnx
    rows = result.per_op
    claimed = {op: row for op, row in rows.items() if op in SUPPORTED_OPS}
    by_body = {op: row for op, row in rows.items() if op not in SUPPORTED_OPS and not op.endswith("(expanded)")}
    expanded = {op: row for op, row in rows.items() if op.endswith("(expanded)")}
    untested = sorted(set(SUPPORTED_OPS) - set(rows))
    element = sum(r.element_type for r in result.results)
    eager = sum(r.how == "eager" and r.passed for r in result.results)
    other = [r for r in result.results if not r.passed and not r.element_type]
    training = sum("training mode" in r.reason for r in other)
    data_sizes = sum("computed from the input data" in r.reason for r in other)
    rest = len(other) - training - data_sizes
    lines = [
        "# ONNX import conformance",
        "",
        "Written by `python benchmarks/onnx_conformance.py`; do not edit by hand.",
        "",
        "The ONNX backend node tests (the cases shipped in `onnx.backend.test.case.node`) run through "
        "lrcc's ONNX import: `onnx_to_module` -> `import_module` (torch.export into lrcc's IR) -> "
        "`lower_to_torch`, and the lowered module's outputs are compared with the expected ones "
        f"(rtol = atol = {RTOL:g} for float32/64, {RTOL_FP16:g} for float16, exact for integers and booleans; "
        "shapes and element types must match). A case runs when every one of its nodes is in "
        "`lrcc.ir.from_onnx.SUPPORTED_OPS` or is an operator ONNX defines by a function body made of "
        "those (the import expands it). Graph inputs that a node reads as a shape argument "
        "(a Reshape's shape, a Slice's starts, reduction axes) are frozen to the test's values, as "
        "they are constants or shape arithmetic in exported models; torch.export cannot trace a shape "
        "taken from the input data.",
        "",
        f"onnx {onnx.__version__}, torch {torch.__version__}, Python {platform.python_version()}; "
        f"{len(node_test_cases())} node test cases, {len(result.results)} run, {result.skipped} skipped "
        f"(an operator lrcc cannot import); {seconds:.0f} s.",
        "",
        f"**{result.passed} of {len(result.results)} passed.** {element} of the {result.failed} failures "
        "are element types lrcc does not take (bfloat16, float8, int4, uint16/32/64, strings: torch has "
        "no CPU kernels or numpy no type for them). Of the others, "
        f"{training} run an operator in training mode (Dropout, BatchNormalization: lrcc compiles "
        f"inference graphs), {data_sizes} take an output size from the input data (the window operators' "
        "size, CenterCropPad's shape: torch.export cannot trace that, a model with a constant size imports "
        f"fine) and {rest} fail for another reason; all are listed per operator below."
        + (f" {eager} passing case(s) have no input left after freezing (Constant, ConstantOfShape, "
           "Range): the imported module is run directly, as there is nothing to export." if eager else ""),
        "",
        "## Operators lrcc claims (SUPPORTED_OPS)",
        "",
        "| op | cases | passed | failed | of which element type | first failure (another reason first) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for op, row in claimed.items():
        lines.append(f"| {op} | {row['cases']} | {row['passed']} | {row['failed']} | {row['element_type']} | "
                     f"{_cell(row['first_failure'])} |")
    if untested:
        lines += ["", "Claimed operators without a runnable node test case: " + ", ".join(untested) + "."]
    lines += [
        "",
        "## Operators imported through their ONNX function body",
        "",
        "Operators without a converter of their own that ONNX defines as a function of other operators "
        "(Attention, RotaryEmbedding, ...): the import replaces each such node by its function body. "
        "A case runs when that body uses supported operators only.",
        "",
        "| op | cases | passed | failed | of which element type | first failure (another reason first) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for op, row in by_body.items():
        lines.append(f"| {op} | {row['cases']} | {row['passed']} | {row['failed']} | {row['element_type']} | "
                     f"{_cell(row['first_failure'])} |")
    lines += [
        "",
        "## Function operators written out as their function bodies",
        "",
        "The `_expanded` cases: an operator that ONNX defines as a function (claimed by lrcc or not), "
        "written out as its body, here made only of supported operators. They exercise the shape "
        "arithmetic (Shape, Gather, Concat, Reshape, Expand, Where, ...) that exporters produce.",
        "",
        "| op | cases | passed | failed | of which element type | first failure (another reason first) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for op, row in expanded.items():
        lines.append(f"| {op} | {row['cases']} | {row['passed']} | {row['failed']} | {row['element_type']} | "
                     f"{_cell(row['first_failure'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="*", help="only these operators (case_op names)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/onnx_conformance.md alone")
    ap.add_argument("--verbose", action="store_true", help="print every failing case")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run_conformance(args.ops)
    seconds = time.perf_counter() - t0
    print(f"{'op':40s} {'cases':>5s} {'pass':>5s} {'fail':>5s} {'type':>5s}  first failure")
    for op, row in result.per_op.items():
        print(f"{op:40s} {row['cases']:5d} {row['passed']:5d} {row['failed']:5d} {row['element_type']:5d}  "
              f"{row['first_failure'][:110]}")
    element = sum(r.element_type for r in result.results)
    print(f"\n{result.passed} of {len(result.results)} cases passed ({result.failed} failed, {element} of them for an "
          f"element type lrcc does not take); {result.skipped} cases skipped (unsupported operators); {seconds:.0f} s")
    if args.verbose:
        for r in result.results:
            if not r.passed:
                print(f"FAIL {r.name}: {r.reason}")
    if not args.no_write and args.ops is None:
        DOC.write_text(render(result, seconds))
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
