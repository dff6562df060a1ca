"""The store formats: each declared once, with its folder suffix, capabilities and backend module.

Every place that needs to know the formats asks here: the manifest's format check
(`FORMATS`), the path helpers that recognise a store folder by name (`SUFFIXES`,
`format_of`: `paths`, `listing`, `jobs.runs`, `jobs.cache`), and the producer that decides what a
store keeps beside the directions (`keeps_clean_images`). Adding a format is one backend
module, one `StoreFormat` row here, and its schemas (storage_schemas/).

An explicit registry instead of importing `f"{fmt}_store"` by name: loading is lazy so that
`import enspipe.stores` (and the trainer's sampler, the listing, the manifest) needs neither
zarr nor PIL until a store of that format is opened. This module imports nothing of the
package beyond `errors`, so the manifest and the path helpers can import it.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from enspipe.util.errors import StoreError

if TYPE_CHECKING:
    from .base import Backend

__all__ = ["BACKENDS", "FORMATS", "SUFFIXES", "StoreFormat", "format_of", "get_backend", "store_format"]


@dataclass(frozen=True)
class StoreFormat:
    """One store format: what the rest of the package may know about it without loading it."""

    name: str                   # the manifest's `format`, precompute's `format` choice
    module: str                 # the backend module in this package (implements base.Backend)
    keeps_clean_images: bool    # stores the clean image and the true label beside the directions
    description: str

    @property
    def suffix(self) -> str:
        """A store of this format is a folder named `*.{name}`."""
        return f".{self.name}"

    def backend(self) -> Backend:
        return importlib.import_module(f"{__package__}.{self.module}")


_ROWS = (
    StoreFormat("zarr", "zarr_store", keeps_clean_images=False,
                description="zarr v3 arrays, sharded, read by byte range"),
    StoreFormat("wds", "wds.store", keeps_clean_images=True,
                description="one WebDataset tar per shard, clean images and labels beside the directions"),
)
_BY_NAME = {f.name: f for f in _ROWS}

FORMATS: tuple[str, ...] = tuple(_BY_NAME)                    # the manifest schema lists the same
SUFFIXES: tuple[str, ...] = tuple(f.suffix for f in _ROWS)   # folder suffixes of stores
BACKENDS = {f.name: f.backend for f in _ROWS}                 # format -> loader of its backend module


def store_format(fmt: str) -> StoreFormat:
    """The declaration of format `fmt`; StoreError for an unknown format."""
    try:
        return _BY_NAME[fmt]
    except (KeyError, TypeError):
        raise StoreError(f"store format must be one of {FORMATS}, got {fmt!r}.") from None


def format_of(path: str | os.PathLike) -> str | None:
    """The format a folder name says (`x.zarr` -> "zarr"), None when it names no store format.
    Works on local paths and URLs alike (only the last path component is looked at)."""
    name = os.fspath(path).rstrip("/").rsplit("/", 1)[-1]
    return next((f.name for f in _ROWS if name.endswith(f.suffix) and len(name) > len(f.suffix)), None)


def get_backend(fmt: str) -> Backend:
    """The backend module of format `fmt`; StoreError for an unknown format."""
    return store_format(fmt).backend()
