"""Compile three small digits models to int8 C for an STM32F746 and check them on the emulated chip.

Trains an MLP, a CNN and a tiny ViT on scikit-learn's digits (seconds to a minute each, offline),
compiles each with ``lrcc.compile(..., target="stm32f746")``, writes ``lrcc_model.c/.h`` under
``out/mcu/<model>/``, builds that C for the host (AddressSanitizer + UBSan) and for the Cortex-M7
(arm-none-eabi-gcc, the part's real 1 MB flash / 320 KB SRAM in the linker script), runs it under
QEMU (mps2-an500), and checks both builds print exactly the int8 outputs of ``cm`` (the reference
executor). Prints held-out accuracy (float vs int8 C), arena, stack and flash.

    python3 examples/mcu_digits.py [--models mlp,cnn,vit] [--out out/mcu]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lrcc
from lrcc.codegen.c.verify import check_c, require_equal
from lrcc.zoo import digits


def run(name: str, out: Path, n_check: int = 32, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    model, data, float_acc = digits.trained(name, seed=seed)
    t_train = time.perf_counter() - t0
    calib = [(data.x_train[i:i + 64],) for i in range(0, len(data.y_train), 64)]
    t1 = time.perf_counter()
    cm = lrcc.compile(model, (data.x_train[:1],), target="stm32f746", calibration=calib)
    t_compile = time.perf_counter() - t1
    with torch.no_grad():
        y_int8 = cm(data.x_test)
        y_float = model(data.x_test)
    int8_acc = float((y_int8.argmax(-1) == data.y_test).float().mean())
    agree = float((y_int8.argmax(-1) == y_float.argmax(-1)).float().mean())
    cm.save(out / name)
    q = cm.module.quantize_input(data.x_test[:n_check])
    chk = check_c(cm.program, q, board="stm32f746", workdir=out / name / "build")
    require_equal(chk, f"{name}")
    return {"model": name, "float_acc": float_acc, "int8_acc": int8_acc, "agree": agree,
            "arena": chk.arena_bytes, "stack": chk.stack_used, "const": chk.const_bytes, "text": chk.text,
            "model_text": chk.model_text, "host_equal": chk.host_equal, "qemu_equal": chk.qemu_equal,
            "train_s": t_train, "compile_s": t_compile, "report": cm.report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,vit")
    ap.add_argument("--out", default="out/mcu")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    rows = [run(m, out) for m in args.models.split(",")]
    print(f"\n{'model':5} {'float acc':>9} {'int8 C acc':>10} {'agree':>6} {'arena B':>8} {'stack B':>8} "
          f"{'consts B':>9} {'flash B':>8} {'host=ref':>8} {'qemu=ref':>8}")
    for r in rows:
        print(f"{r['model']:5} {r['float_acc']:9.4f} {r['int8_acc']:10.4f} {r['agree']:6.3f} {r['arena']:8,} "
              f"{r['stack']:8,} {r['const']:9,} {r['text']:8,} {str(r['host_equal']):>8} {str(r['qemu_equal']):>8}")
    print(f"\nC sources, arena maps and reports under {out}/<model>/ "
          "(flash B = the whole Cortex-M7 image's text: model, harness and C library)")
    if not all(r["host_equal"] and r["qemu_equal"] for r in rows):
        raise SystemExit("a C build differs from the reference executor")


if __name__ == "__main__":
    main()
