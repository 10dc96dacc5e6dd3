"""Write a benchmark's table into docs/benchmarks.md between its markers."""
from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the section between <!-- key:begin --> and <!-- key:end --> markers."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# lrcc benchmarks\n\nEvery number here is written by a script under benchmarks/.\n"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
