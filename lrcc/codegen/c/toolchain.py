"""Build C for Cortex-M microcontrollers with arm-none-eabi-gcc and run it under QEMU.

The twin of hostcc.py for the MCU target. A build links the sources with lrcc's start-up code
(templates/c/startup_cortexm.c.j2) and a linker script with the real part's memory sizes
(templates/c/linker.ld.j2), so a program that would not fit the chip fails to link, and the
failure becomes an LrccError naming the region and the overflow. The build reports flash and RAM
use (arm-none-eabi-size), per-function stack frames (-fstack-usage) and the biggest symbols
(arm-none-eabi-nm). Programs run bare-metal on a QEMU MPS2 board of the same core and print through
ARM semihosting; the start-up code paints the stack so that `lrcc_stack_used()` gives the measured
high-water mark.

Memory map (QEMU 7.2, `info mtree`): the boards mps2-an500 (Cortex-M7) and mps2-an386 (Cortex-M4)
both have 4 MB of SSRAM at 0x00000000 (code; RAM to QEMU, loaded from the ELF) and 4 MB at 0x20000000
(data), so the real parts' 1024K/512K of flash and 320K/128K of RAM fit inside them; the link
enforces the real sizes. Below 0x20000000 lies a reserved region that reads as zero and ignores
writes, so the start-up code puts a no-access MPU region there: a stack overflowing the bottom of
RAM becomes a MemManage fault (exit status 132) instead of silent corruption. On the real STM32
parts flash is at 0x08000000 (aliased at 0x00000000 when booting from flash); RAM is at 0x20000000.

newlib-nano notes: printf has no %lld and no %f (pass "-u_printf_float" in extra_flags for %f);
its first printf takes about 1.5 KB of heap, which the link keeps free (heap_bytes).

Debian packages: gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm (scripts/setup.sh).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from ...errors import LrccError
from .hostcc import STRICT

DEBIAN_PACKAGES = ("gcc-arm-none-eabi", "libnewlib-arm-none-eabi", "qemu-system-arm")
STACK_PAINT = 0xC5A5C5A5          # not a repeated byte, so no compiler turns the painting into memset
STARTUP_FILE = "lrcc_startup.c"
LINKER_FILE = "lrcc_link.ld"
ELF_FILE = "app.elf"
FAULT_EXIT_BASE = 128             # the start-up code's fault handlers exit with 128 + exception number
EXCEPTIONS = {2: "NMI", 3: "HardFault", 4: "MemManage", 5: "BusFault", 6: "UsageFault", 11: "SVCall",
              12: "DebugMonitor", 14: "PendSV", 15: "SysTick"}

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates" / "c"
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


@dataclass(frozen=True)
class Board:
    """A microcontroller part lrcc builds for, and the QEMU board that runs its code."""
    name: str
    cpu: str                      # gcc -mcpu and qemu -cpu
    cflags: tuple[str, ...]       # core, instruction set and float ABI
    flash_origin: int
    flash_bytes: int              # the real part's sizes: what the linker enforces
    ram_origin: int
    ram_bytes: int
    qemu_machine: str
    fpu: bool = True


BOARDS: dict[str, Board] = {
    "stm32f746": Board("stm32f746", "cortex-m7", ("-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-d16", "-mfloat-abi=hard"),
                       flash_origin=0x00000000, flash_bytes=1024 * 1024, ram_origin=0x20000000, ram_bytes=320 * 1024,
                       qemu_machine="mps2-an500"),
    "stm32f411": Board("stm32f411", "cortex-m4", ("-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"),
                       flash_origin=0x00000000, flash_bytes=512 * 1024, ram_origin=0x20000000, ram_bytes=128 * 1024,
                       qemu_machine="mps2-an386"),
}


def get_board(board: str | Board) -> Board:
    """The Board named `board` (a Board passes through), or an LrccError listing the known ones."""
    if isinstance(board, Board):
        return board
    try:
        return BOARDS[board]
    except KeyError:
        raise LrccError(f"unknown MCU board {board!r}; known: {', '.join(sorted(BOARDS))}") from None


@dataclass(frozen=True)
class StackFrame:
    """One function's stack frame as gcc -fstack-usage reports it."""
    function: str
    location: str                 # file:line:column
    bytes: int
    qualifier: str                # "static", "dynamic" or "dynamic,bounded"


