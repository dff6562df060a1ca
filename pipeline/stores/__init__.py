"""Perturbation stores: precomputed adversarial directions, one interface, two formats.

A store holds, for one identity (dataset fingerprint, static model + weights, attack,
label mode, geometry), per sample `i` in `[0, N)`: the direction `d` int8 [C,H,W] in
{-1,0,+1}, the static model's logits float16 [K] and the label the attack used, plus a
`manifest.json`. The producer (`precompute`) and the consumer (`train`) meet only here,
joined by the sample index. This package stores numpy arrays and knows neither.

Formats (see storage_schemas/*.json for the exact layouts):
  - ``zarr``: zarr v3 arrays `direction`, `logits`, `label`, sharded by `shard_size`
    samples, blosc(zstd, bit-shuffle) chunks; dataset keys in `keys/NNNNNN.json`.
  - ``wds``: one WebDataset tar per shard with per-sample members (clean image too).

Work is cut into shards of `shard_size` whole samples. A shard is written by exactly one
writer in one go, then a per-shard completion record `shards/NNNNNN.json` is replaced
into place; `finalize` gathers the records into the manifest and marks it complete.
Readers refuse incomplete stores.

    w = create_store(store_path(root, ident, "zarr"), ident, fmt="zarr", shard_size=1024)
    for s in w.pending_shards():          # or spread over processes with open_writer(path)
        a, b = w.shard_range(s)
        w.write_shard(s, direction=..., logits=..., label=..., keys=..., images=None)
    w.finalize()
    r = open_store(path)
    for a, b in r.iter_blocks(r.chunk_samples, seed=0, epoch=e):
        batch = r.read(a, b)
"""
from __future__ import annotations

import importlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from enspipe.errors import StoreError

from .manifest import (
    FORMATS,
    MANIFEST_NAME,
    RECORDS_DIR,
    SCHEMA_VERSION,
    Format,
    StoreIdentity,
    done_records,
    file_record,
    identity_diff,
    load_record,
    lookup,
    new_manifest,
    now_utc,
    read_manifest,
    record_path,
    record_problem,
    shard_range,
    store_path,
    write_json_atomic,
    write_manifest,
)

__all__ = [
    "SCHEMA_VERSION",
    "StoreIdentity",
    "StoreInfo",
    "StoreReader",
    "StoreWriter",
    "VerifyReport",
    "block_order",
    "create_store",
    "list_stores",
    "open_store",
    "open_writer",
    "store_path",
    "verify_store",
]


