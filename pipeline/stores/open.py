"""Create a store's layout, or open an existing store to write shards or to read them."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from enspipe.util.errors import StoreError

from .base import StoreReader, StoreWriter
from .manifest import (
    MANIFEST_NAME,
    RECORDS_DIR,
    Format,
    StoreIdentity,
    done_records,
    identity_diff,
    lookup,
    new_manifest,
    read_manifest,
    record_problem,
    write_manifest,
)
from .registry import get_backend
from .remote import is_url, local_path

__all__ = ["create_store", "open_store", "open_writer"]


def _short(value: Any, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def create_store(
    path: str | os.PathLike,
    identity: StoreIdentity,
    *,
    fmt: Format,
    shard_size: int,
    extra: dict | None = None,
) -> StoreWriter:
    """Create the store's whole layout and its initial manifest, or reopen it for resume.

    Every zarr array is created here with its final shape, chunks, shards and codecs,
    before any worker runs (workers never write metadata). The layout is built in a
    temporary sibling directory and renamed into place, so a store path never exists
    half-made, and two concurrent creators end with one store. An existing store with
    the same identity, format and shard size is reopened (done shards are kept).
    """
    path = local_path(path)
    backend = get_backend(fmt)
    if not isinstance(identity, StoreIdentity):
        raise StoreError(f"create_store needs a StoreIdentity, got {type(identity).__name__}.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise StoreError(f"shard_size must be a positive integer, got {shard_size!r}.")
    shard_size = int(shard_size)
    if is_url(path):
        return _create_remote(path, identity, fmt, shard_size, extra, backend)
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        return _reopen(path, identity, fmt, shard_size)

    chunk_samples = backend.chunk_samples_for(shard_size, identity.geometry)
    manifest = new_manifest(identity, fmt, shard_size, chunk_samples, extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        (tmp / RECORDS_DIR).mkdir()
        backend.create_layout(tmp, manifest)
        write_manifest(tmp, manifest)
        try:
            os.rename(tmp, path)  # atomic; replaces an empty directory, fails on a non-empty one
        except OSError:
            if (path / MANIFEST_NAME).is_file():  # a concurrent creator won the race
                return _reopen(path, identity, fmt, shard_size)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open_writer(path)


def _create_remote(url: str, identity: StoreIdentity, fmt: str, shard_size: int, extra: dict | None,
                   backend: Any) -> StoreWriter:
    from .remote import existing_remote_manifest
    from .remote_write import RemoteWriter, create_remote

    if existing_remote_manifest(url) is None:
        manifest = new_manifest(identity, fmt, shard_size, backend.chunk_samples_for(shard_size, identity.geometry),
                                extra)
        create_remote(url, manifest, backend)
    return _reopen(url, identity, fmt, shard_size, RemoteWriter(url))


def _reopen(path: Path | str, identity: StoreIdentity, fmt: str, shard_size: int,
            writer: Any = None) -> StoreWriter:
    manifest = writer.manifest if writer is not None else read_manifest(path)  # "not an enspipe store" when none
    checks = [("format", manifest["format"], fmt), ("shard_size", manifest["shard_size"], shard_size)]
    field = identity_diff(manifest["identity"], identity.to_dict())
    if field is not None:
        checks.append((field, lookup(manifest["identity"], field), lookup(identity.to_dict(), field)))
    for name, have, want in checks:
        if have != want:
            raise StoreError(
                f"store {path} already exists with a different {name} ({_short(have)} there, "
                f"{_short(want)} requested) (field: {name}); use another path or delete it."
            )
    return writer if writer is not None else open_writer(path)


def open_writer(path: str | os.PathLike) -> StoreWriter:
    """Reopen an existing store to write shards (worker processes): reads, never writes, metadata.
    A store URL gets a `remote_write.RemoteWriter` (same interface; shards uploaded whole, record last)."""
    path = local_path(path)
    if is_url(path):
        from .remote_write import RemoteWriter

        return RemoteWriter(path)
    manifest = read_manifest(Path(path))
    return get_backend(manifest["format"]).Writer(Path(path), manifest)


def open_store(path: str | os.PathLike | StoreReader, *, allow_incomplete: bool = False,
               cache_dir: str | os.PathLike | None = None, cache_bytes: int | None = None) -> StoreReader:
    """Open a store for reading after validating its manifest and (cheaply) its shard files.

    Incomplete stores are refused unless `allow_incomplete`, in which case only the done
    shards can be read. Full checksums are `verify_store`'s job. Given a reader (a store
    opened earlier in this run), returns it as it is: a store is opened once and passed on.

    A store URL (`s3://bucket/.../X.zarr`) is read through a local cache of whole, sha256-checked
    shard objects: `cache_dir` (default $ENSPIPE_STORE_CACHE or ~/.cache/enspipe/stores), at most
    `cache_bytes` of shard files (default $ENSPIPE_STORE_CACHE_BYTES or 20 GiB); see `remote`.
    """
    if isinstance(path, StoreReader):
        if not (path.complete or allow_incomplete):  # opened with allow_incomplete by someone else
            raise StoreError(f"store {path.location} is incomplete; re-run precompute to finish it.")
        return path
    path = local_path(path)
    if is_url(path):
        from .remote import open_remote

        return open_remote(path, allow_incomplete=allow_incomplete, cache_dir=cache_dir, cache_bytes=cache_bytes)
    path = Path(path)
    manifest = read_manifest(path)
    records = done_records(path, manifest)
    if not manifest["complete"] and not allow_incomplete:
        raise StoreError(
            f"store {path} is incomplete: {len(records)} of {manifest['num_shards']} shards written; "
            f"re-run precompute to finish it."
        )
    if manifest["complete"]:
        for s in range(manifest["num_shards"]):
            rec = records.get(s)
            problem = (
                f"shard {s}: no record in the manifest" if rec is None
                else record_problem(path, manifest, s, rec)
            )
            if problem:
                raise StoreError(f"store {path} is damaged ({problem}); delete it and re-run precompute.")
    return get_backend(manifest["format"]).Reader(path, manifest, records)
