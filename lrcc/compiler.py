"""lrcc.compile: import, match rules, plan under the budget, lower, verify."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file

from .budget import Budget
from .codegen.torch_module import Lowered, lower_to_torch
from .errors import CalibrationError, LrccError
from .ir.from_torch import import_module
from .ir.graph import Graph, print_graph, verify
from .ir.serialize import graph_from_json, graph_to_json, save_weights
from .planner import plan
from .planner.calibrate import check_batches, output_error, split_holdout, take_samples
from .planner.plan import example_dims
from .report import Report
from .rewrites import DEFAULT_RULES, match
from .targets import Target, get_target
from .targets.cost import graph_latency

FORMAT_VERSION = 1
TIMINGS_FILE = "timings.json"  # wall-clock seconds per stage: the one saved file that differs between runs


def read_timings(path: str | os.PathLike) -> dict[str, float]:
    """The timings a saved model directory holds (timings.json), or {} where it has none."""
    f = Path(path) / TIMINGS_FILE
    if not f.is_file():
        return {}
    try:
        timings = json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}  # timings are informational; a damaged file does not stop a load
    return {str(k): float(v) for k, v in timings.items() if isinstance(v, (int, float))} if isinstance(timings, dict) else {}


class CompiledModel(torch.nn.Module):
    """A compiled model: runs like the original; carries .report, .graph and .save()."""

    def __init__(self, graph: Graph, report: Report, target: Target, budget: str, backend: str = "eager",
                 program=None) -> None:
        super().__init__()
        if backend not in ("eager", "inductor"):
            raise LrccError(f"unknown CPU backend {backend!r}; use 'eager' or 'inductor'")
        self.graph = graph
        self.report = report
        self.target = target
        self.budget = budget
        self.backend = backend
        self.program = program  # MCU targets: the int8 Program (lrcc.codegen.c) the C computes
        self._static = None  # (input, dim, size) the graph fixes, checked on every call
        if target.kind == "mcu":
            if program is None:
                raise LrccError(f"a model for {target.name} needs its int8 program")
            from .codegen.c.execute import ProgramModule
            self.module = ProgramModule(program, program.tensors[program.output].shape)
            self._run = self.module
            return
        # GPU targets: compressed sites call their Triton kernels (lrcc.codegen.triton)
        self.module: Lowered = lower_to_torch(graph, gpu=target.kind == "gpu")
        # "inductor": the lowered graph goes through torch.compile's inductor, which fuses the
        # elementwise work (GELU, residual adds, layer norms) around the products; the first call
        # pays its compile time.
        self._run = torch.compile(self.module, dynamic=None) if backend == "inductor" else self.module

    def forward(self, *inputs):
        if self._static is None:
            self._static = _static_dims(self.graph)
        for i, dim, size, shape in self._static:
            if i < len(inputs) and isinstance(inputs[i], torch.Tensor) and inputs[i].dim() > dim \
                    and inputs[i].shape[dim] != size:
                raise LrccError(f"expected input of shape {shape} for input {i}, got {tuple(inputs[i].shape)}: the "
                                f"model was compiled for size {size} in dim {dim} (a sequence traced at a fixed length, "
                                "e.g. with options={'fixed_length': True}, takes only that length)")
        return self._run(*inputs)

    def save(self, path: str | os.PathLike, arch: str | None = None, format: str | None = None) -> Path:
        """Write the plan (IR + report), the compressed weights (safetensors) and the IR as text;
        with arch (GPU targets, e.g. "sm_80", "sm_90") also kernels/: each Triton kernel's source and
        its PTX for that arch, and a manifest of which site launches what; with format="onnx" also
        model.onnx, the compressed model as ONNX for onnxruntime (lrcc.codegen.onnx_export)."""
        if arch is not None and self.target.kind != "gpu":
            raise LrccError(f"save(arch={arch!r}): the model was compiled for {self.target.name!r}, which has no "
                            "GPU kernels; compile with target='a100' or 'h100'")
        if arch is not None:
            from .codegen.triton.aot import parse_arch
            parse_arch(arch)  # an unknown arch fails before anything is written
        formats = (None, "lrcc", "onnx")
        if format not in formats:
            raise LrccError(f"save(format={format!r}): unknown format; use one of "
                            f"{', '.join(repr(f) for f in formats)} (None and 'lrcc' write the plan, weights and "
                            "code; 'onnx' writes them and model.onnx, a compressed ONNX model onnxruntime runs)")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.graph.tensors.items()}
        save_weights(tensors, out / "weights.safetensors", {"format": "lrcc", "version": str(FORMAT_VERSION)})
        plan = {"format": "lrcc", "version": FORMAT_VERSION, "target": self.target.name, "budget": self.budget,
                "backend": self.backend, "graph": graph_to_json(self.graph)}
        (out / "plan.json").write_text(json.dumps(plan, indent=1, sort_keys=True))
        # everything but the wall-clock timings is reproducible byte for byte; they go apart
        (out / "report.json").write_text(self.report.to_json(timings=False))
        (out / "report.txt").write_text(self.report.text(timings=False) + "\n")
        (out / TIMINGS_FILE).write_text(json.dumps(self.report.timings, indent=2) + "\n")
        (out / "graph.txt").write_text(print_graph(self.graph))
        if arch is not None:
            from .codegen.triton.export import write_kernels
            write_kernels(self.module, out, arch)
        if self.program is not None:
            from .codegen.c.mcu import save_c
            save_c(self.program, out, self.report)
        if format == "onnx":
            from .codegen.onnx_export import export_onnx
            export_onnx(self.graph, out / "model.onnx")
        return out


def _static_dims(g: Graph) -> list[tuple[int, int, int, str]]:
    """(input index, dim, size, the input's shape as text) for every input dim the graph fixes, batch
    dims aside: a call with another size gets a clear error instead of a shape mismatch deep inside."""
    out = []
    for node in g.inputs():
        text = "(" + ", ".join(str(d) for d in node.shape or ()) + ")"
        for dim, d in enumerate(node.shape or ()):
            if dim > 0 and getattr(d, "is_Integer", False):
                out.append((int(node.attrs["index"]), dim, int(d), text))
    return out


def load(path: str | os.PathLike) -> CompiledModel:
    """Load a model written by CompiledModel.save(); no calibration is re-run."""
    p = Path(path)
    plan_file, weights_file = p / "plan.json", p / "weights.safetensors"
    for f in (plan_file, weights_file):
        if not f.is_file():
            raise LrccError(f"load: {f} is missing; is {p} a directory written by CompiledModel.save()?")
    try:
        plan = json.loads(plan_file.read_text())
    except json.JSONDecodeError as e:
        raise LrccError(f"load: {plan_file} is not valid JSON ({e})") from None
    if plan.get("format") != "lrcc" or plan.get("version") != FORMAT_VERSION:
        raise LrccError(f"load: {plan_file} is not an lrcc plan of version {FORMAT_VERSION}")
    g = graph_from_json(plan["graph"], load_file(str(weights_file)))
    verify(g)
    report_file = p / "report.json"
    report = Report.from_json(report_file.read_text()) if report_file.is_file() else Report([], {}, plan["target"], plan["budget"])
    report.timings = read_timings(p) or report.timings
    tgt = get_target(plan["target"])
    program = None
    if tgt.kind == "mcu":
        from .codegen.c.mcu import load_program
        program = load_program(p)
    return CompiledModel(g, report, tgt, plan["budget"], plan.get("backend", "eager"), program=program)


class Progress:
    """Compile progress on stderr: a tqdm bar per stage when stderr is a terminal, else at most one
    log line a second. Called with a message; stage(name, total) opens a bar that each later message
    (one per unit of work: batch, site) advances, until total is reached."""

    def __init__(self, bars: bool | None = None, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bars = bool(self.stream.isatty()) if bars is None else bars
        self._bar = None
        self._start = time.perf_counter()
        self._last = -1.0

    def stage(self, name: str, total: int, unit: str = "it") -> None:
        """Start a stage of `total` units (bars only; log lines come from the messages)."""
        self.close()
        if self.bars and total > 0:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=name, unit=unit, file=self.stream, leave=True, dynamic_ncols=True)

    def advance(self, n: int = 1, what: str = "") -> None:
        """Move the open bar on by n units; closes it when complete."""
        if self._bar is None:
            return
        self._bar.update(n)
        if what:
            self._bar.set_postfix_str(what, refresh=False)
        if self._bar.n >= self._bar.total:
            self.close()

    def __call__(self, msg: str) -> None:
        if self._bar is not None:
            self.advance(1, msg.split(": ", 1)[-1])
            return
        now = time.perf_counter() - self._start
        if now - self._last >= 1.0 or msg.endswith("done"):
            self._last = now
            print(f"[lrcc {now:6.1f}s] {msg}", file=self.stream, flush=True)

    def close(self) -> None:
        """Close the open bar, if any (before printing anything else on the stream)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _progress(enabled: "bool | Progress") -> Progress | None:
    if isinstance(enabled, Progress):
        return enabled
    return Progress() if enabled else None


def compile(model: "torch.nn.Module | str | os.PathLike", example_inputs: tuple | None = None, target: str | Target = "cpu",
            budget: Budget | float | str | None = None, calibration: Iterable[tuple] | None = None, *,
            options: dict[str, Any] | None = None, progress: "bool | Progress" = False) -> CompiledModel:
    """Compress `model` for `target` within `budget`; returns a CompiledModel.

    calibration: an iterable of input tuples shaped like example_inputs (batch and sequence length
    may differ). Without it lrcc calibrates on example_inputs alone and says so in the report.
    options: planner knobs (rank_step, probes, sensitivity_samples, holdout, sequential, ridge, seed,
    rules, quant_bits, sparse_block, fixed_length (trace at the example's sequence length: offers
    Linformer), attention_forms, attention_features, attention_budgets, linformer_segments,
    measured_latency (target cpu with a latency budget: time the compiled model against the original
    on example_inputs here, and re-plan with a tighter estimate until the measured ratio meets the
    budget, at most 3 tries);
    GPU targets default quant_bits to the widths their kernels
    unpack and sparse_block to (16, 16)) and backend: "eager" (default: the lowered graph runs op by op) or "inductor" (the
    lowered graph is compiled by torch.compile's inductor on its first call; CPU targets).
    progress: True (or a Progress) reports progress on stderr, as bars when it is a terminal.
    """
    t_start = time.perf_counter()
    options = dict(options or {})
    tgt = get_target(target)
    bud = Budget.coerce(budget)
    if bud is None:
        bud = Budget(sram=tgt.sram_bytes, flash=tgt.flash_bytes, max_error=0.01) if tgt.kind == "mcu" else Budget(max_error=0.01)
    if options.get("measured_latency") and (tgt.kind != "cpu" or bud.latency is None):
        raise LrccError("options measured_latency: times the model on this machine, so it needs target cpu and a "
                        f"latency budget (got target {tgt.name}, budget {bud})")
    if "attention_forms" in options:
        from .rewrites.attention import check_attention_forms
        check_attention_forms(options["attention_forms"])
    say = _progress(progress)
    onnx = isinstance(model, (str, os.PathLike))
    if onnx:
        # an ONNX file: imported as an equivalent torch module, then through the same pipeline
        from .ir.from_onnx import onnx_to_module
        model, onnx_examples = onnx_to_module(model)
        if example_inputs is None:
            example_inputs = onnx_examples
    if example_inputs is None:
        raise LrccError("compile: example_inputs is required for a torch model (a tuple of input tensors)")
    torch.manual_seed(int(options.get("seed", 0)))
    notes: list[str] = []
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not isinstance(model, torch.nn.Module):
        raise LrccError(f"compile: expected a torch.nn.Module or a path to an .onnx file, got {type(model).__name__}")
    if not onnx:
        _check_model(model)
    _check_inputs(model, example_inputs, onnx)
    mcu = tgt.kind == "mcu"
    if mcu:
        # the C program runs batch 1; trace with two copies of the example so the batch dim stays
        # symbolic and calibration can run in batches
        example_inputs = _batch_one(example_inputs)
        try:
            g, export_notes = import_module(model, tuple(torch.cat([x, x]) for x in example_inputs))
        except LrccError:
            # a model written for batch 1 only (e.g. view(1, ...)): trace it at batch 1 and calibrate
            # one sample at a time
            g, export_notes = import_module(model, example_inputs)
            if calibration is not None:
                calibration = [tuple(t[i:i + 1] for t in b) for b in check_batches(list(calibration), len(example_inputs))
                               for i in range(len(b[0]))]
            export_notes.append("the model traces at batch 1 only: calibrated one sample at a time")
    else:
        g, export_notes = import_module(model, example_inputs, _dynamic_shapes(example_inputs, options))
    notes += export_notes
    _check_weights(g, onnx)
    if say:
        say(f"imported: {len(g.nodes)} nodes, {len(g.sites())} linear sites, dims {sorted(g.symbols)}")

    n_inputs = g.meta["num_inputs"]
    if calibration is None:
        batches = check_batches([tuple(example_inputs)], n_inputs, what="example_inputs (the only calibration data)")
        notes.append("no calibration data given: calibrated and verified on example_inputs alone")
    else:
        batches = check_batches(list(calibration), n_inputs)
        _check_calibration(g, batches, example_inputs)
    fit, held, held_what = split_holdout(batches, float(options.get("holdout", 0.125)))
    sens = take_samples(fit, int(options.get("sensitivity_samples", 256)))

    if bud.bytes is not None or bud.latency is not None:
        options.setdefault("lowrank_fp16", True)  # fp16 factors halve the bytes at no measurable error
    if tgt.kind == "gpu":
        from .codegen.triton.layout import KERNEL_BITS
        options.setdefault("quant_bits", KERNEL_BITS)  # only widths the Triton kernels unpack
        # sparse parts in whole 16x16 blocks: the block-sparse kernel's tiles (entry-wise 5% sparsity
        # leaves nearly every block non-empty, so the kernel would do dense work)
        options.setdefault("sparse_block", (16, 16))
    if mcu:
        from .codegen.c.lower import unsupported_ops
        from .codegen.c.mcu import flash_of_site, fixed_flash
        from .rewrites import factorize_linear, quantize_linear
        from .rewrites.quantize import QuantSpec
        bad = unsupported_ops(g)
        if bad:
            lines = "\n".join(f"  {node}: {op}" for node, op in bad)
            raise LrccError(f"target {tgt.name}: {len(bad)} operator(s) cannot be emitted as C:\n{lines}")
        # the MCU knobs: low-rank ranks, and int4 weights per channel (the layout the C kernels run)
        options.setdefault("rules", [factorize_linear, quantize_linear])
        options.setdefault("quant_specs", (QuantSpec(4, 0),))
        options.setdefault("quant_methods", ("gptq",))
        options["lowrank_fp16"] = False
        options.setdefault("flash_of", flash_of_site)
        options.setdefault("flash_fixed", fixed_flash(g))
    m = match(g, list(options.get("rules", DEFAULT_RULES)), options)
    dims = example_dims(g, example_inputs)
    reference = lower_to_torch(g)
    check = lambda graph: output_error(reference, lower_to_torch(graph), held)["rel_error"]
    timer = _latency_ratio(reference, example_inputs) if options.get("measured_latency") else None
    result = plan(g, m, tgt, bud, fit, sens, dims, options, say, check, timer)
    notes += result.notes
    new = result.graph

    program = None
    if mcu:
        from .codegen.c.mcu import build_program
        program, _, mcu_totals, mcu_notes, arena = build_program(new, fit, dims, tgt, bud, say)
        notes += mcu_notes
        from .codegen.c.execute import ProgramModule
        compiled = ProgramModule(program, program.tensors[program.output].shape)
    else:
        compiled = lower_to_torch(new)
    measured = output_error(reference, compiled, held)
    measured["data"] = held_what
    if say:
        say("verification done")

    rows = []
    for d in result.decisions:
        rows.append({"site": d.site, "rule": d.rule, "choice": d.choice, "params_before": int(d.params_before),
                     "params_after": int(d.params_after), "bytes_before": int(d.bytes_before),
                     "bytes_after": int(d.bytes_after), "est_latency_s": float(d.latency_after),
                     "est_latency_before_s": float(d.latency_before), "error": float(d.predicted_error),
                     "reason": d.reason})
    totals = {k: sum(r[k] for r in rows) for k in ("params_before", "params_after", "bytes_before", "bytes_after",
                                                  "est_latency_s", "error")}
    totals["model_latency_before_s"] = graph_latency(g, tgt, dims)
    totals["model_latency_after_s"] = graph_latency(new, tgt, dims)
    totals["measured_error"] = measured["rel_error"]
    if mcu:
        totals.update(mcu_totals)
    timings = dict(result.timings)
    timings["total"] = time.perf_counter() - t_start
    report = Report(rows, totals, tgt.name, str(bud), notes, measured, timings,
                    [{"site": s, "rule": r, "reason": why} for s, r, why in m.rejected]
                    + [{"site": s, "rule": "planner", "reason": why} for s, why in result.dropped],
                    candidates=result.candidates, arena=arena if mcu else [],
                    attention=attention_crossovers(g, m, tgt, dims))
    if bud.max_error is not None and measured["rel_error"] > bud.max_error:
        if options.get("strict", True):
            raise LrccError(f"the compiled model's output error {measured['rel_error']:.3e} on {held_what} exceeds "
                            f"max_error={bud.max_error}; loosen the budget or give more calibration data\n{report}")
        report.notes.append(f"FLAGGED: measured error {measured['rel_error']:.3e} exceeds max_error={bud.max_error}")
    return CompiledModel(new, report, tgt, str(bud), str(options.get("backend", "eager")), program=program)


def _latency_ratio(reference: torch.nn.Module, example_inputs: tuple, runs: int = 5):
    """A function graph -> its wall time on example_inputs over the original model's (lowered
    `reference`): the fastest of `runs` each, after one warm-up (noise on a shared machine only adds
    time). The original is timed once."""
    def fastest(module) -> float:
        with torch.inference_mode():
            module(*example_inputs)
            best = math.inf
            for _ in range(runs):
                t = time.perf_counter()
                module(*example_inputs)
                best = min(best, time.perf_counter() - t)
        return best
    base: list[float] = []

    def ratio(graph: Graph) -> float:
        if not base:
            base.append(fastest(reference))
        return fastest(lower_to_torch(graph)) / base[0]
    return ratio


def _dynamic_shapes(example_inputs: tuple, options: dict[str, Any]):
    """options["dynamic_shapes"] as torch.export takes it, or with options["fixed_length"] the
    batch dim alone dynamic (the sequence length fixed at the example's: fixed-length forms such as
    Linformer become possible), else None (lrcc's default: batch and sequence dynamic)."""
    if options.get("dynamic_shapes") is not None:
        return options["dynamic_shapes"]
    if options.get("fixed_length"):
        from .ir.from_torch import default_dynamic_shapes
        return [None if d is None else {k: v for k, v in d.items() if k == 0} for d in default_dynamic_shapes(example_inputs)]
    return None


CROSSOVER_TARGETS = ("cpu", "a100", "h100")


def attention_crossovers(g: Graph, m, tgt: Target, dims: dict[str, int]) -> list[dict[str, Any]]:
    """For the report: per distinct attention shape, each offered form's estimated crossover length
    (lrcc.targets.cost.crossover_length) on the compile target and the CPU / GPU targets."""
    from .ir.attention import attention_sites
    from .targets.cost import crossover_length
    names = [tgt.name] + [t for t in CROSSOVER_TARGETS if t != tgt.name and tgt.kind != "mcu"]
    groups: dict[tuple, dict[str, Any]] = {}
    for a in attention_sites(g):
        cands = m.candidates.get(a.site, [])
        if not cands:
            continue
        key = (a.heads, a.head_dim, a.value_dim, tuple(c.choice for c in cands))
        if key in groups:
            groups[key]["sites"].append(a.site)
            continue
        forms = []
        for c in cands:
            cross = {t: crossover_length(c.knobs["form"], c.knobs, get_target(t), a.heads, a.head_dim, a.value_dim)
                     for t in names}
            forms.append({"choice": c.choice, "crossover": cross})
        length = dims.get(a.seq_k, a.seq_k)
        groups[key] = {"sites": [a.site], "heads": a.heads, "head_dim": a.head_dim, "value_dim": a.value_dim,
                       "length": int(length) if str(length).isdigit() else str(length), "forms": forms}
    return list(groups.values())


def _batch_one(example_inputs: tuple) -> tuple:
    """The example inputs at batch 1 (MCU targets run one sample per call)."""
    out = []
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise LrccError(f"example_inputs[{i}]: MCU targets take tensors with a leading batch dim")
        out.append(x[:1])
    return tuple(out)


_FLOAT32 = ("lrcc compiles float32 models: convert with model.float() and pass float32 example_inputs and "
            "calibration (lrcc picks lower precisions for the compressed weights itself)")


def _layer_of(ref: str) -> str:
    """The module a parameter belongs to, from its state-dict name ('blocks.0.q.weight' -> 'blocks.0.q')."""
    return ref.rsplit(".", 1)[0] if "." in ref else "<the model itself>"


def _check_model(model: torch.nn.Module) -> None:
    """Before import: the model's parameters are float32 (fp16 / bf16 / fp64 models are rejected)."""
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point and p.dtype != torch.float32:
            raise LrccError(f"weight {name!r} (layer {_layer_of(name)!r}) is {p.dtype}; {_FLOAT32}")


def _check_inputs(model: torch.nn.Module, example_inputs: tuple, onnx: bool) -> None:
    """Before import: example_inputs are tensors, as many as forward takes, non-empty, float32."""
    if not example_inputs:
        raise LrccError("compile: example_inputs is empty; pass a tuple with one tensor per argument of the "
                        "model's forward")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise LrccError(f"compile: example_inputs[{i}] is of type {type(x).__name__}, not a tensor; example_inputs "
                            "must be a tuple of tensors, one per argument of the model's forward")
    _check_arity(model, len(example_inputs))
    for i, x in enumerate(example_inputs):
        if x.numel() == 0:
            raise LrccError(f"compile: example_inputs[{i}] has shape {tuple(x.shape)}, with a zero-size dim; lrcc "
                            "traces and calibrates on real data: give at least one sample and one element in every dim")
        if not onnx and x.dtype.is_floating_point and x.dtype != torch.float32:
            raise LrccError(f"compile: example_inputs[{i}] is {x.dtype}; {_FLOAT32}")
        if x.is_complex():
            raise LrccError(f"compile: example_inputs[{i}] is {x.dtype}; lrcc takes real (float32 or integer) inputs")


def _check_arity(model: torch.nn.Module, n: int) -> None:
    import inspect
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    if len(required) <= n <= len(positional):
        return
    names = ", ".join(p.name for p in positional) or "nothing"
    takes = (f"{len(required)} to {len(positional)}" if len(required) != len(positional) else f"{len(positional)}")
    raise LrccError(f"compile: example_inputs has {n} tensor(s) but {type(model).__name__}.forward takes {takes} "
                    f"({names}); pass a tuple with one tensor per argument of forward")


def _check_calibration(g: Graph, batches: list[tuple], example_inputs: tuple, what: str = "calibration") -> None:
    """Calibration batches match the traced inputs: dtype, rank, static dims, dynamic dims' ranges, non-empty."""
    nodes = g.inputs()
    for b, batch in enumerate(batches):
        for i, (x, node, ex) in enumerate(zip(batch, nodes, example_inputs)):
            where = f"{what} batch {b} input {i} ({node.name!r})"
            if x.dtype != ex.dtype and (x.dtype.is_floating_point or ex.dtype.is_floating_point):
                raise CalibrationError(f"{where} is {x.dtype} but example_inputs[{i}] is {ex.dtype}; give "
                                       f"calibration tensors of the example's dtype")
            shape = node.shape or ()
            if x.dim() != len(shape):
                raise CalibrationError(f"{where} has shape {tuple(x.shape)} ({x.dim()} dims) but the model was traced "
                                       f"with {len(shape)} dims (example shape {tuple(ex.shape)})")
            if x.numel() == 0:
                raise CalibrationError(f"{where} has shape {tuple(x.shape)}, with a zero-size dim; drop empty batches")
            for d, (want, got) in enumerate(zip(shape, x.shape)):
                if getattr(want, "is_Integer", False) and int(want) != int(got):
                    raise CalibrationError(f"{where} has shape {tuple(x.shape)}: dim {d} is {int(got)} but the model "
                                           f"was traced with it fixed at {int(want)} (the model does not allow it to vary)")
                if getattr(want, "is_Symbol", False) and str(want) in g.symbols:
                    lo, hi = g.symbols[str(want)]
                    lo = min(lo, 1)  # export reports dynamic dims from 2 up (its 0/1 specialisation); 1 runs
                    if not lo <= int(got) <= hi:
                        raise CalibrationError(f"{where} has shape {tuple(x.shape)}: dim {d} ({want}) is {int(got)}, "
                                               f"outside the range {lo}..{hi} the model allows")


def _check_weights(g: Graph, onnx: bool = False) -> None:
    """After import: every weight the graph uses is finite and non-empty; linear weights are float32."""
    users = g.users()
    site_params = {}
    for n in g.nodes:
        if n.op == "linear":
            for i in n.inputs[1:]:
                site_params[i] = n.attrs["site"]
    for n in g.nodes:
        if n.op != "param" or not users.get(n.name):
            continue
        ref = n.attrs["ref"]
        t = g.tensors[ref]
        layer = site_params.get(n.name, _layer_of(ref))
        if t.numel() == 0:
            raise LrccError(f"weight {ref!r} of layer {layer!r} has shape {tuple(t.shape)}, zero elements: lrcc cannot "
                            "compile a zero-size layer; remove it from the model or give it at least one input and "
                            "one output feature")
        if t.dtype.is_floating_point and not torch.isfinite(t).all():
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            first = tuple(int(k) for k in (~torch.isfinite(t)).nonzero()[0])
            raise LrccError(f"weight {ref!r} of layer {layer!r} contains {nan} NaN and {inf} Inf value(s), the first at "
                            f"index {first}; fix the model's weights (retrain or reload the checkpoint) before compiling")
        if not onnx and n.name in site_params and t.dtype != torch.float32:
            raise LrccError(f"weight {ref!r} of layer {layer!r} is {t.dtype}; {_FLOAT32}")
