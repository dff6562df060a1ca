"""Proof that a command changed nothing outside its own folders: a snapshot of every entry
under a directory (type, mode, size, mtime, link target), taken before and after the run.

A refused command must leave the whole scene as it was; a command that succeeds may only
have written under the folders it was given (`outputs`), which are left out of the
comparison. A folder's own mtime changes when an entry is added to it, so the folders that
contain an output (its parents) are compared without their mtime.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["changes", "snapshot"]


def snapshot(root: Path, *, outputs: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """{relative path: (type, mode, size, mtime_ns, link target)} of everything under ROOT
    (links are recorded, never followed), except what lies in `outputs`."""
    outputs = tuple(Path(o).absolute() for o in outputs)
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name).absolute()
            if any(p == o or o in p.parents for o in outputs):
                continue
            st = os.lstat(p)
            holds_output = stat.S_ISDIR(st.st_mode) and any(p in o.parents for o in outputs)
            out[str(p.relative_to(root))] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size,
                None if holds_output else st.st_mtime_ns,
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
    return out


def changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """What differs between two snapshots, one phrase per path ([] when nothing)."""
    diff = [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    diff += [f"created {p}" for p in sorted(after.keys() - before.keys())]
    diff += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return diff
