"""Write a Program as C99: lrcc_model.h and lrcc_model.c, with one static arena planned by memory.py.

The interface follows the public API: ``int lrcc_model_run(const int8_t *input, int8_t *output)``,
0 on success; the header defines the sizes, the input/output quantisation and LRCC_ARENA_BYTES.
Weights are const arrays (flash); every activation lives in the arena at an offset fixed here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ...errors import LrccError
from . import kernels, memory
from .emit import array_attrs, const_array, library
from .program import Program

# kinds whose output may take over an input's storage (element-wise or row-wise kernels that
# write y_i only after reading everything they need of x_i)
INPLACE_KINDS = {"add", "relu", "lut", "requant", "layernorm", "softmax"}


def steps_of(prog: Program) -> tuple[list[memory.Step], dict[str, int], set[str]]:
    """The memory planner's view of a program: steps, buffer sizes (bytes), external buffers."""
    sizes: dict[str, int] = {}
    steps = []
    for t in prog.tensors.values():
        if t.const is None:
            key = prog.storage(t.name)
            sizes[key] = max(sizes.get(key, 0), t.size)
    for i, op in enumerate(prog.ops):
        reads = tuple(dict.fromkeys(prog.storage(n) for n in op.inputs if prog.tensors[n].const is None))
        inplace = reads if op.kind in INPLACE_KINDS else ()
        if op.kind == "attention":
            # y (row i, head h) is written after q (row i, head h) was last read and nothing else
            # reads that q slice: y may take q's storage unless k or v share it
            q, k, v = (prog.storage(n) for n in op.inputs)
            inplace = (q,) if q not in (k, v) and prog.tensors[op.inputs[0]].const is None else ()
        steps.append(memory.Step(f"{i}:{op.name}", reads, prog.storage(op.output), int(op.scratch_bytes), inplace))
    external = {prog.storage(prog.input), prog.storage(prog.output)}
    return steps, sizes, external


def plan_arena(prog: Program, strategy: str = "lrcc") -> memory.MemoryPlan:
    """The arena plan of a program under a strategy ("naive", "greedy", "lrcc")."""
    steps, sizes, external = steps_of(prog)
    return memory.plan_memory(sizes, steps, external=external, strategy=strategy)


@dataclass
class CModel:
    """The generated C sources and what they cost."""

    header: str
    source: str
    arena_bytes: int
    const_bytes: int       # bytes of const data (weights, tables) in flash
    plan: memory.MemoryPlan
    arena_map: str

    def files(self) -> dict[str, str]:
        return {"lrcc_model.h": self.header, "lrcc_model.c": self.source}


