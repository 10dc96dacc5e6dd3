"""Check generated C against the reference executor: a host build under AddressSanitizer and
UBSan, and an arm-none-eabi build for the target's board run under QEMU, both bit for bit."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import LrccError
from . import hostcc
from .execute import run_program
from .program import Program
from .writer import harness, parse_outputs, write_c


@dataclass
class CCheck:
    """What one check found: the outputs of each build, whether they equal the reference, sizes."""

    reference: np.ndarray
    host: np.ndarray | None = None
    qemu: np.ndarray | None = None
    arena_bytes: int = 0
    const_bytes: int = 0
    text: int | None = None        # arm-none-eabi-size of the whole program (model, harness, C library)
    data: int | None = None
    bss: int | None = None
    model_text: int | None = None  # code of lrcc_model.o alone (text minus its const data)
    stack_used: int | None = None  # measured under QEMU: the model's stack high-water mark
    notes: list[str] = field(default_factory=list)

    @property
    def host_equal(self) -> bool:
        return self.host is not None and np.array_equal(self.host, self.reference)

    @property
    def qemu_equal(self) -> bool:
        return self.qemu is not None and np.array_equal(self.qemu, self.reference)


def check_c(prog: Program, inputs: np.ndarray, board: str | None = "stm32f746", workdir: str | Path | None = None,
            sanitize: bool = True, strategy: str = "lrcc") -> CCheck:
    """Build and run the program's C on int8 `inputs` (n, input size): on the host (ASan + UBSan)
    and, with a board, for it under QEMU. Raises LrccError when a build or run fails."""
    rows = np.asarray(inputs, dtype=np.int8).reshape(len(inputs), -1)
    ref = np.stack([run_program(prog, r).reshape(-1) for r in rows])
    c = write_c(prog, strategy)
    out = CCheck(ref, arena_bytes=c.arena_bytes, const_bytes=c.const_bytes)
    n_out = prog.tensors[prog.output].size
    tmp = tempfile.TemporaryDirectory(prefix="lrcc-c-") if workdir is None else None
    root = Path(workdir) if workdir is not None else Path(tmp.name)
    try:
        files = c.files()
        exe = hostcc.build({**files, "main.c": harness(rows)}, root / "host", sanitize=sanitize)
        out.host, _ = parse_outputs(hostcc.run(exe).decode(), n_out)
        if board is not None:
            from . import toolchain
            b = toolchain.arm_build({**files, "main.c": harness(rows, arm=True)}, root / board, board=board)
            out.text, out.data, out.bss = b.text, b.data, b.bss
            out.model_text = _object_text(b, "lrcc_model")
            text = toolchain.run_qemu(b.elf, board)
            out.qemu, out.stack_used = parse_outputs(text, n_out)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


def _object_text(build, stem: str) -> int | None:
    """Code + read-only data of one object of an ARM build, from arm-none-eabi-size on its .o."""
    import subprocess
    for o in Path(build.elf).parent.rglob(f"{stem}.o"):
        r = subprocess.run(["arm-none-eabi-size", str(o)], capture_output=True, text=True)
        if r.returncode == 0:
            fields = r.stdout.splitlines()[-1].split()
            return int(fields[0])
    return None


def require_equal(check: CCheck, what: str = "the C model") -> None:
    """Raise LrccError unless every build's output equals the reference."""
    for name, got in (("host", check.host), ("qemu", check.qemu)):
        if got is not None and not np.array_equal(got, check.reference):
            bad = int((got != check.reference).sum())
            raise LrccError(f"{what}: the {name} build differs from the reference executor in {bad} values")
