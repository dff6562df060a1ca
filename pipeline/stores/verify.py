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
from .manifest import local_sizes, read_manifest, read_record, sha256_matches, store_shard_lines
from .registry import get_backend
from .remote import is_url, local_path

__all__ = ["VerifyReport", "check_against", "verify_store"]


def check_against(reader: StoreReader, dataset: object) -> None:
    """Refuse, before any work reads it, a store that is damaged or does not hold `dataset`'s
    samples (a `SampleSource`): what train and evaluate both do with a store.

    A local store: every checksum (one read of the store: a corrupt store must never feed wrong
    directions silently), the identity (fingerprint -- naming what differs --, geometry, N,
    classes), and the keys that bind each shard to its samples (a zarr shard copied over
    another, records and all, passes the checksums but fails here).

    A complete store URL: what needs no shard object's bytes -- the manifest, its records and
    every object's size against the store's listing (all checked by `open_remote` when the store
    was opened: nothing is fetched again here; the record objects `shards/NNNNNN.json` are not
    fetched at all, since a complete store is read by its manifest's records: ~1,250 GETs per
    rank and store at ImageNet scale, guarding nothing a read uses), the identity, and the keys
    (zarr: every shard's small keys object, fetched concurrently into the cache). Each object's sha256 is checked as a read downloads it
    (`remote_cache`), before any of its bytes are used: a corrupt object stops the run at the read
    that fetches it, one line naming the object, and never feeds a direction. Downloading and
    hashing the whole store here (tens of GB for ImageNet, on every node, evicted again when the
    cache cap is smaller than the store) would add nothing to that. A wds tar holds its keys
    beside its directions: its `.idx` members bind each sample to its index on every decode (a
    tar copied over another fails its first read), and the identity's fingerprint covers the
    dataset's keys, so its tars are not downloaded here. `enspipe verify URL` downloads and
    hashes everything."""
    remote = reader.source is not None
    # A complete store URL's reader: open_remote refused it unless every record and object size holds.
    report = VerifyReport(True) if remote and reader.complete else verify_store(reader, deep=not remote)
    if not report.ok:
        raise StoreError(f"store {reader.location} failed verification: "
                         f"{report.problems[0]}"
                         + (f" (and {len(report.problems) - 1} more problems)" if len(report.problems) > 1 else "")
                         + "; run enspipe verify for details")
    reader.check_compatible(fingerprint=dataset.fingerprint, geometry=dataset.geometry.shape,  # type: ignore[attr-defined]
                            num_samples=len(dataset), num_classes=dataset.num_classes,  # type: ignore[attr-defined, arg-type]
                            dataset=dataset)
    if not remote:
        reader.check_keys(0, len(dataset), dataset.keys)  # type: ignore[attr-defined, arg-type]
        return
    if reader.keys_apart:
        # Every shard's keys object at once (the cache's download pool), then compared shard by shard.
        with reader.source.local(reader.records, sorted(reader.records), reader.records, only=reader._key_files):
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
    A store URL or its reader: `remote_read.verify_remote`, the same problem lines (records
    against the manifest: `manifest.store_records`), sizes from the store's listing; not deep,
    it downloads no shard object.
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
    sha = (lambda rel, sha256: sha256_matches(path / rel, sha256)) if deep else None

    def read_whole(s: int, rec: dict) -> tuple[list[str], bool]:
        try:
            backend.check_shard(path, manifest, s, rec)
        except Exception as exc:  # any decoder failure is a finding, not a crash
            return [f"shard {s}: unreadable ({exc})"], True
        return [], True

    # Shards are decoded only when the format's metadata is sound (else every one would fail alike).
    lines, checked = store_shard_lines(manifest, lambda s: read_record(path, s), local_sizes(path), sha,
                                       read_whole if deep and not problems else None)
    problems += lines
    return VerifyReport(not problems, problems, checked)
