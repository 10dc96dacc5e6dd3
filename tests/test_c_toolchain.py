"""The Cortex-M toolchain: builds for the MCU boards, runs under QEMU, agrees with the host build,
measures its stack, and turns programs that do not fit the part into clear errors."""
import re
import subprocess

import pytest

from lrcc.codegen.c import hostcc
from lrcc.codegen.c import toolchain as tc
from lrcc.errors import LrccError

BOARDS = ["stm32f746", "stm32f411"]
STACK = 8192
SCRATCH = 1024

# A checksum over a const table (flash), a mutable table (.data), a zeroed buffer (.bss) and a
# function with a 1 KB frame, with integer, 64-bit and float arithmetic; on the MCU it also prints
# its measured stack use. The same program builds on the host, without the stack line.
CHECKSUM_C = r"""
#include <stdint.h>
#include <stdio.h>

#define N 512
static const int8_t table[N] = {
#include "table.inc"
};
int32_t bias[4] = {7, -3, 1000, -100000};
uint8_t scratch_out[64];

static uint32_t fnv1a(const int8_t *p, int n)
{
    uint32_t h = 2166136261u;
    int i;
    for (i = 0; i < n; ++i) {
        h = (h ^ (uint8_t)p[i]) * 16777619u;
    }
    return h;
}

uint32_t scratch(uint32_t seed);
uint32_t scratch(uint32_t seed)
{
    volatile uint8_t buf[%(scratch)d];
    uint32_t i, s = 0;
    for (i = 0; i < sizeof buf; ++i) {
        buf[i] = (uint8_t)(seed * i + 1u);
    }
    for (i = 0; i < sizeof buf; ++i) {
        s = s * 31u + buf[i];
    }
    scratch_out[seed %% 64u] = (uint8_t)s;
    return s;
}

int main(void)
{
    int64_t dot = 0;
    float fsum = 0.0f;
    uint32_t fbits;
    int i;
    for (i = 0; i < N; ++i) {
        dot += (int64_t)table[i] * table[(i * 7) %% N] * bias[i %% 4];
        fsum += (float)table[i] * 0.125f + 0.1f;
    }
    {
        union { float f; uint32_t u; } pun;
        pun.f = fsum;
        fbits = pun.u;
    }
    printf("fnv1a %%lu\n", (unsigned long)fnv1a(table, N));
    /* newlib-nano's printf has no %%lld: print 64-bit values as two 32-bit halves */
    printf("dot %%08lx%%08lx\n", (unsigned long)((uint64_t)dot >> 32), (unsigned long)(uint32_t)dot);
    printf("float bits %%08lx\n", (unsigned long)fbits);
    printf("scratch %%lu\n", (unsigned long)scratch(3u));
#ifdef LRCC_MCU
    {
        extern uint32_t lrcc_stack_used(void);
        printf("stack %%lu\n", (unsigned long)lrcc_stack_used());
    }
#endif
    return 0;
}
""" % {"scratch": SCRATCH}

TABLE = ", ".join(str(((i * 37 + 11) % 256) - 128) for i in range(512)) + "\n"
SOURCES = {"checksum.c": CHECKSUM_C, "table.inc": TABLE}


def _program(body: str, decls: str = "") -> dict[str, str]:
    return {"main.c": "#include <stdint.h>\n#include <stdio.h>\n" + decls + "\nint main(void)\n{\n" + body + "\n}\n"}


@pytest.fixture(scope="module")
def host_output() -> list[str]:
    return hostcc.build_and_run(SOURCES).decode().splitlines()


@pytest.fixture(scope="module", params=BOARDS)
def built(request, tmp_path_factory):
    board = request.param
    b = tc.arm_build(SOURCES, tmp_path_factory.mktemp(board), board=board, stack_bytes=STACK,
                     extra_flags=("-DLRCC_MCU",))
    return b, tc.run_qemu(b.elf, board).splitlines()


