"""The MCU path of lrcc.compile: flash prices for the planner, the int8 program, its C, its files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...budget import Budget
from ...errors import BudgetError, LrccError
from ...ir.graph import Graph
from ...targets import Target
from .lower import lower_program
from .program import Op, Program, QTensor
from .ranges import collect_ranges
from .writer import CModel, plan_arena, write_c

# Flash reserved besides the model's constants, for planning: the model's own code (kernels and
# lrcc_model_run: 6.6 KB for the large ViT of benchmarks/mcu.py with arm-none-eabi-gcc -Os) and
# what every image carries around it (start-up, newlib-nano with printf, the application; the
# benchmark's test harness image adds 24 KB including its test inputs). The ARM link with the
# part's real sizes is the final check.
CODE_ESTIMATE = 32 * 1024
# Stack the generated code needs at most (kernels keep a few scalars; no recursion); measured
# under QEMU by benchmarks/mcu.py and tests, which paint the stack before running.
STACK_ESTIMATE = 1024


def flash_of_site(shapes: list[tuple[int, int]], bits: int = 8) -> int:
    """Flash bytes of a linear site computing products with weights of these (m, n) shapes:
    int8 weights (int4: two per byte and a zero point per row) plus an int32 bias, multiplier and
    shift per output channel of each product."""
    if bits == 4:
        return int(sum(m * ((n + 1) // 2) + 16 * m for m, n in shapes))
    return int(sum(m * n + 12 * m for m, n in shapes))


# bytes of the lookup tables an op's kernel keeps in flash (lower.py / kernels_transformer.py)
_TABLE_BYTES = {"gelu": 256, "softmax": 1024, "_softmax": 1024, "scaled_dot_product_attention": 512}


def fixed_flash(g: Graph) -> int:
    """Flash bytes outside the linear sites: other weights as the C stores them (convolution
    kernels int8 with an int32 bias, multiplier and shift per output channel; other matrices
    int8; vectors such as layer-norm parameters int32), lookup tables, and the code estimate."""
    site_params = {i for n in g.sites() for i in n.inputs[1:]}
    conv_weights = {n.attrs["args"][1].name for n in g.nodes if n.op == "aten"
                    and n.attrs["target"].split(".")[1:2] == ["conv2d"] and hasattr(n.attrs["args"][1], "name")}
    total = CODE_ESTIMATE
    for n in g.nodes:
        if n.op == "param" and n.name not in site_params:
            t = g.tensors[n.attrs["ref"]]
            total += t.numel() * (4 if t.dim() <= 1 else 1)
            if n.name in conv_weights:
                total += 8 * int(t.shape[0])  # multiplier and shift (the bias is its own param)
        elif n.op == "aten":
            total += _TABLE_BYTES.get(n.attrs["target"].split(".")[1] if "." in n.attrs["target"] else "", 0)
    return int(total)


def build_program(g: Graph, batches: list[tuple], dims: dict[str, int], target: Target, budget: Budget,
                  say=None) -> tuple[Program, CModel, dict[str, Any], list[str], list[dict[str, Any]]]:
    """Calibrate activation ranges, lower to the int8 program, plan its arena and write its C; checks
    the SRAM and flash budgets against what was built."""
    if say:
        say("int8 lowering: activation ranges")
    ranges = collect_ranges(g, batches)
    prog = lower_program(g, ranges, {k: 1 for k in dims})
    c = write_c(prog, "lrcc")
    greedy = plan_arena(prog, "greedy")
    naive = plan_arena(prog, "naive")
    ram = c.arena_bytes + STACK_ESTIMATE
    flash = c.const_bytes + CODE_ESTIMATE
    if budget.sram is not None and ram > budget.sram:
        raise BudgetError(f"budget sram={budget.sram:,} bytes cannot be met on {target.name}: the smallest reachable "
                          f"is {ram:,} bytes (arena {c.arena_bytes:,} + stack {STACK_ESTIMATE:,}); the arena holds "
                          "activations, which low-rank factors do not shrink")
    if budget.flash is not None and flash > budget.flash:
        raise BudgetError(f"budget flash={budget.flash:,} bytes cannot be met on {target.name}: the int8 program needs "
                          f"{flash:,} bytes ({c.const_bytes:,} of constants + about {CODE_ESTIMATE:,} of code)")
    totals = {"arena_bytes": int(c.arena_bytes), "arena_bytes_greedy": int(greedy.arena_bytes),
              "arena_bytes_naive": int(naive.arena_bytes), "flash_bytes": int(flash), "const_bytes": int(c.const_bytes),
              "stack_bytes_estimate": STACK_ESTIMATE, "ops": len(prog.ops)}
    notes = [f"int8 program: {len(prog.ops)} ops; arena {c.arena_bytes:,} B (TFLite Micro's greedy-by-size on the same "
             f"schedule: {greedy.arena_bytes:,} B; no reuse: {naive.arena_bytes:,} B); constants {c.const_bytes:,} B"]
    notes.append("arena map:\n" + c.arena_map)
    if say:
        say("int8 lowering done")
    return prog, c, totals, notes, arena_record(c)


def arena_record(c: CModel) -> list[dict[str, Any]]:
    """The arena's buffers for the report: name, offset, bytes, first/last step live."""
    plan = c.plan
    rec = []
    for name, off in sorted(plan.offsets.items(), key=lambda kv: (kv[1], kv[0])):
        first, last = plan.lifetimes.get(name, (None, None))
        d = {"name": name, "offset": int(off), "bytes": int(plan.sizes.get(name, 0))}
        if first is not None:
            d.update(first=int(first), last=int(last))
        rec.append(d)
    return rec


