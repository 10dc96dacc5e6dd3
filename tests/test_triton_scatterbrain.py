"""Scatterbrain attention's Triton kernel against the torch reference.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on
tiny ragged shapes: d=24, dv=20, m=12 pad to 32 / 32 / 16, L=37 / 45 / 70 leave partial query
blocks and key tiles; 16 x 16 blocks make the window span several key tiles and the global keys
several chunks. Tolerances are relative to the largest reference value: fp32 multiplies in full
fp32 ("ieee"), so 1e-4; fp16 rounds the scores' operands and the weights to fp16 (and, on a GPU,
the fp32 state products to tf32), so 1e-2. Ahead-of-time compiles check that the kernel builds
for sm_80 and sm_90 with the tensor cores, and that its largest config fits an A100's shared memory.
"""
from __future__ import annotations

import pytest
import torch

from lrcc.codegen.triton import kernels
from lrcc.codegen.triton.aot import AotJob, compile_many
from lrcc.codegen.triton.render import interpreting
from lrcc.codegen.triton.scatterbrain import (
    MAX_FEATURES,
    MAX_HEAD_DIM,
    TEMPLATE,
    clustered_attention_triton,
    scatterbrain_attention_triton,
    scatterbrain_config,
)
from lrcc.errors import LrccError
from lrcc.rewrites.linear_attention import (
    clustered_attention,
    exact_attention,
    orthogonal_features,
    performer_attention,
    scatterbrain_attention,
)

from .conftest import device

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
B, H, D, DV, M = 2, 2, 24, 20, 12
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_G": 16}  # several query blocks, key tiles and key chunks
A100_SHARED = 163 * 1024  # the most shared memory one block may take on sm_80


def _inputs(L, dtype=torch.float32, seed=0, d=D, dv=DV, m=M, spread=1.5):
    """q, k, v and the features w; spread > 1 sharpens the scores, so the window's exact terms and the
    low-rank estimate differ visibly (a kernel that mixed them up would not pass)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (spread * torch.randn(B, H, L, d, generator=gen) for _ in range(2))
    v = torch.randn(B, H, L, dv, generator=gen)
    w = orthogonal_features(d, m, gen)
    return [t.to(device(), dtype) for t in (q, k, v)] + [w.to(device())]


def _padding(L, seed=0):
    """A ragged key mask: sequence 0 loses random keys and its tail, sequence 1 is all padding."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=gen) > 0.3
    mask[0, L - 5:] = False
    mask[1] = False
    return mask.to(device())


def _assert_near(out, ref, tol, what=""):
    assert out.shape == ref.shape, what
    err = (out.double().cpu() - ref.double().cpu()).abs().max().item()
    top = ref.double().abs().max().item()
    assert top > 0, f"{what}: the reference is all zeros"
    assert err <= tol * top, f"{what}: max error {err} vs largest value {top}"


def _check(q, k, v, w, window, mask=None, global_keys=0, clusters=1, config=None, tol=None):
    if config is not None:
        L = q.shape[2]
        config = {**scatterbrain_config((B, H, L, q.shape[-1], v.shape[-1]), w.shape[0], window, global_keys,
                                        v.dtype), **config}
    out = scatterbrain_attention_triton(q, k, v, w, window, mask, global_keys, clusters, config=config)
    ref = scatterbrain_attention(q.cpu(), k.cpu(), v.cpu(), w.cpu(), window, None if mask is None else mask.cpu(),
                                 global_keys, clusters)
    assert out.dtype == v.dtype and out.device == v.device
    _assert_near(out, ref, tol or TOL[v.dtype], f"window={window} global_keys={global_keys} {v.dtype} {config}")
    return out


# --- the kernel against the reference -------------------------------------------------------------
@pytest.mark.parametrize("window", [0, 3, 8, 37, None])
def test_windows(window) -> None:
    """Window radii 0 (the diagonal), 3 and 8 (spanning 2-3 key tiles of 16), 37 >= L (every key
    exact) and None (no window: Performer alone) over L=37 in blocks of 16 queries."""
    q, k, v, w = _inputs(37)
    _check(q, k, v, w, window, config=SMALL)


def test_default_config_one_partial_block() -> None:
    """L=45 in the default config: one partial query block of 64 and one key tile."""
    q, k, v, w = _inputs(45, seed=1)
    cfg = scatterbrain_config((B, H, 45, D, DV), M, 5, 0, torch.float32)
    assert cfg["BLOCK_M"] == 64 and cfg["BLOCK_N"] == 64
    _check(q, k, v, w, 5)


