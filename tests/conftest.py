"""Shared test fixtures.

Triton kernels run on the GPU where CUDA is present and in Triton's interpreter otherwise; Triton
reads TRITON_INTERPRET once, when it is first imported, so it is set here, before any test module
imports it. Compiled kernels and rendered sources go to a per-run temporary folder.
"""
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_tmp = tempfile.mkdtemp(prefix="lrcc-test-")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_tmp, "triton"))
os.environ.setdefault("LRCC_KERNEL_DIR", os.path.join(_tmp, "kernels"))


@pytest.fixture(scope="module")
def one_thread():
    """Toy-sized ops: one thread is fastest and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def device() -> str:
    """Where kernel tests run: the GPU if present, else the CPU (Triton interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