# --- files -----------------------------------------------------------------------------------------
def save_c(prog: Program, out: Path, report=None) -> None:
    """lrcc_model.h / lrcc_model.c, the arena map, and the program itself (for lrcc.load)."""
    c = write_c(prog, "lrcc")
    for name, text in c.files().items():
        (out / name).write_text(text)
    (out / "arena_map.txt").write_text(c.arena_map + "\n")
    save_program(prog, out)


def save_program(prog: Program, out: Path) -> None:
    from safetensors.numpy import save_file
    arrays: dict[str, np.ndarray] = {}
    tensors = []
    for t in prog.tensors.values():
        if t.const is not None:
            arrays[f"tensor/{t.name}"] = np.ascontiguousarray(t.const)
        tensors.append({"name": t.name, "shape": list(t.shape), "scale": t.scale, "zero_point": t.zero_point,
                        "const": t.const is not None})
    ops = []
    for i, op in enumerate(prog.ops):
        attrs = {}
        for k, v in op.attrs.items():
            if isinstance(v, np.ndarray):
                arrays[f"op{i}/{k}"] = np.ascontiguousarray(v)
                attrs[k] = {"array": f"op{i}/{k}"}
            else:
                attrs[k] = _jsonable(v, f"{op.name}.{k}")
        ops.append({"kind": op.kind, "name": op.name, "inputs": op.inputs, "output": op.output, "attrs": attrs,
                    "scratch_bytes": op.scratch_bytes})
    doc = {"format": "lrcc-int8-program", "version": 1, "input": prog.input, "output": prog.output,
           "aliases": prog.aliases, "tensors": tensors, "ops": ops}
    (out / "program.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    save_file(arrays, str(out / "program.safetensors"))


def load_program(path: Path) -> Program:
    from safetensors.numpy import load_file
    f = path / "program.json"
    if not f.is_file():
        raise LrccError(f"load: {f} is missing; the model was compiled for an MCU target and needs its int8 program")
    doc = json.loads(f.read_text())
    if doc.get("format") != "lrcc-int8-program" or doc.get("version") != 1:
        raise LrccError(f"load: {f} is not an lrcc int8 program of version 1")
    arrays = load_file(str(path / "program.safetensors"))
    tensors = {}
    for t in doc["tensors"]:
        const = arrays[f"tensor/{t['name']}"] if t["const"] else None
        tensors[t["name"]] = QTensor(t["name"], tuple(t["shape"]), float(t["scale"]), int(t["zero_point"]), const)
    ops = []
    for o in doc["ops"]:
        attrs = {k: (arrays[v["array"]] if isinstance(v, dict) and "array" in v else _unjson(v)) for k, v in o["attrs"].items()}
        ops.append(Op(o["kind"], o["name"], list(o["inputs"]), o["output"], attrs, int(o["scratch_bytes"])))
    return Program(tensors, ops, doc["input"], doc["output"], dict(doc["aliases"]))


def _jsonable(v, where: str):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return {"tuple": [_jsonable(x, where) for x in v]}
    raise LrccError(f"saving the int8 program: attribute {where} of type {type(v).__name__} cannot be saved")


def _unjson(v):
    if isinstance(v, dict) and "tuple" in v:
        return tuple(_unjson(x) for x in v["tuple"])
    return v

