"""Shared by the benchmark scripts: rewrite one `## section` of BENCHMARKS.md in place."""
from __future__ import annotations

from pathlib import Path


def update_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) the `## {heading}` section; every other section is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"## {heading}"), None)
    new = [f"## {heading}\n", "\n", section]
    if start is None:
        body = "".join(lines).rstrip("\n") + "\n\n" + "".join(new)
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        tail = lines[end:]
        body = "".join(lines[:start] + new + (["\n"] if tail else []) + tail)
    path.write_text(body)
