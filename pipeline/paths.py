"""Where outputs may go: never inside a store, and stores never inside a training run.

A store's folder holds exactly the files its manifest records (`verify` and `ls` rely on
it): a run written into it (`train --out STORE.zarr/run`) mixes files into the store, and a
store root made inside it (`precompute --out STORE.zarr`) nests stores that `ls` never
lists. A run's folder is what `--resume`, `evaluate` and `precompute --model RUN` read: stores
written into it would travel with every copy of the run. The stages call these checks first,
before they write anything.

Both checks walk up from the output path (symlinks resolved), so a path inside a store at any
depth is caught, and look only at marker files: a store is a folder named with a store format's suffix
(`stores.registry`: `*.zarr`, `*.wds`) holding a `manifest.json` (or any zarr hierarchy: a folder with `zarr.json`), a run is a folder whose
`config.json` records a training run or whose `model.json` describes an enspipe model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from enspipe.util.errors import ConfigError
from enspipe.stores.registry import format_of
from enspipe.stores.remote import is_url, local_path

__all__ = ["check_output", "check_outside_dataset", "check_store_root", "enclosing_run", "enclosing_store", "is_run_dir", "is_store_dir"]

_MARKER_BYTES = 1 << 20  # a run's config.json / model.json is a few KiB; larger is no marker


def _up(path: str | os.PathLike) -> list[Path]:
    """`path` (made absolute, existing symlinks resolved) and every folder above it."""
    p = Path(path).expanduser().resolve(strict=False)
    return [p, *p.parents]


def is_store_dir(p: Path) -> bool:
    """An enspipe store (a folder with a store format's suffix and a manifest) or any zarr hierarchy."""
    return ((format_of(p) is not None and (p / "manifest.json").is_file())
            or (p / "zarr.json").is_file() or (p / ".zgroup").is_file() or (p / ".zarray").is_file())


def _json_marker(path: Path) -> dict | None:
    try:
        if path.stat().st_size > _MARKER_BYTES:
            return None
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def is_run_dir(p: Path) -> bool:
    """A training run (config.json with a `train` table) or a saved model (model.json)."""
    config = _json_marker(p / "config.json")
    if config is not None and isinstance(config.get("train"), dict):
        return True
    model = _json_marker(p / "model.json")
    return model is not None and str(model.get("format", "")).startswith("enspipe-model/")


def enclosing_store(path: str | os.PathLike) -> Path | None:
    """The store `path` is in (or is), else None."""
    return next((p for p in _up(path) if is_store_dir(p)), None)


def enclosing_run(path: str | os.PathLike) -> Path | None:
    """The training run `path` is in (or is), else None."""
    return next((p for p in _up(path) if is_run_dir(p)), None)


def check_output(path: str | os.PathLike, *, flag: str = "--out") -> None:
    """Refuse an output path inside a store (ConfigError, one line naming both)."""
    store = enclosing_store(path)
    if store is not None:
        raise ConfigError(f"{flag} {path} is inside the store {store}: a store's folder holds only its own "
                          "files; choose a folder outside it")


def check_store_root(path: str | os.PathLike, *, flag: str = "--out") -> None:
    """Refuse a store ROOT inside a store or inside a training run (ConfigError, one line).
    A URL root is not checked: object storage holds no training runs, and a store's prefix is
    never a root because store names end in a format suffix that `store_path` adds."""
    if is_url(path):
        return
    path = local_path(path)
    check_output(path, flag=flag)
    run = enclosing_run(path)
    if run is not None:
        raise ConfigError(f"{flag} {path} is inside the training run {run}: stores go under a ROOT of "
                          "their own, not in a run's folder")


def check_outside_dataset(path: str | os.PathLike, dataset: str, *, field: str = "out") -> None:
    """Refuse an output inside the folder of an `imagefolder:PATH` dataset (one line naming
    both): its folders (a run's checkpoints/, a ROOT's stores) would be listed as classes of
    that dataset, shifting its labels and changing its fingerprint under what was just written."""
    from enspipe.config import OptionError

    from enspipe.stores.remote import is_url

    kind, _, arg = str(dataset).partition(":")
    if kind != "imagefolder" or not arg or is_url(path):  # an object-store URL is no local folder
        return
    root, out = Path(arg).resolve(), Path(path).resolve()
    if out == root or root in out.parents:
        raise OptionError(field, f"{path} is inside the image folder {arg} of `dataset`: its folders would be "
                          "read as classes of that dataset; choose a folder outside it")
