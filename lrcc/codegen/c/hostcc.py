"""Build and run generated C on the host with gcc (strict C99, AddressSanitizer and UBSan)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import LrccError

STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def host_cc() -> str:
    """The host C compiler (gcc), or an LrccError saying how to install it."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise LrccError("no host C compiler: install gcc (Debian: apt-get install -y gcc)")
    return cc


def build(sources: dict[str, str], out_dir: str | Path, exe: str = "prog", sanitize: bool = True,
          extra_flags: list[str] | None = None) -> Path:
    """Write `sources` (file name -> text) into out_dir and link every .c among them into one
    executable, with -O1 and the strict C99 warnings as errors; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in sources.items():
        (out / name).write_text(text)
    cfiles = [str(out / n) for n in sources if n.endswith(".c")]
    cmd = [host_cc(), *STRICT, "-O1", *(SANITIZE if sanitize else []), *(extra_flags or []), "-I", str(out),
           *cfiles, "-o", str(out / exe), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise LrccError(f"host C build failed ({' '.join(cmd)}):\n{r.stderr}")
    return out / exe


def run(exe: str | Path, stdin: bytes = b"", timeout: float = 60.0) -> bytes:
    """Run a built program; its stdout, or an LrccError with its stderr (sanitizer reports) on failure."""
    try:
        r = subprocess.run([str(exe)], input=stdin, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LrccError(f"{exe} did not finish within {timeout} s") from None
    if r.returncode != 0:
        raise LrccError(f"{exe} exited with status {r.returncode}:\n{r.stderr.decode(errors='replace')}")
    return r.stdout


def build_and_run(sources: dict[str, str], stdin: bytes = b"", sanitize: bool = True) -> bytes:
    """build() in a temporary directory, then run(); the program's stdout."""
    with tempfile.TemporaryDirectory(prefix="lrcc-cc-") as d:
        return run(build(sources, d, sanitize=sanitize), stdin)
