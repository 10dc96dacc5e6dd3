"""The sparse plus low-rank Triton kernel, its block-sparse layout, and the rule's block option.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
on small ragged shapes (M, K, N, R all off the tile sizes); ahead-of-time compiles for sm_80 and
sm_90 check that it builds for real GPUs and uses their tensor cores. Tolerances: fp32 products
run in full fp32 ("ieee"), so 1e-4 relative; fp16 operands with fp32 accumulation, 1e-2 relative
(the kernel rounds x V^T to fp16 before multiplying by U^T; the reference does not).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrcc.codegen.torch_module import CompressedLinear
from lrcc.codegen.triton import sparse
from lrcc.codegen.triton.aot import AotJob, compile_many
from lrcc.codegen.triton.sparse import (
    TritonSparseLowRankLinear,
    csr_to_dense,
    prepare,
    run,
    sparse_candidates,
    sparse_config,
    sparse_lowrank_linear,
    sparse_lowrank_reference,
    to_block_sparse,
)
from lrcc.errors import LrccError
from lrcc.ir.from_torch import import_module
from lrcc.rewrites import match, sparsify_lowrank
from lrcc.rewrites.sparse_low_rank import csr_parts, sparse_bytes

from .conftest import device

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
M, N_IN, N_OUT, R = 19, 72, 50, 12  # x: M x N_IN; S, U V: N_OUT x N_IN; every extent ragged


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _block_mask(m: int, n: int) -> torch.Tensor:
    """A few 16 x 16 blocks of S (out x in), two of them ragged (past row 48, past column 64), plus
    a scattering of single entries that land in otherwise empty blocks."""
    mask = torch.zeros(m, n, dtype=torch.bool)
    mask[0:16, 16:32] = True
    mask[16:32, 0:16] = True
    mask[16:32, 48:64] = True
    mask[48:50, 64:72] = True
    mask[32:48, 64:72] = True
    mask[40, 3] = mask[5, 70] = True
    return mask


def _parts(mask: torch.Tensor, rank: int = R, bias: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m, n = mask.shape
    dense = torch.randn(m, n, generator=gen) / n ** 0.5
    parts = {**csr_parts(dense, mask), "v": (torch.randn(rank, n, generator=gen) / n ** 0.5).half(),
             "u": (torch.randn(m, rank, generator=gen) / rank ** 0.5).half()}
    if bias:
        parts["bias"] = torch.randn(m, generator=gen)
    return parts


def _layout_dense(layout: dict[str, torch.Tensor], m: int, n: int, block_k: int, block_n: int) -> torch.Tensor:
    """S (m x n) from the block layout, block by block (independent of the vectorised conversion)."""
    ptr, kidx, blocks = layout["block_ptr"].tolist(), layout["block_k"].tolist(), layout["blocks"]
    st = torch.zeros(-(-n // block_k) * block_k, -(-m // block_n) * block_n, dtype=blocks.dtype)
    for j in range(len(ptr) - 1):
        ks = kidx[ptr[j]:ptr[j + 1]]
        assert ks == sorted(set(ks)), "K-blocks of one output tile are unique and in increasing order"
        for i in range(ptr[j], ptr[j + 1]):
            st[kidx[i] * block_k:(kidx[i] + 1) * block_k, j * block_n:(j + 1) * block_n] = blocks[i]
    assert not st[n:].any() and not st[:, m:].any(), "blocks are zero past the matrix"
    return st[:n, :m].T


# --- the layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_k,block_n", [(16, 16), (32, 16), (16, 64)])
def test_block_layout_round_trips(block_k, block_n) -> None:
    mask = _block_mask(N_OUT, N_IN)
    parts = _parts(mask)
    layout = to_block_sparse(parts["values"], parts["cols"], parts["rowptr"], N_OUT, N_IN, block_k, block_n)
    assert layout["block_ptr"].dtype == layout["block_k"].dtype == torch.int32
    assert layout["blocks"].dtype == torch.float16
    assert layout["block_ptr"].shape == (-(-N_OUT // block_n) + 1,)
    want = csr_to_dense(parts["values"], parts["cols"], parts["rowptr"], N_OUT, N_IN)
    assert torch.equal(_layout_dense(layout, N_OUT, N_IN, block_k, block_n), want)
    # and csr_to_dense is what the torch lowering computes with
    assert torch.equal(want.float(), CompressedLinear(parts, N_OUT, N_IN, None, None).main_weight())
    occupied = {(int(r) // block_n, int(c) // block_k) for r, c in mask.nonzero()}
    assert layout["blocks"].shape == (len(occupied), block_k, block_n)


def test_unstructured_csr_converts_to_denser_blocks() -> None:
    """Any CSR pattern converts; at 5% entry-wise density nearly every 16 x 16 block holds an entry."""
    m, n = 64, 96
    mask = torch.rand(m, n, generator=torch.Generator().manual_seed(3)) < 0.05
    parts = _parts(mask)
    layout = to_block_sparse(parts["values"], parts["cols"], parts["rowptr"], m, n, 16, 16)
    want = csr_to_dense(parts["values"], parts["cols"], parts["rowptr"], m, n)
    assert torch.equal(_layout_dense(layout, m, n, 16, 16), want)
    assert layout["blocks"].shape[0] >= 0.9 * (m // 16) * (n // 16)


def test_empty_sparse_part_converts() -> None:
    parts = _parts(torch.zeros(N_OUT, N_IN, dtype=torch.bool))
    layout = to_block_sparse(parts["values"], parts["cols"], parts["rowptr"], N_OUT, N_IN, 16, 16)
    assert layout["blocks"].shape == (0, 16, 16) and not layout["block_ptr"].any()


# --- the kernel ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_reference(dtype, bias) -> None:
    parts = _parts(_block_mask(N_OUT, N_IN), bias=bias)
    x = torch.randn(M, N_IN, generator=torch.Generator().manual_seed(1)).to(device(), dtype)
    y = sparse_lowrank_linear(x, parts)
    ref = sparse_lowrank_reference(x.cpu(), parts)
    assert y.dtype == dtype and y.shape == (M, N_OUT)
    assert rel(y.cpu(), ref) < TOL[dtype]


def test_reference_is_what_the_torch_lowering_computes() -> None:
    parts = _parts(_block_mask(N_OUT, N_IN))
    x = torch.randn(M, N_IN)
    torch.testing.assert_close(sparse_lowrank_reference(x, parts),
                               CompressedLinear(parts, N_OUT, N_IN, None, None)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m,n_split", [(16, 1), (32, 4)])
def test_any_split_of_the_output_tiles_gives_the_same_result(block_m, n_split) -> None:
    """N_SPLIT = 1: one program sweeps every output tile with one t; N_SPLIT = 4 (the number of
    16-wide tiles of 50 features): one tile per program. 16-row tiles leave a ragged third."""
    parts = _parts(_block_mask(N_OUT, N_IN))
    w = prepare(parts, device=device())
    x = torch.randn(M, N_IN, generator=torch.Generator().manual_seed(2)).to(device())
    cfg = {**sparse_config(M, N_OUT, N_IN, R), "BLOCK_M": block_m, "N_SPLIT": n_split, "BLOCK_KV": 32}
    assert rel(run(x, w, cfg).cpu(), sparse_lowrank_reference(x.cpu(), parts)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 37])
def test_two_pass_strategy_matches_the_fused_kernel_and_the_reference(dtype, rows) -> None:
    """t = x V^T first (the matmul kernel, split over K into fp32), then the sparse kernel reading it,
    one program per output tile; the fused kernel computes t in every program instead."""
    parts = _parts(_block_mask(N_OUT, N_IN))
    w = prepare(parts, device=device())
    x = torch.randn(rows, N_IN, generator=torch.Generator().manual_seed(6)).to(device(), dtype)
    two_pass, fused = sorted(sparse_candidates(rows, N_OUT, N_IN, R, sms=132), key=lambda c: c["strategy"] != "two_pass")
    assert two_pass["sparse"]["HAS_T"] and two_pass["sparse"]["N_SPLIT"] == -(-N_OUT // 16)
    ref = sparse_lowrank_reference(x.cpu(), parts)
    assert rel(run(x, w, fused).cpu(), ref) < TOL[dtype]
    for split in (1, 2):  # t in x's dtype, or split over K into fp32 partials added atomically
        cfg = {**two_pass, "t": {**two_pass["t"], "SPLIT_K": split}}
        assert rel(run(x, w, cfg).cpu(), ref) < TOL[dtype], split


def test_decode_shapes_compute_t_once() -> None:
    """For a few rows, every fused program would read all of V again: two-pass is offered first.
    The fused kernel stays first where one program per row block computes t once."""
    assert sparse_candidates(1, 4096, 4096, 64, sms=132)[0]["strategy"] == "two_pass"
    assert sparse_candidates(1 << 16, 256, 256, 16, sms=4)[0]["strategy"] == "fused"


def test_unstructured_s_and_leading_dims() -> None:
    """Entry-wise S (every block partly filled) through 32 x 32 blocks; x with two leading dims."""
    mask = torch.rand(N_OUT, N_IN, generator=torch.Generator().manual_seed(4)) < 0.05
    parts = _parts(mask, rank=5)
    x = torch.randn(3, 7, N_IN, generator=torch.Generator().manual_seed(5)).to(device())
    y = sparse_lowrank_linear(x, parts, sparse_config(21, N_OUT, N_IN, 5, 32, 32))
    assert y.shape == (3, 7, N_OUT)
    assert rel(y.cpu(), sparse_lowrank_reference(x.cpu(), parts)) < TOL[torch.float32]


def test_kernel_reads_nothing_past_the_last_input_feature() -> None:
    """x as the first 72 columns of a wider buffer whose other columns are NaN: a K tail read
    without its mask would multiply NaN by the blocks' zero padding."""
    parts = _parts(_block_mask(N_OUT, N_IN))
    wide = torch.full((M, N_IN + 24), float("nan"))
    wide[:, :N_IN] = torch.randn(M, N_IN, generator=torch.Generator().manual_seed(6))
    x = wide.to(device())[:, :N_IN]
    y = sparse_lowrank_linear(x, parts)
    assert torch.isfinite(y).all()
    assert rel(y.cpu(), sparse_lowrank_reference(x.cpu(), parts)) < TOL[torch.float32]