@dataclass(frozen=True)
class Symbol:
    """One symbol of the linked program, from arm-none-eabi-nm -S."""
    name: str
    bytes: int
    kind: str                     # nm's letter: t/T code, r/R read-only data, d/D data, b/B bss


@dataclass
class ArmBuild:
    """A linked Cortex-M program and what it costs on its board."""
    elf: Path
    board: Board
    text: int                     # arm-none-eabi-size: code and read-only data (flash)
    data: int                     # initialised data (flash and RAM)
    bss: int                      # zeroed data (RAM)
    stack_bytes: int              # the stack reserved at the bottom of RAM
    heap_bytes: int               # RAM the link keeps free at the top for the C library's heap
    stack_frames: list[StackFrame] = field(default_factory=list)   # biggest first
    symbols: list[Symbol] = field(default_factory=list)            # the biggest, biggest first

    @property
    def flash_bytes(self) -> int:
        """Flash the program occupies: code, constants and the initial values of .data."""
        return self.text + self.data

    @property
    def ram_bytes(self) -> int:
        """RAM the program reserves: .data, .bss and the stack (the heap takes what is left, at least
        heap_bytes)."""
        return self.data + self.bss + self.stack_bytes

    @property
    def max_static_frame(self) -> int:
        """The largest single frame -fstack-usage reports among the built sources (0 if none).
        A bound on one call, not on a call chain: lrcc_stack_used() measures the chain."""
        return max((f.bytes for f in self.stack_frames), default=0)

    def frame(self, function: str) -> StackFrame:
        """The stack frame of `function`, or an LrccError."""
        for f in self.stack_frames:
            if f.function == function:
                return f
        raise LrccError(f"no stack frame for {function!r} in the build of {self.elf}")


def _tool(name: str) -> str | None:
    return shutil.which(name)


def have_arm_toolchain(need_qemu: bool = True) -> bool:
    """Whether arm-none-eabi-gcc with newlib (and qemu-system-arm, unless need_qemu=False) are installed."""
    try:
        require_arm_toolchain(need_qemu)
    except LrccError:
        return False
    return True


def require_arm_toolchain(need_qemu: bool = True) -> None:
    """Raise an LrccError naming the Debian packages to install when a needed tool is missing."""
    missing = [t for t in ("arm-none-eabi-gcc", "arm-none-eabi-size", "arm-none-eabi-nm") if _tool(t) is None]
    if need_qemu and _tool("qemu-system-arm") is None:
        missing.append("qemu-system-arm")
    if not missing and not _have_newlib():
        missing.append("newlib for arm-none-eabi (nano.specs, rdimon.specs)")
    if missing:
        raise _missing(missing)


def _missing(missing: list[str]) -> LrccError:
    return LrccError(f"the Cortex-M toolchain is incomplete: missing {', '.join(missing)}; install it with "
                     f"`apt-get install -y {' '.join(DEBIAN_PACKAGES)}` (as root, Debian/Ubuntu) "
                     "or run scripts/setup.sh")


def _have_newlib() -> bool:
    r = subprocess.run(["arm-none-eabi-gcc", "-print-file-name=nano.specs"], capture_output=True, text=True)
    return r.returncode == 0 and os.path.isabs(r.stdout.strip())


def render_startup(board: str | Board = "stm32f746") -> str:
    """The start-up C file for `board`: vector table, reset handler, fault exits, lrcc_stack_used()."""
    b = get_board(board)
    return _ENV.get_template("startup_cortexm.c.j2").render(board=b.name, cpu=b.cpu, fpu=b.fpu,
                                                            paint=f"{STACK_PAINT:08X}")