def test_window_covering_the_sequence_is_exact_softmax() -> None:
    """With every key on the support, the low-rank terms cancel out: softmax attention, checked
    against SDPA rather than the reference (window >= L, with padding)."""
    q, k, v, w = _inputs(45, seed=2)
    mask = _padding(45, seed=2)
    out = scatterbrain_attention_triton(q, k, v, w, 45, mask, config={**SMALL, **_sizes(45)})
    ref = torch.nan_to_num(exact_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu()))  # all-padding rows: NaN there
    _assert_near(out, ref, TOL[torch.float32], "window >= L")


def test_no_window_is_performer() -> None:
    q, k, v, w = _inputs(37, seed=3)
    out = scatterbrain_attention_triton(q, k, v, w, None)
    _assert_near(out, performer_attention(q.cpu(), k.cpu(), v.cpu(), w.cpu()), TOL[torch.float32], "performer")


def _sizes(L):
    return {k: val for k, val in scatterbrain_config((B, H, L, D, DV), M, 0, 0, torch.float32).items()
            if k not in SMALL}


@pytest.mark.parametrize("window", [0, 5, 70])
def test_padding_mask(window) -> None:
    """Ragged padding in sequence 0 (random keys and its tail), sequence 1 all padding: zeros there."""
    q, k, v, w = _inputs(70, seed=4)
    mask = _padding(70, seed=4)
    out = _check(q, k, v, w, window, mask, config=SMALL)
    assert torch.count_nonzero(out[1]) == 0, "a sequence of padding must give zeros"
    assert torch.isfinite(out).all()


def test_float_mask_is_a_key_bias() -> None:
    """A float mask adds to every query's score of its key (-inf or the dtype's lowest masks the key):
    0 / -inf matches the bool mask exactly; a general bias matches the reference."""
    q, k, v, w = _inputs(45, seed=5)
    mask = _padding(45, seed=5)
    as_bias = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    as_bias[0, 0] = torch.finfo(torch.float32).min  # the lowest value masks too
    mask[0, 0] = False
    cfg = {**SMALL, **_sizes(45)}
    same = scatterbrain_attention_triton(q, k, v, w, 4, as_bias, config=cfg)
    torch.testing.assert_close(same, scatterbrain_attention_triton(q, k, v, w, 4, mask, config=cfg), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(5)
    bias = (2 * torch.randn(B, 45, generator=gen)).to(device())
    bias[0, 3:9] = float("-inf")
    _check(q, k, v, w, 4, bias, config=SMALL)


@pytest.mark.parametrize("window", [2, None])
def test_global_keys(window) -> None:
    """20 global keys per cluster (two chunks of 16), 3 clusters of queries, with padding: the keys
    inside a query's window are not counted twice, padded ones never attended."""
    q, k, v, w = _inputs(45, seed=6)
    mask = _padding(45, seed=6)
    out = _check(q, k, v, w, window, mask, global_keys=20, clusters=3, config=SMALL)
    assert torch.count_nonzero(out[1]) == 0


def test_global_keys_default_config() -> None:
    q, k, v, w = _inputs(37, seed=7)
    _check(q, k, v, w, 3, global_keys=4, clusters=2)


# --- sparse + centroids: the same kernel with the centroid kernel as the low-rank part ---------------
@pytest.mark.parametrize("window,global_keys,clusters", [(3, 0, 3), (None, 20, 3), (2, 20, 2), (None, 0, 4),
                                                         (45, 0, 2)])
def test_clustered_matches_the_reference(window, global_keys, clusters) -> None:
    """Window, global keys (two chunks of 16), both, neither (the centroid kernel alone) and a window
    covering the sequence, with ragged padding; sequence 1 all padding gives zeros."""
    q, k, v, _ = _inputs(45, seed=10)
    mask = _padding(45, seed=10)
    cfg = {**scatterbrain_config((B, H, 45, D, DV), clusters, window, global_keys, torch.float32), **SMALL}
    out = clustered_attention_triton(q, k, v, window, mask, global_keys, clusters, config=cfg)
    ref = clustered_attention(q.cpu(), k.cpu(), v.cpu(), window, mask.cpu(), global_keys, clusters)
    _assert_near(out, ref, TOL[torch.float32], f"clustered window={window} global_keys={global_keys}")
    assert torch.count_nonzero(out[1]) == 0 and torch.isfinite(out).all()


def test_clustered_half_inputs_and_a_float_bias() -> None:
    q, k, v, _ = _inputs(37, torch.float16, seed=11, spread=1.0)
    gen = torch.Generator().manual_seed(11)
    bias = (2 * torch.randn(B, 37, generator=gen)).to(device())
    bias[0, 3:9] = float("-inf")
    out = clustered_attention_triton(q, k, v, 4, bias, 6, 2)
    ref = clustered_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), 4, bias.cpu(), 6, 2)
    assert out.dtype == torch.float16
    _assert_near(out, ref, TOL[torch.float16], "clustered fp16")


