"""C int8 kernels for transformer ops (layernorm, softmax, lut, attention).

Two kinds of check for each kind:
1. the generated C (gcc -std=c99 strict, ASan + UBSan) equals the numpy reference bit for bit, on
   random int8 inputs and on the extremes of the int8 range (all -128, all 127, constant rows
   whose variance is 0, alternating -128/127), including run in place (y == x) for the row-wise
   and elementwise kinds, which the memory planner aliases;
2. the reference is a faithful quantisation of the float op: its dequantised output is within a
   bound derived from its integer arithmetic of torch's float64 result on the dequantised inputs.
Several ops share one C program where possible (each gcc build takes a fraction of a second).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lrcc.codegen.c import emit, kernels
from lrcc.codegen.c import fixedpoint as fx
from lrcc.codegen.c.hostcc import build_and_run
from lrcc.codegen.c.kernels_transformer import Attention, LayerNorm, Lut, Softmax
from lrcc.codegen.c.program import Op
from lrcc.errors import LrccError

pytestmark = pytest.mark.usefixtures("one_thread")


# --- helpers ---------------------------------------------------------------------------------
def int8(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(-128, 128, size=shape).astype(np.int8)


def extreme_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """rows x n int8: all -128, all 127, constant rows (variance 0), -128/127 alternating, one value
    off a constant, a single 127 among -128s, then random rows."""
    x = int8(rng, (rows, n))
    special = [np.full(n, -128), np.full(n, 127), np.full(n, 0), np.full(n, 37), np.full(n, -77),
               np.where(np.arange(n) % 2 == 0, -128, 127), np.full(n, 5), np.full(n, -128)]
    special[6][n // 2] = 6
    special[7][0] = 127
    for i, row in enumerate(special[:rows]):
        x[i] = row
    return x


def qpair(rng: np.random.Generator, lo: float = 0.005, hi: float = 0.2) -> tuple[float, int]:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi)))), int(rng.integers(-100, 101))


def run_ops_in_c(cases: list[tuple[Op, list[np.ndarray], tuple[int, ...]]], inplace: bool = False) -> list[np.ndarray]:
    """Run several ops in one C program (ASan + UBSan). inplace: each op reads and writes the same
    mutable buffer, initialised with its one input (the call gets y == x)."""
    ops = [op for op, _, _ in cases]
    lines = ["#include <stdio.h>", "#include <stdint.h>", "#include <string.h>", emit.library(ops)]
    calls, prints = [], []
    for c, (op, xs, out_shape) in enumerate(cases):
        size = int(np.prod(out_shape))
        for key, arr in emit.array_attrs(op).items():
            lines.append(emit.const_array(f"k{c}_{key}", arr))
        if inplace:
            assert len(xs) == 1 and xs[0].size == size
            buf = emit.const_array(f"buf{c}", np.asarray(xs[0], dtype=np.int8))
            lines.append(buf.replace("static const", "static", 1))  # mutable: the kernel writes it
            ins, out = [f"buf{c}"], f"buf{c}"
        else:
            ins = []
            for i, x in enumerate(xs):
                lines.append(emit.const_array(f"in{c}_{i}", np.asarray(x, dtype=np.int8)))
                ins.append(f"in{c}_{i}")
            lines.append(f"static int8_t out{c}[{size}];")
            out = f"out{c}"
        scratch = "NULL"
        if op.scratch_bytes:
            lines.append(f"static int32_t scratch{c}[{(op.scratch_bytes + 3) // 4}];")
            scratch = f"(void *)scratch{c}"
        call = kernels.get(op.kind).call(op, ins, out, scratch, lambda key, c=c: f"k{c}_{key}")
        calls.append(f"    if ({call} != 0) {{\n        return 1;\n    }}")
        prints.append(f"    for (i = 0; i < {size}; ++i) {{\n        printf(\"%d \", (int){out}[i]);\n    }}\n"
                      "    printf(\"\\n\");")
    lines.append("int main(void)\n{\n    int32_t i;\n" + "\n".join(calls) + "\n" + "\n".join(prints)
                 + "\n    return 0;\n}\n")
    text = build_and_run({"main.c": "\n".join(lines)}).decode()
    rows = text.strip("\n").split("\n")
    assert len(rows) == len(cases)
    return [np.array([int(v) for v in row.split()], dtype=np.int8).reshape(shape)
            for row, (_, _, shape) in zip(rows, cases)]


def gelu_erf(t: np.ndarray) -> np.ndarray:
    """Exact GELU, x * Phi(x), computed independently of torch."""
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in np.asarray(t, dtype=np.float64)])


def deq(q: np.ndarray, qp: tuple[float, int]) -> np.ndarray:
    return fx.dequantize(q, *qp).astype(np.float64)


def clip_to(ref: np.ndarray, qp: tuple[float, int]) -> np.ndarray:
    """ref clamped to the range an int8 tensor with qparams qp can hold."""
    lo, hi = deq(np.array([-128, 127]), qp)
    return np.clip(ref, lo, hi)


# --- lut -------------------------------------------------------------------------------------
def test_lut_c_matches_reference_bit_for_bit():
    rng = np.random.default_rng(10)
    x = np.concatenate([np.arange(-128, 128), int8(rng, 200), np.full(7, -128), np.full(7, 127)]).astype(np.int8)
    op = Lut.build("gelu", x.size, gelu_erf, (0.04, 10), (0.025, -110))
    assert op.attrs["table"].dtype == np.int8 and op.attrs["table"].shape == (256,)
    ref = kernels.reference(op, [x])
    np.testing.assert_array_equal(emit.run_op_in_c(op, [x], x.shape), ref)
    # variants with other functions and quantisations, in one program
    cases = []
    for fn in (gelu_erf, np.tanh, lambda t: np.exp(-t * t), lambda t: np.maximum(t, 0.0)):
        xq, yq = qpair(rng), qpair(rng)
        xv = extreme_rows(rng, 6, 40)
        cases.append((Lut.build("f", xv.size, fn, xq, yq), [xv], xv.shape))
    for (op_, xs, _), got in zip(cases, run_ops_in_c(cases)):
        np.testing.assert_array_equal(got, kernels.reference(op_, xs))


def test_lut_is_exactly_rounded_gelu():
    """Each table entry is the int8 nearest to exact GELU (torch's F.gelu default, the erf form):
    error at most half an output step where GELU is inside the output range."""
    rng = np.random.default_rng(11)
    for _ in range(5):
        xq, yq = qpair(rng, 0.01, 0.08), qpair(rng, 0.005, 0.05)
        x = np.arange(-128, 128).astype(np.int8)
        op = Lut.build("gelu", x.size, gelu_erf, xq, yq)
        y = deq(kernels.reference(op, [x]), yq)
        ref = F.gelu(torch.tensor(deq(x, xq))).numpy()
        err = np.abs(y - clip_to(ref, yq))
        assert err.max() <= 0.5 * yq[0] * (1 + 1e-9), err.max() / yq[0]
    tanh_op = Lut.build("gelu_tanh", x.size, lambda t: F.gelu(torch.tensor(t), approximate="tanh").numpy(), xq, yq)
    ref = F.gelu(torch.tensor(deq(x, xq)), approximate="tanh").numpy()
    assert np.abs(deq(kernels.reference(tanh_op, [x]), yq) - clip_to(ref, yq)).max() <= 0.5 * yq[0] * (1 + 1e-9)


def test_lut_build_rejects_a_function_that_is_not_elementwise():
    with pytest.raises(LrccError, match="256 finite values"):
        Lut.build("bad", 4, lambda t: np.where(t > 0, t, np.nan), (0.05, 0), (0.05, 0))
    with pytest.raises(LrccError, match="256 finite values"):
        Lut.build("bad", 4, lambda t: t[:10], (0.05, 0), (0.05, 0))


# --- softmax ---------------------------------------------------------------------------------
def test_softmax_c_matches_reference_bit_for_bit():
    rng = np.random.default_rng(20)
    x = extreme_rows(rng, 14, 23)
    op = Softmax.build("sm", 14, 23, (0.08, -5))
    np.testing.assert_array_equal(emit.run_op_in_c(op, [x], x.shape), kernels.reference(op, [x]))
    cases = []
    for rows, n, xs_ in ((9, 1, 0.1), (10, 7, 0.5), (12, 64, 0.01), (8, 33, 2.0), (9, 16, 1e-4)):
        xv = extreme_rows(rng, rows, n)
        cases.append((Softmax.build("sm", rows, n, (xs_, int(rng.integers(-50, 50)))), [xv], xv.shape))
    for (op_, xs, _), got in zip(cases, run_ops_in_c(cases)):
        np.testing.assert_array_equal(got, kernels.reference(op_, xs))


def test_softmax_is_faithful_to_float():
    """With e_i = E_i + d_i (|d_i| <= 1/2, E_max = 2^16 exactly) and s = sum e, |e_i/s - p_i| <=
    (n+1)/2^17; rounding to 1/256 adds half a step, and the top value p ~ 1 saturates at 127 (255/256),
    at most one more half step."""
    rng = np.random.default_rng(21)
    for n, xs_ in ((5, 0.1), (16, 0.03), (40, 0.2), (64, 0.01)):
        x = extreme_rows(rng, 50, n)
        xq = (xs_, int(rng.integers(-50, 50)))
        op = Softmax.build("sm", 50, n, xq)
        q = kernels.reference(op, [x])
        y = deq(q, Softmax.Y_Q)
        ref = F.softmax(torch.tensor(deq(x, xq)), dim=-1).numpy()
        err = np.abs(y - ref)
        table_err = (n + 1) / 2**17
        assert err.max() <= 1 / 256 + table_err, err.max()
        assert err[q < 127].max() <= 0.5 / 256 + table_err, err[q < 127].max()
        assert np.abs(y.sum(axis=1) - 1).max() <= n * (0.5 / 256 + table_err) + 1 / 256


# --- layernorm -------------------------------------------------------------------------------
def ln_case(rng: np.random.Generator, rows: int, n: int, xq, yq, eps: float = 1e-5, gscale: float = 1.0):
    g = rng.normal(size=n) * gscale
    b = rng.normal(size=n) * 0.5
    x = extreme_rows(rng, rows, n)
    return LayerNorm.build("ln", rows, n, g, b, eps, xq, yq), [x], x.shape


def test_layernorm_c_matches_reference_bit_for_bit():
    rng = np.random.default_rng(30)
    op, xs, shape = ln_case(rng, 12, 24, (0.05, 7), (0.03, -3))
    np.testing.assert_array_equal(emit.run_op_in_c(op, xs, shape), kernels.reference(op, xs))
    cases = [
        ln_case(rng, 10, 1, (0.05, 0), (0.02, 0)),                         # n = 1: always beta
        ln_case(rng, 10, 8, (0.5, -128), (0.1, 127), eps=0.0),             # extreme zero points, eps 0
        ln_case(rng, 10, 40, (0.01, 20), (0.03, -20), eps=1e-2),          # eps dominates small variance
        ln_case(rng, 10, 16, (1e-9, 0), (0.02, 0)),                        # tiny x scale: huge eps_q (int64 literal)
        ln_case(rng, 10, 16, (0.05, 3), (1e-6, 0), gscale=50.0),           # gamma/ys ~ 2^26: k = 0, clipped
        ln_case(rng, 10, 300, (0.02, -5), (0.04, 9)),
    ]
    assert cases[3][0].attrs["eps_q"] >= 2**31
    assert cases[4][0].attrs["sqrt_shift"] == 0
    assert len({c[0].attrs["sqrt_shift"] for c in cases}) >= 3
    for (op_, xs_, _), got in zip(cases, run_ops_in_c(cases)):
        np.testing.assert_array_equal(got, kernels.reference(op_, xs_))


def test_layernorm_is_faithful_to_float():
    """Error bound, in output steps: 1/2 from the final rounding, plus the floor in den =
    isqrt(n^2 var 4^k + eps_q) >= 2^k n std_q: it is off by less than 1, a relative error under
    2^-k / (n std_q), and |n d_i - s| / (n std_q) <= sqrt(n-1) <= n std_q for any non-constant row,
    so t_i moves by less than (max|gamma| / y_scale) 2^-k steps; plus 2^-10 for the 2^-16 roundings
    of gamma_q, beta_q and t. Near-constant rows (the smallest variances) are where the floor
    matters most; constant rows give beta."""
    rng = np.random.default_rng(31)
    for n, xs_, eps in ((16, 0.05, 1e-5), (64, 0.02, 1e-5), (32, 0.5, 1e-3), (8, 0.01, 0.1), (48, 0.001, 1e-5)):
        rows = 120
        g = rng.normal(size=n)
        b = rng.normal(size=n) * 0.5
        x = extreme_rows(rng, rows, n)
        for r in range(8, 60):  # one value off a constant row: the smallest non-zero variances
            x[r] = r - 30
            x[r, r % n] += 1 + r % 3
        xq = (xs_, int(rng.integers(-30, 30)))
        ref = F.layer_norm(torch.tensor(deq(x, xq)), (n,), torch.tensor(g), torch.tensor(b), eps).numpy()
        yq = fx.choose_qparams(ref.min(), ref.max())
        op = LayerNorm.build("ln", rows, n, g, b, eps, xq, yq)
        k = op.attrs["sqrt_shift"]
        err = np.abs(deq(kernels.reference(op, [x]), yq) - clip_to(ref, yq)) / yq[0]
        bound = 0.5 + np.abs(g).max() / yq[0] * 2.0**-k + 2.0**-10
        assert k >= 8
        assert err.max() <= bound, (err.max(), bound)
        assert err.mean() <= 0.27, err.mean()  # uniform rounding alone: 0.25
        const_rows = [0, 1, 2, 3, 4]
        np.testing.assert_allclose(deq(kernels.reference(op, [x]), yq)[const_rows], clip_to(np.tile(b, (5, 1)), yq),
                                   atol=0.5 * yq[0] + 1e-9)


# --- in place ---------------------------------------------------------------------------------
def test_rowwise_kernels_are_correct_in_place():
    """y == x: the memory planner aliases these kinds' outputs onto their inputs."""
    rng = np.random.default_rng(40)
    cases = []
    for n in (1, 9, 32):
        x = extreme_rows(rng, 10, n)
        cases.append((LayerNorm.build("ln", 10, n, rng.normal(size=n), rng.normal(size=n), 1e-5, (0.04, 3),
                                      (0.03, -2)), [x], x.shape))
        cases.append((Softmax.build("sm", 10, n, (0.07, 1)), [x], x.shape))
        cases.append((Lut.build("gelu", x.size, gelu_erf, (0.04, 3), (0.02, -100)), [x], x.shape))
    for (op, xs, _), got in zip(cases, run_ops_in_c(cases, inplace=True)):
        np.testing.assert_array_equal(got, kernels.reference(op, xs), err_msg=op.kind)


# --- attention -------------------------------------------------------------------------------
def att_case(rng, heads, nq, nk, d, causal=False, scale=None, fill=None):
    qq, kq, vq, yq = qpair(rng, 0.01, 0.1), qpair(rng, 0.01, 0.1), qpair(rng), qpair(rng)
    op = Attention.build("att", heads, nq, nk, d, qq, kq, vq, yq, scale=scale, causal=causal)
    xs = [int8(rng, (nq, heads * d)), int8(rng, (nk, heads * d)), int8(rng, (nk, heads * d))]
    if fill is not None:
        for x, value in zip(xs, fill):
            if value is not None:
                x[...] = value
    return op, xs, (nq, heads * d)


def test_attention_c_matches_reference_bit_for_bit():
    rng = np.random.default_rng(50)
    op, xs, shape = att_case(rng, 2, 6, 6, 8, causal=True)
    assert op.scratch_bytes == 4 * 6
    np.testing.assert_array_equal(emit.run_op_in_c(op, xs, shape, op.scratch_bytes), kernels.reference(op, xs))
    cases = [
        att_case(rng, 3, 5, 5, 8),
        att_case(rng, 1, 3, 7, 4, causal=True, scale=0.7),        # fewer queries than keys
        att_case(rng, 2, 7, 4, 8, causal=True),                   # more queries than keys
        att_case(rng, 2, 4, 4, 16, scale=0.0),                    # uniform weights
        att_case(rng, 1, 4, 5, 8, scale=1e3),                     # scores saturate dist at 4095
        att_case(rng, 1, 1, 1, 1),
        att_case(rng, 2, 5, 5, 8, fill=(-128, -128, -128)),       # all -128
        att_case(rng, 2, 5, 5, 8, fill=(127, 127, 127)),          # all 127
        att_case(rng, 2, 5, 5, 8, fill=(127, -128, None)),        # constant scores, random v
        att_case(rng, 1, 3, 3, 8, fill=(None, None, -128)),       # constant v
    ]
    big = Attention.build("big", 1, 3, 6, 64, (0.1, 127), (0.1, -128), (0.05, 127), (0.01, 0))
    x_big = [np.full((3, 64), -128, np.int8), np.full((6, 64), 127, np.int8), np.full((6, 64), -128, np.int8)]
    x_big[1][::2] = -128  # raw scores of +-255*255*64
    cases.append((big, x_big, (3, 64)))
    for (op_, xs_, _), got in zip(cases, run_ops_in_c(cases)):
        np.testing.assert_array_equal(got, kernels.reference(op_, xs_))


def float_attention(rng, heads, n_q, n_k, d, temp, causal, scale):
    """Random float q/k/v (temp: larger makes the attention peakier), their int8 quantisation, and
    torch's SDPA on the dequantised values in the (tokens, heads*d) layout."""
    qf = rng.normal(size=(n_q, heads * d)) * temp
    kf = rng.normal(size=(n_k, heads * d)) * temp
    vf = rng.normal(size=(n_k, heads * d))
    qps = [fx.choose_qparams(t.min(), t.max()) for t in (qf, kf, vf)]
    xs = [fx.quantize_real(t, *p) for t, p in zip((qf, kf, vf), qps)]
    split = [torch.tensor(deq(x, p)).reshape(-1, heads, d).transpose(0, 1) for x, p in zip(xs, qps)]
    ref = F.scaled_dot_product_attention(*split, is_causal=causal, scale=scale)
    return xs, qps, ref.transpose(0, 1).reshape(n_q, heads * d).numpy()


@pytest.mark.parametrize("heads,n_q,n_k,d,temp,causal,scale", [
    (2, 16, 16, 16, 1.0, False, None),
    (4, 24, 24, 32, 3.0, False, None),
    (2, 32, 32, 64, 2.0, True, None),
    (2, 12, 20, 16, 1.5, True, None),
    (3, 16, 16, 8, 1.0, False, 0.9),
])
def test_attention_is_faithful_to_float(heads, n_q, n_k, d, temp, causal, scale):
    """Error bound: half an output step (final rounding) + v_s/512 (o has 8 fractional bits of v's
    step) + the weights' error times the spread of v: each e_j = W_j (1 + eps_j) + eta_j with
    |eps_j| <= e^(2^-9) - 1 (dist rounded to 1/256 nat) and |eta_j| <= 1.5 (table roundings, W_max =
    2^16), so the weighted mean moves by at most (2^-9 + 1.6 nk 2^-16) * max|v - o|. The rms error
    must stay at the level of the final rounding alone (1/sqrt(12) = 0.289 steps)."""
    rng = np.random.default_rng(hash((heads, n_q, n_k, d)) % 2**32)
    xs, (qq, kq, vq), ref = float_attention(rng, heads, n_q, n_k, d, temp, causal, scale)
    yq = fx.choose_qparams(ref.min(), ref.max())
    op = Attention.build("att", heads, n_q, n_k, d, qq, kq, vq, yq, scale=scale, causal=causal)
    y = deq(kernels.reference(op, xs), yq)
    v = deq(xs[2], vq)
    spread = v.max() - v.min()
    bound = 0.5 * yq[0] + vq[0] / 512 + (2.0**-9 * 1.01 + 1.6 * n_k / 2**16) * spread
    err = np.abs(y - ref)
    assert err.max() <= bound, (err.max() / yq[0], bound / yq[0])
    assert np.sqrt((err**2).mean()) <= 0.31 * yq[0], np.sqrt((err**2).mean()) / yq[0]


def test_attention_build_rejects_bad_parameters():
    with pytest.raises(LrccError, match="scale"):
        Attention.build("att", 1, 2, 2, 4, (0.1, 0), (0.1, 0), (0.1, 0), (0.1, 0), scale=-1.0)
    with pytest.raises(LrccError, match="shape"):
        Attention.build("att", 1, 0, 2, 4, (0.1, 0), (0.1, 0), (0.1, 0), (0.1, 0))
