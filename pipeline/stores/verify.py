"""verify_store: every check a store can fail, reported one problem per line.

Checks, in order: the manifest (schema, identity hash, counts), the format's metadata,
completeness (a complete manifest must hold a record of every shard; an incomplete store
is reported shard by shard), then per shard: every recorded file present with its size,
its sha256 (deep), and finally that the shard decodes to valid values (deep, only for
shards whose bytes match their checksums: corrupt bytes are never fed to a decoder).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from enspipe.util.errors import StoreError

from .base import StoreReader
from .manifest import RECORDS_DIR, read_manifest, read_record, record_problems
from .registry import get_backend
from .remote import is_url, local_path

__all__ = ["VerifyReport", "check_against", "verify_store"]


def check_against(reader: StoreReader, dataset: object) -> None:
    """Refuse, before any work reads it, a store that is corrupt or does not hold `dataset`'s
    samples (a `SampleSource`): every checksum (one read of the store: a corrupt store must never
    feed wrong directions silently), the identity (fingerprint -- naming what differs --,
    geometry, N, classes), and the keys that bind each shard to its samples (a zarr shard copied
    over another, records and all, passes the checksums but fails here). What train and
    evaluate both do with a store."""
    report = verify_store(reader)
    if not report.ok:
        raise StoreError(f"store {reader.path} failed verification: {report.problems[0]}"
                         + (f" (and {len(report.problems) - 1} more problems)" if len(report.problems) > 1 else "")
                         + "; run enspipe verify for details")
    reader.check_compatible(fingerprint=dataset.fingerprint, geometry=dataset.geometry.shape,  # type: ignore[attr-defined]
                            num_samples=len(dataset), num_classes=dataset.num_classes,  # type: ignore[attr-defined, arg-type]
                            dataset=dataset)
    reader.check_keys(0, len(dataset), dataset.keys)  # type: ignore[attr-defined, arg-type]


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0

    def __str__(self) -> str:
        head = f"{'OK' if self.ok else 'FAILED'}: {self.shards_checked} shards checked"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def verify_store(path: str | os.PathLike | StoreReader, *, deep: bool = True) -> VerifyReport:
    """Check a store; `deep` also hashes every file and decodes every shard. Never raises for a bad store.

    Given a reader (`open_store`'s handle), its manifest, read and schema-checked when it was
    opened, is used instead of reading it again; everything else is checked as for a path.
    """
    target = local_path(path)
    if is_url(target) or (isinstance(target, StoreReader) and target.source is not None):
        from .remote_read import verify_remote

        problems, checked = verify_remote(target, deep)
        return VerifyReport(not problems, problems, checked)
    if isinstance(path, StoreReader):
        path, manifest = path.path, path.manifest
    else:
        path = Path(target)  # a file:// URL is its path
        try:
            manifest = read_manifest(path)
        except StoreError as exc:
            return VerifyReport(False, [f"manifest: {exc}"], 0)
    backend = get_backend(manifest["format"])
    problems = list(backend.store_problems(path, manifest))
    complete = manifest["complete"]
    checked = written = 0
    shard_lines: list[str] = []
    for s in range(manifest["num_shards"]):
        on_disk = read_record(path, s)
        if complete:
            rec = manifest["shards"].get(f"{s:06d}")
            if rec is None:
                shard_lines.append(
                    f"shard {s}: the manifest claims the store is complete but has no record of this shard"
                )
                continue
            if on_disk is not None and on_disk != rec:
                shard_lines.append(
                    f"shard {s}: completion record {RECORDS_DIR}/{s:06d}.json differs from the manifest's"
                )
        else:
            rec = on_disk
            if rec is None:
                shard_lines.append(f"shard {s}: not written (no completion record {RECORDS_DIR}/{s:06d}.json)")
                continue
        checked += 1
        found = list(record_problems(path, manifest, s, rec, deep=deep))
        if not found:
            written += 1
            if deep and not problems:
                try:
                    backend.check_shard(path, manifest, s, rec)
                except Exception as exc:  # any decoder failure is a finding, not a crash
                    found.append(f"shard {s}: unreadable ({exc})")
        shard_lines += found
    if not complete:
        problems.append(
            f"store is incomplete: {written} of {manifest['num_shards']} shards written; re-run precompute to finish it"
        )
    problems += shard_lines
    return VerifyReport(not problems, problems, checked)
