"""Writing a store URL: `RemoteWriter`, `StoreWriter`'s interface for object storage (see `remote`
for the contract: shards staged locally, uploaded whole, completion record last, manifest last).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from enspipe.util.errors import StoreError

from .remote import MANIFEST, RECORDS, Remote, _dump, _records, read_remote_manifest

__all__ = ["RemoteWriter", "create_remote"]


def create_remote(url: str, manifest: dict, backend: Any) -> None:
    """Upload a new store's layout (built locally by the backend) and then its initial manifest.
    Concurrent creators upload the same layout; the store's identity is the same either way."""
    from .manifest import write_manifest

    r = Remote(url)
    with tempfile.TemporaryDirectory(prefix="enspipe-layout-") as tmp:
        root = Path(tmp) / "store"
        root.mkdir()
        (root / RECORDS).mkdir()
        backend.create_layout(root, manifest)
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            r.put_file(f, f.relative_to(root).as_posix())
        write_manifest(root, manifest)  # validated here
        r.put_bytes(MANIFEST, (root / MANIFEST).read_bytes())


class RemoteWriter:
    """`StoreWriter`'s interface for a store URL: shards written locally, uploaded whole, record last."""

    def __init__(self, url: str, manifest: dict | None = None) -> None:
        from .base import _StoreFiles
        from .registry import get_backend

        self.url = url.rstrip("/")
        self._remote = Remote(self.url)
        manifest = manifest if manifest is not None else read_remote_manifest(self.url)
        self._files = _StoreFiles(Path("."), manifest)
        self.fmt = manifest["format"]
        self._backend = get_backend(self.fmt)
        self._staging: Path | None = None
        self._local = None
        for name in ("identity", "num_samples", "num_shards", "shard_size", "chunk_samples", "geometry",
                     "num_classes"):
            setattr(self, name, getattr(self._files, name))
        self._done: dict[int, dict] | None = None

    @property
    def path(self) -> str:
        return self.url

    @property
    def manifest(self) -> dict:
        return self._files.manifest

    @property
    def keeps_clean_images(self) -> bool:
        from .registry import store_format

        return store_format(self.fmt).keeps_clean_images

    def __reduce__(self) -> tuple:
        return RemoteWriter, (self.url, self.manifest)

    def shard_range(self, s: int) -> tuple[int, int]:
        from .manifest import shard_range

        if not isinstance(s, int) or not 0 <= s < self.num_shards:
            raise StoreError(f"shard {s} is out of range for store {self.url} ({self.num_shards} shards).")
        return shard_range(self.manifest, s)

    def _records(self) -> dict[int, dict]:
        if self._done is None:
            self._done = _records(self._remote, {**self.manifest, "complete": False})
        return self._done

    def shard_done(self, s: int) -> bool:
        """Shard s's record object is valid and its objects have the recorded sizes (a few
        requests for this shard alone: a dask task asks for its own shard only)."""
        self.shard_range(s)
        if self._done is not None:
            return int(s) in self._done
        rel = f"{RECORDS}/{s:06d}.json"
        if self._remote.size(rel) is None:
            return False
        try:
            files = json.loads(self._remote.cat(rel))["files"]
        except (ValueError, KeyError, TypeError):
            return False
        sizes = {name: self._remote.size(name) for name in [rel, *files]}
        return int(s) in _records(self._remote, {**self.manifest, "complete": False},
                                  {k: v for k, v in sizes.items() if v is not None})

    def pending_shards(self) -> list[int]:
        done = self._records()
        return [s for s in range(self.num_shards) if s not in done]

    def _local_writer(self):
        if self._local is None:
            from .manifest import write_manifest

            # Private to this process: a dask worker on another machine has its own.
            self._staging = Path(tempfile.mkdtemp(prefix="enspipe-staging-")) / f"store.{self.fmt}"
            self._staging.mkdir()
            (self._staging / RECORDS).mkdir()
            self._backend.create_layout(self._staging, self.manifest)
            write_manifest(self._staging, self.manifest)
            self._local = self._backend.Writer(self._staging, self.manifest)
        return self._local

    def write_shard(self, s: int, **arrays: Any) -> dict:
        """Write shard s locally (the backend's checks and bytes), upload each file whole, then its record."""
        local = self._local_writer()
        rec = local.write_shard(s, **arrays)
        try:
            for rel in sorted(rec["files"]):
                self._remote.put_file(self._staging / rel, rel)
            self._remote.put_bytes(f"{RECORDS}/{s:06d}.json", _dump(rec, 1))
        finally:
            for rel in rec["files"]:
                with contextlib.suppress(OSError):
                    os.remove(self._staging / rel)  # keep the staging folder small
        if self._done is not None:
            self._done[int(s)] = rec
        return rec

    def finalize(self, *, verify: bool = True) -> dict:
        """Every shard's record and objects present (sizes; the sha256 are checked on every read),
        then the complete manifest, written last. Idempotent."""
        from .manifest import now_utc

        self._done = None
        records = self._records()
        missing = [s for s in range(self.num_shards) if s not in records]
        if missing:
            raise StoreError(f"cannot finalize store {self.url}: {len(missing)} of {self.num_shards} shards are not "
                             f"written (first: shard {missing[0]}); re-run precompute to finish them.")
        current = read_remote_manifest(self.url)
        shards = {f"{s:06d}": rec for s, rec in sorted(records.items())}
        if current["complete"] and current["shards"] == shards:
            self._files.manifest = current
            return current
        manifest = {**current, "shards": shards, "complete": True, "finalized_at": now_utc()}
        from .manifest import check_manifest

        check_manifest(manifest, f"store {self.url}")
        self._remote.put_bytes(MANIFEST, _dump(manifest, 2))
        self._files.manifest = manifest
        return manifest

    def __del__(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging.parent, ignore_errors=True)
