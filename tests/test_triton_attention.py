"""Linear attention kernels (causal and non-causal) against the torch reference.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
on tiny ragged shapes: Dk=24 and Dv=20 pad to 32, L=37 / 45 leave a partial chunk. Tolerances are
relative to the largest reference value: fp32 multiplies in full fp32 ("ieee"), so 1e-4; fp16 / bf16
round phi(q), phi(k) to the input dtype for the tensor cores and the fp32 state / scores to tf32,
so 1e-2 (2e-2 for bf16's 8-bit mantissa). The sequence-parallel (split) kernels are forced through an
explicit config on B=1, H=2, L=150 in 16-row chunks (nine full, one of 6), Dk=20, Dv=24 in two 16-column
programs. Ahead-of-time compiles check that every kernel builds for sm_80 and sm_90 and uses the
tensor cores there.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrcc.codegen.triton.aot import AotJob, compile_many
from lrcc.codegen.triton.attention import (
    attention_config,
    kernel_launches,
    kernel_module,
    linear_attention,
    linear_attention_reference,
    template_name,
)
from lrcc.codegen.triton.render import interpreting
from lrcc.errors import LrccError

from .conftest import device

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
B, H, Dk, Dv = 2, 3, 24, 20


def _qkv(L, dtype, seed=0, dk=Dk, dv=Dv):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, dk, generator=gen) for _ in range(2))
    v = torch.randn(B, H, L, dv, generator=gen)
    return [t.to(device(), dtype) for t in (q, k, v)]


def _assert_near(out, ref, tol, what=""):
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= tol * ref.double().abs().max().item(), f"{what}: max error {err}"


def _check(q, k, v, causal, feature="elu1", config=None, tol=None):
    out = linear_attention(q, k, v, causal=causal, feature=feature, config=config)
    ref = linear_attention_reference(q.cpu(), k.cpu(), v.cpu(), causal=causal, feature=feature)
    _assert_near(out.cpu(), ref, tol or TOL[v.dtype], f"causal={causal} {v.dtype} {config}")
    return out


# --- the reference states the law ----------------------------------------------------------------
def test_reference_is_the_recurrence() -> None:
    """The reference (fp32 math) against the RNN form of the paper in fp64, one position at a time."""
    q, k, v = (t.cpu() for t in _qkv(7, torch.float64))
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    for causal in (False, True):
        want = torch.empty_like(v)
        for i in range(7):
            j = slice(0, i + 1) if causal else slice(None)
            s = torch.einsum("bhld,bhle->bhde", phi_k[:, :, j], v[:, :, j])
            z = phi_k[:, :, j].sum(2)
            num = torch.einsum("bhd,bhde->bhe", phi_q[:, :, i], s)
            want[:, :, i] = num / (torch.einsum("bhd,bhd->bh", phi_q[:, :, i], z)[..., None] + 1e-6)
        got = linear_attention_reference(q, k, v, causal=causal, feature="elu1")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- kernels against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_one_partial_chunk(causal, dtype) -> None:
    """L=45 < the default chunk: a single, masked chunk; padded key and value columns."""
    q, k, v = _qkv(45, dtype)
    cfg = attention_config((B, H, 45, Dk, Dv), dtype, causal)
    assert cfg["BLOCK_L"] > 45 and cfg["BLOCK_DK"] == 32 and cfg["BLOCK_DV"] == 32
    _check(q, k, v, causal)


# Triton's interpreter does not do arithmetic on bfloat16 (it stores it as uint16; tl.dot multiplies
# the bit patterns: triton-lang/triton#11584), so bf16 runs on a GPU only.
BF16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(interpreting(), reason="bf16 needs a GPU"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_GPU])
@pytest.mark.parametrize("causal", [False, True])
def test_several_chunks_and_value_blocks(causal, dtype) -> None:
    """L=37 in 16-row chunks (two full, one of 5) and Dv=20 in two 16-column programs: the state
    carried from chunk to chunk, the causal mask inside each, and the value-column split."""
    q, k, v = _qkv(37, dtype, seed=1)
    cfg = {**attention_config((B, H, 37, Dk, Dv), dtype, causal), "BLOCK_L": 16, "BLOCK_DV": 16}
    _check(q, k, v, causal, config=cfg)


@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs(causal) -> None:
    """q, k as the transpose of [B, L, H, D] projections; v every other column of a wider tensor."""
    gen = torch.Generator().manual_seed(2)
    L = 37
    q, k = (torch.randn(B, L, H, Dk, generator=gen).to(device()).transpose(1, 2) for _ in range(2))
    v = torch.randn(B, H, L, 2 * Dv, generator=gen).to(device())[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous()) and v.stride(-1) == 2
    out = _check(q, k, v, causal, config={**attention_config((B, H, L, Dk, Dv), v.dtype, causal), "BLOCK_L": 16})
    assert out.is_contiguous()


@pytest.mark.parametrize("causal", [False, True])
def test_identity_feature_with_fp16_values(causal) -> None:
    """Features computed before the kernel (positive, as Performer's), fp32 q / k and fp16 v: the
    output comes back in v's dtype."""
    q, k, _ = _qkv(45, torch.float32, seed=3)
    _, _, v = _qkv(45, torch.float16, seed=3)
    q, k = torch.exp(q - 1), torch.exp(k - 1)
    out = _check(q, k, v, causal, feature="identity")
    assert out.dtype == torch.float16


# --- sequence-parallel (split) kernels --------------------------------------------------------------
SPLIT_SHAPE = (1, 2, 150, 20, 24)  # B, H, L, Dk, Dv


def _split_qkv(dtype, seed=4):
    gen = torch.Generator().manual_seed(seed)
    B_, H_, L, dk, dv = SPLIT_SHAPE
    q, k = (torch.randn(B_, H_, L, dk, generator=gen) for _ in range(2))
    v = torch.randn(B_, H_, L, dv, generator=gen)
    return [t.to(device(), dtype) for t in (q, k, v)]


def _split_config(dtype, causal, split):
    return {**attention_config(SPLIT_SHAPE, dtype, causal), "BLOCK_L": 16, "BLOCK_DV": 16, "SPLIT": split}


@pytest.fixture
def serial_kernels_refused(monkeypatch):
    """Make the serial kernels raise, so a test of the split ones cannot pass through them."""
    def refuse(*args, **kwargs):
        raise AssertionError("the serial kernel ran")
    for causal in (False, True):
        monkeypatch.setattr(kernel_module(causal), "launch", refuse)


@pytest.mark.usefixtures("serial_kernels_refused")
@pytest.mark.parametrize("split", [3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_GPU])
@pytest.mark.parametrize("causal", [False, True])
def test_split_matches_the_reference(causal, dtype, split) -> None:
    """SPLIT=3: segments of 4, 4 and 2 chunks, the last ending in the partial chunk; SPLIT=10: one
    chunk per segment (fla's chunk mode for the causal form). Two value blocks, the second ragged."""
    q, k, v = _split_qkv(dtype)
    cfg = _split_config(dtype, causal, split)
    assert kernel_launches(cfg, causal)[0][0] == template_name(causal, split=True)
    _check(q, k, v, causal, config=cfg)


@pytest.mark.usefixtures("serial_kernels_refused")
@pytest.mark.parametrize("causal", [False, True])
def test_split_non_contiguous_inputs_and_identity_feature(causal) -> None:
    """q, k as the transpose of [B, L, H, D] projections, v every other column of a wider tensor;
    positive features computed before the kernel; more segments asked for than chunks exist."""
    gen = torch.Generator().manual_seed(5)
    B_, H_, L, dk, dv = SPLIT_SHAPE
    q, k = (torch.exp(torch.randn(B_, L, H_, dk, generator=gen) - 1).to(device()).transpose(1, 2) for _ in range(2))
    v = torch.randn(B_, H_, L, 2 * dv, generator=gen).to(device())[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous()) and v.stride(-1) == 2
    out = _check(q, k, v, causal, feature="identity", config=_split_config(v.dtype, causal, 64))
    assert out.is_contiguous()


def test_split_segments_are_whole_chunks_and_never_empty() -> None:
    for causal in (False, True):
        segments = kernel_module(causal, split=True).segments
        assert segments(150, 16, 3) == (3, 64)     # 10 chunks: 4 + 4 + 2
        assert segments(150, 16, 4) == (4, 48)     # 3 + 3 + 3 + 1
        assert segments(144, 16, 4) == (3, 48)     # 9 chunks in 4 would leave one empty: 3 x 3
        assert segments(150, 16, 100) == (10, 16)  # at most one segment per chunk
        assert segments(5, 16, 8) == (1, 16)


def test_config_splits_the_sequence_only_for_few_heads_and_long_sequences() -> None:
    for causal in (False, True):
        for dtype in ("fp16", "fp32"):
            few = attention_config((1, 2, 16384, 64, 64), dtype, causal)
            n_dv = -(-64 // few["BLOCK_DV"])
            assert few["SPLIT"] >= 2 and 2 * n_dv * few["SPLIT"] >= 128, few
            assert -(-16384 // few["BLOCK_L"]) >= 4 * few["SPLIT"], few  # several chunks per segment
            assert kernel_launches(few, causal)[0][0] == template_name(causal, split=True)
            mid = attention_config((2, 16, 16384, 64, 64), dtype, causal)
            assert mid["SPLIT"] == 4 and mid["BLOCK_DV"] == 64, mid  # segments before value blocks
            for shape in [(8, 16, 16384, 64, 64), (4, 32, 2048, 128, 128), (1, 2, 256, 64, 64)]:
                # enough programs already, or too few chunks to split
                cfg = attention_config(shape, dtype, causal)
                assert cfg["SPLIT"] == 1, (shape, cfg)
                assert kernel_launches(cfg, causal) == [(template_name(causal), {})]


def test_empty_sequence() -> None:
    q, k, v = _qkv(0, torch.float32)
    assert linear_attention(q, k, v, causal=True).shape == (B, H, 0, Dv)


# --- configs --------------------------------------------------------------------------------------
def test_config_tiles_cover_the_head_dims() -> None:
    for shape in [(2, 3, 37, 24, 20), (1, 1, 5, 8, 8), (4, 16, 4096, 64, 64), (1, 2, 8192, 256, 256),
                  (8, 32, 2048, 128, 96)]:
        for causal in (False, True):
            for dtype in (torch.float16, torch.float32):
                cfg = attention_config(shape, dtype, causal)
                _, _, L, dk, _ = shape
                for key in ("BLOCK_L", "BLOCK_DK", "BLOCK_DV"):
                    assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (shape, cfg)
                assert cfg["BLOCK_DK"] >= dk and cfg["BLOCK_DK"] < max(2 * dk, 32), (shape, cfg)
                assert cfg["BLOCK_L"] < max(2 * L, 32), (shape, cfg)
                assert cfg["BLOCK_DK"] * cfg["BLOCK_DV"] <= 64 * 128, (shape, cfg)
                assert cfg["num_warps"] in (4, 8) and cfg["num_stages"] in (2, 3), (shape, cfg)
                assert isinstance(cfg["SPLIT"], int) and 1 <= cfg["SPLIT"] <= 32, (shape, cfg)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_input_is_rejected_with_a_clear_message() -> None:
    q, k, v = _qkv(9, torch.float32)
    cases = [
        ((q[0], k, v, {}), r"q must be \[B, H, L, d\], got rank 3"),
        ((q, k[..., :-1], v, {}), "q .* and k .* must have the same shape"),
        ((q, k, v[:, :, :-1], {}), "v .* must share B, H, L with q"),
        ((q, k.half(), v, {}), "q is torch.float32 but k is torch.float16"),
        ((q.double(), k.double(), v, {}), "q is torch.float64; use float32, float16 or bfloat16"),
        ((q, k, v, {"feature": "softmax"}), "unknown feature 'softmax'; known: elu1, identity"),
        ((q, k, v, {"config": {**attention_config((B, H, 9, 8, Dv), torch.float32, True)}}),
         "BLOCK_DK=16 < Dk=24"),
        ((q, k, v, {"config": {"BLOCK_L": 16}}), "config lacks BLOCK_DK, BLOCK_DV, num_warps, num_stages"),
        ((q.new_zeros(1, 1, 9, 1000), q.new_zeros(1, 1, 9, 1000), v[:1, :1], {}), "Dk=1000 > 512"),
    ]
    good = attention_config((B, H, 9, Dk, Dv), torch.float32, True)
    for split in (0, -2, 2.5, True, "4"):
        cases.append(((q, k, v, {"config": {**good, "SPLIT": split}}),
                      f"config SPLIT={split!r} must be an int >= 1"))
    for (q_, k_, v_, kw), message in cases:
        with pytest.raises(LrccError, match=message):
            linear_attention(q_, k_, v_, causal=kw.pop("causal", True), **kw)


# --- ahead-of-time compiles for real GPUs ---------------------------------------------------------
# The tensor-core products of each kernel: "f16" (half operands) and "tf32" (the fp32 state and scores,
# for half inputs); split kernels by their phase.
PRODUCTS = {"linear_attention": ("f16", "tf32"), "causal_linear_attention": ("f16", "tf32"),
            "state": ("f16",), "apply": ("tf32",), "prefix": (), "chunk": ("f16", "tf32")}
SM80_MMA = {"f16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "tf32": ".tf32.tf32.f32"}
SM90_MMA = {"f16": ".f32.f16.f16", "tf32": ".f32.tf32.tf32"}


def test_both_kernels_compile_for_sm80_and_sm90_with_tensor_cores() -> None:
    """fp16 at head size 64: the serial kernels (B=4, H=16, L=4096) and every phase of the split ones
    (B=1, H=2, L=16384: BLOCK_DV=32). sm_80: mma.sync, both for the fp16 products and for the tf32
    ones (the fp32 state and scores). sm_90: wgmma for every product, since each has M >= 64 rows
    (the state update phi(K)^T V has M = BLOCK_DK = 64; with a head size under 64, e.g. Dk=24 ->
    BLOCK_DK=32, it has M=32 and Triton lowers it to mma.sync instead, so these shapes are the ones to
    hold wgmma to). The split form's prefix kernel has no products: no tensor-core instruction."""
    jobs = []
    for shape in ((4, 16, 4096, 64, 64), (1, 2, 16384, 64, 64)):
        for causal in (False, True):
            cfg = attention_config(shape, "fp16", causal)
            jobs += [AotJob(template, cfg, arch, "fp16", flags)
                     for template, flags in kernel_launches(cfg, causal) for arch in ("sm_80", "sm_90")]
    assert {job.template for job in jobs} == {template_name(c, s) for c in (False, True) for s in (False, True)}
    for job, res in zip(jobs, compile_many(jobs)):
        ptx, what = res["ptx"], f"{job.template} {job.flags} {job.arch}"
        assert res["local_bytes"] == 0, f"{what}: spills {res['local_bytes']} bytes per thread"  # ptxas's allocation
        products = PRODUCTS[job.flags.get("phase", job.template)]
        assert f".target sm_{job.arch[3:]}" in ptx, what
        if not products:
            assert "mma" not in ptx, f"{what}: a tensor-core instruction in a kernel without products"
        elif job.arch == "sm_80":
            for kind in products:
                assert SM80_MMA[kind] in ptx, f"{what}: no {kind} mma.sync"
        else:
            assert "wgmma.mma_async.sync.aligned" in ptx, f"{what}: no wgmma"
            for kind in products:
                assert any(SM90_MMA[kind] in line for line in ptx.splitlines() if "wgmma.mma_async" in line), \
                    f"{what}: no {kind} wgmma"
            assert "mma.sync" not in ptx, f"{what}: a product fell back to mma.sync"
