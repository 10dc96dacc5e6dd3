"""Write C text: const arrays, the operator library for a set of ops, and one-op test programs."""
from __future__ import annotations

import numpy as np

from . import kernels
from .kernels import c_int
from .program import Op

_CTYPES = {np.dtype(np.int8): "int8_t", np.dtype(np.uint8): "uint8_t", np.dtype(np.int16): "int16_t",
           np.dtype(np.int32): "int32_t", np.dtype(np.int64): "int64_t"}


def c_type(arr: np.ndarray) -> str:
    try:
        return _CTYPES[np.asarray(arr).dtype]
    except KeyError:
        raise kernels.LrccError(f"C backend: cannot emit an array of dtype {np.asarray(arr).dtype}") from None


def const_array(name: str, arr: np.ndarray, per_line: int = 24) -> str:
    """`static const <type> name[N] = {...};` for an integer numpy array (flattened)."""
    flat = np.asarray(arr).ravel()
    if flat.size == 0:
        flat = np.zeros(1, dtype=np.asarray(arr).dtype)  # C forbids empty arrays
    vals = [c_int(v) for v in flat.tolist()]
    lines = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    body = ",\n    ".join(lines)
    return f"static const {c_type(flat)} {name}[{flat.size}] = {{\n    {body}\n}};\n"


def library(ops: list[Op]) -> str:
    """The operator library for these ops: lrcc_ops.h's helpers, then each used kernel's C once."""
    parts = [kernels.render("lrcc_ops.h.j2")]
    kinds: dict[str, list[Op]] = {}
    for op in ops:
        kinds.setdefault(op.kind, []).append(op)
    for kind in sorted(kinds):
        k = kernels.get(kind)
        flags = k.flags(kinds[kind]) if hasattr(k, "flags") else {}
        parts.append(kernels.render(k.template, **flags))
    return "\n".join(parts)


def array_attrs(op: Op) -> dict[str, np.ndarray]:
    return {k: v for k, v in op.attrs.items() if isinstance(v, np.ndarray)}


def op_test_program(op: Op, xs: list[np.ndarray], out_size: int, scratch_bytes: int = 0) -> str:
    """A standalone C program that runs one op on the given int8 inputs and prints its output as
    space-separated integers (for comparing a kernel with its reference)."""
    lines = ["#include <stdio.h>", "#include <stdint.h>", "#include <string.h>", library([op])]
    for key, arr in array_attrs(op).items():
        lines.append(const_array(f"k_{key}", arr))
    ins = []
    for i, x in enumerate(xs):
        lines.append(const_array(f"in{i}", np.asarray(x, dtype=np.int8)))
        ins.append(f"in{i}")
    lines.append(f"static int8_t out[{max(out_size, 1)}];")
    scratch = "NULL"
    if scratch_bytes:
        lines.append(f"static int32_t scratch[{(scratch_bytes + 3) // 4}];")
        scratch = "(void *)scratch"
    call = kernels.get(op.kind).call(op, ins, "out", scratch, lambda key: f"k_{key}")
    lines.append("int main(void)\n{\n    int32_t i;\n    int status = " + call + ";\n"
                 "    if (status != 0) {\n        return status;\n    }\n"
                 f"    for (i = 0; i < {out_size}; ++i) {{\n        printf(\"%d \", (int)out[i]);\n    }}\n"
                 "    printf(\"\\n\");\n    return 0;\n}\n")
    return "\n".join(lines)


def run_op_in_c(op: Op, xs: list[np.ndarray], out_shape: tuple[int, ...], scratch_bytes: int = 0) -> np.ndarray:
    """Build the one-op program with gcc (ASan + UBSan) and return what it computes."""
    from .hostcc import build_and_run
    size = int(np.prod(out_shape, dtype=np.int64)) if out_shape else 1
    text = op_test_program(op, xs, size, scratch_bytes)
    out = build_and_run({"main.c": text})
    vals = np.array([int(v) for v in out.split()], dtype=np.int8)
    return vals.reshape(out_shape)
