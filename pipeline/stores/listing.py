"""What is stored where: `list_stores` under a root, `store_info` of one store (`enspipe ls`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enspipe.util.errors import StoreError
from enspipe.util.fileio import dir_bytes

from .manifest import MANIFEST_NAME, done_records, read_manifest
from .registry import format_of
from .remote import is_url, local_path

__all__ = ["StoreInfo", "list_stores", "store_info"]


@dataclass(frozen=True)
class StoreInfo:
    """One line of `list_stores`. `problem` is set (and most fields None) for unreadable stores."""

    path: Path | str  # a store URL stays a str
    fmt: str
    dataset_source: str | None
    dataset_split: str | None
    model: str | None
    attack: str | None
    label_mode: str | None
    num_samples: int | None
    bytes_on_disk: int
    bits_per_element: float | None  # stored direction bytes * 8 / (samples * C*H*W), done shards
    complete: bool
    shards_done: int
    num_shards: int | None
    problem: str | None = None


def store_info(path: str | os.PathLike) -> StoreInfo:
    """Summary of one store (a folder or a store URL); never raises for a damaged store (reports `problem`)."""
    path = local_path(path)
    remote = is_url(path)
    if not remote:
        path = Path(path)
    fmt = format_of(path) or Path(str(path)).suffix.lstrip(".")
    size = 0 if remote else dir_bytes(path)
    try:
        if remote:
            from .remote_read import remote_info

            got = remote_info(path)
            m, records, size = got["manifest"], got["records"], got["bytes"]
        else:
            m = read_manifest(path)
            records = done_records(path, m)
    except StoreError as exc:
        return StoreInfo(path, fmt, None, None, None, None, None, None, size, None, False, 0, None, str(exc))
    ident = m["identity"]
    elements = sum((r["stop"] - r["start"]) for r in records.values()) * int(np.prod(ident["geometry"]))
    bpe = sum(r["direction_bytes"] for r in records.values()) * 8 / elements if elements else None
    return StoreInfo(
        path=path,
        fmt=m["format"],
        dataset_source=ident["dataset"]["source"],
        dataset_split=ident["dataset"]["split"],
        model=ident["model_name"],
        attack=ident["attack"],
        label_mode=ident["label_mode"],
        num_samples=m["num_samples"],
        bytes_on_disk=size,
        bits_per_element=bpe,
        complete=m["complete"],
        shards_done=len(records),
        num_shards=m["num_shards"],
    )


def list_stores(root: str | os.PathLike) -> list[StoreInfo]:
    """Every store (a folder with a store format's suffix, `*.zarr`, `*.wds`, and a manifest) under root, by path.
    A root URL (`s3://bucket/prefix`) lists the store URLs under it."""
    root = local_path(root)
    if is_url(root):
        from .remote_read import find_remote_stores

        return [store_info(u) for u in find_remote_stores(root)]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue  # temporary directories of create_store
            full = Path(dirpath) / d
            if format_of(d) is not None and (full / MANIFEST_NAME).is_file():
                found.append(store_info(full))
            else:
                keep.append(d)
        dirnames[:] = keep  # do not descend into stores
    return sorted(found, key=lambda i: str(i.path))
