"""MiniLM through ONNX and back: export the model to ONNX, compile the ONNX file with `lrcc compile`
at a parameter budget, write the compressed model as ONNX, and run it in onnxruntime.

Reports: max |onnxruntime - cm| on held-out batches (the target is 1e-4, fp32), the embedding
cosine against the original model, and the ONNX files' sizes (original vs compressed; the
token-embedding table, which is not a linear layer, is in both). Writes the "onnx-roundtrip"
section of docs/benchmarks.md.

    python benchmarks/onnx_roundtrip.py [--budget params=0.5] [--no-write]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs_sections import write_section  # noqa: E402

import lrcc  # noqa: E402
from lrcc.planner.calibrate import output_error  # noqa: E402
from lrcc.zoo import corpus, minilm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="params=0.5")
    ap.add_argument("--calibration", type=int, default=640, help="calibration sentences")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort
    torch.set_num_threads(2)
    model = minilm.load_encoder("plain").eval()
    cal, ev = corpus.splits(args.calibration, 256)
    cal_b, ev_b = minilm.encode_batches(cal, 64), minilm.encode_batches(ev, 64)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "minilm.onnx"
        torch.onnx.export(model, cal_b[0], str(src), input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], dynamic_axes={"input_ids": {0: "B", 1: "L"},
                                                                    "attention_mask": {0: "B", 1: "L"}},
                          dynamo=False)
        torch.save(cal_b, tmp / "cal.pt")
        out = tmp / "out"
        cmd = [sys.executable, "-m", "lrcc.cli", "compile", str(src), "--calibration", str(tmp / "cal.pt"),
               "--budget", args.budget, "--format", "onnx", "-o", str(out), "--quiet", "--no-html"]
        subprocess.run(cmd, check=True)
        cm = lrcc.load(out)
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        diff = 0.0
        with torch.no_grad():
            for ids, mask in ev_b:
                y_ort = sess.run(None, dict(zip(names, (ids.numpy(), mask.numpy()))))[0]
                diff = max(diff, float(np.abs(y_ort - cm(ids, mask).numpy()).max()))
        q = output_error(model, cm, ev_b)
        size_src, size_out = src.stat().st_size, (out / "model.onnx").stat().st_size
        t = cm.report.totals
    rows = [
        "| budget | linear params kept | max abs(onnxruntime - cm) | cosine mean (p5) vs original | original ONNX | compressed ONNX | ratio |",
        "|---|---|---|---|---|---|---|",
        f"| {args.budget} | {t['params_after'] / t['params_before']:.3f} | {diff:.1e} | {q['cosine_mean']:.4f} "
        f"({q['cosine_p5']:.4f}) | {size_src / 1e6:.1f} MB | {size_out / 1e6:.1f} MB | {size_out / size_src:.3f} |",
    ]
    print("\n".join(rows))
    body = (f"`python benchmarks/onnx_roundtrip.py`: all-MiniLM-L6-v2 exported with torch.onnx (legacy exporter), "
            f"compiled from the ONNX file by `lrcc compile --format onnx` with {args.calibration} calibration "
            "sentences, the written model.onnx run in onnxruntime (CPU) on 256 held-out sentences. Both files "
            "hold the 11.7 M-parameter token-embedding table, which is not a linear layer.\n\n" + "\n".join(rows) + "\n")
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", "onnx-roundtrip", body)


if __name__ == "__main__":
    main()
