"""The local, size-capped cache of a store URL's shard objects that a reader runs on: whole
objects, each downloaded once and sha256-checked as it arrives, served to later reads without a
listing, stat or hash, and downloaded ahead of the reader in its order. See `remote` for the
contract and `remote_read` for opening a store URL.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

from enspipe.util.errors import StoreError

from .remote import Remote, join

__all__ = ["PREFETCH_SHARDS", "RemoteSource"]


# Shards downloaded ahead of the reader (`RemoteSource.prefetch`), and objects at most this big are
# fetched in one GET and hashed in memory (larger ones through a file, hashed from disk once).
PREFETCH_SHARDS = 4
TOUCH_EVERY_S = 1.0
FETCH_LOCKS = 256  # lock files one object's download holds (`RemoteSource._fetching`)
_IN_MEMORY = 64 << 20


class _Here:
    """One process's side of a RemoteSource (made again after a fork: flocks belong to the open
    file, which a fork would share, and threads do not survive one)."""

    def __init__(self, mirror: Path) -> None:
        self.pid = os.getpid()
        self.fd = os.open(mirror / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        self.mutex = threading.RLock()
        self.holders = 0  # threads of this process inside the fast path's shared lock
        self.gen: int | None = None  # the cache's eviction count when `confirmed` was last true
        self.confirmed: set[str] = set()  # shard files in the cache, checked, since `gen`
        self.last: tuple[int, ...] = ()
        self.touched: dict[str, float] = {}  # when this process last marked a file as used
        self.consumed: set[int] = set()  # shards the reader has read (the prefetcher keeps ahead of them)
        self.changed = threading.Condition(self.mutex)
        self.pool: ThreadPoolExecutor | None = None
        self.inflight: dict[str, Future] = {}
        self.plan_id = 0
        # The store's filesystem: an fsspec async filesystem (s3fs) refuses to run in a forked
        # child (a loader worker downloads the shards its reads need), so each process makes its own.
        self.remote: Remote | None = None

    def executor(self) -> ThreadPoolExecutor:
        with self.mutex:
            if self.pool is None:
                # A shard's objects (zarr: one per array + keys) fetched concurrently.
                self.pool = ThreadPoolExecutor(8, thread_name_prefix="enspipe-fetch")
            return self.pool


def _generation(fd: int) -> int:
    raw = os.pread(fd, 32, 0).strip()
    return int(raw) if raw.isdigit() else 0


class RemoteSource:
    """The local mirror of a store URL: which objects a read needs, fetched whole and checked.

    The cache is shared by the processes of a machine. Files leave it only by eviction, under an
    exclusive flock, which also counts the evictions in the lock file. A read holds a shared flock
    for its duration; a process remembers which shard files it found in place at which eviction
    count, so a read of such files costs the shared lock and one 32-byte pread, no listing, stat
    or hash. Everything else (a file not yet here, or an eviction since) takes the slow path:
    evict if the cap needs it, download what is missing, check it, mark it.
    """

    def __init__(self, url: str, mirror: Path, cap_bytes: int) -> None:
        self.url, self.mirror, self.cap_bytes = url, Path(mirror), int(cap_bytes)
        self._here_: _Here | None = None

    def __reduce__(self) -> tuple:
        return RemoteSource, (self.url, str(self.mirror), self.cap_bytes)

    @property
    def remote(self) -> Remote:
        """This process's filesystem of the store (`_Here`: made again after a fork)."""
        here = self._here()
        with here.mutex:
            if here.remote is None:
                here.remote = Remote(self.url)
            return here.remote

    def _here(self) -> _Here:
        if self._here_ is None or self._here_.pid != os.getpid():
            self._here_ = _Here(self.mirror)
        return self._here_

    @contextlib.contextmanager
    def _lock(self, kind: int) -> Iterator[int]:
        # A fresh descriptor per use: flock belongs to the open file, which a fork would share
        # (and two threads of one process on one descriptor would share one lock).
        fd = os.open(self.mirror / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind)
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _shared(self) -> Iterator[_Here]:
        """The fast path's shared lock: this process's descriptor, locked once however many of
        its threads read."""
        here = self._here()
        with here.mutex:
            if here.holders == 0:
                fcntl.flock(here.fd, fcntl.LOCK_SH)
            here.holders += 1
        try:
            yield here
        finally:
            with here.mutex:
                here.holders -= 1
                if here.holders == 0:
                    fcntl.flock(here.fd, fcntl.LOCK_UN)

    def _evict(self, fd: int, keep: set[str], names: set[str], cap: int) -> None:
        """Evict least recently used shard files (of `names`, not `keep`) until at most `cap`
        bytes remain (exclusive lock held on `fd`); count the eviction in the lock file."""
        files = []
        for rel in names:
            p = self.mirror / rel
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                files.append((st.st_atime, st.st_size, rel))
        total = sum(size for _, size, _ in files)
        removed = False
        for _, size, rel in sorted(files):
            if total <= cap:
                break
            if rel in keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.mirror / rel)
                total -= size
                removed = True
        if removed:
            self.count_eviction(fd)

    def _held(self, all_records: dict[int, dict], every: set[str]) -> int:
        """Bytes of this store's shard files in the cache now (0 when the whole store fits under
        the cap: then nothing is ever evicted, and nothing need be counted)."""
        if sum(meta["bytes"] for rec in all_records.values() for meta in rec["files"].values()) <= self.cap_bytes:
            return 0
        held = 0
        for rel in every:
            with contextlib.suppress(FileNotFoundError):
                held += (self.mirror / rel).stat().st_size
        return held

    @staticmethod
    def count_eviction(fd: int) -> None:
        """Tell every process's fast path that files may be gone (exclusive lock held on `fd`)."""
        os.pwrite(fd, b"%020d\n" % (_generation(fd) + 1), 0)

    def _mark(self, here: _Here, gen: int, files: Iterable[str]) -> None:
        with here.mutex:
            if here.gen != gen:
                here.confirmed.clear()
                here.gen = gen
            here.confirmed.update(files)

    def _consumed(self, here: _Here, shards: tuple[int, ...]) -> None:
        with here.mutex:
            if not here.consumed.issuperset(shards):
                here.consumed.update(shards)
                here.changed.notify_all()

    def _touch(self, want: Iterable[str], here: _Here, *, always: bool = False) -> None:
        # LRU order by atime, set explicitly (mounts may not update it); mtime is kept, so the
        # sha256 memory of this file version stays valid. At most once a second per file and
        # process: a shuffled epoch changes shard on nearly every read.
        now = time.monotonic()
        for rel in want:
            if not always and now - here.touched.get(rel, -1e9) < TOUCH_EVERY_S:
                continue
            here.touched[rel] = now
            with contextlib.suppress(FileNotFoundError):
                p = self.mirror / rel
                os.utime(p, ns=(time.time_ns(), p.stat().st_mtime_ns))

    @contextlib.contextmanager
    def local(self, records: dict[int, dict], shards: Iterable[int], all_records: dict[int, dict], *,
              only: Callable[[int], list[str]] | None = None) -> Iterator[None]:
        """Shards' objects (`only(s)` of shard s: the ones a read needs, else all) present in the
        mirror, sha256-checked, for the duration (shared lock)."""
        shards = tuple(shards)
        names = [rel for s in shards for rel in (only(s) if only else records[s]["files"])]
        with self._shared() as here:
            gen = _generation(here.fd)
            with here.mutex:
                fast = here.gen == gen and here.confirmed.issuperset(names)
                changed = fast and here.last != shards
                if fast:
                    here.last = shards
            if fast:
                if changed:
                    self._touch(names, here)
                self._consumed(here, shards)
                yield
                return
        with self._slow(records, shards, names, all_records):
            yield

    @contextlib.contextmanager
    def _slow(self, records: dict[int, dict], shards: tuple[int, ...], names: list[str],
              all_records: dict[int, dict]) -> Iterator[None]:
        metas = {rel: meta for s in shards for rel, meta in records[s]["files"].items()}
        want = {rel: metas[rel] for rel in names}
        every = {rel for rec in all_records.values() for rel in rec["files"]}
        missing = [rel for rel in want if not (self.mirror / rel).is_file()]
        need = sum(want[rel]["bytes"] for rel in missing)
        if missing and self._held(all_records, every) + need > self.cap_bytes:
            # Only then the exclusive lock: it waits for every read and download in progress.
            with self._lock(fcntl.LOCK_EX) as fd:
                self._evict(fd, set(want), every, max(0, self.cap_bytes - need))
        here = self._here()
        with self._lock(fcntl.LOCK_SH) as fd:
            gen = _generation(fd)
            self._download({rel: want[rel] for rel in want if not (self.mirror / rel).is_file()})
            self._touch(want, here, always=True)
            self._mark(here, gen, want)
            with here.mutex:
                here.last = shards
            self._consumed(here, shards)
            yield

    def _download(self, want: dict[str, dict]) -> None:
        """Fetch these objects (the pool's downloads of them already under way are waited for)."""
        here = self._here()
        futures = []
        with here.mutex:
            for rel in sorted(want):
                fut = here.inflight.get(rel)
                if fut is None:
                    fut = here.executor().submit(self._fetch, rel, want[rel], self.mirror / rel)
                    here.inflight[rel] = fut
                    fut.add_done_callback(lambda _f, rel=rel: here.inflight.pop(rel, None))
                futures.append(fut)
        for fut in futures:
            fut.result()

    def _fetch(self, rel: str, meta: dict, dest: Path) -> None:
        """One object downloaded whole, hashed once (as it arrives when it fits in memory), and
        renamed into place only when it matches its record."""
        if dest.is_file():  # another process fetched it meanwhile (its check passed)
            return
        with self._fetching(rel):
            if dest.is_file():  # another process fetched it while this one waited
                return
            self._fetch_now(rel, meta, dest)

    @contextlib.contextmanager
    def _fetching(self, rel: str) -> Iterator[None]:
        """One process of the machine downloads an object at a time; the others wait and then find it
        in place: the ranks of a node starting together fetch each keys object once, not once each.
        Objects share FETCH_LOCKS lock files by a hash of their names (a collision only serializes
        two downloads); the lock is held for one object's download only, beside no other lock."""
        locks = self.mirror / ".fetch"
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"{zlib.crc32(rel.encode('utf-8')) % FETCH_LOCKS:03d}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _fetch_now(self, rel: str, meta: dict, dest: Path) -> None:
        from .manifest import note_verified, sha256_file

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            if meta["bytes"] <= _IN_MEMORY:
                data = self.remote.cat(rel)
                ok = len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"]
                if ok:
                    tmp.write_bytes(data)
            else:
                self.remote.get_file(rel, tmp)
                ok = tmp.stat().st_size == meta["bytes"] and sha256_file(tmp) == meta["sha256"]
            if not ok:
                raise StoreError(f"object {join(self.url, rel)} does not match its completion record (corrupt, "
                                 "half-written or replaced); run enspipe verify on the store and re-run precompute")
            os.replace(tmp, dest)
            note_verified(dest, meta["sha256"])
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    # ----------------------------------------------------------------------- prefetch

    def prefetch(self, records: dict[int, dict], order: list[int], all_records: dict[int, dict], *,
                 only: Callable[[int], list[str]] | None = None) -> None:
        """Download the shards of `order` (the reader's coming shards, in its order) in a
        background thread, at most PREFETCH_SHARDS ahead of the shards it has read. Never evicts:
        a shard that does not fit under the cap beside what is cached is left to the read. A new
        call replaces the previous order (the next epoch)."""
        here = self._here()
        with here.mutex:
            here.plan_id += 1
            here.consumed = set()
            here.changed.notify_all()
            plan_id = here.plan_id
        if order:
            threading.Thread(target=self._prefetcher, args=(here, plan_id, records, list(order), all_records, only),
                             name="enspipe-prefetch", daemon=True).start()

    def _prefetcher(self, here: _Here, plan_id: int, records: dict, order: list[int], all_records: dict,
                    only: Callable[[int], list[str]] | None) -> None:
        every = {rel for rec in all_records.values() for rel in rec["files"]}
        room = threading.BoundedSemaphore(PREFETCH_SHARDS)  # shards downloading at once
        full = threading.Event()

        def job(s: int) -> None:
            try:
                files = records[s]["files"]
                if not self._prefetch_one(here, {rel: files[rel] for rel in (only(s) if only else files)},
                                          all_records, every):
                    full.set()  # no room under the cap without evicting: the reads fetch on demand
            finally:
                room.release()

        with ThreadPoolExecutor(PREFETCH_SHARDS, thread_name_prefix="enspipe-prefetch") as jobs:
            for i, s in enumerate(order):
                with here.mutex:
                    # Wait until the reader has reached the shard PREFETCH_SHARDS before this one.
                    while here.plan_id == plan_id and not here.consumed.issuperset(
                            order[:max(0, i - PREFETCH_SHARDS + 1)]):
                        here.changed.wait(1.0)
                    if here.plan_id != plan_id or os.getpid() != here.pid or full.is_set():
                        return
                    names = only(s) if only else list(records[s]["files"])
                    if s in here.consumed or (here.gen == _generation(here.fd) and here.confirmed.issuperset(names)):
                        continue  # read already, or known to be cached
                room.acquire()
                jobs.submit(job, s)

    def _prefetch_one(self, here: _Here, files: dict[str, dict], all_records: dict, every: set[str]) -> bool:
        """A shard's missing objects (`files`) downloaded under a shared lock, if they fit beside what is
        cached; False when they do not."""
        try:
            with self._lock(fcntl.LOCK_SH) as fd:
                gen = _generation(fd)
                missing = {rel: meta for rel, meta in files.items() if not (self.mirror / rel).is_file()}
                if not missing:
                    self._mark(here, gen, files)
                    return True
                if self._held(all_records, every) + sum(m["bytes"] for m in missing.values()) > self.cap_bytes:
                    return False
                self._download(missing)
                self._mark(here, gen, files)
            return True
        except Exception:
            return False  # the read that needs the shard fetches it and reports any failure itself
