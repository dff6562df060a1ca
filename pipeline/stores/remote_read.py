"""Reading a store URL: the local, size-capped cache of whole sha256-checked shard objects on which
the backend's own reader runs; verify and ls of store URLs. See `remote` for the contract.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from enspipe.util.errors import StoreError

from .remote import (MANIFEST, Remote, _records, cache_settings, fetch_records, join, read_remote_manifest,
                     valid_records)
from .remote_cache import RemoteSource

__all__ = ["RemoteSource", "find_remote_stores", "open_remote", "remote_info", "verify_remote"]


# --------------------------------------------------------------------------- reading


def _mirror_dir(url: str, manifest: dict, cache_dir: Path) -> Path:
    # The URL and what the store holds: a complete store's shard records (every file's sha256),
    # an incomplete one's creation time (a resumed precompute keeps it). A store deleted and
    # written again at the same URL with other bytes gets a mirror of its own instead of the old
    # one's files, which the cache would take as present and the reader refuse as damaged; one
    # written again with the same bytes keeps its mirror.
    content = manifest.get("shards") if manifest.get("complete") else manifest.get("created_at")
    tag = hashlib.sha256(f"{url}\0{json.dumps(content, sort_keys=True)}".encode("utf-8")).hexdigest()[:12]
    return Path(cache_dir) / f"{manifest['identity_key'][:16]}-{tag}.{manifest['format']}"


def open_remote(url: str, *, allow_incomplete: bool = False, cache_dir: str | os.PathLike | None = None,
                cache_bytes: int | None = None, check_objects: bool = True):
    """The backend's reader of a store URL, running on its local mirror (see the module doc).

    Requests: one listing of the store, the manifest, and for an incomplete store its record
    objects, fetched in one concurrent call; a complete store's records are its manifest's (its
    record objects are never fetched). `check_objects`: every recorded object is in the listing
    with its recorded size (no object is downloaded): for a complete store, everything a train
    start's check needs of the records (`verify.check_against`)."""
    url = url.rstrip("/")
    r = Remote(url)
    sizes = r.sizes()  # the store's one listing: the manifest's presence, the records, the objects
    manifest = read_remote_manifest(url, sizes)
    return _open_listed(url, manifest, _records(r, manifest, sizes), sizes, allow_incomplete=allow_incomplete,
                        cache_dir=cache_dir, cache_bytes=cache_bytes, check_objects=check_objects)


def _open_listed(url: str, manifest: dict, records: dict[int, dict], sizes: dict[str, int], *, allow_incomplete: bool,
                 cache_dir: str | os.PathLike | None, cache_bytes: int | None, check_objects: bool):
    """`open_remote` of a store already listed (`sizes`), its manifest read and its valid records taken."""
    from .manifest import RECORDS_DIR, record_lines, write_json_atomic
    from .registry import get_backend

    if not manifest["complete"] and not allow_incomplete:
        raise StoreError(f"store {url} is incomplete: {len(records)} of {manifest['num_shards']} shards written; "
                         "re-run precompute to finish it.")
    if manifest["complete"] and check_objects:
        for s in range(manifest["num_shards"]):
            rec = records.get(s)
            problem = ("no record in the manifest" if rec is None
                       else next(record_lines(manifest, s, rec, sizes.get), None))
            if problem:
                raise StoreError(f"store {url} is damaged ({problem}); delete it and re-run precompute.")
    default_dir, default_cap = cache_settings()
    mirror = _mirror_dir(url, manifest, Path(cache_dir) if cache_dir is not None else default_dir)
    if not (mirror / MANIFEST).is_file():
        # The format's metadata (zarr.json, ...) is made here from the validated manifest, as the
        # writer made it, in a sibling folder renamed into place (concurrent openers: one wins).
        mirror.parent.mkdir(parents=True, exist_ok=True)
        tmp = mirror.parent / f".{mirror.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            (tmp / RECORDS_DIR).mkdir()
            get_backend(manifest["format"]).create_layout(tmp, manifest)
            write_json_atomic(tmp / MANIFEST, manifest, indent=2)
            with contextlib.suppress(OSError):
                os.rename(tmp, mirror)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(mirror / MANIFEST, manifest, indent=2)  # the manifest may have been completed since
    reader = get_backend(manifest["format"]).Reader(mirror, manifest, records)
    reader.source = RemoteSource(url, mirror, cache_bytes if cache_bytes is not None else default_cap)
    return reader