def render_linker_script(board: str | Board = "stm32f746", stack_bytes: int = 8192, heap_bytes: int = 2048) -> str:
    """The linker script for `board`: `stack_bytes` of stack at the bottom of RAM, the last
    `heap_bytes` of RAM kept free for the C library's heap."""
    b = get_board(board)
    return _ENV.get_template("linker.ld.j2").render(
        board=b.name, cpu=b.cpu, qemu_machine=b.qemu_machine, stack_bytes=stack_bytes, heap_bytes=heap_bytes,
        flash_origin=f"0x{b.flash_origin:08X}", flash_length=_ld_size(b.flash_bytes),
        ram_origin=f"0x{b.ram_origin:08X}", ram_length=_ld_size(b.ram_bytes - heap_bytes),
        heap_origin=f"0x{b.ram_origin + b.ram_bytes - heap_bytes:08X}")


def _ld_size(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def compile_flags(board: str | Board, opt: str = "-Os") -> list[str]:
    """The C flags of an MCU build: the board's core flags, strict C99, one section per function and datum."""
    b = get_board(board)
    return [*b.cflags, opt, *STRICT, "-ffunction-sections", "-fdata-sections", "-fstack-usage", "-g"]


def arm_build(sources: dict[str, str], out_dir: str | Path, board: str | Board = "stm32f746", opt: str = "-Os",
              stack_bytes: int = 8192, extra_flags: tuple[str, ...] | list[str] = (),
              heap_bytes: int = 2048) -> ArmBuild:
    """Write `sources` (file name -> text; .c files are compiled, others such as headers only written)
    into out_dir with lrcc's start-up code and linker script, compile and link them for `board`,
    and return the ELF with its sizes, stack frames and biggest symbols. The program provides
    `int main(void)`; it may call `uint32_t lrcc_stack_used(void)`. `extra_flags` go to both the
    compile and the link (e.g. "-DN=4", "-u_printf_float"). The link keeps `heap_bytes` of RAM free
    for the C library's heap (newlib-nano's stdio takes about 1.5 KB on the first printf). A
    program that does not fit the part raises an LrccError naming the region and by how much."""
    require_arm_toolchain(need_qemu=False)
    b = get_board(board)
    if stack_bytes <= 0 or stack_bytes % 8:
        raise LrccError(f"stack_bytes={stack_bytes}: give a positive multiple of 8 (the AAPCS stack alignment)")
    if heap_bytes < 0 or heap_bytes % 8:
        raise LrccError(f"heap_bytes={heap_bytes}: give a non-negative multiple of 8")
    if stack_bytes + heap_bytes >= b.ram_bytes:
        raise LrccError(f"stack_bytes={stack_bytes:,} + heap_bytes={heap_bytes:,} do not fit {b.name}'s "
                        f"{b.ram_bytes:,} bytes of RAM")
    for reserved in (STARTUP_FILE, LINKER_FILE, ELF_FILE):
        if reserved in sources:
            raise LrccError(f"source name {reserved!r} is reserved for lrcc's own build files; rename it")
    if not any(n.endswith(".c") for n in sources):
        raise LrccError("arm_build: no .c file among the sources")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {**sources, STARTUP_FILE: render_startup(b), LINKER_FILE: render_linker_script(b, stack_bytes, heap_bytes)}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)

    cflags = [*compile_flags(b, opt), *extra_flags]
    objects = []
    for name in files:
        if not name.endswith(".c"):
            continue
        obj = out / "obj" / (name[:-2].replace("/", "__") + ".o")
        obj.parent.mkdir(exist_ok=True)
        _run(["arm-none-eabi-gcc", *cflags, "-I", str(out), "-c", str(out / name),
              "-o", str(obj)], f"compiling {name} for {b.name}")
        objects.append(obj)

    elf = out / ELF_FILE
    link = ["arm-none-eabi-gcc", *b.cflags, opt, *extra_flags, "--specs=nano.specs", "--specs=rdimon.specs",
            "-nostartfiles", "-T", str(out / LINKER_FILE), "-Wl,--gc-sections", "-Wl,--no-warn-rwx-segments",
            f"-Wl,-Map={out / 'app.map'}", *map(str, objects), "-lm", "-o", str(elf)]
    r = subprocess.run(link, capture_output=True, text=True)
    if r.returncode != 0:
        user_objects = [o for o in objects if o.stem != Path(STARTUP_FILE).stem]
        raise _link_error(r.stderr, b, stack_bytes, heap_bytes, user_objects, link)

    text, data, bss = _sizes(elf)
    return ArmBuild(elf=elf, board=b, text=text, data=data, bss=bss, stack_bytes=stack_bytes, heap_bytes=heap_bytes,
                    stack_frames=_stack_frames(out / "obj"), symbols=_biggest_symbols([elf]))


