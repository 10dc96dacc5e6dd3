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
# Debian packages, collected and installed with one apt-get call:
# - chromium, for the HTML report's headless-browser test (tests/test_report_html.py);
# - the host gcc, which builds and checks the generated C (lrcc/codegen/c/hostcc.py);
# - the Cortex-M cross compiler with newlib and QEMU, which build the generated C for microcontrollers
#   and run it (lrcc/codegen/c/toolchain.py, tests/test_c_toolchain.py).
have() { command -v "$1" >/dev/null 2>&1; }
have_newlib() { have arm-none-eabi-gcc && [ -f "$(arm-none-eabi-gcc -print-file-name=nano.specs)" ]; }
APT_PACKAGES=()
have chromium || APT_PACKAGES+=(chromium)
have gcc || APT_PACKAGES+=(gcc)
have arm-none-eabi-gcc || APT_PACKAGES+=(gcc-arm-none-eabi)
have_newlib || APT_PACKAGES+=(libnewlib-arm-none-eabi)
have qemu-system-arm || APT_PACKAGES+=(qemu-system-arm)
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    have sudo || { echo "setup.sh: ${APT_PACKAGES[*]} missing and installing needs root (no sudo)" >&2; exit 1; }
    SUDO="sudo"
  fi
  { $SUDO apt-get update \
      && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"; } \
    || { echo "setup.sh: installing ${APT_PACKAGES[*]} with apt-get failed" >&2; exit 1; }
  for tool in chromium gcc arm-none-eabi-gcc qemu-system-arm; do
    have "$tool" || { echo "setup.sh: $tool is still not on PATH after apt-get" >&2; exit 1; }
  done
  have_newlib || { echo "setup.sh: newlib for arm-none-eabi (nano.specs) is still missing after apt-get" >&2; exit 1; }
fi
