"""Triton kernels for the low-rank and quantised forms, against their torch references.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
on small ragged shapes; ahead-of-time compiles for sm_80 and sm_90 check that each kernel builds
for real GPUs and uses their tensor cores. Tolerances: fp32 products run in full fp32 ("ieee"),
so 1e-4 relative; fp16 operands with fp32 accumulation, 2e-2 relative (the intermediate rank-r
product and the dequantised weights are rounded to fp16 as the torch reference rounds them).
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lrcc.codegen.triton import configs, kernels
from lrcc.codegen.triton.aot import AotJob, compile_many, loop_opcodes
from lrcc.codegen.triton.layout import pack_for_kernel
from lrcc.errors import LrccError
from lrcc.rewrites.quantize import QuantSpec, dequantize, quantize_rtn

from .conftest import device

TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _lowrank_case(M, K, N, R, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    v = torch.randn(R, K, generator=gen) / K ** 0.5
    u = torch.randn(N, R, generator=gen) / R ** 0.5
    b = torch.randn(N, generator=gen) if bias else None
    dev = device()
    return [t if t is None else t.to(dev, dtype) for t in (x, v, u, b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,R,bias", [(37, 70, 53, 12, True), (5, 48, 33, 20, False), (130, 40, 24, 7, True),
                                           (19, 128, 40, 16, True)])  # the last: K a multiple of BLOCK_K (EVEN_K)
def test_fused_lowrank_matches_reference(M, K, N, R, bias, dtype) -> None:
    x, v, u, b = _lowrank_case(M, K, N, R, dtype, bias)
    mod = kernels.kernel("lowrank_linear")
    for cfg in configs.lowrank_configs(M, N, K, R, sms=4):
        if cfg["strategy"] != "fused":
            continue
        y = mod.launch(x, v, u, b, cfg)
        t = F.linear(x.float(), v.float()).to(dtype).float()  # the rank-r intermediate, rounded as the kernel does
        ref = F.linear(t, u.float(), None if b is None else b.float())
        assert y.dtype == dtype and y.shape == (M, N)
        assert rel(y, ref) < TOL[dtype], cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_pass_lowrank_matches_reference(dtype) -> None:
    """Ranks above FUSED_MAX_RANK go through two matmul.py.j2 launches."""
    M, K, N, R = 21, 150, 40, configs.FUSED_MAX_RANK + 9
    x, v, u, b = _lowrank_case(M, K, N, R, dtype)
    cands = configs.lowrank_configs(M, N, K, R, sms=4)
    assert all(c["strategy"] == "two_pass" for c in cands)
    y = kernels.lowrank_linear(x.reshape(3, 7, K), v, u, b)
    ref = F.linear(F.linear(x.float(), v.float()).to(dtype).float(), u.float(), b.float())
    assert y.shape == (3, 7, N)
    assert rel(y.reshape(M, N), ref) < TOL[dtype]


SPECS = [(8, 0), (4, 32), (4, 64), (4, 128), (2, 32), (2, 64)]


def _quant_case(m, n, spec, awq=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen)
    codes, scale, zero = quantize_rtn(w, QuantSpec(*spec))
    in_scale = (torch.rand(n, generator=gen) + 0.5).half() if awq else None
    bias = torch.randn(m, generator=gen)
    packed = pack_for_kernel(codes, scale.half(), zero.half(), spec[0], spec[1], n, in_scale, bias)
    w_ref = dequantize(codes, scale.half(), zero.half(), n)
    if awq:
        w_ref = w_ref / in_scale.float()
    return packed, w_ref, bias


def _quant_lowrank_case(m, n, r, spec, dtype, seed):
    """A packed quantised weight on the test device (bias in `dtype`), its float weight and bias, and
    a rank-r branch v (r x n), u (m x r) in `dtype`."""
    packed, w_ref, bias = _quant_case(m, n, spec)
    gen = torch.Generator().manual_seed(seed)
    v = (torch.randn(r, n, generator=gen) / 10).to(dtype)
    u = (torch.randn(m, r, generator=gen) / 3).to(dtype)
    w = {k: (t.to(device()) if isinstance(t, torch.Tensor) else t) for k, t in packed.items()}
    w["bias"] = w["bias"].to(dtype)
    return w, w_ref, bias, v, u, gen


def test_packed_layout_round_trips() -> None:
    for spec in SPECS:
        packed, w_ref, _ = _quant_case(24, 150, spec, awq=spec == (4, 64))
        assert torch.equal(kernels.reference_weight(packed), w_ref), spec


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_matmul_matches_reference(spec, dtype) -> None:
    m, n = 40, 150  # n is not a multiple of any block: the tail is masked
    packed, w_ref, bias = _quant_case(m, n, spec, awq=spec == (4, 32))
    dev = device()
    w = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
    w["bias"] = w["bias"].to(dtype)
    mod = kernels.kernel("quant_matmul", lowrank=False)
    for M in (3, 37):
        x = torch.randn(M, n, generator=torch.Generator().manual_seed(M)).to(dev, dtype)
        ref = F.linear(x.float(), w_ref.to(dev).to(dtype).float(), bias.to(dev).to(dtype).float())
        cands = [c for c in configs.quant_configs(M, m, n, packed["block_k"], sms=8, bits=spec[0])
                 if c["strategy"] == "mma"][:1]
        cands.append({**cands[0], "SPLIT_K": 2})  # split K: programs add into an fp32 output
        for cfg in cands:
            y = mod.launch(x, w, cfg)
            assert y.dtype == dtype
            assert rel(y, ref) < TOL[dtype], (M, cfg)


@pytest.mark.parametrize("spec", [(4, 32), (8, 0), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_quant_lowrank_matches_reference(spec, dtype) -> None:
    m, n, r = 33, 100, 12
    w, w_ref, bias, v, u, gen = _quant_lowrank_case(m, n, r, spec, dtype, seed=1)
    dev = device()
    for M in (2, 19):
        x = torch.randn(M, n, generator=gen).to(dtype)
        t = F.linear(x.float(), v.float()).to(dtype).float()
        ref = F.linear(x.float(), w_ref.to(dtype).float(), bias.to(dtype).float()) + F.linear(t, u.float())
        y = kernels.quant_linear(x.to(dev), w, v.to(dev), u.to(dev))
        assert rel(y.cpu(), ref) < TOL[dtype], M


# (8, 128): a group spans two K blocks (each block scaled on its own, SCALE_AT 1)
@pytest.mark.parametrize("spec", SPECS + [(8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_gemv_matches_reference(spec, dtype) -> None:
    """The decode kernel (CUDA-core GEMV, one row per program), whole K and split K: splits add into
    the output atomically (fp16 / fp32 directly, bf16 through an fp32 buffer)."""
    m = 40
    mod = kernels.kernel("quant_gemv", lowrank=False)
    tol = 2e-2 if dtype == torch.bfloat16 else TOL[dtype]
    dev = device()
    # 300 input features: several K blocks to split, and a masked tail; 512: whole blocks (EVEN_K)
    for n in (300, 512):
        packed, w_ref, bias = _quant_case(m, n, spec, awq=spec == (4, 64))
        w = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
        w["bias"] = w["bias"].to(dtype)
        for M in (1, 3):
            x = torch.randn(M, n, generator=torch.Generator().manual_seed(M)).to(dev, dtype)
            ref = F.linear(x.float(), w_ref.to(dev).to(dtype).float(), bias.to(dev).to(dtype).float())
            first = configs.gemv_configs(M, m, n, packed["block_k"], spec[0], sms=8)[0]
            # with and without PREFETCH (the next K block's codes loaded ahead)
            for split, reduce, prefetch in ((1, "none", True), (3, "atomic", False), (3, "serial", True),
                                            (2, "serial", False)):
                for _ in range(2):  # twice: the serial reduction's counters must be back at zero
                    y = mod.launch(x, w, {**first, "SPLIT_K": split, "REDUCE": reduce, "PREFETCH": prefetch})
                    assert y.dtype == dtype and y.shape == (M, m)
                    assert rel(y, ref) < tol, (n, M, split, reduce, prefetch)


@pytest.mark.parametrize("spec", [(4, 32), (8, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_quant_lowrank_gemv_matches_reference(spec, dtype) -> None:
    m, n, r = 33, 260, 12
    w, w_ref, bias, v, u, gen = _quant_lowrank_case(m, n, r, spec, dtype, seed=2)
    dev = device()
    mod = kernels.kernel("quant_gemv", lowrank=True)
    for M in (1, 2):
        x = torch.randn(M, n, generator=gen).to(dtype)
        t = F.linear(x.float(), v.float()).to(dtype).float()
        ref = F.linear(x.float(), w_ref.to(dtype).float(), bias.to(dtype).float()) + F.linear(t, u.float())
        first = configs.gemv_configs(M, m, n, w["block_k"], spec[0], sms=8, rank=r)[0]
        assert first["BLOCK_R"] >= r
        for split, reduce in ((1, "none"), (2, "atomic"), (2, "serial")):
            y = mod.launch(x.to(dev), w, v.to(dev), u.to(dev), {**first, "SPLIT_K": split, "REDUCE": reduce})
            assert rel(y.cpu(), ref) < TOL[dtype], (M, split, reduce)


@pytest.mark.parametrize("spec", [(8, 0), (4, 32), (4, 128), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_then_matmul_matches_reference(spec, dtype) -> None:
    """Many rows: the weight is dequantised once (W^T, K x N, in x's dtype) and multiplied by the
    tiled matmul reading it through a transposed view; AWQ input scales fold into W^T."""
    m, n = 40, 150
    packed, w_ref, bias = _quant_case(m, n, spec, awq=spec == (4, 32))
    dev = device()
    w = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
    w["bias"] = w["bias"].to(dtype)
    M = configs.DEQUANT_MIN_M + 3
    cfg = configs.quant_configs(M, m, n, packed["block_k"], sms=8, bits=spec[0])[0]
    assert cfg["strategy"] == "dequant_matmul"
    wt = kernels.kernel("dequantize").launch(w, dtype, cfg["dequant"])
    assert wt.shape == (n, m) and wt.dtype == dtype
    # fp32: to rounding (a GPU's fp32 division is not correctly rounded); fp16: to one half-precision step
    torch.testing.assert_close(wt.float().cpu(), w_ref.t().to(dtype).float(), rtol=1e-6 if dtype == torch.float32 else 1e-3,
                               atol=1e-6 if dtype == torch.float32 else 1e-3)
    x = torch.randn(M, n, generator=torch.Generator().manual_seed(5)).to(dev, dtype)
    ref = F.linear(x.float(), w_ref.to(dev).to(dtype).float(), bias.to(dev).to(dtype).float())
    y = kernels.quant_linear(x, w)  # the first config: dequantise, then matmul
    assert y.dtype == dtype and rel(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_then_matmul_with_a_low_rank_branch(dtype) -> None:
    """Many rows with a low-rank branch: W dequantised once, t = x V^T, then one matmul adds t U^T."""
    m, n, r = 33, 100, 12
    w, w_ref, bias, v, u, gen = _quant_lowrank_case(m, n, r, (4, 32), dtype, seed=4)
    M = configs.DEQUANT_MIN_M
    assert configs.quant_configs(M, m, n, w["block_k"], sms=8, rank=r, bits=4)[0]["strategy"] == "dequant_matmul"
    x = torch.randn(M, n, generator=gen).to(dtype)
    t = F.linear(x.float(), v.float()).to(dtype).float()
    ref = F.linear(x.float(), w_ref.to(dtype).float(), bias.to(dtype).float()) + F.linear(t, u.float())
    y = kernels.quant_linear(x.to(device()), w, v.to(device()), u.to(device()))
    assert rel(y.cpu(), ref) < TOL[dtype]


def test_quant_layers_take_the_gemv_kernel_for_a_few_rows_and_tensor_cores_above() -> None:
    for M in range(1, configs.GEMV_MAX_M + 1):
        assert configs.quant_configs(M, 4096, 4096, 128, sms=132, bits=4)[0]["strategy"] == "gemv"
    cands = configs.quant_configs(configs.GEMV_MAX_M + 1, 4096, 4096, 128, sms=132, bits=4)
    assert cands[0]["strategy"] == "mma" and {c["strategy"] for c in cands} == {"mma", "gemv"}  # GEMV still offered
    assert {c["strategy"] for c in configs.quant_configs(configs.SMALL_M + 1, 4096, 4096, 128, sms=132, bits=4)} == {"mma"}
    # both kernels are offered at M <= GEMV_MAX_M, so autotuning on a GPU can keep either
    assert {c["strategy"] for c in configs.quant_configs(1, 4096, 4096, 128, sms=132, bits=4)} == {"gemv", "mma"}
    # many rows: dequantise-then-matmul first, the fused kernel still offered; not with a low-rank branch
    big = configs.quant_configs(configs.DEQUANT_MIN_M, 4096, 4096, 128, sms=132, bits=4)
    assert big[0]["strategy"] == "dequant_matmul" and {c["strategy"] for c in big} == {"dequant_matmul", "mma"}
    fused = configs.quant_configs(configs.DEQUANT_MIN_M, 4096, 4096, 128, sms=132, rank=32, bits=4)
    assert fused[0]["strategy"] == "dequant_matmul" and fused[0]["first"]["BLOCK_N"] >= 32


def test_matmul_kernel_matches_reference() -> None:
    x, v, u, b = _lowrank_case(45, 70, 33, 12, torch.float32)
    mod = kernels.kernel("matmul")
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(3)).to(x.device)
    for cfg in configs.matmul_configs(45, 33, 70, sms=4)[:2]:
        assert rel(mod.launch(x, w, b, cfg), F.linear(x, w, b)) < TOL[torch.float32]
    # K split over programs: partial products add into an fp32 output
    for split in (2, 3):
        y = mod.launch(x.half(), w.half(), b.half(), {**configs.matmul_configs(45, 33, 70, sms=4)[0], "SPLIT_K": split})
        assert y.dtype == torch.float32
        assert rel(y, F.linear(x.half().float(), w.half().float(), b.half().float())) < 1e-3, split
    # K a multiple of BLOCK_K: the loads drop their K mask (EVEN_K)
    x2, w2 = x[:, :64].contiguous(), w[:, :64].contiguous()
    cfg = configs.matmul_configs(45, 33, 64, sms=4)[0]
    assert 64 % cfg["BLOCK_K"] == 0
    assert rel(mod.launch(x2, w2, b, cfg), F.linear(x2, w2, b)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_persistent_matmul_sweeps_several_tiles_per_program(dtype) -> None:
    """Fewer programs than tiles: each program runs its tiles' K steps as one loop, storing at every
    tile's last step; ragged M, N and K."""
    x, _, _, b = _lowrank_case(45, 70, 33, 12, dtype)
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(3)).to(x.device, dtype)
    mod = kernels.kernel("matmul_persistent")
    ref = F.linear(x.float(), w.float(), b.float())
    for programs in (1, 3, 64):  # one program for every tile, a few, more than the tiles
        cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "PROGRAMS": programs,
               "num_warps": 4, "num_stages": 3}
        assert rel(mod.launch(x, w, b, cfg), ref) < TOL[dtype], programs
    # and as the second pass of a large-rank low-rank layer
    M, K, N, R = 21, 150, 40, configs.FUSED_MAX_RANK + 9
    x, v, u, b = _lowrank_case(M, K, N, R, dtype)
    cfg = next(c for c in configs.lowrank_configs(M, N, K, R, sms=2) if c.get("second", {}).get("PERSISTENT"))
    y = kernels.matmul(kernels.matmul(x, v, None, cfg["first"]), u, b, cfg["second"])
    ref = F.linear(F.linear(x.float(), v.float()).to(dtype).float(), u.float(), b.float())
    assert rel(y, ref) < TOL[dtype]