def _run(cmd: list[str], what: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise LrccError(f"{what} failed ({' '.join(cmd)}):\n{r.stderr}")
    return r.stdout


_OVERFLOW = re.compile(r"region [`']?(\w+)'? overflowed by (\d+) bytes")


def _link_error(stderr: str, b: Board, stack_bytes: int, heap_bytes: int, objects: list[Path],
                cmd: list[str]) -> LrccError:
    """An overflowed region becomes a message saying which, by how much, and what to do."""
    overflows = {m.group(1): int(m.group(2)) for m in _OVERFLOW.finditer(stderr)}
    if not overflows:
        return LrccError(f"linking for {b.name} failed ({' '.join(cmd)}):\n{stderr}")
    parts = []
    if "RAM" in overflows:
        parts.append(f"region RAM overflowed by {overflows['RAM']:,} bytes: .data + .bss + the {stack_bytes:,}-byte "
                     f"stack + {heap_bytes:,} bytes kept for the heap must fit {b.name}'s {b.ram_bytes:,} bytes of "
                     "RAM; shrink the arena or other static buffers, lower stack_bytes if the measured stack use "
                     "allows, or pick a board with more RAM")
    if "FLASH" in overflows:
        parts.append(f"region FLASH overflowed by {overflows['FLASH']:,} bytes: code + constants + .data must fit "
                     f"{b.name}'s {b.flash_bytes:,} bytes of flash; compress the weights further (lower rank or "
                     "fewer bits), build with -Os, or pick a board with more flash")
    for region in sorted(set(overflows) - {"RAM", "FLASH"}):
        parts.append(f"region {region} overflowed by {overflows[region]:,} bytes")
    big = [s for s in _biggest_symbols(objects) if s.bytes >= 64 and (("RAM" in overflows and s.kind in "bBdD")
           or ("FLASH" in overflows and s.kind in "tTrRdD"))][:5]
    if big:
        parts.append("largest objects: " + ", ".join(f"{s.name} ({s.bytes:,} B)" for s in big))
    return LrccError(f"the program does not fit {b.name}: " + "; ".join(parts))


def _sizes(elf: Path) -> tuple[int, int, int]:
    """text, data, bss of an ELF, from arm-none-eabi-size (Berkeley format)."""
    lines = _run(["arm-none-eabi-size", "-B", str(elf)], "arm-none-eabi-size").splitlines()
    text, data, bss = (int(v) for v in lines[1].split()[:3])
    return text, data, bss


def _stack_frames(obj_dir: Path) -> list[StackFrame]:
    """Every function's frame from the .su files gcc -fstack-usage wrote, biggest first."""
    frames = []
    for su in sorted(obj_dir.glob("*.su")):
        for line in su.read_text().splitlines():
            cols = line.split("\t")
            if len(cols) != 3:
                continue
            where, nbytes, qualifier = cols
            location, _, function = where.rpartition(":")
            frames.append(StackFrame(function=function, location=location, bytes=int(nbytes), qualifier=qualifier))
    return sorted(frames, key=lambda f: (-f.bytes, f.function))


def _biggest_symbols(paths: list[Path], top: int = 20) -> list[Symbol]:
    """The `top` biggest symbols with a size, from arm-none-eabi-nm -S --size-sort, biggest first."""
    out = subprocess.run(["arm-none-eabi-nm", "-S", "--size-sort", *map(str, paths)], capture_output=True,
                         text=True).stdout
    symbols = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) == 4:
            symbols.append(Symbol(name=cols[3], bytes=int(cols[1], 16), kind=cols[2]))
    return sorted(symbols, key=lambda s: (-s.bytes, s.name))[:top]