def test_layout_is_converted_once_per_weight(monkeypatch) -> None:
    parts = _parts(_block_mask(N_OUT, N_IN))
    calls = []
    real = sparse.prepare
    monkeypatch.setattr(sparse, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, N_IN).to(device())
    first = sparse_lowrank_linear(x, parts)
    again = sparse_lowrank_linear(x, parts)
    assert len(calls) == 1 and torch.equal(first, again)


def test_module_runs_the_kernel_and_names_its_launch() -> None:
    parts = _parts(_block_mask(N_OUT, N_IN))
    mod = TritonSparseLowRankLinear(parts, {"m": N_OUT, "n": N_IN, "block": [16, 16]}, "fc").to(device())
    x = torch.randn(M, N_IN).to(device())
    assert rel(mod(x).cpu(), sparse_lowrank_reference(x.cpu(), parts)) < TOL[torch.float32]
    (call,) = mod.kernel_calls()
    cfg = call["config"](2048, 132)
    sparse_cfg = cfg["sparse"] if cfg["strategy"] == "two_pass" else cfg
    assert call["template"] == "sparse_lowrank_linear" and (sparse_cfg["BLOCK_K"], sparse_cfg["BLOCK_N"]) == (16, 16)
    assert sparse._reference_prepared(x.cpu(), prepare(parts)).sub(sparse_lowrank_reference(x.cpu(), parts)).abs().max() < 1e-4


