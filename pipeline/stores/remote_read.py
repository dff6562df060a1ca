"""Reading a store URL: the local, size-capped cache of whole sha256-checked shard objects on which
the backend's own reader runs; verify and ls of store URLs. See `remote` for the contract.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

from enspipe.util.errors import StoreError

from .remote import MANIFEST, Remote, _records, _size_problems, cache_settings, join, read_remote_manifest

__all__ = ["RemoteSource", "find_remote_stores", "open_remote", "remote_info", "verify_remote"]


# --------------------------------------------------------------------------- reading


class RemoteSource:
    """The local mirror of a store URL: which objects a read needs, fetched whole and checked."""

    def __init__(self, url: str, mirror: Path, cap_bytes: int) -> None:
        self.url, self.mirror, self.cap_bytes = url, Path(mirror), int(cap_bytes)
        self._remote: Remote | None = None

    def __reduce__(self) -> tuple:
        return RemoteSource, (self.url, str(self.mirror), self.cap_bytes)

    @property
    def remote(self) -> Remote:
        if self._remote is None:
            self._remote = Remote(self.url)
        return self._remote

    @contextlib.contextmanager
    def _lock(self, kind: int) -> Iterator[None]:
        # A fresh descriptor per use: flock belongs to the open file, which a fork would share.
        fd = os.open(self.mirror / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)

    def _cached(self, keep: set[str], names: set[str], cap: int) -> None:
        """Evict least recently used shard files (of `names`, not `keep`) until at most `cap`
        bytes remain (exclusive lock held)."""
        files = []
        for rel in names:
            p = self.mirror / rel
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                files.append((st.st_atime, st.st_size, rel))
        total = sum(size for _, size, _ in files)
        for _, size, rel in sorted(files):
            if total <= cap:
                break
            if rel in keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.mirror / rel)
                total -= size

    @contextlib.contextmanager
    def local(self, records: dict[int, dict], shards: Iterable[int], all_records: dict[int, dict]) -> Iterator[None]:
        """Shards' objects present in the mirror, sha256-checked, for the duration (shared lock)."""
        from .manifest import note_verified

        want = {rel: meta for s in shards for rel, meta in records[s]["files"].items()}
        every = {rel for rec in all_records.values() for rel in rec["files"]}
        missing = [rel for rel in want if not (self.mirror / rel).is_file()]
        if missing:
            need = sum(want[rel]["bytes"] for rel in missing)
            with self._lock(fcntl.LOCK_EX):
                self._cached(set(want), every, max(0, self.cap_bytes - need))
        with self._lock(fcntl.LOCK_SH):
            missing = [rel for rel in sorted(want) if not (self.mirror / rel).is_file()]
            if missing:  # a shard's objects (zarr: one per array + keys) fetched concurrently
                with ThreadPoolExecutor(min(8, len(missing))) as pool:
                    list(pool.map(lambda rel: self._fetch(rel, want[rel], self.mirror / rel), missing))
            for rel, meta in sorted(want.items()):
                p = self.mirror / rel
                if rel in missing:
                    note_verified(p, meta["sha256"])
                # LRU order by atime, set explicitly (mounts may not update it); mtime is kept,
                # so the sha256 memory of this file version stays valid.
                os.utime(p, ns=(time.time_ns(), p.stat().st_mtime_ns))
            yield

    def _fetch(self, rel: str, meta: dict, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.remote.get_file(rel, tmp)
            h = hashlib.sha256()
            with open(tmp, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            if tmp.stat().st_size != meta["bytes"] or h.hexdigest() != meta["sha256"]:
                raise StoreError(f"object {join(self.url, rel)} does not match its completion record (corrupt, "
                                 "half-written or replaced); run enspipe verify on the store and re-run precompute")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def _mirror_dir(url: str, manifest: dict, cache_dir: Path) -> Path:
    tag = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return Path(cache_dir) / f"{manifest['identity_key'][:16]}-{tag}.{manifest['format']}"


def open_remote(url: str, *, allow_incomplete: bool = False, cache_dir: str | os.PathLike | None = None,
                cache_bytes: int | None = None, check_objects: bool = True):
    """The backend's reader of a store URL, running on its local mirror (see the module doc)."""
    from .manifest import RECORDS_DIR, write_json_atomic
    from .registry import get_backend

    url = url.rstrip("/")
    manifest = read_remote_manifest(url)
    r = Remote(url)
    records = _records(r, manifest)
    if not manifest["complete"] and not allow_incomplete:
        raise StoreError(f"store {url} is incomplete: {len(records)} of {manifest['num_shards']} shards written; "
                         "re-run precompute to finish it.")
    sizes = r.sizes()
    if manifest["complete"] and check_objects:
        for s in range(manifest["num_shards"]):
            rec = records.get(s)
            problem = "no record in the manifest" if rec is None else next(_size_problems(sizes, rec, s), None)
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
    """(problems, shards checked) of a store URL or of a reader `open_remote` made. Deep: every
    object sha256-checked and decoded; for a URL (`enspipe verify`) downloaded again, not taken
    from the cache; for a reader (the trainer's check) cached copies, checked when they were
    downloaded, are kept, so the ranks on one node share one download."""
    from .manifest import RECORDS_DIR, sha256_matches
    from .registry import get_backend

    fresh = isinstance(target, str)
    if fresh:
        try:
            manifest = read_remote_manifest(target)
        except StoreError as exc:
            return [f"manifest: {exc}"], 0
        reader = open_remote(target, allow_incomplete=True, check_objects=False) if deep else None
        url = target.rstrip("/")
    else:
        reader, manifest, url = target, target.manifest, target.source.url
    r = Remote(url)
    sizes = r.sizes()
    complete = manifest["complete"]
    remote_records = _records(r, {**manifest, "complete": False})
    problems: list[str] = []
    checked = written = 0
    for s in range(manifest["num_shards"]):
        if complete:
            rec = manifest["shards"].get(f"{s:06d}")
            if rec is None:
                problems.append(f"shard {s}: the manifest claims the store is complete but has no record of this shard")
                continue
            if f"{RECORDS_DIR}/{s:06d}.json" in sizes and remote_records.get(s) not in (None, rec):
                problems.append(f"shard {s}: completion record {RECORDS_DIR}/{s:06d}.json differs from the manifest's")
        else:
            rec = remote_records.get(s)
            if rec is None:
                problems.append(f"shard {s}: not written (no valid completion record {RECORDS_DIR}/{s:06d}.json)")
                continue
        checked += 1
        found = list(_size_problems(sizes, rec, s))
        if not found and deep:
            src = reader.source
            with src._lock(fcntl.LOCK_EX) if fresh else contextlib.nullcontext():
                for rel in rec["files"] if fresh else ():
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(src.mirror / rel)  # verify what is stored now, not the cache
            try:
                with src.local({s: rec}, [s], reader.records):
                    for rel, meta in sorted(rec["files"].items()):
                        if not sha256_matches(src.mirror / rel, meta["sha256"]):
                            raise StoreError(f"checksum mismatch in cached copy of {rel}")
                    get_backend(manifest["format"]).check_shard(src.mirror, manifest, s, rec)
            except StoreError as exc:
                found.append(f"shard {s}: {exc}")
            except Exception as exc:  # any decoder failure is a finding, not a crash
                found.append(f"shard {s}: unreadable ({exc})")
        if not found:
            written += 1
        problems += found
    if not complete:
        problems.insert(0, f"store is incomplete: {written} of {manifest['num_shards']} shards written; "
                           "re-run precompute to finish it")
    return problems, checked


def remote_info(url: str) -> dict:
    """What `enspipe ls` shows of a store URL: manifest, records, bytes stored."""
    r = Remote(url)
    manifest = read_remote_manifest(url)
    return {"manifest": manifest, "records": _records(r, manifest), "bytes": sum(r.sizes().values())}


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