def test_clustered_bad_input() -> None:
    q, k, v, _ = _inputs(9)
    for kwargs, message in (({"clusters": 0}, "clustered_attention: clusters must be an int >= 1, got 0"),
                            ({"clusters": MAX_FEATURES + 1}, f"{MAX_FEATURES + 1} clusters > {MAX_FEATURES}"),
                            ({"global_keys": -1}, "clustered_attention: global_keys must be an int >= 0")):
        with pytest.raises(LrccError, match=message):
            clustered_attention_triton(q, k, v, 3, **kwargs)


# Triton's interpreter does not do arithmetic on bfloat16 (triton-lang/triton#11584): bf16 on a GPU only.
BF16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(interpreting(), reason="bf16 needs a GPU"))


@pytest.mark.parametrize("dtype", [torch.float16, BF16_ON_GPU])
def test_half_inputs(dtype) -> None:
    """Half inputs, a mask and global keys: the output comes back in the input dtype."""
    q, k, v, w = _inputs(45, dtype, seed=8, spread=1.0)
    mask = _padding(45, seed=8)
    out = _check(q, k, v, w, 5, mask, global_keys=4, clusters=2, config=SMALL)
    assert out.dtype == dtype


def test_non_contiguous_inputs() -> None:
    """q, k as the transpose of [B, L, H, d] projections; v every other column of a wider tensor."""
    gen = torch.Generator().manual_seed(9)
    L = 37
    q, k = (1.5 * torch.randn(B, L, H, D, generator=gen).to(device()).transpose(1, 2) for _ in range(2))
    v = torch.randn(B, H, L, 2 * DV, generator=gen).to(device())[..., ::2]
    w = orthogonal_features(D, M, gen).to(device())
    assert not (q.is_contiguous() or k.is_contiguous()) and v.stride(-1) == 2
    out = _check(q, k, v, w, 3, config=SMALL)
    assert out.is_contiguous()


def test_empty_sequence() -> None:
    q, k, v, w = _inputs(0)
    assert scatterbrain_attention_triton(q, k, v, w, 3).shape == (B, H, 0, DV)


