"""Render Triton kernel templates into standalone Python modules and load them.

A template (``lrcc/codegen/templates/triton/<kernel>.py.j2``) renders to a complete module: the
``@triton.jit`` kernel, ``SIGNATURE`` (argument name -> Triton type, for ahead-of-time compiles)
and ``launch(...)``, which takes torch tensors and a config dict (tile sizes, ``num_warps``,
``num_stages``) decided in Python by :mod:`lrcc.codegen.triton.configs`. Templates carry only
structural flags (bias or not, feature map, ...); every number comes from the config.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2

from ...errors import LrccError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates" / "triton"
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
_LOADED: dict[str, ModuleType] = {}


def render(template: str, **flags: Any) -> str:
    """The source of one kernel module: templates/triton/<template>.py.j2 rendered with flags."""
    try:
        return _ENV.get_template(f"{template}.py.j2").render(template=template, **flags)
    except jinja2.TemplateNotFound:
        known = sorted(p.name[:-6] for p in TEMPLATE_DIR.glob("*.py.j2"))
        raise LrccError(f"no Triton template {template!r}; known: {', '.join(known)}") from None
    except jinja2.UndefinedError as e:
        raise LrccError(f"Triton template {template!r}: {e}; pass every flag it uses") from None


def kernel_dir() -> Path:
    """Where rendered kernel modules are written (Triton reads kernel source from files)."""
    root = os.environ.get("LRCC_KERNEL_DIR") or os.path.join(tempfile.gettempdir(), f"lrcc-kernels-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def interpreting() -> bool:
    """Whether this process runs Triton kernels in the interpreter (TRITON_INTERPRET=1, which
    Triton reads once, when it is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def load(source: str) -> ModuleType:
    """Import a rendered kernel module (cached by source). In a process started with
    TRITON_INTERPRET=1 its kernels run in Triton's interpreter on CPU tensors; otherwise they are
    JIT-compiled for the GPU. Ahead-of-time compiles run in a clean subprocess (see aot.py)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    if digest in _LOADED:
        return _LOADED[digest]
    name = f"lrcc_kernel_{digest}"
    path = kernel_dir() / f"{name}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        tmp.replace(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton resolves a kernel's globals through its module
    spec.loader.exec_module(module)
    _LOADED[digest] = module
    return module
