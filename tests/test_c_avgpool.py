"""avgpool2d: the C equals the reference bit for bit (extremes included), and the reference is
within half an output step of torch's float average pool."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lrcc.codegen.c import emit, kernels
from lrcc.codegen.c import fixedpoint as fx


@pytest.mark.parametrize("shape, kernel, stride", [((3, 7, 7), 3, 2), ((2, 6, 5), (2, 3), (1, 2)), ((1, 4, 4), 4, None)])
def test_avgpool_matches_reference_and_torch(shape, kernel, stride):
    rng = np.random.default_rng(0)
    xq, yq = (0.03, -20), (0.02, 5)
    op = kernels.get("avgpool2d").build("pool", shape, xq, yq, kernel, stride)
    out_shape = (shape[0], op.attrs["oh"], op.attrs["ow"])
    for x in (rng.integers(-128, 128, shape), np.full(shape, -128), np.full(shape, 127)):
        x = x.astype(np.int8)
        ref = kernels.reference(op, [x])
        assert np.array_equal(ref, emit.run_op_in_c(op, [x], out_shape))
        yf = F.avg_pool2d(torch.from_numpy(fx.dequantize(x, *xq).astype(np.float64))[None], kernel, stride)[0].numpy()
        expect = np.clip(yf / yq[0] + yq[1], -128, 127)
        assert np.abs(ref.astype(np.float64) - expect).max() <= 0.5 + 1e-6
