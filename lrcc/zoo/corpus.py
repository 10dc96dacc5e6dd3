"""An offline English corpus built from Python standard-library docstrings.

The sentence list depends only on the running Python's standard library and the seed.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import warnings
from collections.abc import Iterator

from lrcc.errors import LrccError

__all__ = ["MODULES", "sentences", "splits"]

MODULES: tuple[str, ...] = tuple(sorted({
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath",
    "codecs", "collections", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email", "enum", "filecmp", "fnmatch", "fractions",
    "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "http.client",
    "inspect", "io", "itertools", "json", "locale", "logging", "lzma", "math", "mimetypes",
    "numbers", "operator", "os", "pathlib", "pickle", "platform", "pprint", "pydoc", "queue",
    "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib",
    "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref",
    "xml.etree.ElementTree", "zipfile", "zlib",
}))

MIN_WORDS = 6
MAX_WORDS = 60

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_CODE_MARKERS = (">>>", "...", "==", "->", "--", "::", "{", "}", "\\", "`", "$", "|", "@", "#")
_SYMBOLS = set("=()[]{}<>*/_%&^~+")


def _public(obj: object) -> Iterator[object]:
    """Public attributes of ``obj`` in sorted name order (errors are skipped)."""
    for name in sorted(dir(obj)):
        if name.startswith("_"):
            continue
        try:
            yield getattr(obj, name)
        except Exception:  # noqa: BLE001 - some attributes raise on access
            continue


def _docstrings() -> Iterator[str]:
    """Docstrings of the listed modules and their public classes, functions and methods."""
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - skip modules missing from this build
            continue
        yield module.__doc__ or ""
        for obj in _public(module):
            if inspect.ismodule(obj):
                continue
            if inspect.isclass(obj):
                yield obj.__doc__ or ""
                for member in _public(obj):
                    if callable(member) and not inspect.isclass(member):
                        yield getattr(member, "__doc__", None) or ""
            elif callable(obj):
                yield getattr(obj, "__doc__", None) or ""


def _is_prose(sentence: str) -> bool:
    """True for natural-language sentences, False for code-like or odd fragments."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if any(marker in sentence for marker in _CODE_MARKERS):
        return False
    if sum(ch in _SYMBOLS for ch in sentence) > 2:
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in sentence)
    return letters / len(sentence) >= 0.9


def _split(doc: str) -> Iterator[str]:
    """Sentences of one docstring: paragraphs joined, whitespace collapsed, split on ``. ``."""
    if not isinstance(doc, str):
        return
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        if any(line.lstrip().startswith((">>>", "...")) for line in lines):
            continue
        text = " ".join(" ".join(lines).split())
        for sentence in _SENTENCE_END.split(text):
            sentence = sentence.strip()
            if sentence and _is_prose(sentence):
                yield sentence


@functools.lru_cache(maxsize=1)
def _unique() -> tuple[str, ...]:
    """Deduplicated, sorted sentences (computed once per process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases warn on attribute access
        return tuple(sorted({s for doc in _docstrings() for s in _split(doc)}))


@functools.lru_cache(maxsize=8)
def _sentences(seed: int) -> tuple[str, ...]:
    shuffled = list(_unique())
    random.Random(seed).shuffle(shuffled)
    return tuple(shuffled)


def sentences(seed: int = 0) -> list[str]:
    """All corpus sentences (deduplicated, sorted, then shuffled with ``seed``)."""
    return list(_sentences(seed))


def splits(
    n_calibration: int = 1280, n_evaluation: int = 512, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Disjoint ``(calibration, evaluation)`` sentence lists of the requested sizes."""
    if n_calibration < 0 or n_evaluation < 0:
        raise LrccError("split sizes must be non-negative")
    pool = _sentences(seed)
    if n_calibration + n_evaluation > len(pool):
        raise LrccError(
            f"corpus has {len(pool)} sentences; {n_calibration} + {n_evaluation} requested"
        )
    calibration = list(pool[:n_calibration])
    evaluation = list(pool[n_calibration : n_calibration + n_evaluation])
    return calibration, evaluation
