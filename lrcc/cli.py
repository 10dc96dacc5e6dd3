"""The `lrcc` command: compile, report, targets.

    lrcc compile MODULE:ATTR --calibration FILE [--target T] [--budget SPEC] -o OUT [--no-html]
                 [--measured-latency]
    lrcc report OUT [--json] [--no-html]
    lrcc targets [--json]

Exit codes: 0 success, 2 bad input (one line on stderr naming what and where; --debug adds the
traceback), 1 an unexpected internal error.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"lrcc: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lrcc", description="Compress a model's linear layers under a budget.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="examples:\n"
                       "  lrcc targets\n"
                       "  lrcc compile lrcc.zoo.minilm:load_encoder --calibration cal.pt --budget params=0.5 -o out/\n"
                       "  lrcc report out/")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compile", help="compile a model and write the result to a directory",
                       description="Compile MODEL (module:attribute naming a torch.nn.Module or a function "
                                   "returning one) for TARGET within BUDGET and save it to OUT.")
    c.add_argument("model", metavar="MODEL", help="module:attribute, e.g. lrcc.zoo.minilm:load_encoder")
    c.add_argument("--calibration", metavar="FILE", required=True,
                   help="torch.save() of a list of input tuples; the first one is also the example input")
    c.add_argument("--target", default="cpu", help="target name (see `lrcc targets`); default cpu")
    c.add_argument("--budget", metavar="SPEC", default=None,
                   help="e.g. params=0.5, bytes=0.125,max_error=0.02; default max_error=0.01")
    c.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory")
    c.add_argument("--measured-latency", action="store_true",
                   help="target cpu with a latency budget: time the compiled model against the original here and "
                        "re-plan until the measured ratio meets the budget")
    c.add_argument("--format", choices=("lrcc", "onnx"), default="lrcc",
                   help="onnx: also write OUT/model.onnx, the compressed model for onnxruntime")
    c.add_argument("--quiet", action="store_true", help="no progress (bars or lines) and no report on stdout")
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    c.add_argument("--html", action=argparse.BooleanOptionalAction, default=True,
                   help="also write OUT/report.html and OUT/pareto.png (default: yes)")
    c.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    r = sub.add_parser("report", help="print the report of a compiled model directory and write OUT/report.html")
    r.add_argument("out", metavar="OUT")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--html", action=argparse.BooleanOptionalAction, default=True,
                   help="also write OUT/report.html and OUT/pareto.png (default: yes)")
    r.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    w = sub.add_parser("worker", help="serve factorisation jobs for a compile_blockwise driver on another machine",
                       description="Join the driver's torch.distributed group at INIT as RANK of WORLD_SIZE (the "
                                   "driver is rank 0) and run factorisation jobs until the driver finishes.")
    w.add_argument("--init", required=True, metavar="INIT", help="the driver's address, tcp://HOST:PORT")
    w.add_argument("--rank", type=int, required=True, help="this worker's rank, 1 .. world size - 1")
    w.add_argument("--world-size", type=int, required=True, help="the number of workers + 1")
    w.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    t = sub.add_parser("targets", help="list the targets lrcc knows")
    t.add_argument("--json", action="store_true")
    t.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _load_model(spec: str):
    from .errors import LrccError
    if spec.endswith(".onnx"):
        return spec  # lrcc.compile imports ONNX files itself
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise LrccError(f"MODEL {spec!r}: expected module:attribute, e.g. lrcc.zoo.minilm:load_encoder")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise LrccError(f"MODEL {spec!r}: cannot import module {mod_name!r} ({e})") from None
    if not hasattr(module, attr):
        raise LrccError(f"MODEL {spec!r}: module {mod_name!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    import torch
    if isinstance(obj, torch.nn.Module):
        return obj
    if callable(obj):
        model = obj()
        if isinstance(model, torch.nn.Module):
            return model
        raise LrccError(f"MODEL {spec!r}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    raise LrccError(f"MODEL {spec!r}: {attr} is a {type(obj).__name__}, not a torch.nn.Module or a factory")


def _load_calibration(path: str) -> list[tuple]:
    import torch

    from .errors import LrccError
    p = Path(path)
    if not p.is_file():
        raise LrccError(f"--calibration {path}: no such file")
    try:
        data = torch.load(p, weights_only=True)
    except Exception as e:  # torch.load raises many kinds on corrupt files
        raise LrccError(f"--calibration {path}: not a torch.save() file ({type(e).__name__})") from None
    if isinstance(data, tuple) and data and all(isinstance(x, torch.Tensor) for x in data):
        data = [data]
    if not isinstance(data, list) or not data:
        raise LrccError(f"--calibration {path}: expected a non-empty list of input tuples")
    return [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]


def _write_html(report, out) -> Path:
    from .errors import LrccError
    from .report_html import write_html
    try:
        return write_html(report, out)
    except OSError as e:
        raise LrccError(f"{out}: cannot write report.html ({e.strerror or e}); use --no-html to skip it") from None


def _compile(args) -> int:
    import lrcc
    from .budget import Budget
    from .compiler import Progress
    # the budget first: a typo in it is reported before any model is imported or loaded
    budget = Budget.parse(args.budget) if args.budget is not None else None
    model = _load_model(args.model)
    batches = _load_calibration(args.calibration)
    progress = None if args.quiet else Progress()
    try:
        cm = lrcc.compile(model, batches[0], target=args.target, budget=budget, calibration=batches,
                          progress=progress if progress is not None else False,
                          options={"measured_latency": True} if args.measured_latency else None)
    finally:
        if progress is not None:
            progress.close()  # an error message must not land on a half-drawn bar
    out = cm.save(args.out, format=args.format)
    html = _write_html(cm.report, out) if args.html else None
    if args.json:
        print(cm.report.to_json())
        if html is not None and not args.quiet:
            print(f"html report: {html}", file=sys.stderr)
    elif not args.quiet:
        print(cm.report)
        print(f"saved to {out}")
        if html is not None:
            print(f"html report: {html}")
    return EXIT_OK


def _report(args) -> int:
    from .errors import LrccError
    from .report import Report
    path = Path(args.out) / "report.json"
    if not path.is_file():
        raise LrccError(f"{args.out}: no report.json; is it a directory written by `lrcc compile`?")
    try:
        report = Report.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as e:
        raise LrccError(f"{path}: not a readable lrcc report ({type(e).__name__}: {e})") from None
    from .compiler import read_timings
    report.timings = read_timings(args.out) or report.timings  # saved apart: report.json is reproducible
    print(report.to_json() if args.json else report)
    if args.html:
        html = _write_html(report, args.out)
        print(f"html report: {html}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def _targets(args) -> int:
    from .targets import get_target, targets
    ts = [get_target(name) for name in targets()]
    if args.json:
        print(json.dumps([{"name": t.name, "kind": t.kind, "description": t.description, "peak_flops": t.peak_flops,
                           "bandwidth": t.bandwidth} for t in ts], indent=2))
    else:
        for t in ts:
            print(f"{t.name:10s} {t.kind:4s} {t.description}")
    return EXIT_OK


def _worker(args) -> int:
    from .errors import LrccError
    from .planner.workers import worker_main
    if not 1 <= args.rank < args.world_size:
        raise LrccError(f"worker --rank {args.rank}: must be between 1 and --world-size - 1 = {args.world_size - 1}")
    if not args.init.startswith("tcp://"):
        raise LrccError(f"worker --init {args.init!r}: expected the driver's address as tcp://HOST:PORT")
    worker_main(args.init, args.rank, args.world_size)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import LrccError
    try:
        return {"compile": _compile, "report": _report, "targets": _targets, "worker": _worker}[args.command](args)
    except LrccError as e:
        if args.debug:
            traceback.print_exc()
        print(f"lrcc: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lrcc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an lrcc bug: say so, keep the traceback behind --debug
        if args.debug:
            traceback.print_exc()
        print(f"lrcc: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
