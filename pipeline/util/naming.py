"""Names that become paths, and the names models are shown by.

Every name a user gives that enspipe turns into a file or folder name (a job's name, a step's
name in a job spec, a run's name under the cache) must match `NAME_PATTERN`: it cannot climb
out of its folder (`..`, `/`), be absolute, or hide (a leading dot). Models given as paths are
shown by the shortest path suffix that tells them apart (`seed0/C`, `seed1/C`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from enspipe.util.errors import ConfigError

__all__ = ["NAME_PATTERN", "check_name", "model_label", "unique_labels"]

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(NAME_PATTERN)


def check_name(name: object, what: str = "name") -> str:
    """`name` if it is safe as one path component, else a ConfigError saying why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{what} {name!r} is not a valid name: use letters, digits, '.', '_' and '-', "
                          f"starting with a letter or digit, without '..' ({NAME_PATTERN})")
    return name


def model_label(spec: str | os.PathLike) -> str:
    """A short name for a model given as a run dir or checkpoint path."""
    spec = os.fspath(spec)
    p = Path(spec)
    return p.name if p.is_dir() else (p.parent.name if p.suffix in (".json", ".safetensors") else spec)


def _parts(spec: str) -> list[str]:
    """The path components a label may draw on, the run dir's own name last."""
    p = Path(spec)
    if not p.is_dir() and p.suffix in (".json", ".safetensors"):
        p = p.parent
    return [part for part in (p.absolute() if p.exists() else p).parts if part not in ("/", "")]


def unique_labels(specs: Iterable[str | os.PathLike]) -> dict[str, str]:
    """{spec: label}: `model_label`, lengthened to the shortest unique path suffix where two
    different specs would share one (`seed0/C`, `seed1/C`)."""
    specs = list(dict.fromkeys(os.fspath(s) for s in specs))
    labels = {s: model_label(s) for s in specs}
    for _ in range(64):  # path depth bounds it; the loop ends as soon as the labels are unique
        seen: dict[str, list[str]] = {}
        for s, label in labels.items():
            seen.setdefault(label, []).append(s)
        clashes = [group for group in seen.values() if len(group) > 1]
        if not clashes:
            break
        for group in clashes:
            for s in group:
                parts = _parts(s)
                depth = labels[s].count("/") + 2
                labels[s] = "/".join(parts[-depth:]) if depth <= len(parts) else s
    return labels
