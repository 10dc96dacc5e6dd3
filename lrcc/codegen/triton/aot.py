"""Ahead-of-time compilation of rendered kernels for a GPU that need not be present.

Uses Triton's own compiler with a GPUTarget (no driver, no CUDA toolkit: Triton bundles ptxas),
so CI can check that every kernel compiles for sm_80 and sm_90 and look at the PTX it produces.
Compiles run in a fresh Python process: Triton fixes interpreter-or-compiler when it is imported,
and the calling process may be running kernels in the interpreter.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ...errors import LrccError

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


def parse_arch(arch: str) -> int:
    """Compute capability of an arch name like 'sm_80' or 'sm_90a'."""
    key = str(arch).lower().rstrip("a")
    if key not in ARCHS:
        raise LrccError(f"unknown GPU arch {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[key]


@dataclass
class AotJob:
    """One kernel to compile: template + render flags, the config's constexprs, arch and dtype."""

    template: str
    config: dict[str, Any]
    arch: str = "sm_80"
    dtype: str = "fp16"
    flags: dict[str, Any] = field(default_factory=dict)
    # whether the sizes and strides are multiples of 16, as model widths are (4096, 11008, ...): the
    # JIT specialises on that at launch, and it decides whether loads vectorise and loops pipeline
    aligned: bool = True
    # also return the SASS (the GPU's own instructions, disassembled from the cubin with the
    # cuobjdump Triton bundles): what ptxas made of the PTX, to count what a loop issues
    sass: bool = False


def compile_many(jobs: list[AotJob], timeout: float = 900.0) -> list[dict[str, Any]]:
    """Compile every job in one subprocess; returns per job {"ptx", "name", "shared" (bytes),
    "regs" (per thread), "local_bytes", "stack_bytes" (spilled, per thread)} (the last three None
    without cuobjdump), and "sass" where the job asks for it.
    Raises LrccError naming the job that failed."""
    for job in jobs:
        parse_arch(job.arch)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps([job.__dict__ for job in jobs])
    proc = subprocess.run([sys.executable, "-m", "lrcc.codegen.triton.aot"], input=payload, capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise LrccError(f"ahead-of-time Triton compile failed:\n{tail}")
    return json.loads(proc.stdout)


def _compile_one(job: dict[str, Any]) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget

    from .render import load, render

    module = load(render(job["template"], **job["flags"]))
    config = job["config"]
    signature, constexprs = module.aot_args(config, job["dtype"])
    # pointers 16-byte aligned, as torch allocates them (what the JIT specialises on at launch)
    # and, for an aligned job, the strides and the sizes a template names in AOT_DIVISIBLE multiples
    # of 16, as the JIT specialises them when a GPU launch passes sizes like 4096
    aligned, sizes = job.get("aligned", True), set(getattr(module, "AOT_DIVISIBLE", ()))
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
             if ty.startswith("*") or (aligned and ty == "i32" and (name in sizes or name.startswith("stride_")))}
    target = GPUTarget("cuda", parse_arch(job["arch"]), 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    src = triton.compiler.ASTSource(fn=module.KERNEL, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        k = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:
        first = "\n".join(str(e).splitlines()[:12])
        raise SystemExit(f"{job['template']} {job['flags']} {config} for {job['arch']}: {first}")
    out = {"ptx": k.asm["ptx"], "name": k.metadata.name, "shared": k.metadata.shared, **resources(k.asm.get("cubin"))}
    if job.get("sass"):
        out["sass"] = _cuobjdump(k.asm.get("cubin"), "-sass")
    return out


def _cuobjdump(cubin: bytes | None, flag: str) -> str | None:
    """cuobjdump's output for a cubin (None where Triton bundles no cuobjdump)."""
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def loop_opcodes(sass: str) -> Counter:
    """Opcode counts (predicates and modifiers dropped: "FFMA", "LOP3", ...) of the longest loop in
    a kernel's SASS: the instructions from a backward branch's target to the branch itself. For a
    kernel with one main loop, what one trip issues per thread."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best: list[str] = []
    for addr, text in ins:
        m = re.search(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    return Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in best)


def resources(cubin: bytes | None) -> dict[str, int | None]:
    """Registers per thread, and local-memory and stack-frame bytes per thread (where ptxas puts
    spilled registers: a kernel without calls reports its spills as stack) of a compiled kernel, as
    ptxas allotted them, read with the cuobjdump Triton bundles; None where it is missing."""
    out = _cuobjdump(cubin, "-res-usage")
    if out is None:
        return {"regs": None, "local_bytes": None, "stack_bytes": None}
    regs, local, stack = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return {"regs": int(regs.group(1)) if regs else None, "local_bytes": int(local.group(1)) if local else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


def main() -> None:
    jobs = json.loads(sys.stdin.read())
    out = [_compile_one(job) for job in jobs]
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