# --- bad input -----------------------------------------------------------------------------------------
def test_bad_input_says_what_is_wrong() -> None:
    parts = _parts(_block_mask(N_OUT, N_IN))
    with pytest.raises(LrccError, match="power of two >= 16"):
        to_block_sparse(parts["values"], parts["cols"], parts["rowptr"], N_OUT, N_IN, 8, 16)
    with pytest.raises(LrccError, match="block_n=24"):
        prepare(parts, 16, 24)
    with pytest.raises(LrccError, match="rowptr"):
        to_block_sparse(parts["values"], parts["cols"], parts["rowptr"], N_OUT + 1, N_IN, 16, 16)
    with pytest.raises(LrccError, match="column indices"):
        to_block_sparse(parts["values"], parts["cols"], parts["rowptr"], N_OUT, 40, 16, 16)
    with pytest.raises(LrccError, match="r x n and m x r"):
        prepare({**parts, "u": parts["u"][:, :5]})
    with pytest.raises(LrccError, match=r"bias is \(49,\)"):
        prepare({**parts, "bias": parts["bias"][:49]})
    with pytest.raises(LrccError, match="lack"):
        prepare({k: t for k, t in parts.items() if k != "v"})
    w = prepare(parts)
    with pytest.raises(LrccError, match="last dimension must be the 72 input features"):
        run(torch.randn(3, 70), w)
    with pytest.raises(LrccError, match="float64"):
        run(torch.randn(3, N_IN, dtype=torch.float64), w)
    with pytest.raises(LrccError, match="do not fit the weight"):
        run(torch.randn(3, N_IN), w, sparse_config(3, N_OUT, N_IN, R, 32, 16))