# --- configs --------------------------------------------------------------------------------------
def test_config_tiles_cover_the_dims() -> None:
    for shape, m, window, g in [((2, 2, 37, 24, 20), 12, 3, 0), ((1, 1, 5, 8, 8), 4, 0, 2),
                                ((4, 16, 4096, 64, 64), 64, 16, 16), ((1, 8, 8192, 128, 128), 128, 64, 200),
                                ((8, 12, 512, 32, 32), 16, None, 0)]:
        for dtype in (torch.float16, torch.float32):
            cfg = scatterbrain_config(shape, m, window, g, dtype)
            _, _, L, d, dv = shape
            for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "BLOCK_F", "BLOCK_G"):
                assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (shape, cfg)
            for key, need in (("BLOCK_D", d), ("BLOCK_DV", dv), ("BLOCK_F", m)):
                assert need <= cfg[key] < max(2 * need, 32), (shape, key, cfg)
            assert cfg["BLOCK_M"] < max(2 * L, 32) and cfg["BLOCK_G"] <= cfg["BLOCK_N"], (shape, cfg)
            itemsize = 4 if dtype == torch.float32 else 2
            widest = max(cfg["BLOCK_D"], cfg["BLOCK_DV"], cfg["BLOCK_F"])
            assert max(cfg["BLOCK_M"], cfg["BLOCK_N"]) * widest * itemsize <= 16 * 1024, (shape, dtype, cfg)
            assert cfg["num_warps"] in (4, 8) and cfg["num_stages"] == 2, (shape, cfg)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_input_is_rejected_with_a_clear_message(monkeypatch) -> None:
    q, k, v, w = _inputs(9)
    mask = torch.ones(B, 9, dtype=torch.bool, device=q.device)
    big = q.new_zeros(1, 1, 9, MAX_HEAD_DIM + 8)
    cases = [
        ((q[0], k, v, w, 3), {}, r"q must be \[B, H, L, d\], got rank 3"),
        ((q, k[..., :-1], v, w, 3), {}, "q .* and k .* must have the same shape"),
        ((q, k, v[:, :, :-1], w, 3), {}, "v .* must share B, H, L with q"),
        ((q, k, v.half(), w, 3), {}, "q, k, v are torch.float32, torch.float32, torch.float16; cast them"),
        ((q.double(), k.double(), v.double(), w, 3), {}, "q is torch.float64; use float32, float16 or bfloat16"),
        ((q, k, v, w[:, :-1], 3), {}, r"w must be \[m, d\] with m >= 1 and d=24 .* got \(12, 23\)"),
        ((q, k, v, w[0], 3), {}, r"w must be \[m, d\]"),
        ((q, k, v, w, -1), {}, "window must be an int >= 0 .* or None for no window, got -1"),
        ((q, k, v, w, 2.5), {}, "window must be an int >= 0"),
        ((q, k, v, w, 3), {"global_keys": -2}, "global_keys must be an int >= 0, got -2"),
        ((q, k, v, w, 3), {"global_keys": 2, "clusters": 0}, "clusters must be an int >= 1"),
        ((q, k, v, w, 3), {"mask": mask[:, :-1]}, r"key mask is \(2, 8\), expected \[B, L\] = \[2, 9\]"),
        ((q, k, v, w, 3), {"mask": mask.long()}, "key mask must be bool .* or floating point"),
        ((big, big, big, w.new_zeros(4, MAX_HEAD_DIM + 8), 3), {}, f"d={MAX_HEAD_DIM + 8}, .* at most {MAX_HEAD_DIM}"),
        ((q, k, v, w.new_zeros(MAX_FEATURES + 1, D), 3), {}, f"{MAX_FEATURES + 1} random features > {MAX_FEATURES}"),
        ((q, k, v, w, 3), {"config": {"BLOCK_M": 16}}, "config lacks BLOCK_N, .* num_stages; start from"),
        ((q, k, v, w, 3), {"config": {**scatterbrain_config((B, H, 9, 8, DV), M, 3), "BLOCK_N": 24}},
         "BLOCK_N=24 must be a power of two"),
        ((q, k, v, w, 3), {"config": scatterbrain_config((B, H, 9, 8, DV), M, 3)}, "BLOCK_D=16 < d=24"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(LrccError, match=message):
            scatterbrain_attention_triton(*args, **kwargs)
    # off the GPU and outside the interpreter the kernel cannot run: say so, and name the torch form
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    cpu = [t.cpu() for t in (q, k, v, w)]
    with pytest.raises(LrccError, match="needs CUDA tensors .*TRITON_INTERPRET=1.*linear_attention.scatterbrain"):
        scatterbrain_attention_triton(*cpu, 3)


# --- ahead-of-time compiles for real GPUs ---------------------------------------------------------
def test_compiles_for_sm80_and_sm90() -> None:
    """fp16 at head size 64 with 64 features, a window, a mask and global keys (B=4, H=16, L=4096):
    sm_80 runs the half products on mma.sync and the fp32 state ones on tf32 mma.sync; sm_90 on
    wgmma. The largest config (d = dv = m = 128, fp32 inputs, the most shared memory) fits an A100."""
    shape = (4, 16, 4096, 64, 64)
    largest = (4, 16, 4096, MAX_HEAD_DIM, MAX_HEAD_DIM)
    jobs = [AotJob(TEMPLATE, scatterbrain_config(shape, 64, 16, 16, "fp16"), arch, "fp16")
            for arch in ("sm_80", "sm_90")]
    jobs.append(AotJob(TEMPLATE, scatterbrain_config(largest, MAX_FEATURES, 64, 64, "fp32"), "sm_80", "fp32"))
    jobs.append(AotJob(TEMPLATE, {**scatterbrain_config(shape, 8, 16, 16, "fp16"), "CENTROID": True}, "sm_80", "fp16"))
    sm80, sm90, biggest, centroid = results = compile_many(jobs)
    # ptxas's allocation, read back with cuobjdump: registers spill neither to local memory nor, beyond
    # a few words, to the stack frame (where ptxas reports the spills of a kernel without calls),
    # except in the largest config (fp32, d = dv = m = 128), a known gap (docs/gpu.md): it spills
    # 2864 bytes per thread at 32 x 32 tiles, and still 1200 at 16 x 32
    spills = [(r["regs"], r["local_bytes"], r["stack_bytes"]) for r in results]
    assert all(local == 0 for _, local, _ in spills), spills
    assert all(stack <= 32 for i, (_, _, stack) in enumerate(spills) if results[i] is not biggest), spills
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in centroid["ptx"], "sm_80 (centroid): no fp16 mma"
    assert ".target sm_80" in sm80["ptx"] and ".target sm_90a" in sm90["ptx"]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in sm80["ptx"], "sm_80: no fp16 mma.sync"
    assert ".f32.tf32.tf32.f32" in sm80["ptx"], "sm_80: no tf32 mma.sync"
    assert "wgmma.mma_async.sync.aligned" in sm90["ptx"] and ".f32.f16.f16" in sm90["ptx"], "sm_90: no fp16 wgmma"
    assert 0 < biggest["shared"] <= A100_SHARED, f"largest config takes {biggest['shared']} bytes of shared memory"
