"""The dense int8 C kernels (conv2d, maxpool2d, mean, add, relu, requant, permute).

For each kind: (1) the C (strict C99 under ASan + UBSan) equals the numpy reference bit for bit,
on random int8 inputs and on the int8 extremes (-128 and 127 everywhere, and mixed), with zero
points at both ends of the range; (2) the reference is a faithful quantisation of the float op:
its dequantised output is compared with torch's float op on the same (dequantised) input.

Tolerances of (2). The integer pipeline computes exactly the real value of its operands up to one
final rounding (round half up: at most half an output step, 0.5 * y_scale) and the fixed-point
multiplier's relative error (mult >= 2**30 rounded to an integer: under 2**-31, below float noise).
Clamping to the output range and max pooling are monotone and 1-Lipschitz, so they keep that
bound. Hence:
- ops without weights (maxpool2d, relu, permute) are exact: dequantisation is monotone, so the max
  of dequantised values is the dequantised max;
- mean, add, requant: within 0.5 * y_scale (plus 1e-6 steps of float noise);
- conv2d against torch with the *dequantised* weights and bias (w_q * w_scale, bias_q * x_scale *
  w_scale): within 0.5 * y_scale as well. Against the original float weights, the weights'
  rounding adds at most sum_taps |x| * w_scale / 2 and the bias's at most x_scale * w_scale / 2
  per output; that bound is computed per output and asserted, and on these shapes it stays
  within a few output steps (asserted: 3).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lrcc.codegen.c import emit, kernels
from lrcc.codegen.c import fixedpoint as fx
from lrcc.codegen.c.hostcc import build_and_run
from lrcc.codegen.c.kernels_dense import Add, Conv2d, MaxPool2d, Mean, Permute, Relu, Requant, permute_loops
from lrcc.errors import LrccError

EPS_STEPS = 1e-6  # float noise, in output steps


# --- helpers ---------------------------------------------------------------------------------------
def extreme_inputs(shape, rng) -> list[np.ndarray]:
    """Random int8, all -128, all 127, a random mix of -128/127, and random with extremes sprinkled in."""
    rand = rng.integers(-128, 128, size=shape).astype(np.int8)
    mixed = rng.choice(np.array([-128, 127], dtype=np.int8), size=shape)
    sprinkled = rand.copy()
    flat = sprinkled.reshape(-1)
    flat[rng.random(flat.size) < 0.3] = -128
    flat[rng.random(flat.size) < 0.3] = 127
    return [rand, np.full(shape, -128, np.int8), np.full(shape, 127, np.int8), mixed, sprinkled]


def run_cases_in_c(cases: list[tuple], inplace: int | None = None) -> list[np.ndarray]:
    """One C program running every (op, inputs) case; each case's output, flat. With inplace=j the
    output is written over a mutable copy of input j (the memory planner's in-place kinds)."""
    ops = [op for op, _ in cases]
    lines = ["#include <stdio.h>", "#include <stdint.h>", "#include <string.h>", emit.library(ops)]
    body = []
    sizes = []
    for i, (op, xs) in enumerate(cases):
        p = f"c{i}_"
        for key, arr in emit.array_attrs(op).items():
            lines.append(emit.const_array(p + key, arr))
        ins = []
        for j, x in enumerate(xs):
            lines.append(emit.const_array(f"{p}in{j}", np.asarray(x, dtype=np.int8)))
            ins.append(f"{p}in{j}")
        size = kernels.reference(op, xs).size
        sizes.append(size)
        out = f"{p}out"
        if inplace is None:
            lines.append(f"static int8_t {out}[{max(size, 1)}];")
        else:
            lines.append(f"static int8_t {out}[{xs[inplace].size}];")
            body.append(f"    memcpy({out}, {ins[inplace]}, sizeof {out});")
            ins[inplace] = out
        call = kernels.get(op.kind).call(op, ins, out, "NULL", lambda key, p=p: p + key)
        body.append(f"    if ({call} != 0) {{\n        return 1;\n    }}\n"
                    f"    for (i = 0; i < {size}; ++i) {{\n        printf(\"%d \", (int){out}[i]);\n    }}\n"
                    "    printf(\"\\n\");")
    lines.append("int main(void)\n{\n    int32_t i;\n" + "\n".join(body) + "\n    return 0;\n}\n")
    text = build_and_run({"main.c": "\n".join(lines)}).decode()
    rows = text.split("\n")[:len(cases)]
    outs = [np.array([int(v) for v in row.split()], dtype=np.int64) for row in rows]
    assert [o.size for o in outs] == sizes
    return outs


def assert_c_matches(cases: list[tuple], inplace: int | None = None) -> None:
    outs = run_cases_in_c(cases, inplace)
    for (op, xs), got in zip(cases, outs):
        want = kernels.reference(op, xs)
        assert want.dtype == np.int8
        np.testing.assert_array_equal(got, want.reshape(-1).astype(np.int64), err_msg=f"{op.kind} {op.name}")


def dq(q, qp) -> torch.Tensor:
    return torch.from_numpy(fx.dequantize(q, *qp).astype(np.float64))


def quantized_input(shape, rng, lo=-2.0, hi=3.0):
    """A float input drawn in [lo, hi], its (scale, zp), its int8 values and their dequantised floats."""
    x = rng.uniform(lo, hi, size=shape)
    q = fx.choose_qparams(x.min(), x.max())
    xq = fx.quantize_real(x, *q)
    return q, xq, dq(xq, q)


def clamp_real(t: torch.Tensor, qp, lo: int = -128, hi: int = 127) -> torch.Tensor:
    s, z = qp
    return t.clamp(s * (lo - z), s * (hi - z))


def assert_within(got: torch.Tensor, want: torch.Tensor, tol) -> None:
    err = (got - want).abs()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(err)
    assert bool((err <= tol).all()), f"max error {float(err.max()):.6g}, worst excess {float((err - tol).max()):.3g}"


# --- conv2d ----------------------------------------------------------------------------------------
# (C, H, W), M, (KH, KW), stride, pad [top, left, bottom, right], groups, relu, pool
CONV_CASES = [
    ((3, 7, 9), 4, (3, 3), (1, 1), (1, 1, 1, 1), 1, False, 0),
    ((4, 9, 7), 6, (3, 2), (2, 1), (0, 2, 1, 0), 2, True, 0),       # grouped, asymmetric pad, ragged stride
    ((5, 8, 11), 5, (3, 3), (1, 1), (1, 1, 1, 1), 5, True, 2),       # depthwise + relu + pool, odd width
    ((2, 11, 9), 3, (5, 5), (2, 3), (2, 2, 2, 2), 1, False, 2),     # pool of an odd conv output
    ((1, 6, 6), 2, (1, 1), (1, 1), (0, 0, 0, 0), 1, True, 0),        # 1x1
    ((3, 5, 5), 4, (3, 3), (1, 1), (3, 0, 0, 3), 1, False, 0),       # rows and columns wholly in the padding
]


def conv_float(x: torch.Tensor, w, b, stride, pad, groups) -> torch.Tensor:
    top, left, bottom, right = pad
    xp = F.pad(x[None], (left, right, top, bottom))
    bias = None if b is None else torch.as_tensor(b, dtype=torch.float64)
    return F.conv2d(xp, torch.as_tensor(w, dtype=torch.float64), bias, stride=stride, groups=groups)[0]


def relu_pool(y: torch.Tensor, relu: bool, pool: int) -> torch.Tensor:
    if relu:
        y = y.clamp_min(0)
    if pool:
        y = F.max_pool2d(y[None], 2)[0]
    return y


def make_conv(case, rng, x_q=None, y_shrink=1.0, name="conv"):
    shape, m, (kh, kw), stride, pad, groups, relu, pool = case
    w = rng.normal(size=(m, shape[0] // groups, kh, kw))
    b = rng.normal(size=m) * 0.5
    q, xq, xd = quantized_input(shape, rng)
    x_q = x_q or q
    yf = relu_pool(conv_float(dq(xq, x_q), w, b, stride, pad, groups), relu, 0)
    s, z = fx.choose_qparams(float(yf.min()), float(yf.max()))
    y_q = (s * y_shrink, z)
    op = Conv2d.build(name, w, b, shape, x_q, y_q, stride=stride, pad=pad, groups=groups, relu=relu, pool=pool)
    return op, w, b, x_q, y_q, xq


def test_conv2d_c_matches_reference_bit_for_bit():
    rng = np.random.default_rng(1)
    cases = []
    for i, case in enumerate(CONV_CASES):
        for x_q in (None, (0.02, -128), (0.03, 127)):
            op, *_ = make_conv(case, rng, x_q=x_q, y_shrink=0.6, name=f"conv{i}")
            cases += [(op, [x]) for x in extreme_inputs(case[0], rng)]
    # a bias far outside the accumulator's range: the build clips it, and UBSan sees no overflow
    big = rng.normal(size=(6, 3, 3, 3))
    op = Conv2d.build("bigbias", big, np.array([1e7, -1e7, 3e6, -5e2, 0.0, 7e6]), (3, 6, 6), (1e-3, 127),
                      (40.0, 0), pad=1)
    room = 2**31 - 1 - 27 * 255 * np.abs(op.attrs["weight"].astype(np.int64)).reshape(6, -1).max(axis=1)
    assert (np.abs(op.attrs["bias"].astype(np.int64)) == room)[[0, 1, 2, 5]].all()
    cases += [(op, [x]) for x in extreme_inputs((3, 6, 6), rng)]
    assert_c_matches(cases)


def test_conv2d_reference_is_the_quantised_float_conv():
    rng = np.random.default_rng(2)
    for case in CONV_CASES:
        shape, m, (kh, kw), stride, pad, groups, relu, pool = case
        op, w, b, x_q, y_q, xq = make_conv(case, rng)
        (xs, xz), (ys, yz) = x_q, y_q
        xd = dq(xq, x_q)
        y = kernels.reference(op, [xq])
        assert y.shape == Conv2d.out_shape(op) == tuple(relu_pool(conv_float(xd, w, b, stride, pad, groups),
                                                                  relu, pool).shape)
        got = dq(y, y_q)
        lo = yz if relu else -128
        w_scale = np.abs(w).reshape(m, -1).max(axis=1) / 127.0
        # (a) the integers are exact up to the final rounding: torch with the dequantised parameters
        wd = op.attrs["weight"] * w_scale[:, None, None, None]
        bd = op.attrs["bias"] * xs * w_scale
        exact = relu_pool(clamp_real(conv_float(xd, wd, bd, stride, pad, groups), y_q, lo), relu, pool)
        assert_within(got, exact, ys * (0.5 + EPS_STEPS))
        # (b) the original float conv: plus the weights' and bias's rounding, bounded per output
        flt = relu_pool(clamp_real(conv_float(xd, w, b, stride, pad, groups), y_q, lo), relu, pool)
        ones = np.ones((m, shape[0] // groups, kh, kw)) * (w_scale / 2)[:, None, None, None]
        wbound = conv_float(xd.abs(), ones, xs * w_scale / 2, stride, pad, groups)
        if pool:  # the pooled value's error is at most the largest error among its window
            wbound = F.max_pool2d(wbound[None], 2)[0]
        assert_within(got, flt, ys * (0.5 + EPS_STEPS) + wbound)
        assert_within(got, flt, 3 * ys)


def test_conv2d_build_checks():
    w = np.ones((4, 2, 3, 3))
    with pytest.raises(LrccError, match="groups"):
        Conv2d.build("bad", w, None, (3, 8, 8), (0.1, 0), (0.1, 0), groups=2)
    with pytest.raises(LrccError, match="empty"):
        Conv2d.build("small", np.ones((4, 3, 3, 3)), None, (3, 3, 3), (0.1, 0), (0.1, 0), pool=2)
    with pytest.raises(LrccError, match="overflow"):
        Conv2d.build("huge", np.ones((1, 2048, 6, 6)), None, (2048, 6, 6), (0.1, -128), (0.1, 0))
    op = Conv2d.build("zero", np.zeros((2, 3, 1, 1)), None, (3, 2, 2), (0.1, 0), (0.1, 0))
    assert (op.attrs["weight"] == 0).all() and (op.attrs["mult"] > 0).all()


# --- maxpool2d -------------------------------------------------------------------------------------
# (C, H, W), kernel, stride, padding (symmetric, torch's rule: at most half the kernel)
POOL_CASES = [((3, 8, 8), 2, 2, 0), ((2, 7, 9), 2, 2, 0), ((2, 9, 7), 3, 2, 1), ((1, 5, 8), (3, 2), (1, 2), (1, 1)),
              ((2, 6, 6), 3, 3, 0), ((3, 5, 5), 5, 1, 2)]


def test_maxpool2d_c_matches_reference_and_torch():
    rng = np.random.default_rng(3)
    cases = []
    for i, (shape, k, s, p) in enumerate(POOL_CASES):
        x_q, xq, xd = quantized_input(shape, rng)
        ph, pw = (p, p) if isinstance(p, int) else p
        op = MaxPool2d.build(f"pool{i}", shape, x_q, k, s, (ph, pw, ph, pw))
        y = kernels.reference(op, [xq])
        want = F.max_pool2d(xd[None].float(), k, s, p)[0]
        assert tuple(y.shape) == tuple(want.shape)
        assert torch.equal(torch.from_numpy(fx.dequantize(y, *x_q)), want)  # exact (see the module docstring)
        cases += [(op, [x]) for x in extreme_inputs(shape, rng) + [xq]]
    assert_c_matches(cases)


# --- mean ------------------------------------------------------------------------------------------
MEAN_CASES = [(3, 7, 5), (4, 25, 1), (1, 9, 6), (2, 1, 3), (5, 64, 1)]


def test_mean_c_matches_reference_bit_for_bit():
    rng = np.random.default_rng(4)
    cases = []
    for i, view in enumerate(MEAN_CASES):
        for x_q, y_q in (((0.05, 3), (0.02, -7)), ((0.1, -128), (0.3, 127)), ((0.02, 127), (0.01, -128))):
            op = Mean.build(f"mean{i}", *view, x_q, y_q)
            cases += [(op, [x]) for x in extreme_inputs(view, rng)]
    assert_c_matches(cases)


def test_mean_reference_is_the_quantised_float_mean():
    rng = np.random.default_rng(5)
    for outer, count, inner in MEAN_CASES:
        x_q, xq, xd = quantized_input((outer, count, inner), rng)
        want = xd.mean(dim=1)
        y_q = fx.choose_qparams(float(want.min()), float(want.max()))
        op = Mean.build("mean", outer, count, inner, x_q, y_q)
        got = dq(kernels.reference(op, [xq]), y_q)
        assert_within(got, clamp_real(want, y_q), y_q[0] * (0.5 + EPS_STEPS))


# --- add -------------------------------------------------------------------------------------------
ADD_QPARAMS = [((0.05, 3), (0.02, -10), (0.06, 0)), ((0.1, -128), (0.1, 127), (0.2, 5)),
               ((0.5, 127), (0.01, -128), (0.3, -128)), ((0.02, 0), (0.5, 60), (1.0, 0))]


def test_add_c_matches_reference_bit_for_bit():
    rng = np.random.default_rng(6)
    cases = []
    for i, (a_q, b_q, y_q) in enumerate(ADD_QPARAMS):
        for relu in (False, True):
            op = Add.build(f"add{i}", 37, a_q, b_q, y_q, relu=relu)
            xs = extreme_inputs((37,), rng)
            cases += [(op, [a, b]) for a in xs for b in (xs[0], xs[1], xs[2])]
    assert_c_matches(cases)
    # the output may take over either input's storage
    assert_c_matches(cases[:10], inplace=0)
    assert_c_matches(cases[:10], inplace=1)


def test_add_reference_is_the_quantised_float_add():
    rng = np.random.default_rng(7)
    for relu in (False, True):
        for scale_b in (1.0, 0.05, 20.0):
            a_q, aq, ad = quantized_input((3, 41), rng)
            b_q, bq, bd = quantized_input((3, 41), rng, -scale_b, 2 * scale_b)
            want = ad + bd
            if relu:
                want = want.clamp_min(0)
            y_q = fx.choose_qparams(float(want.min()), float(want.max()))
            op = Add.build("add", want.numel(), a_q, b_q, y_q, relu=relu)
            got = dq(kernels.reference(op, [aq, bq]), y_q)
            assert got.shape == want.shape
            assert_within(got, clamp_real(want, y_q, y_q[1] if relu else -128), y_q[0] * (0.5 + EPS_STEPS))


# --- relu and requant -------------------------------------------------------------------------------
def test_relu_and_requant_c_match_reference_bit_for_bit():
    rng = np.random.default_rng(8)
    cases = []
    for zp in (-128, -5, 0, 77, 127):
        cases += [(Relu.build(f"relu{zp}", 29, (0.1, zp)), [x]) for x in extreme_inputs((29,), rng)]
    for x_q, y_q, relu in (((0.1, 0), (0.05, 3), False), ((0.02, -128), (0.5, 127), True),
                           ((0.3, 127), (0.001, -128), False), ((0.07, 9), (0.07, 9), True)):
        op = Requant.build("rq", 29, x_q, y_q, relu=relu)
        cases += [(op, [x]) for x in extreme_inputs((29,), rng)]
    assert_c_matches(cases)
    assert_c_matches(cases, inplace=0)


def test_relu_and_requant_references_are_the_float_ops():
    rng = np.random.default_rng(9)
    x_q, xq, xd = quantized_input((4, 33), rng)
    op = Relu.build("relu", xq.size, x_q)
    assert torch.equal(dq(kernels.reference(op, [xq]), x_q), F.relu(xd))  # exact
    for s in (0.3, 1.0, 2.7):
        for relu in (False, True):
            y_q = fx.choose_qparams(0.0 if relu else float(xd.min()) * s, float(xd.max()) * s)
            op = Requant.build("rq", xq.size, x_q, y_q, relu=relu)
            got = dq(kernels.reference(op, [xq]), y_q)
            want = F.relu(xd) if relu else xd
            assert_within(got, clamp_real(want, y_q), y_q[0] * (0.5 + EPS_STEPS))


# --- permute ---------------------------------------------------------------------------------------
PERMUTES = [((5, 7), (1, 0)), ((3, 4, 5), (1, 0, 2)), ((3, 4, 5), (2, 0, 1)), ((2, 3, 4, 5), (3, 1, 0, 2)),
            ((2, 1, 3, 5), (2, 3, 1, 0)), ((2, 3, 4, 5, 6), (0, 1, 4, 2, 3)), ((7,), (0,)),
            ((2, 3, 2, 3, 2, 3), (4, 5, 0, 1, 2, 3))]


def test_permute_c_matches_reference_and_torch():
    rng = np.random.default_rng(10)
    cases = []
    for i, (shape, perm) in enumerate(PERMUTES):
        op = Permute.build(f"perm{i}", shape, perm)
        xq = rng.integers(-128, 128, size=shape).astype(np.int8)
        y = kernels.reference(op, [xq])
        want = torch.from_numpy(xq).permute(perm).contiguous()
        assert torch.equal(torch.from_numpy(y), want)  # exact: a copy
        cases += [(op, [xq]), (op, [extreme_inputs(shape, rng)[3]])]
    assert_c_matches(cases)


def test_permute_loops_merge_and_limit():
    assert permute_loops((2, 3, 4, 5, 6), (0, 1, 4, 2, 3)) == [(6, 120), (6, 1), (20, 6)]
    assert permute_loops((2, 1, 3), (1, 2, 0)) == [(3, 1), (2, 3)]
    assert permute_loops((2, 3), (0, 1)) == [(6, 1)]
    with pytest.raises(LrccError, match="more than 4"):
        Permute.build("p5", (2, 3, 2, 3, 2), (4, 3, 2, 1, 0))
    with pytest.raises(LrccError, match="not a permutation"):
        Permute.build("bad", (2, 3), (0, 0))


# --- the one-op programs of emit.py ------------------------------------------------------------------
def test_run_op_in_c_one_op_per_kind():
    """emit.run_op_in_c (the path other tests use) on one op of each kind, extremes included."""
    rng = np.random.default_rng(11)
    conv, *_ = make_conv(CONV_CASES[2], rng, x_q=(0.04, 127))
    ops = [
        (conv, [extreme_inputs((5, 8, 11), rng)[3]]),
        (MaxPool2d.build("pool", (2, 7, 9), (0.1, 0), 3, 2, 1), [extreme_inputs((2, 7, 9), rng)[4]]),
        (Mean.build("mean", 2, 9, 3, (0.1, -128), (0.05, 127)), [np.full((2, 9, 3), 127, np.int8)]),
        (Add.build("add", 16, (0.1, 127), (0.2, -128), (0.3, 0), relu=True),
         [np.full(16, -128, np.int8), np.full(16, 127, np.int8)]),
        (Relu.build("relu", 16, (0.1, 11)), [extreme_inputs((16,), rng)[4]]),
        (Requant.build("rq", 16, (0.3, 127), (0.01, -128)), [extreme_inputs((16,), rng)[3]]),
        (Permute.build("perm", (3, 4, 5), (2, 1, 0)), [extreme_inputs((3, 4, 5), rng)[0]]),
    ]
    for op, xs in ops:
        want = kernels.reference(op, xs)
        got = emit.run_op_in_c(op, xs, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=op.kind)
    assert sorted(op.kind for op, _ in ops) == sorted(["conv2d", "maxpool2d", "mean", "add", "relu", "requant",
                                                        "permute"])
