"""What the quantised GEMV's main loop issues per weight code, read from the GPU's own instructions.

Decoding (M = 1) streams every weight byte once, so a weight-only int4 GEMV can only reach the GPU's
peak bandwidth if its threads issue few enough instructions per code: an H100 SXM issues about
33e12 thread-instructions per second (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz) against
6.7e12 int4 codes per second at its 3.35 TB/s, so about 5 instructions per code is the budget.
This script needs no GPU: it compiles quant_gemv.py.j2 ahead of time for sm_80 and sm_90 (Triton's
own compiler and ptxas), disassembles the cubin with the cuobjdump Triton bundles, and counts the
instructions of the main loop's body (one trip: BLOCK_K rows of BLOCK_N columns per program).

Columns: form; arch; the config (BLOCK_N, warps, columns per thread; PREFETCH: whether the next K
block's codes are loaded before this block's are used); registers per thread and
spilled bytes; codes one thread handles per trip; instructions per trip; instructions per code;
int-to-float conversions (I2F / I2FP) and barriers (BAR) in the loop; "issue bound": the code
rate the issue rate allows at that count, as a fraction of the peak bandwidth's code rate (codes
only, at the boost clock: A100 SXM 108 SMs at 1.41 GHz and 2.04 TB/s for sm_80, H100 SXM 132 SMs
at 1.98 GHz and 3.35 TB/s for sm_90). Above 1, issuing is not what limits the kernel. It is an
upper bound from counts, not a timing: the timings come from benchmarks/gpu_kernels.py on a GPU.

    python3 benchmarks/gemv_sass.py [--no-docs]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_sections import write_section  # noqa: E402

from lrcc.codegen.triton import configs  # noqa: E402
from lrcc.codegen.triton.aot import AotJob, compile_many, loop_opcodes  # noqa: E402

GPUS = {"sm_80": ("A100 SXM", 108, 1.41e9, 2.04e12), "sm_90": ("H100 SXM", 132, 1.98e9, 3.35e12)}
# (form, bits, group, block_k, rank): int4 at three group sizes, int8 per output channel, int4 g128
# with the fused rank-32 branch
FORMS = [("int4 g128", 4, 128, 128, 0), ("int4 g64", 4, 64, 128, 0), ("int4 g32", 4, 32, 64, 0),
         ("int8 per channel", 8, 0, 64, 0), ("int4 g128 + r32", 4, 128, 128, 32)]
N = K = 4096


def rows() -> list[dict]:
    jobs, meta = [], []
    for arch in GPUS:
        for form, bits, group, block_k, rank in FORMS:
            seen = set()
            for cfg in configs.gemv_configs(1, N, K, block_k, bits, sms=GPUS[arch][1], rank=rank):
                # 8 warps run the same loop as 4 (bigger programs): its counts match, so 4 warps only
                key = (cfg["BLOCK_N"], cfg["PREFETCH"])
                if key in seen or cfg["REDUCE"] == "atomic" or cfg["num_warps"] != 4:
                    continue
                seen.add(key)
                scale_at = configs.gemv_scale_at(group or K, K, block_k)  # group 0: per output channel
                full = {**cfg, "BITS": bits, "BLOCK_K": block_k, "SCALE_AT": scale_at}
                jobs.append(AotJob("quant_gemv", full, arch, flags={"lowrank": rank > 0}, sass=True))
                meta.append((form, arch, cfg, bits, block_k))
    out = []
    for (form, arch, cfg, bits, block_k), res in zip(meta, compile_many(jobs)):
        ops = loop_opcodes(res["sass"] or "")
        per_trip = sum(ops.values())
        codes = cfg["BLOCK_N"] * block_k / (32 * cfg["num_warps"])
        name, sms, clock, bw = GPUS[arch]
        issue_codes = sms * 4 * 32 * clock / (per_trip / codes)  # codes per second the issue rate allows
        lanes_n = 32 // max(1, block_k * bits // 8 // 16)  # a warp's lanes along N (the rest run along K)
        per_thread = max(1, cfg["BLOCK_N"] // (lanes_n * cfg["num_warps"]))
        out.append({"form": form, "arch": arch, "config": f"{cfg['BLOCK_N']} x {cfg['num_warps']} ({per_thread})",
                    "prefetch": "yes" if cfg["PREFETCH"] else "no",
                    "regs": res["regs"], "spill": res["local_bytes"], "codes": int(codes), "instrs": per_trip,
                    "per_code": per_trip / codes, "cvt": ops["I2F"] + ops["I2FP"], "bar": ops["BAR"],
                    "bound": issue_codes / (bw * 8 / bits)})
    return out


def table(rs: list[dict]) -> str:
    head = ("| form | arch | BLOCK_N x warps (columns/thread) | prefetch | regs | spilled B | codes/trip | instrs/trip | "
            "instrs/code | I2F in loop | BAR in loop | issue bound / peak BW |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['form']} | {r['arch']} | {r['config']} | {r['prefetch']} | {r['regs']} | {r['spill']} | {r['codes']} | {r['instrs']} | "
        f"{r['per_code']:.2f} | {r['cvt']} | {r['bar']} | {r['bound']:.2f} |\n" for r in rs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    text = table(rows())
    print(text)
    if not args.no_docs:
        import triton
        body = ("## Quantised GEMV: instructions per weight code (benchmarks/gemv_sass.py)\n\n"
                f"Counted in the SASS of ahead-of-time compiles (Triton {triton.__version__}, no GPU involved) of the "
                f"GEMV's heuristic configs for one row of a {N} x {K} layer; the script's docstring defines every "
                "column. These are counts, not timings.\n\n" + text + "\n")
        write_section(ROOT / "docs" / "benchmarks.md", "gemv-sass", body)


if __name__ == "__main__":
    main()
