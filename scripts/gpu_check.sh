#!/usr/bin/env bash
# On a machine with a CUDA GPU: the kernel tests on the GPU, then the rows the targets are judged on, then
# the whole kernel benchmark, which rewrites the GPU section of docs/benchmarks.md. Logs go to $OUT
# when it is set (else ./gpu-out).
# The default time limits (170 + 240 + 170 s) fit one 10-minute command. The targets step gets the
# most: autotuning compiles each kernel variant once there (the full run reuses them from the cache).
# The full benchmark prints its rows as it goes (bench.log) and, cut short, leaves the docs as they were.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/lrcc-triton-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q $XDIST -p no:cacheprovider tests/test_triton_kernels.py \
  tests/test_gpu_target.py tests/test_triton_attention.py tests/test_triton_sparse.py 2>&1 | tee "$OUT/pytest.log" | tail -25
# the rows the targets are judged on first (a few minutes), so a short session has them; then everything
timeout "${TARGETS_TIMEOUT:-240}" python3 benchmarks/gpu_kernels.py --targets --no-write --out "$OUT/targets.md" 2>&1 \
  | tee "$OUT/targets.log" | tail -25
timeout "${BENCH_TIMEOUT:-170}" python3 benchmarks/gpu_kernels.py --out "$OUT/gpu_section.md" "$@" 2>&1 | tee "$OUT/bench.log"
cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null || true
