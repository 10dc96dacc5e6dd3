"""Write a compiled model's Triton kernels: each kernel's source and, per arch, its PTX."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from ...errors import LrccError
from . import configs
from .aot import AotJob, compile_many, parse_arch
from .render import render

SMS = {80: 108, 86: 84, 89: 128, 90: 132}  # streaming multiprocessors: A100, A10/A40-class, L40, H100 SXM
TOKENS = {"decode": 1, "prefill": 2048}     # the row counts a saved kernel set is specialised for


def _even_k(cfg: dict[str, Any], k: int) -> dict[str, Any]:
    """cfg with EVEN_K: whether its K steps tile k exactly (the loads then drop their K mask)."""
    return {**cfg, "EVEN_K": k % cfg["BLOCK_K"] == 0}


def launches(call: dict[str, Any], M: int, sms: int) -> list[tuple[str, dict, dict]]:
    """(template, flags, config) of the kernels one site launches for M rows, heuristic configs."""
    s = call["shape"]
    if call["template"] == "lowrank_linear":
        cfg = configs.lowrank_configs(M, s["N"], s["K"], s["R"], sms)[0]
        if cfg["strategy"] == "fused":
            return [("lowrank_linear", {}, _even_k({k: v for k, v in cfg.items() if k != "strategy"}, s["K"]))]
        second = "matmul_persistent" if cfg["second"].get("PERSISTENT") else "matmul"
        return [("matmul", {}, _even_k(cfg["first"], s["K"])), (second, {}, _even_k(cfg["second"], s["R"]))]
    if call["template"] == "quant_matmul":
        cfg = configs.quant_configs(M, s["N"], s["K"], s["BLOCK_K"], sms, s["R"], bits=s["BITS"])[0]
        if cfg["strategy"] == "dequant_matmul":
            out = [("dequantize", {}, {**cfg["dequant"], "BITS": s["BITS"], "BLOCK_K": s["BLOCK_K"]})]
            if s["R"]:
                out.append(("matmul", {}, _even_k(cfg["first"], s["K"])))
            return out + [("matmul", {"lowrank": True} if s["R"] else {}, _even_k({**cfg["matmul"], "W_LAYOUT": "kn"}, s["K"]))]
        full = {**cfg, "BITS": s["BITS"], "BLOCK_K": s["BLOCK_K"]}
        if cfg["strategy"] == "gemv":
            scale_at = configs.gemv_scale_at(s["G"], s["K"], s["BLOCK_K"])
            return [("quant_gemv", call["flags"], _even_k({**full, "SCALE_AT": scale_at}, s["K"]))]
        return [("quant_matmul", call["flags"], full)]
    if call["template"] == "sparse_lowrank_linear":
        cfg = call["config"](M, sms)
        if cfg.get("strategy") == "two_pass":  # t = x V^T first, then the sparse kernel reading it
            return [("matmul", {}, _even_k(cfg["t"], s["K"])),
                    ("sparse_lowrank_linear", call["flags"], cfg["sparse"])]
        return [("sparse_lowrank_linear", call["flags"], {k: v for k, v in cfg.items() if k != "strategy"})]
    raise LrccError(f"no kernel launch plan for template {call['template']!r}")


def write_kernels(module: nn.Module, out: Path, arch: str, dtype: str = "fp16") -> dict[str, Any]:
    """Write kernels/<template>.py sources and kernels/<template>-<config hash>.<arch>.ptx for every
    kernel the model's sites launch (decode and prefill configs), plus kernels/manifest.json (which
    site launches what, and each compiled kernel's shared memory, registers and spills)."""
    cc = parse_arch(arch)
    sms = SMS.get(cc, 108)
    kdir = out / "kernels"
    kdir.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, AotJob] = {}
    sites: dict[str, list[dict[str, Any]]] = {}
    for name, mod in module.named_modules():
        calls = getattr(mod, "kernel_calls", None)
        if calls is None:
            continue
        entries = []
        for call in calls():
            # the JIT specialises on sizes that are multiples of 16; the saved PTX does the same
            aligned = all(call["shape"][d] % 16 == 0 for d in ("N", "K", "R") if call["shape"].get(d))
            for phase, M in TOKENS.items():
                for template, flags, cfg in launches(call, M, sms):
                    stem = template + ("_lowrank" if flags.get("lowrank") else "")
                    source = render(template, **flags)
                    (kdir / f"{stem}.py").write_text(source)
                    key = hashlib.sha256(json.dumps([stem, cfg, aligned], sort_keys=True).encode()).hexdigest()[:10]
                    ptx_name = f"{stem}-{key}.{arch}.ptx"
                    jobs.setdefault(ptx_name, AotJob(template, cfg, arch, dtype, dict(flags), aligned))
                    entries.append({"phase": phase, "rows": M, "source": f"{stem}.py", "ptx": ptx_name, "config": cfg})
        sites[getattr(mod, "site", name)] = entries
    names = sorted(jobs)
    usage = {}
    for ptx_name, res in zip(names, compile_many([jobs[n] for n in names]) if names else []):
        (kdir / ptx_name).write_text(res["ptx"])
        usage[ptx_name] = {"shared_bytes": res["shared"], "regs": res["regs"], "local_bytes": res["local_bytes"],
                           "stack_bytes": res["stack_bytes"]}
    manifest = {"arch": arch, "dtype": dtype, "sms_assumed": sms, "sites": sites, "resources": usage}
    (kdir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest
