"""What runs are where: `list_runs` under any folder (a job's `--out`, a runs/ tree, the cache).

A run is a directory holding an enspipe checkpoint (`model.json` beside `model.safetensors`),
as `train` writes it and a job publishes it. Reading a listing never imports torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enspipe.util.fileio import dir_bytes
from enspipe.stores.registry import format_of

__all__ = ["RunInfo", "list_runs", "run_info"]

CHECKPOINT_FORMAT = "enspipe-model/1"  # enspipe.models.CHECKPOINT_FORMAT, without importing torch


@dataclass(frozen=True)
class RunInfo:
    """One line of `list_runs`; `problem` is set (and most fields None) for an unreadable run."""

    path: Path
    model: str | None
    num_classes: int | None
    dataset: str | None          # source/split the run was trained on
    mode: str | None             # clean | adv | ens-adv (None: not trained by enspipe train)
    epochs_done: int | None
    bytes_on_disk: int
    problem: str | None = None


def run_info(path: str | os.PathLike) -> RunInfo:
    """Summary of one run directory; never raises for a damaged one (reports `problem`)."""
    path = Path(path)
    size = dir_bytes(path)
    try:
        meta: dict[str, Any] = json.loads((path / "model.json").read_text())
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not {CHECKPOINT_FORMAT}")
        cfg, prov = meta.get("config") or {}, meta.get("provenance") or {}
        data = prov.get("dataset") or {}
        dataset = f"{data.get('source', '?')}/{data.get('split', '?')}" if data else None
        return RunInfo(path, cfg.get("name"), cfg.get("num_classes"), dataset, prov.get("mode"),
                       prov.get("epochs_done"), size)
    except (OSError, ValueError, AttributeError) as e:
        return RunInfo(path, None, None, None, None, None, size, f"model.json cannot be read ({e})")
    except RecursionError:  # json's parser on thousands of nested brackets
        return RunInfo(path, None, None, None, None, None, size, "model.json cannot be read (nested too deeply)")


def list_runs(root: str | os.PathLike) -> list[RunInfo]:
    """Every run directory under root, by path. Stores and hidden (temporary) folders are
    not entered; symlinks are not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "model.json" in filenames and "model.safetensors" in filenames:
            found.append(run_info(dirpath))
            dirnames[:] = []  # a run's checkpoints/ and indices/ hold no runs
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and format_of(d) is None)
    return sorted(found, key=lambda i: str(i.path))
