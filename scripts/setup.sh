#!/usr/bin/env bash
# Install everything lrcc, its examples and its tests need, on a fresh machine.
# torch is pinned to the CPU wheel first so that nothing later pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
# Debian's chromium, for the HTML report's headless-browser test (tests/test_report_html.py).
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup.sh: chromium is missing and installing it needs root (no sudo)" >&2; exit 1; }
    SUDO="sudo"
  fi
  { $SUDO apt-get update && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; } \
    || { echo "setup.sh: installing chromium with apt-get failed" >&2; exit 1; }
  command -v chromium >/dev/null 2>&1 || { echo "setup.sh: chromium is still not on PATH after apt-get" >&2; exit 1; }
fi