# --------------------------------------------------------------------------- verify and ls


def verify_remote(target: Any, deep: bool) -> tuple[list[str], int]:
    """(problems, shards checked) of a store URL or of a reader `open_remote` made: the same lines
    as a local store's `verify_store` (`manifest.store_records`), files' sizes taken from the
    store's listing, the record objects fetched in one concurrent call.

    Shallow: manifest, records against it, every object's size: no shard object is downloaded.
    Each object's sha256 is checked when a read downloads it (`RemoteSource`), so a corrupt
    object still never feeds a read: that read fails, naming the object. (A train start's check
    of a complete store URL does not call this: `open_remote` checked the same.) Deep (`enspipe
    verify URL`): also every object downloaded again, not taken from the cache, sha256-checked and
    decoded; for a reader, its cached copies (checked when they were downloaded) are kept, so the
    ranks on one node share one download. Counted and reported as a local store's
    (`manifest.store_shard_lines`)."""
    from .manifest import sha256_matches, store_shard_lines
    from .registry import get_backend

    fresh = isinstance(target, str)
    if fresh:
        url = target.rstrip("/")
        r = Remote(url)
        try:
            sizes = r.sizes()
            manifest = read_remote_manifest(url, sizes)
        except StoreError as exc:
            return [f"manifest: {exc}"], 0
    else:
        reader, manifest, url, r = target, target.manifest, target.source.url, target.source.remote
        sizes = r.sizes()
    try:
        stored = fetch_records(r, manifest, sizes)
    except StoreError as exc:  # a record that cannot be read (denied, archived, unreachable): one line naming it
        return [f"records: {exc}"], 0
    if deep and fresh:
        # The reader of what was just listed and fetched: one listing, one manifest, each record
        # once (a store finalized in between is verified as it was listed, not half one, half the other).
        records = ({int(k): v for k, v in manifest["shards"].items()} if manifest["complete"]
                   else valid_records(manifest, stored, sizes))
        reader = _open_listed(url, manifest, records, sizes, allow_incomplete=True, cache_dir=None, cache_bytes=None,
                              check_objects=False)
    read_whole = None
    if deep:
        src = reader.source
        if fresh:  # verify what is stored now, not the cache
            with src._lock(fcntl.LOCK_EX) as fd:
                for rec in reader.records.values():
                    for rel in rec["files"]:
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(src.mirror / rel)
                src.count_eviction(fd)
        # Shards download ahead of the checks (hashing and decoding one while the next arrive).
        src.prefetch(reader.records, sorted(reader.records), reader.records)

        def read_whole(s: int, rec: dict) -> tuple[list[str], bool]:
            try:
                with src.local({s: rec}, [s], reader.records):
                    # A download was hashed as it arrived (fresh: every file); a cached copy this
                    # process has not hashed yet is hashed here, once.
                    for rel, meta in sorted(rec["files"].items()):
                        if not sha256_matches(src.mirror / rel, meta["sha256"], trust_checked=True):
                            return [f"shard {s}: checksum mismatch in cached copy of {rel}"], False
                    try:
                        get_backend(manifest["format"]).check_shard(src.mirror, manifest, s, rec)
                    except Exception as exc:  # any decoder failure is a finding, not a crash
                        return [f"shard {s}: unreadable ({exc})"], True
            except StoreError as exc:  # a download refused (bytes not as recorded) or failed: not written
                return [f"shard {s}: {exc}"], False
            return [], True

    problems, checked = store_shard_lines(manifest, stored.get, sizes.get, None, read_whole)
    return problems, checked


def remote_info(url: str) -> dict:
    """What `enspipe ls` shows of a store URL: manifest, records, bytes stored (one listing)."""
    r = Remote(url)
    sizes = r.sizes()
    manifest = read_remote_manifest(url, sizes)
    return {"manifest": manifest, "records": _records(r, manifest, sizes), "bytes": sum(sizes.values())}


def find_remote_stores(root: str) -> list[str]:
    """Every store URL under a root URL: a prefix with a store format's suffix holding a manifest."""
    from .registry import format_of

    r = Remote(root)
    out = []
    for rel in sorted(r.sizes()):
        parts = rel.split("/")
        if parts[-1] != MANIFEST or len(parts) < 2 or format_of(parts[-2]) is None:
            continue
        if any(format_of(p) for p in parts[:-2]):
            continue  # inside another store
        out.append(join(r.url, "/".join(parts[:-1])))
    return out
