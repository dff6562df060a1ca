"""A full disk: a size-limited tmpfs (mounting needs root; the tests fall back to faults.py's
simulated ENOSPC where it is not allowed)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def store_usage(path: Path) -> int:
    """Bytes a store occupies on a page-granular filesystem like tmpfs (4 KiB per file page)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


def mount_tmpfs(path: Path, size: int, remount: bool = False) -> bool:
    """Mount a tmpfs of `size` bytes at PATH (or resize the one there); False if not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"remount,size={size}" if remount else f"size={size}"
    cmd = ["mount", "-o", opts, str(path)] if remount else ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def umount(path: Path) -> None:
    """Unmount PATH, quietly."""
    subprocess.run(["umount", str(path)], capture_output=True)


def can_mount_tmpfs(probe: Path) -> bool:
    """Whether this process may mount a tmpfs (tried at PROBE)."""
    if shutil.which("mount") is None or not mount_tmpfs(probe, 65536):
        return False
    umount(probe)
    return True