def _short(value: Any, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _backend(fmt: str) -> ModuleType:
    """The format's module, imported lazily so `block_order` users need neither zarr nor PIL."""
    if fmt not in FORMATS:
        raise StoreError(f"store format must be one of {FORMATS}, got {fmt!r}.")
    return importlib.import_module(f"{__name__}.{fmt}_store")


# --------------------------------------------------------------------------- block order


def block_order(
    num_samples: int,
    block_size: int,
    *,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> list[tuple[int, int]]:
    """This rank's contiguous (start, stop) blocks, in a shuffled order.

    Blocks are `[b*block_size, min(N, (b+1)*block_size))`, so a block_size that is a
    multiple or divisor of the store's `chunk_samples` keeps reads chunk-aligned. The
    permutation depends only on (seed, epoch); after shuffling, block b goes to rank
    `b % world_size`, so ranks are disjoint and together cover every sample. Ranks can
    differ by one block; `drop_last=True` trims every rank to the same count (DDP needs
    equal step counts). The trainer calls this once and reads the clean data and every
    store with the same blocks: they are joined by sample index.
    """
    if num_samples < 0 or block_size < 1:
        raise StoreError(f"block_order needs num_samples >= 0 and block_size >= 1, got {num_samples}, {block_size}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise StoreError(f"block_order needs 0 <= rank < world_size, got rank {rank} of {world_size}.")
    if seed < 0 or epoch < 0:
        raise StoreError(f"block_order needs seed >= 0 and epoch >= 0, got {seed}, {epoch}.")
    nblocks = -(-num_samples // block_size)
    # SeedSequence over (seed, epoch): independent, reproducible streams per epoch.
    perm = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(nblocks)
    mine = perm[rank::world_size]
    if drop_last:
        mine = mine[: nblocks // world_size]
    return [(int(b) * block_size, min(num_samples, (int(b) + 1) * block_size)) for b in mine]


# --------------------------------------------------------------------------- writer


def _read_layout(obj: Any, path: Path, manifest: dict) -> None:
    """The fields writers and readers share, read from a validated manifest."""
    obj.path = Path(path)
    obj.manifest = manifest
    obj.identity = StoreIdentity.from_dict(manifest["identity"])
    obj.num_samples = manifest["num_samples"]
    obj.num_shards = manifest["num_shards"]
    obj.shard_size = manifest["shard_size"]
    obj.chunk_samples = manifest["chunk_samples"]
    obj.geometry = obj.identity.geometry
    obj.num_classes = obj.identity.num_classes


class StoreWriter:
    """Writes whole shards of an existing store; safe to use from many processes at once.

    Each shard is written by one writer in one go; its completion record is the last file
    written, so a shard is either done (record valid, files match it) or not done.
    """

    fmt: ClassVar[str] = ""

    def __init__(self, path: Path, manifest: dict) -> None:
        _read_layout(self, path, manifest)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def shard_range(self, s: int) -> tuple[int, int]:
        """Samples [start, stop) of shard s."""
        if not isinstance(s, (int, np.integer)) or not 0 <= s < self.num_shards:
            raise StoreError(f"shard {s} is out of range for store {self.path} ({self.num_shards} shards).")
        return shard_range(self.manifest, int(s))

    def shard_done(self, s: int) -> bool:
        """True when shard s has a valid completion record and its files have the recorded sizes."""
        self.shard_range(s)
        return load_record(self.path, self.manifest, int(s)) is not None

    def pending_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_done(s)]

    def write_shard(
        self,
        s: int,
        *,
        direction: np.ndarray,
        logits: np.ndarray,
        label: np.ndarray,
        keys: Sequence[str],
        images: np.ndarray | None = None,
        true_label: np.ndarray | None = None,
    ) -> dict:
        """Write all of shard s, then its completion record; returns the record.

        `images` (uint8 [n,C,H,W]) and `true_label` (int64 [n]) are used by the wds
        format only (clean image member, `.cls` member); zarr checks and ignores them.
        Writing a done shard again rewrites identical bytes.
        """
        start, stop = self.shard_range(s)
        n = stop - start
        C, H, W = self.geometry
        K = self.num_classes
        direction = _check_array("direction", direction, np.int8, (n, C, H, W), s)
        # int8 wraps on +1 only at 127, so (d + 1) viewed as uint8 is <= 2 exactly for {-1, 0, 1}.
        if direction.size and int(((direction + np.int8(1)).view(np.uint8)).max()) > 2:
            raise StoreError(f"shard {s}: direction values must be -1, 0 or +1.")
        logits = _check_array("logits", logits, np.float16, (n, K), s)
        label = _check_array("label", label, np.int64, (n,), s)
        if n and (label.min() < 0 or label.max() >= K):
            raise StoreError(f"shard {s}: label values must lie in [0, {K}).")
        if images is not None:
            images = _check_array("images", images, np.uint8, (n, C, H, W), s)
        if true_label is not None:
            true_label = _check_array("true_label", true_label, np.int64, (n,), s)
        keys = list(keys)
        if len(keys) != n or not all(isinstance(k, str) for k in keys):
            raise StoreError(f"shard {s}: keys must be {n} strings, got {len(keys)} items.")

        files, extra = self._write_files(
            int(s), start, stop, direction=direction, logits=logits, label=label,
            keys=keys, images=images, true_label=true_label,
        )
        record = {
            "shard": int(s),
            "start": start,
            "stop": stop,
            "files": {rel: file_record(self.path, rel) for rel in files},
            **extra,
        }
        write_json_atomic(record_path(self.path, int(s)), record)
        return record

    def _write_files(self, s: int, start: int, stop: int, **arrays: Any) -> tuple[list[str], dict]:
        """Write the shard's payload; return its files (relative paths) and extra record fields."""
        raise NotImplementedError

    def finalize(self, *, verify: bool = True) -> dict:
        """Gather every shard's record into the manifest and mark the store complete.

        Requires every shard done; with `verify` (default) also re-hashes every file, since
        this is the one moment a store is declared readable. Idempotent.
        """
        records, missing = {}, []
        for s in range(self.num_shards):
            rec = load_record(self.path, self.manifest, s)
            if rec is None:
                missing.append(s)
            else:
                records[s] = rec
        if missing:
            raise StoreError(
                f"cannot finalize store {self.path}: {len(missing)} of {self.num_shards} shards are not "
                f"written (first: shard {missing[0]}); re-run precompute to finish them."
            )
        if verify:
            for s, rec in records.items():
                problem = record_problem(self.path, self.manifest, s, rec, deep=True)
                if problem:
                    raise StoreError(f"cannot finalize store {self.path}: {problem}.")
        current = read_manifest(self.path)  # another process may have finalized meanwhile
        shards = {f"{s:06d}": rec for s, rec in records.items()}
        if current["complete"] and current["shards"] == shards:
            self.manifest = current
            return current
        manifest = {**current, "shards": shards, "complete": True, "finalized_at": now_utc()}
        write_manifest(self.path, manifest)
        self.manifest = manifest
        return manifest


def _check_array(name: str, a: Any, dtype: type, shape: tuple[int, ...], s: int) -> np.ndarray:
    """Exact dtype and shape, C-contiguous; no silent casts (a wrong dtype is a producer bug)."""
    if not isinstance(a, np.ndarray):
        raise StoreError(f"shard {s}: {name} must be a numpy array, got {type(a).__name__}.")
    if a.dtype != dtype:
        raise StoreError(f"shard {s}: {name} must be {np.dtype(dtype).name}, got {a.dtype}.")
    if a.shape != shape:
        raise StoreError(f"shard {s}: {name} must have shape {shape}, got {a.shape}.")
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------- reader


class StoreReader:
    """Random access to a store by sample index; blocks are the fast path."""

    fmt: ClassVar[str] = ""

    def __init__(self, path: Path, manifest: dict, records: dict[int, dict]) -> None:
        _read_layout(self, path, manifest)
        self.complete: bool = manifest["complete"]
        self.records = records
        self._done = set(records)

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, N={self.num_samples})"

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_samples:
            raise StoreError(f"sample range [{start}, {stop}) is outside store {self.path} (N={self.num_samples}).")
        for s in range(start // self.shard_size, -(-stop // self.shard_size)):
            if s not in self._done:
                raise StoreError(f"shard {s} of store {self.path} is not written; re-run precompute to finish it.")
        return start, stop

    def _empty(self, n: int) -> dict[str, np.ndarray]:
        C, H, W = self.geometry
        return {
            "direction": np.empty((n, C, H, W), np.int8),
            "logits": np.empty((n, self.num_classes), np.float16),
            "label": np.empty((n,), np.int64),
        }

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """{"direction", "logits", "label"} of samples [start, stop)."""
        start, stop = self._check_range(start, stop)
        if start == stop:
            return self._empty(0)
        return self._read(start, stop)

    def _read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def read_directions(self, start: int, stop: int) -> np.ndarray:
        """Only the directions of samples [start, stop): the trainer's hot path."""
        start, stop = self._check_range(start, stop)
        if start == stop:
            return self._empty(0)["direction"]
        d = self._read_directions(start, stop)
        # Cheap value check on the hot path: a damaged chunk whose checksum was forged
        # still cannot smuggle values outside {-1, 0, 1} into training.
        if d.size and (d.min() < -1 or d.max() > 1):
            raise StoreError(f"store {self.path}: directions of samples [{start}, {stop}) hold values outside "
                             "{-1, 0, 1}; the store is corrupt (run enspipe verify)")
        return d

    def _read_directions(self, start: int, stop: int) -> np.ndarray:
        return self._read(start, stop)["direction"]

    def read_indices(self, idx: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        """Samples at arbitrary indices (any order, repeats allowed), in the order given.

        Indices are grouped by read unit (`chunk_samples`) so each unit is read once.
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = self._empty(len(idx))
        if not len(idx):
            return out
        if idx.min() < 0 or idx.max() >= self.num_samples:
            raise StoreError(f"sample indices must lie in [0, {self.num_samples}) for store {self.path}.")
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        unit = sidx // self.chunk_samples
        cuts = np.flatnonzero(np.diff(unit)) + 1
        for lo_i, hi_i in zip(np.r_[0, cuts], np.r_[cuts, len(sidx)]):
            lo, hi = int(sidx[lo_i]), int(sidx[hi_i - 1]) + 1
            part = self.read(lo, hi)
            rows = sidx[lo_i:hi_i] - lo
            dest = order[lo_i:hi_i]
            for name, arr in part.items():
                out[name][dest] = arr[rows]
        return out

    def keys(self, start: int, stop: int) -> list[str]:
        """The dataset keys of samples [start, stop) (a sanity check for the join by index)."""
        start, stop = self._check_range(start, stop)
        return self._keys(start, stop) if start < stop else []

    def _keys(self, start: int, stop: int) -> list[str]:
        raise NotImplementedError

    def check_compatible(
        self,
        *,
        fingerprint: str,
        geometry: tuple[int, int, int] | Sequence[int],
        num_samples: int,
        num_classes: int | None = None,
    ) -> None:
        """Raise StoreError naming the first field where the store does not fit the training data."""
        ident = self.identity
        have_fp = str(ident.dataset["fingerprint"])
        if have_fp != str(fingerprint):
            raise StoreError(
                f"store {self.path} was made for dataset fingerprint {have_fp[:12]}.. but the training "
                f"data has {str(fingerprint)[:12]}.. (field: dataset.fingerprint)."
            )
        want_geom = tuple(int(g) for g in geometry)
        if ident.geometry != want_geom:
            raise StoreError(
                f"store {self.path} was made for geometry {'x'.join(map(str, ident.geometry))} but the "
                f"training data has {'x'.join(map(str, want_geom))} (field: geometry)."
            )
        if self.num_samples != int(num_samples):
            raise StoreError(
                f"store {self.path} was made for {self.num_samples} samples but the training data has "
                f"{num_samples} (field: num_samples)."
            )
        if num_classes is not None and ident.num_classes != int(num_classes):
            raise StoreError(
                f"store {self.path} was made for {ident.num_classes} classes but the model has "
                f"{num_classes} (field: num_classes)."
            )

    def iter_blocks(
        self,
        block_size: int,
        *,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> Iterator[tuple[int, int]]:
        """`block_order` over this store's samples (use `chunk_samples` for aligned reads)."""
        yield from block_order(
            self.num_samples, block_size, seed=seed, epoch=epoch, rank=rank,
            world_size=world_size, drop_last=drop_last,
        )


# --------------------------------------------------------------------------- create / open


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
    path = Path(path)
    backend = _backend(fmt)
    if not isinstance(identity, StoreIdentity):
        raise StoreError(f"create_store needs a StoreIdentity, got {type(identity).__name__}.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise StoreError(f"shard_size must be a positive integer, got {shard_size!r}.")
    shard_size = int(shard_size)
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


def _reopen(path: Path, identity: StoreIdentity, fmt: str, shard_size: int) -> StoreWriter:
    manifest = read_manifest(path)  # "exists but is not an enspipe store" when no manifest
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
    return open_writer(path)


def open_writer(path: str | os.PathLike) -> StoreWriter:
    """Reopen an existing store to write shards (worker processes): reads, never writes, metadata."""
    manifest = read_manifest(Path(path))
    return _backend(manifest["format"]).Writer(Path(path), manifest)


def open_store(path: str | os.PathLike, *, allow_incomplete: bool = False) -> StoreReader:
    """Open a store for reading after validating its manifest and (cheaply) its shard files.

    Incomplete stores are refused unless `allow_incomplete`, in which case only the done
    shards can be read. Full checksums are `verify_store`'s job.
    """
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
    return _backend(manifest["format"]).Reader(path, manifest, records)


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class StoreInfo:
    """One line of `list_stores`. `problem` is set (and most fields None) for unreadable stores."""

    path: Path
    fmt: str
    dataset_source: str | None
    dataset_split: str | None
    model: str | None
    attack: str | None
    label_mode: str | None
    num_samples: int | None
    bytes_on_disk: int
    bits_per_element: float | None  # stored direction bytes * 8 / (samples * C*H*W), done shards
    complete: bool
    shards_done: int
    num_shards: int | None
    problem: str | None = None


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def store_info(path: str | os.PathLike) -> StoreInfo:
    """Summary of one store; never raises for a damaged store (reports `problem`)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    size = _dir_bytes(path)
    try:
        m = read_manifest(path)
    except StoreError as exc:
        return StoreInfo(path, fmt, None, None, None, None, None, None, size, None, False, 0, None, str(exc))
    ident = m["identity"]
    records = done_records(path, m)
    elements = sum((r["stop"] - r["start"]) for r in records.values()) * int(np.prod(ident["geometry"]))
    bpe = sum(r["direction_bytes"] for r in records.values()) * 8 / elements if elements else None
    return StoreInfo(
        path=path,
        fmt=m["format"],
        dataset_source=ident["dataset"]["source"],
        dataset_split=ident["dataset"]["split"],
        model=ident["model_name"],
        attack=ident["attack"],
        label_mode=ident["label_mode"],
        num_samples=m["num_samples"],
        bytes_on_disk=size,
        bits_per_element=bpe,
        complete=m["complete"],
        shards_done=len(records),
        num_shards=m["num_shards"],
    )


def list_stores(root: str | os.PathLike) -> list[StoreInfo]:
    """Every store (a `*.zarr` or `*.wds` directory with a manifest) under root, by path."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue  # temporary directories of create_store
            full = Path(dirpath) / d
            if full.suffix in (".zarr", ".wds") and (full / MANIFEST_NAME).is_file():
                found.append(store_info(full))
            else:
                keep.append(d)
        dirnames[:] = keep  # do not descend into stores
    return sorted(found, key=lambda i: str(i.path))


from .verify import VerifyReport, verify_store  # noqa: E402  (verify uses the backends above)