def _sym(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


def _float_literal(v: float) -> str:
    """A C float literal that reads back as the same float32 (9 significant digits)."""
    text = f"{float(v):.9g}"
    return f"{text}f" if ("." in text or "e" in text) else f"{text}.0f"


def write_c(prog: Program, strategy: str = "lrcc") -> CModel:
    """C99 sources for the program with its arena planned by `strategy`."""
    plan = plan_arena(prog, strategy)
    steps, _, external = steps_of(prog)
    memory.check_plan(plan, steps, external)
    inp, out = prog.tensors[prog.input], prog.tensors[prog.output]
    in_key, out_key = prog.storage(prog.input), prog.storage(prog.output)

    def ptr(name: str) -> str:
        t = prog.tensors[name]
        if t.const is not None:
            return f"c_{_sym(name)}"
        key = prog.storage(name)
        if key == in_key:
            return "input"
        if key == out_key:
            return "output"
        return f"(LRCC_ARENA + {plan.offsets[key]})"

    body: list[str] = []
    const_parts: list[str] = []
    const_bytes = 0
    for name, t in prog.tensors.items():
        if t.const is not None and prog.storage(name) == name:
            const_parts.append(const_array(f"c_{_sym(name)}", t.const.astype(np.int8)))
            const_bytes += t.const.size
    for name, t in prog.tensors.items():  # reshaped views of constants share the array
        if t.const is not None and prog.storage(name) != name:
            const_parts.append(f"#define c_{_sym(name)} c_{_sym(prog.storage(name))}\n")
    for i in plan.order:
        op = prog.ops[i]
        prefix = f"k{i}_"
        for key, arr in array_attrs(op).items():
            const_parts.append(const_array(prefix + key, arr))
            const_bytes += arr.nbytes
        scratch = "NULL"
        skey = f"{steps[i].name}#scratch"
        if op.scratch_bytes:
            scratch = f"(void *)(LRCC_ARENA + {plan.offsets[skey]})"
        call = kernels.get(op.kind).call(op, [ptr(n) for n in op.inputs], ptr(op.output), scratch,
                                         lambda key, p=prefix: p + key)
        body.append(f"    /* {op.kind} {op.name} */\n    status = {call};\n"
                    f"    if (status != LRCC_OK) {{\n        return status;\n    }}")
    arena = max(int(plan.arena_bytes), 0)
    header = f"""/* Generated by lrcc: int8 model, C99. */
#ifndef LRCC_MODEL_H
#define LRCC_MODEL_H

#include <stdint.h>

#define LRCC_INPUT_SIZE {inp.size}
#define LRCC_OUTPUT_SIZE {out.size}
#define LRCC_INPUT_SCALE {_float_literal(inp.scale)}
#define LRCC_INPUT_ZERO_POINT {inp.zero_point}
#define LRCC_OUTPUT_SCALE {_float_literal(out.scale)}
#define LRCC_OUTPUT_ZERO_POINT {out.zero_point}
#define LRCC_ARENA_BYTES {arena}

/* Runs the model on LRCC_INPUT_SIZE int8 values (row-major in the model's input shape, batch
   left out) and writes LRCC_OUTPUT_SIZE int8 values. Returns 0 on success, non-zero on error. */
int lrcc_model_run(const int8_t *input, int8_t *output);

#endif /* LRCC_MODEL_H */
"""
    words = max((arena + 7) // 8, 1)
    source = "\n".join([
        "/* Generated by lrcc: int8 model, C99, no malloc, one static arena. */",
        "#include <stddef.h>",
        "#include \"lrcc_model.h\"",
        library(prog.ops),
        *const_parts,
        f"/* the arena: {arena} bytes, 8-byte aligned; offsets planned by lrcc ({plan.strategy}) */",
        f"static int64_t lrcc_arena[{words}];",
        "#define LRCC_ARENA ((int8_t *)lrcc_arena)",
        "",
        "int lrcc_model_run(const int8_t *input, int8_t *output)",
        "{",
        "    int status = LRCC_OK;",
        "    if (input == NULL || output == NULL) {\n        return LRCC_ERR_NULL;\n    }",
        *body,
        "    return status;",
        "}",
        "",
    ])
    return CModel(header, source, arena, const_bytes, plan, memory.ascii_map(plan))


def harness(inputs: np.ndarray, arm: bool = False) -> str:
    """main.c that runs lrcc_model_run on each row of `inputs` (int8), keeping every output, and
    then prints them, one line per input (integers separated by spaces). ARM builds first print
    "stack <bytes>": the stack high-water mark after the model ran and before any printf, so it
    measures the model's own stack (the start-up code paints the stack)."""
    rows = np.asarray(inputs, dtype=np.int8).reshape(len(inputs), -1)
    lines = ["#include <stdio.h>", "#include <stdint.h>", "#include \"lrcc_model.h\""]
    if arm:
        lines.append("uint32_t lrcc_stack_used(void);")
    lines.append(const_array("test_inputs", rows))
    lines.append(f"#define N_INPUTS {len(rows)}")
    lines.append("static int8_t outs[N_INPUTS][LRCC_OUTPUT_SIZE];")
    lines.append("""int main(void)
{
    int i, j;
    for (i = 0; i < N_INPUTS; ++i) {
        int status = lrcc_model_run(test_inputs + (long)i * LRCC_INPUT_SIZE, outs[i]);
        if (status != 0) {
            printf("status %d\\n", status);
            return 1;
        }
    }""")
    if arm:
        lines.append('    printf("stack %lu\\n", (unsigned long)lrcc_stack_used());')
    lines.append("""    for (i = 0; i < N_INPUTS; ++i) {
        for (j = 0; j < LRCC_OUTPUT_SIZE; ++j) {
            printf("%d ", (int)outs[i][j]);
        }
        printf("\\n");
    }
    return 0;
}
""")
    return "\n".join(lines)


def parse_outputs(text: str, n_out: int) -> tuple[np.ndarray, int | None]:
    """The int8 outputs printed by harness() and the stack line's value (None if absent)."""
    rows, stack = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("stack "):
            stack = int(line.split()[1])
            continue
        if line.startswith("status"):
            raise LrccError(f"C model returned an error: {line}")
        vals = [int(v) for v in line.split()]
        if len(vals) != n_out:
            raise LrccError(f"C model printed {len(vals)} values, expected {n_out}: {line[:80]}")
        rows.append(vals)
    return np.array(rows, dtype=np.int8), stack
