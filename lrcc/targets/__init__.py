"""Targets: the machines lrcc compiles for, with the datasheet numbers its cost model uses."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LrccError


@dataclass(frozen=True)
class Target:
    """A machine: peak FLOP/s, memory bandwidth, per-op overhead, and (MCUs) memory sizes."""

    name: str
    kind: str                # "cpu" | "gpu" | "mcu"
    description: str
    peak_flops: float        # FLOP/s for the dtype lrcc computes in on this target
    bandwidth: float         # bytes/s of main memory
    op_overhead_s: float     # fixed cost per operator launch (dispatch / kernel launch)
    sram_bytes: int | None = None
    flash_bytes: int | None = None
    cycles_per_mac: float | None = None  # MCUs: core cycles per int8 multiply-accumulate of lrcc's C kernels
    clock_hz: float | None = None        # MCUs: core clock
    board: str | None = None             # MCUs: the board description lrcc.codegen.c.toolchain builds for

    def roofline_s(self, flops: float, nbytes: float) -> float:
        """Latency of one operator by the roofline model, plus its launch overhead."""
        return max(flops / self.peak_flops, nbytes / self.bandwidth) + self.op_overhead_s


# CPU: a 2-core AVX-512 server slice. Its datasheet peak (2 cores x 3.0 GHz x 2 FMA units x 16 fp32
# lanes x 2 FLOP = 384 GFLOP/s) is not what torch reaches: its fp32 matmuls on MiniLM's shapes and its
# blocked attention kernel run at 130-180 GFLOP/s with 2 threads (benchmarks/attention_speed.py prints
# them), so the roofline uses 150; ~20 GB/s per core pair (a pass over a large fp32 tensor). Datasheet
# figures otherwise. GPUs: NVIDIA A100 SXM 80GB (312 TFLOP/s dense fp16 tensor core,
# 2.039 TB/s HBM2e) and H100 SXM (989 TFLOP/s dense fp16, 3.35 TB/s HBM3).
_TARGETS = {
    "cpu": Target("cpu", "cpu", "x86-64 CPU, 2 cores, AVX-512 fp32 (roofline)", 150e9, 20e9, 3e-6),
    "a100": Target("a100", "gpu", "NVIDIA A100 SXM 80GB, fp16 tensor cores", 312e12, 2.039e12, 4e-6),
    "h100": Target("h100", "gpu", "NVIDIA H100 SXM, fp16 tensor cores", 989e12, 3.35e12, 4e-6),
    # MCUs: STM32F746 (Cortex-M7 at 216 MHz, 320 KB SRAM, 1 MB flash) and STM32F411 (Cortex-M4 at
    # 100 MHz, 128 KB SRAM, 512 KB flash). lrcc's kernels are portable C (no SIMD intrinsics yet):
    # the digits MLP executes 633,344 instructions per inference for its 50,560 MACs under QEMU
    # (benchmarks/mcu.py), 12.5 per MAC; we price a MAC at 12 cycles on the dual-issue M7 and 13 on
    # the M4. peak_flops = 2 * clock / cycles_per_mac. Bandwidth: one 32-bit word per cycle from
    # flash through the ART accelerator.
    "stm32f746": Target("stm32f746", "mcu", "STM32F746 Cortex-M7 216 MHz, 320 KB SRAM, 1 MB flash (int8 C)",
                        2 * 216e6 / 12.0, 4 * 216e6, 2e-7, 320 * 1024, 1024 * 1024, 12.0, 216e6, "stm32f746"),
    "stm32f411": Target("stm32f411", "mcu", "STM32F411 Cortex-M4 100 MHz, 128 KB SRAM, 512 KB flash (int8 C)",
                        2 * 100e6 / 13.0, 4 * 100e6, 4e-7, 128 * 1024, 512 * 1024, 13.0, 100e6, "stm32f411"),
}


def targets() -> list[str]:
    """Names of the targets lrcc knows."""
    return sorted(_TARGETS)


def get_target(target: "str | Target") -> Target:
    """The Target named `target` (or the Target itself)."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, str) or target.lower() not in _TARGETS:
        raise LrccError(f"unknown target {target!r}; known targets: {', '.join(targets())}")
    return _TARGETS[target.lower()]
