"""The linear kernel's three weight layouts (int8, signed int4, unsigned int4 with a zero point per
row) in C equal the reference bit for bit on random and extreme inputs, and the reference is a
faithful quantisation of the float layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lrcc.codegen.c import emit, kernels
from lrcc.codegen.c import fixedpoint as fx


def _inputs(rng, rows, n):
    return [rng.integers(-128, 128, (rows, n)), np.full((rows, n), -128), np.full((rows, n), 127),
            rng.choice([-128, 127], (rows, n))]


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_linear_matches_reference_and_float(bits):
    rng = np.random.default_rng(bits)
    torch.manual_seed(bits)
    lin = torch.nn.Linear(37, 11)
    x = torch.randn(5, 37)
    y = lin(x).detach()
    xq, yq = fx.choose_qparams(x.min(), x.max()), fx.choose_qparams(y.min(), y.max())
    op = kernels.Linear.build("fc", lin.weight.detach().numpy(), lin.bias.detach().numpy(), 5, xq, yq, bits=bits)
    for xi in _inputs(rng, 5, 37):
        xi = xi.astype(np.int8)
        assert np.array_equal(kernels.reference(op, [xi]), emit.run_op_in_c(op, [xi], (5, 11)))
    got = fx.dequantize(kernels.reference(op, [fx.quantize_real(x.numpy(), *xq)]), *yq)
    # int8: a couple of output steps; int4 weights round each weight to 1/15 of the row's range
    tol = 3 * yq[0] if bits == 8 else 0.25 * float(y.abs().max())
    assert np.abs(got - y.numpy()).max() <= tol


def test_unsigned_int4_with_zero_points_matches_reference_and_its_weight():
    rng = np.random.default_rng(0)
    rows, n, m = 3, 37, 11
    codes = rng.integers(0, 16, (m, n))
    zero = rng.integers(0, 16, m).astype(float)
    scale = rng.uniform(0.01, 0.05, m)
    bias = rng.normal(size=m)
    xq, yq = (0.02, -3), (0.05, 4)
    op = kernels.Linear.build_u4z("fc", codes, zero, scale, bias, rows, xq, yq)
    assert np.array_equal(kernels.Linear.weight(op), codes - zero[:, None])
    for xi in _inputs(rng, rows, n):
        xi = xi.astype(np.int8)
        ref = kernels.reference(op, [xi])
        assert np.array_equal(ref, emit.run_op_in_c(op, [xi], (rows, m)))
        yf = fx.dequantize(xi, *xq).astype(np.float64) @ ((codes - zero[:, None]) * scale[:, None]).T + bias
        expect = fx.quantize_real(yf, *yq)
        assert np.abs(ref.astype(int) - expect.astype(int)).max() <= 1


def test_bad_int4_codes_are_refused():
    with pytest.raises(kernels.LrccError, match="codes out of range"):
        kernels.Linear.build_u4z("fc", np.full((2, 4), 16), np.zeros(2), np.ones(2), None, 1, (1.0, 0), (1.0, 0))
    with pytest.raises(kernels.LrccError, match="zero points"):
        kernels.Linear.build_u4z("fc", np.zeros((2, 4)), np.full(2, 0.5), np.ones(2), None, 1, (1.0, 0), (1.0, 0))