def test_toolchain_is_installed():
    assert tc.have_arm_toolchain()


def test_qemu_output_matches_host(built, host_output):
    b, lines = built
    assert len(host_output) == 4
    assert lines[:-1] == host_output
    assert lines[-1].startswith("stack ")


def test_measured_stack_use(built):
    b, lines = built
    used = int(lines[-1].split()[1])
    assert 0 < used < STACK
    # scratch's 1 KB frame is on the chain main -> scratch, which ran before the measurement.
    assert b.frame("scratch").bytes >= SCRATCH
    assert used > b.frame("scratch").bytes + b.frame("main").bytes


def test_sizes_agree_with_arm_none_eabi_size(built):
    b, _ = built
    out = subprocess.run(["arm-none-eabi-size", "-B", str(b.elf)], capture_output=True, text=True, check=True).stdout
    text, data, bss = (int(v) for v in out.splitlines()[1].split()[:3])
    assert (b.text, b.data, b.bss) == (text, data, bss)
    assert b.text >= 512 and b.data >= 16 and b.bss >= 64   # the table, bias and scratch_out at least
    assert b.flash_bytes == text + data > 0
    assert b.ram_bytes == data + bss + STACK
    assert b.ram_bytes + b.heap_bytes <= b.board.ram_bytes
    assert b.flash_bytes <= b.board.flash_bytes


def test_stack_table_and_symbols(built):
    b, _ = built
    assert b.max_static_frame == max(f.bytes for f in b.stack_frames) >= SCRATCH
    assert {"main", "scratch", "Reset_Handler", "lrcc_stack_used"} <= {f.function for f in b.stack_frames}
    sizes = {s.name: s for s in b.symbols}
    assert sizes["table"].bytes == 512 and sizes["table"].kind in "rR"
    assert [s.bytes for s in b.symbols] == sorted((s.bytes for s in b.symbols), reverse=True)


def test_boards():
    m7, m4 = tc.get_board("stm32f746"), tc.get_board("stm32f411")
    assert (m7.cpu, m7.qemu_machine, m7.flash_bytes, m7.ram_bytes) == ("cortex-m7", "mps2-an500", 1 << 20, 320 << 10)
    assert (m4.cpu, m4.qemu_machine, m4.flash_bytes, m4.ram_bytes) == ("cortex-m4", "mps2-an386", 512 << 10, 128 << 10)
    assert "-mfpu=fpv5-d16" in m7.cflags and "-mfpu=fpv4-sp-d16" in m4.cflags
    with pytest.raises(LrccError, match="stm32f411"):
        tc.get_board("esp32")


def test_oversized_arena_fails_to_link_naming_ram(tmp_path):
    src = _program("arena[0] = 1; arena[sizeof arena - 1] = 2; return arena[0] - 1;",
                   "volatile uint8_t arena[400 * 1024];")
    with pytest.raises(LrccError) as e:
        tc.arm_build(src, tmp_path, board="stm32f746")
    msg = str(e.value)
    assert "region RAM overflowed by" in msg and "stm32f746" in msg and "arena" in msg and "stack_bytes" in msg
    overflow = int(re.search(r"overflowed by ([\d,]+) bytes", msg).group(1).replace(",", ""))
    assert overflow >= 400 * 1024 + STACK - 320 * 1024


def test_ram_fits_up_to_the_last_byte(tmp_path):
    """An arena that fills RAM exactly links and runs (printf's heap included); 8 bytes more fail."""
    def arena_prog(n):
        return _program("arena[0] = 1; arena[sizeof arena - 1] = 2; printf(\"%d\\n\", arena[0] + arena[sizeof arena - 1]); "
                        "return 0;", f"volatile uint8_t arena[{n}];")
    probe = tc.arm_build(arena_prog(8), tmp_path / "probe", board="stm32f411")
    free = probe.board.ram_bytes - probe.heap_bytes - probe.ram_bytes
    full = tc.arm_build(arena_prog(8 + free), tmp_path / "full", board="stm32f411")
    assert full.ram_bytes + full.heap_bytes == full.board.ram_bytes
    assert tc.run_qemu(full.elf, "stm32f411") == "3\n"
    with pytest.raises(LrccError, match="region RAM overflowed by 8 bytes"):
        tc.arm_build(arena_prog(16 + free), tmp_path / "over", board="stm32f411")