# --- ahead-of-time compiles ------------------------------------------------------------------------------
def test_compiles_for_sm80_and_sm90_on_tensor_cores() -> None:
    """sm_80 multiplies with mma.sync. On sm_90 Triton uses wgmma when a warpgroup (4 warps) owns a
    64-row tile, i.e. for prefill-sized M; a 16-row decode tile is below wgmma's 64-row unit, so
    Triton falls back to mma.sync there (still the tensor cores)."""
    prefill = sparse_config(2048, 1536, 384, 64, sms=132)
    decode = sparse_config(1, 1536, 384, 64, sms=132)
    assert prefill["BLOCK_M"] == 64 and decode["BLOCK_M"] == 16
    two_pass = sparse_candidates(1, 1536, 384, 64, sms=132)[0]
    assert two_pass["strategy"] == "two_pass" and two_pass["t"]["SPLIT_K"] > 1
    jobs = [AotJob("sparse_lowrank_linear", prefill, "sm_80"), AotJob("sparse_lowrank_linear", prefill, "sm_90"),
            AotJob("sparse_lowrank_linear", decode, "sm_90"), AotJob("matmul", two_pass["t"], "sm_80"),
            AotJob("sparse_lowrank_linear", two_pass["sparse"], "sm_80")]
    results = compile_many(jobs)
    t_ptx, reading_t = results[3]["ptx"], results[4]["ptx"]
    assert "red.global" in t_ptx or "atom.global" in t_ptx  # t's split-K partials add up in device memory
    assert re.search(r"\bmma\.sync\.aligned", reading_t)  # t U^T and the sparse blocks on the tensor cores
    results = results[:3]
    # ptxas's allocation, read back with cuobjdump: no config spills registers (to local memory or
    # to the stack frame, where ptxas reports the spills of a kernel without calls)
    assert [(r["local_bytes"], r["stack_bytes"]) for r in results] == [(0, 0)] * len(results), \
        [(r["regs"], r["local_bytes"], r["stack_bytes"]) for r in results]
    sm80, sm90, sm90_decode = (r["ptx"] for r in results)
    assert re.search(r"\bmma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32", sm80)
    assert len(re.findall(r"\bwgmma\.mma_async", sm90)) >= 3  # x V^T, t U^T and the sparse blocks
    assert re.search(r"\bmma\.sync\.aligned", sm90_decode)