def qemu_command(elf: str | Path, board: str | Board = "stm32f746") -> list[str]:
    """The qemu-system-arm command line that runs `elf` on `board`'s QEMU machine with semihosting."""
    b = get_board(board)
    return ["qemu-system-arm", "-M", b.qemu_machine, "-cpu", b.cpu, "-nographic", "-monitor", "none",
            "-serial", "none", "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)]


def _run_under_timeout(cmd: list[str], elf: str | Path, b: Board, timeout: float) -> subprocess.CompletedProcess:
    if _tool("qemu-system-arm") is None:
        raise _missing(["qemu-system-arm"])
    wrapped = ["timeout", "--kill-after=5", f"{timeout:g}", *cmd]
    try:
        r = subprocess.run(wrapped, capture_output=True, text=True, errors="replace", timeout=timeout + 15)
    except subprocess.TimeoutExpired:
        r = subprocess.CompletedProcess(wrapped, 124, "", "")
    if r.returncode in (124, 137):
        raise LrccError(f"{elf} did not finish within {timeout:g} s on QEMU {b.qemu_machine}: a program stuck in a "
                        "loop, or too much work for the timeout (raise it); output so far:\n"
                        f"{r.stdout}{r.stderr}")
    if r.returncode != 0:
        what = f"exit status {r.returncode}"
        exc = EXCEPTIONS.get(r.returncode - FAULT_EXIT_BASE)
        if exc == "MemManage":
            what += (" (MemManage: an access the MPU forbids; most likely a stack overflow past the bottom of RAM: "
                     "build with a larger stack_bytes)")
        elif exc is not None:
            what += f" ({exc}: the program faulted)"
        raise LrccError(f"{elf} failed on QEMU {b.qemu_machine}: {what}; output:\n{r.stdout}{r.stderr}")
    return r


def run_qemu(elf: str | Path, board: str | Board = "stm32f746", timeout: float = 30) -> str:
    """Run a program built by arm_build on `board`'s QEMU machine; its stdout (semihosting). A non-zero
    exit (main's return value, or 128 + exception number after a fault) or a run longer than
    `timeout` seconds raises an LrccError carrying the output."""
    b = get_board(board)
    return _run_under_timeout(qemu_command(elf, b), elf, b, timeout).stdout


def count_instructions(elf: str | Path, board: str | Board = "stm32f746", timeout: float = 120) -> int:
    """Instructions the program executes from reset to exit (a cycle proxy; start-up and printf
    included: about 9,000 for an empty main with one printf). QEMU logs every instruction
    (-singlestep -d nochain,exec) to a temporary file and this counts the `Trace` lines, a few hundred
    thousand a second, so it is practical for small runs only (up to a few million instructions)."""
    b = get_board(board)
    with tempfile.TemporaryDirectory(prefix="lrcc-qemu-") as d:
        log = Path(d) / "exec.log"
        cmd = qemu_command(elf, b)
        cmd[1:1] = ["-singlestep", "-d", "nochain,exec", "-D", str(log)]
        _run_under_timeout(cmd, elf, b, timeout)
        with open(log, "rb") as f:
            return sum(1 for line in f if line.startswith(b"Trace"))
