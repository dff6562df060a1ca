"""Decode handlers for reading a wds store with plain `webdataset`.

    import webdataset as wds
    from enspipe.stores import wds_decoders

    urls = sorted(glob.glob(f"{store}/shard-*.tar"))
    for sample in wds.WebDataset(urls, shardshuffle=False).decode(*wds_decoders(store)):
        sample["dir.bits.gz"]   # int8 [C,H,W] in {-1,0,1}: what open_store(store) reads
        sample["logits.npy"], sample["label.cls"], sample["idx"], sample["key"]

Why handlers: webdataset's defaults leave a layout-v2 direction (`.dir.bits.gz`) as the raw
packed sign bits and decode a layout-v1 one (`.dir.npy.gz`) into its packed bit planes
(uint8 [2, n/8]), silently wrong, and its default post-handlers unpickle `.pyd`/`.pickle`
and torch.load `.pth` members. These handlers come first: directions are decoded by the
store backend's own `decode_direction` (so they follow its layout), arrays with numpy
(`allow_pickle=False`), and a pickle or torch member is refused. A v2 store's clean image
`.src.<ext>` stays the source's encoded bytes (add webdataset's "rgb8" or your own handler).

Directions do not record their shape, so the handlers need the store's geometry: pass the
store (its manifest says it) or `geometry=(C, H, W)`. The handler sees the member without
its `.gz` when webdataset's gzip pre-handler ran first (the default) and whole with
`decode(..., pre=[])`; either way the sample keeps the member's name as its key.
"""
from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from enspipe.util.errors import StoreError
from enspipe.util.tarsafe import PICKLE_EXTENSIONS

__all__ = ["wds_decoders"]


def _geometry(store: Any, geometry: Any) -> tuple[int, int, int] | None:
    if geometry is not None:
        return tuple(int(g) for g in geometry)  # type: ignore[return-value]
    if store is None:
        return None
    if hasattr(store, "geometry"):  # an open StoreReader
        return tuple(store.geometry)
    from enspipe.stores.manifest import read_manifest

    return tuple(read_manifest(os.fspath(store))["identity"]["geometry"])


def wds_decoders(store: str | os.PathLike | Any | None = None, *,
                 geometry: tuple[int, int, int] | None = None) -> list[Callable[[str, bytes], Any]]:
    """Handlers for `webdataset.WebDataset(urls).decode(*wds_decoders(store))` (see the module doc).

    `store` is the store's path (or an open reader); `geometry` (C, H, W) may stand in for it.
    Without either, decoding a direction raises (its shape is not in the member)."""
    from enspipe.stores.wds import store as wds_store

    shape = _geometry(store, geometry)
    # Each direction member name -> its layout's member (v2 and v1 stores are both read), with
    # and without the .gz that webdataset's gzip pre-handler strips.
    layouts = {}
    for member in (wds_store.DIRECTION, wds_store.DIRECTION_V1):
        layouts[member] = layouts[member.removesuffix(".gz")] = member

    def direction(key: str, data: bytes) -> np.ndarray | None:
        ext = key.lstrip(".")
        member = layouts.get(ext)
        if member is None:
            return None
        if shape is None:
            raise StoreError("enspipe.stores.wds_decoders() needs the store (or geometry=(C, H, W)) to "
                             "decode directions: their shape is in the manifest, not in the member")
        if ext != member:  # webdataset's gzip pre-handler got there first: give the backend its member
            data = gzip.compress(data, compresslevel=0, mtime=0)
        return wds_store.decode_direction(data, shape, member)

    def refuse_pickles(key: str, data: bytes) -> None:
        bad = [e for e in key.lstrip(".").split(".") if e.lower() in PICKLE_EXTENSIONS]
        if bad:
            raise StoreError(f"member {key!r} has the forbidden extension .{bad[0]} (pickle/torch payloads are "
                             "never loaded)")
        return None

    def arrays(key: str, data: bytes) -> Any:
        ext = key.lstrip(".")
        if ext.endswith("npy"):
            return np.load(io.BytesIO(data), allow_pickle=False)
        if ext in ("cls", "label.cls", "idx"):
            return int(data.decode("ascii"))
        if ext == "key":
            return data.decode("utf-8")
        if ext == "png":
            if shape is not None:
                return wds_store.decode_image("png", data, shape)
            from PIL import Image

            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                arr = np.asarray(im)
            return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
        return None

    return [refuse_pickles, direction, arrays]