# --- the rule's block option ---------------------------------------------------------------------------
class Ragged(nn.Module):
    """Two linears whose widths are not all multiples of 16 (72 -> 96 -> 50)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(72, 96)
        self.fc2 = nn.Linear(96, 50)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Stats:
    """x^T x and token counts per site, from running the model on x."""

    def __init__(self, model: Ragged, x: torch.Tensor) -> None:
        with torch.no_grad():
            h = F.gelu(model.fc1(x))
        self.sums = {"fc1": (x.T @ x).double(), "fc2": (h.T @ h).double()}
        self.tokens = {"fc1": x.shape[0], "fc2": x.shape[0]}

    def xtx(self, site):
        return self.sums[site]


CONFIGS = ((0.1, (16,)), (0.25, (16,)))


@pytest.fixture(scope="module")
def ragged():
    torch.manual_seed(0)
    model = Ragged().eval()
    g, _ = import_module(model, (torch.randn(4, 72),))
    return model, g, _Stats(model, torch.randn(400, 72, generator=torch.Generator().manual_seed(7)))


def _is_block_aligned(mask: torch.Tensor, bo: int, bi: int) -> bool:
    m, k = mask.shape
    if mask[m // bo * bo:].any() or mask[:, k // bi * bi:].any():
        return False
    counts = mask[: m // bo * bo, : k // bi * bi].reshape(m // bo, bo, k // bi, bi).sum((1, 3))
    return bool(((counts == 0) | (counts == bo * bi)).all())


def test_block_option_keeps_whole_top_blocks(ragged) -> None:
    model, g, stats = ragged
    m = match(g, [sparsify_lowrank], {"sparse_configs": CONFIGS, "sparse_block": (16, 16)})
    assert m.fired == {"sparsify_lowrank": 2}
    for site, lin in (("fc1", model.fc1), ("fc2", model.fc2)):
        w = lin.weight.detach()
        out_f, in_f = w.shape
        for cand in m.candidates[site]:
            assert cand.choice == f"{cand.knobs['density']:.0%} block-sparse 16x16 + rank 16 fp16"
            delta = cand.spectrum(stats)
            parts = delta.parts
            mask = csr_to_dense(torch.ones_like(parts["values"]), parts["cols"], parts["rowptr"], out_f, in_f) != 0
            nnz = int(mask.sum())
            assert nnz % 256 == 0 and 0 < nnz <= round(cand.knobs["density"] * out_f * in_f)
            assert _is_block_aligned(mask, 16, 16)
            assert cand.bytes == sparse_bytes(out_f, in_f, nnz) + 2 * 16 * (out_f + in_f) + 4 * out_f
            assert cand.bytes == sum(t.numel() * t.element_size() for t in parts.values()) + 4 * out_f
            assert delta.attrs["block"] == [16, 16]
            # the kept blocks are the top ones by summed score |R_ij| * rms(x_j)
            residual = w - parts["u"].float() @ parts["v"].float()
            rms = (stats.xtx(site).diagonal().float() / stats.tokens[site]).sqrt()
            score = (residual.abs() * rms)[: out_f // 16 * 16, : in_f // 16 * 16]
            sums = score.reshape(out_f // 16, 16, in_f // 16, 16).sum((1, 3)).flatten()
            kept = mask[: out_f // 16 * 16, : in_f // 16 * 16].reshape(out_f // 16, 16, in_f // 16, 16)[:, 0, :, 0]
            assert set(kept.flatten().nonzero().flatten().tolist()) == set(torch.topk(sums, nnz // 256).indices.tolist())
            # the stored parts compute W + dW in the torch lowering and in the Triton kernel
            x = torch.randn(M, in_f)
            bias = lin.bias.detach()
            want = F.linear(x, w + delta.dw, bias)
            got = CompressedLinear({**parts, "bias": bias}, out_f, in_f, None, None)(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            if site == "fc1" and cand.knobs["density"] == 0.25:
                y = sparse_lowrank_linear(x.to(device()), {**parts, "bias": bias})
                assert rel(y.cpu(), want) < TOL[torch.float32]


def test_block_sparsity_keeps_less_score_than_entrywise(ragged) -> None:
    """The law's price: whole blocks within the same budget never keep more of the summed score
    than the best single entries do."""
    model, g, stats = ragged
    w = model.fc1.weight.detach()
    rms = (stats.xtx("fc1").diagonal().float() / stats.tokens["fc1"]).sqrt()
    kept = {}
    for block in (None, (16, 16)):
        m = match(g, [sparsify_lowrank], {"sparse_configs": ((0.25, (16,)),), "sparse_block": block})
        (cand,) = m.candidates["fc1"]
        parts = cand.spectrum(stats).parts
        score = (w - parts["u"].float() @ parts["v"].float()).abs() * rms
        mask = csr_to_dense(torch.ones_like(parts["values"]), parts["cols"], parts["rowptr"], *w.shape) != 0
        kept[block] = float(score[mask].sum())
    assert kept[(16, 16)] <= kept[None]


def test_default_is_unchanged(ragged) -> None:
    """Without sparse_block (or with None) the rule offers exactly what it did: entry-wise top-k."""
    model, g, stats = ragged
    plain = match(g, [sparsify_lowrank], {"sparse_configs": CONFIGS})
    none = match(g, [sparsify_lowrank], {"sparse_configs": CONFIGS, "sparse_block": None})
    assert plain.fired == none.fired == {"sparsify_lowrank": 2}
    for site, lin in (("fc1", model.fc1), ("fc2", model.fc2)):
        w = lin.weight.detach()
        out_f, in_f = w.shape
        for a, b in zip(plain.candidates[site], none.candidates[site]):
            assert (a.choice, a.knobs, a.family, a.bytes, a.params) == (b.choice, b.knobs, b.family, b.bytes, b.params)
            density = a.knobs["density"]
            assert a.choice == f"{density:.0%} sparse + rank 16 fp16" and "block" not in a.knobs
            assert a.family == f"{site}:sparse:{density}:16"
            delta = a.spectrum(stats)
            assert "block" not in delta.attrs
            # the entry-wise rule as it was written
            v, u = delta.parts["v"], delta.parts["u"]
            residual = w - u.float() @ v.float()
            rms = (stats.xtx(site).diagonal().float() / stats.tokens[site]).sqrt()
            score = (residual.abs() * rms[None, :]).flatten()
            mask = torch.zeros(out_f * in_f, dtype=torch.bool)
            mask[torch.topk(score, round(density * out_f * in_f)).indices] = True
            want = csr_parts(residual, mask.reshape(out_f, in_f))
            for role in ("values", "cols", "rowptr"):
                assert torch.equal(delta.parts[role], want[role]), role


def test_block_option_rejects_bad_values_and_too_small_layers(ragged) -> None:
    _, g, _ = ragged
    with pytest.raises(LrccError, match="sparse_block"):
        match(g, [sparsify_lowrank], {"sparse_block": 16})
    with pytest.raises(LrccError, match="sparse_block"):
        match(g, [sparsify_lowrank], {"sparse_block": (16, 0)})
    # 5% of 50 x 96 entries is less than one 16 x 16 block: no candidate for fc2
    m = match(g, [sparsify_lowrank], {"sparse_configs": ((0.05, (16,)),), "sparse_block": (16, 16)})
    assert ("fc2", "sparsify_lowrank", "no candidate saves anything") in m.rejected