def test_oversized_weights_fail_to_link_naming_flash(tmp_path):
    src = _program("printf(\"%d\\n\", weights[i]); return 0;",
                   "const int8_t weights[600 * 1024] = {1};\nvolatile int i = 0;")
    with pytest.raises(LrccError, match="region FLASH overflowed by .* weights"):
        tc.arm_build(src, tmp_path, board="stm32f411")


def test_stack_overflow_faults(tmp_path):
    src = _program("return (int)deep(100000u);",
                   "static uint32_t deep(uint32_t n)\n{\n    volatile uint32_t pad[8];\n    pad[0] = n;\n"
                   "    return n == 0u ? 0u : deep(n - 1u) + pad[0];\n}\n")
    b = tc.arm_build(src, tmp_path, board="stm32f746", stack_bytes=2048)
    with pytest.raises(LrccError, match="exit status 132 .*MemManage.*stack_bytes"):
        tc.run_qemu(b.elf, "stm32f746")


def test_failures_under_qemu(tmp_path):
    status = tc.arm_build(_program("printf(\"partial\\n\");\n    return 3;"), tmp_path / "status")
    with pytest.raises(LrccError, match="(?s)exit status 3.*partial"):
        tc.run_qemu(status.elf)
    stuck = tc.arm_build(_program("volatile int spin = 1;\n    while (spin) {\n    }\n    return 0;"), tmp_path / "stuck")
    with pytest.raises(LrccError, match="did not finish within 1 s"):
        tc.run_qemu(stuck.elf, timeout=1)


def test_count_instructions_grows_with_the_work(tmp_path):
    src = _program("uint32_t s = 0;\n    int k;\n    for (k = 0; k < n; ++k) {\n        s += (uint32_t)k;\n    }\n"
                   "    return s == 0u ? 1 : 0;", "volatile int n = LOOPS;")
    counts = []
    for loops in (10, 1010):
        b = tc.arm_build(src, tmp_path / str(loops), opt="-O1", extra_flags=(f"-DLOOPS={loops}",))
        counts.append(tc.count_instructions(b.elf))
    assert 1000 < counts[0] < 1_000_000
    # the loop body is a handful of instructions per iteration
    assert 2 * 1000 <= counts[1] - counts[0] <= 20 * 1000


def test_bad_arguments(tmp_path):
    with pytest.raises(LrccError, match="multiple of 8"):
        tc.arm_build(SOURCES, tmp_path, stack_bytes=1004)
    with pytest.raises(LrccError, match="do not fit"):
        tc.arm_build(SOURCES, tmp_path, board="stm32f411", stack_bytes=128 * 1024)
    with pytest.raises(LrccError, match="reserved"):
        tc.arm_build({tc.STARTUP_FILE: "int x;\n", **SOURCES}, tmp_path)
    with pytest.raises(LrccError, match="no .c file"):
        tc.arm_build({"table.inc": TABLE}, tmp_path)
    with pytest.raises(LrccError, match="checksum.c"):
        tc.arm_build({"checksum.c": "int main(void) { return undefined_name; }\n"}, tmp_path)


def test_missing_toolchain_names_the_debian_packages(monkeypatch):
    monkeypatch.setattr(tc, "_tool", lambda name: None if name == "qemu-system-arm" else "/usr/bin/" + name)
    assert not tc.have_arm_toolchain()
    assert tc.have_arm_toolchain(need_qemu=False)
    with pytest.raises(LrccError, match="gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm") as e:
        tc.run_qemu("app.elf")
    assert "missing qemu-system-arm" in str(e.value)
