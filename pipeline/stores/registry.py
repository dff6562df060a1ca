"""The store formats and the backend module of each, loaded on first use.

An explicit registry instead of importing `f"{fmt}_store"` by name: the formats are listed
here, and loading is lazy so that `import enspipe.stores` (and the trainer's sampler, the
listing, the manifest) needs neither zarr nor PIL until a store of that format is opened.
"""
from __future__ import annotations

from typing import Callable

from enspipe.errors import StoreError

from .base import Backend

__all__ = ["BACKENDS", "get_backend"]


def _zarr() -> Backend:
    from . import zarr_store

    return zarr_store


def _wds() -> Backend:
    from . import wds_store

    return wds_store


# Keys are manifest.FORMATS, in that order (the manifest schema lists the same formats).
BACKENDS: dict[str, Callable[[], Backend]] = {"zarr": _zarr, "wds": _wds}


def get_backend(fmt: str) -> Backend:
    """The backend module of format `fmt`; StoreError for an unknown format."""
    try:
        load = BACKENDS[fmt]
    except (KeyError, TypeError):
        raise StoreError(f"store format must be one of {tuple(BACKENDS)}, got {fmt!r}.") from None
    return load()