# --- bad input ----------------------------------------------------------------------------------
def test_decode_shapes_split_k_to_fill_the_gpu() -> None:
    """Small M streams the weights: K is split until there are enough programs for every SM."""
    launcher = kernels.kernel("quant_gemv", lowrank=False)
    for group, K, block_k, want in ((4160, 4096, 64, 0), (128, 4096, 128, 1), (128, 4096, 64, 1), (32, 4096, 64, 2),
                                    (64, 4096, 128, 2)):
        assert configs.gemv_scale_at(group, K, block_k) == launcher.scale_at(group, K, block_k) == want, group
    gemv = configs.quant_configs(1, 4096, 4096, 128, sms=132, bits=4)[0]
    assert gemv["strategy"] == "gemv" and gemv["SPLIT_K"] > 1
    assert (4096 // gemv["BLOCK_N"]) * gemv["SPLIT_K"] >= 2 * 132
    mma = configs.quant_configs(16, 4096, 4096, 128, sms=132, bits=4)[0]
    assert mma["BLOCK_M"] == 16 and mma["SPLIT_K"] > 1 and (4096 // mma["BLOCK_N"]) * mma["SPLIT_K"] >= 2 * 132
    prefill = [c for c in configs.quant_configs(2048, 4096, 4096, 128, sms=132, bits=4) if c["strategy"] == "mma"]
    assert all(c["SPLIT_K"] == 1 for c in prefill)


def test_unsupported_widths_and_groups_are_rejected_with_the_layer_named() -> None:
    codes, scale, zero = quantize_rtn(torch.randn(8, 64), QuantSpec(3, 64))
    with pytest.raises(LrccError, match=r"layers\.3\.fc: int3 .*no Triton kernel"):
        pack_for_kernel(codes, scale, zero, 3, 64, 64, where="layers.3.fc")
    codes, scale, zero = quantize_rtn(torch.randn(8, 64), QuantSpec(4, 8))
    with pytest.raises(LrccError, match="group size 8"):
        pack_for_kernel(codes, scale, zero, 4, 8, 64)


def test_wrong_feature_count_names_the_layer() -> None:
    x, v, u, b = _lowrank_case(4, 32, 16, 8, torch.float32)
    with pytest.raises(LrccError, match="enc.q: input has 31 features, the layer expects 32"):
        kernels.lowrank_linear(x[:, :31], v, u, b, where="enc.q")


def test_without_cuda_or_interpreter_the_reference_runs_with_one_warning() -> None:
    code = textwrap.dedent("""
        import warnings, torch
        from lrcc.codegen.triton import kernels
        x, v, u = torch.randn(5, 32), torch.randn(8, 32), torch.randn(16, 8)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y1 = kernels.lowrank_linear(x, v, u, None)
            y2 = kernels.lowrank_linear(x, v, u, None)
        assert torch.allclose(y1, (x @ v.t()) @ u.t(), atol=1e-5)
        msgs = [str(m.message) for m in w if "TRITON_INTERPRET" in str(m.message)]
        assert len(msgs) == 1, msgs
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --- ahead-of-time compiles for real GPUs --------------------------------------------------------
def _jobs() -> list[tuple[str, AotJob]]:
    """Each kernel at a prefill shape (M=2048), a batch (M=100) and a decode shape (M=1) for sm_80 and sm_90."""
    jobs = []
    N, K = 1024, 1024
    for arch in ("sm_80", "sm_90"):
        for M, phase in ((2048, "prefill"), (100, "batch"), (1, "decode")):
            fused = [c for c in configs.lowrank_configs(M, N, K, 64, sms=132) if c["strategy"] == "fused"][0]
            jobs.append((f"lowrank_linear {phase}", AotJob("lowrank_linear", fused, arch)))
            mm = configs.matmul_configs(M, N, K, sms=132)[0]
            jobs.append((f"matmul {phase}", AotJob("matmul", mm, arch)))
            for lowrank in (False, True):
                cands = configs.quant_configs(M, N, K, 128, sms=132, rank=32 if lowrank else 0, bits=4)
                q = [c for c in cands if c["strategy"] == "mma"][0]
                jobs.append((f"quant_matmul lowrank={lowrank} {phase}",
                             AotJob("quant_matmul", {**q, "BITS": 4, "BLOCK_K": 128}, arch, flags={"lowrank": lowrank})))
        # a layer whose widths are not multiples of 16: compiled without the alignment the JIT
        # would not assume either
        persistent = configs.matmul_configs(2048, N, 128, sms=132, kernel="persistent")[0]
        jobs.append(("matmul_persistent prefill", AotJob("matmul_persistent", {**persistent, "PROGRAMS": 132}, arch)))
        # widths that are not multiples of 16: compiled, as the JIT would, without assuming alignment
        for M in (2048, 100, 5):
            jobs.append((f"matmul at unaligned sizes, M={M}", AotJob("matmul", configs.matmul_configs(M, 1000, 1000, sms=132)[0],
                                                                     arch, aligned=False)))
        prefill = configs.quant_configs(2048, N, K, 128, sms=132, bits=4)[0]
        jobs.append(("dequantize prefill", AotJob("dequantize", {**prefill["dequant"], "BITS": 4, "BLOCK_K": 128}, arch)))
        jobs.append(("matmul on a K x N weight prefill", AotJob("matmul", {**prefill["matmul"], "W_LAYOUT": "kn"}, arch)))
        with_t = configs.quant_configs(2048, N, K, 128, sms=132, rank=32, bits=4)[0]
        jobs.append(("matmul + t U^T on a K x N weight prefill",
                     AotJob("matmul", {**with_t["matmul"], "W_LAYOUT": "kn"}, arch, flags={"lowrank": True})))
        for lowrank in (False, True):
            for bits, block_k in ((4, 128), (8, 64)):
                g = configs.quant_configs(1, 4096, 4096, block_k, sms=132, rank=32 if lowrank else 0, bits=bits)[0]
                jobs.append((f"quant_gemv int{bits} lowrank={lowrank} decode",
                             AotJob("quant_gemv", {**g, "BITS": bits, "BLOCK_K": block_k}, arch, flags={"lowrank": lowrank})))
    return jobs


def test_every_kernel_compiles_for_sm80_and_sm90_with_tensor_cores() -> None:
    """Every kernel but the GEMV one must use the tensor cores; the GEMV one must not."""
    jobs = _jobs()
    results = compile_many([j for _, j in jobs])
    spills = []
    for (what, job), res in zip(jobs, results):
        ptx = res["ptx"]
        assert f".target sm_{job.arch[3:]}" in ptx, what
        # ptxas's allocation (read back with cuobjdump): no heuristic config spills registers (to
        # local memory or, as ptxas reports spills of a call-free kernel, to its stack frame)
        spills.extend([(what, res["regs"], res["local_bytes"], res["stack_bytes"])]
                      if res["local_bytes"] or res["stack_bytes"] else [])
        if job.template == "quant_gemv":
            # and the decode kernel leaves room for 4 programs of 4 warps per SM (64K registers)
            assert res["regs"] * 32 * job.config["num_warps"] * 4 <= 65536, (what, res["regs"])
        if job.template == "dequantize":
            assert "mma" not in ptx and "st.global" in ptx, what  # elementwise: codes in, W^T out
        elif job.template == "quant_gemv":
            # decode: bound by reading the weights, on the CUDA cores with 16-byte loads of the codes,
            # split-K partials added in device memory
            assert "mma" not in ptx, f"{what}: the GEMV kernel should not use tensor-core tiles"
            assert "ld.global.v4.b32" in ptx, f"{what}: no 16-byte loads"
            assert job.config["SPLIT_K"] > 1 and ("red.global" in ptx or "atom.global" in ptx), what
            if job.config["REDUCE"] == "serial":  # the arrival counter: an acquire-release atomic add
                assert re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx), f"{what}: no acq_rel atomic"
                assert "ld.global.cg" in ptx, f"{what}: partials must be read past L1 (.cg)"
        elif job.arch == "sm_80":
            assert "mma.sync.aligned" in ptx, f"{what}: no mma.sync on sm_80"
        elif job.config["BLOCK_M"] >= 64:
            # Hopper's warpgroup MMA needs a 64-row tile; the 16-row decode tiles use mma.sync
            assert "wgmma.mma_async" in ptx, f"{what}: no wgmma on sm_90"
        else:
            assert "mma.sync.aligned" in ptx, f"{what}: no tensor-core mma on sm_90"
        if "prefill" in what and job.template in ("matmul", "matmul_persistent", "lowrank_linear", "quant_matmul"):
            # at aligned sizes (model widths), the K loop is software-pipelined: asynchronous copies
            # to shared memory tiles ahead of the tensor cores, as the JIT compiles it on a GPU
            assert "cp.async" in ptx, f"{what}: K loop not pipelined"
    assert not spills, spills


# Most instructions per weight code the GEMV's main loop may issue (SASS, heuristic config, one row
# of a 4096 x 4096 layer). An H100 SXM issues about 5 thread-instructions per int4 code its peak
# bandwidth delivers, an A100 about 4.8 (benchmarks/gemv_sass.py); the kernel before the
# magic-number dequantisation issued 8.5-9 per int4 code.
GEMV_INSTRS_PER_CODE = 5.25


def test_gemv_main_loop_issues_few_instructions_per_code_and_no_conversions() -> None:
    """The decode kernel must not be bound by issuing instructions: its codes become floats by
    bit operations (no int-to-float conversions, quarter-rate on sm_80), a group's scale is applied
    once per span rather than per code, and no barriers run where the group is the whole row."""
    cases = []
    for arch in ("sm_80", "sm_90"):
        for bits, group, block_k in ((4, 128, 128), (8, 0, 64)):
            cfg = configs.gemv_configs(1, 4096, 4096, block_k, bits, sms=132)[0]
            scale_at = configs.gemv_scale_at(group or 4096, 4096, block_k)
            cases.append((arch, bits, block_k, cfg, AotJob("quant_gemv", {**cfg, "BITS": bits, "BLOCK_K": block_k,
                                                                          "SCALE_AT": scale_at}, arch,
                                                            flags={"lowrank": False}, sass=True)))
    for (arch, bits, block_k, cfg, _), res in zip(cases, compile_many([c[4] for c in cases])):
        ops = loop_opcodes(res["sass"])
        codes = cfg["BLOCK_N"] * block_k / (32 * cfg["num_warps"])
        per_code = sum(ops.values()) / codes
        what = f"int{bits} {arch}: {sum(ops.values())} instructions for {codes:.0f} codes, {dict(ops.most_common(8))}"
        assert ops["FFMA"] >= codes, what  # the loop found is the main one: one multiply-add per code
        assert per_code <= GEMV_INSTRS_PER_CODE, what
        assert ops["I2F"] + ops["I2FP"] <= 2, what  # per trip (the group index), not per code
        if bits == 8:
            assert ops["BAR"] == 0, what  # one group per row: scaled once, after the loop


def test_loop_opcodes_counts_the_longest_loop_body() -> None:
    """The SASS reader behind the instruction-count checks: predicates and modifiers dropped, only
    the body between a backward branch's target and the branch counted, the longest loop kept."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LOP3.LUT R8, R4, 0xf, R9, 0xf8, !PT ;
        /*0030*/                   FADD R8, R8, -8388608 ;
        /*0040*/                   FFMA R10, R8, R11, R10 ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   SHFL.BFLY PT, R3, R10, 0x1, 0x1f ;
        /*0070*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0080*/              @!P1 BRA 0x70 ;
        /*0090*/                   EXIT ;
    """
    assert loop_opcodes(sass) == {"LDG": 1, "LOP3": 1, "FADD": 1, "FFMA": 1, "BRA": 1}
    assert loop_opcodes("        /*0000*/                   EXIT ;") == {}
