"""What every backend builds on: the writer and reader base classes and the backend protocol.

(Over 400 lines on purpose: the writer's and the reader's shared rules are one contract, read
together; splitting them would put the shard-range and value rules in two places.)

A backend module (`zarr_store`, `wds.store`) subclasses `StoreWriter` / `StoreReader` for its
payload and provides the four layout functions of `Backend`; the registry
(`registry.BACKENDS`) loads it by format. The shared rules live here once: which shards a
sample range touches (`shard_spans`) and which direction values are valid
(`directions_valid`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol, Sequence

import numpy as np

from enspipe.util.errors import StoreError
from enspipe.util.fileio import naming

from .manifest import (
    StoreIdentity,
    file_record,
    load_record,
    now_utc,
    read_manifest,
    record_path,
    record_problem,
    shard_range,
    write_json_atomic,
    write_manifest,
)
from .registry import store_format

__all__ = ["Backend", "StoreReader", "StoreWriter", "directions_valid", "shard_spans"]


def shard_spans(start: int, stop: int, shard_size: int) -> Iterator[tuple[int, slice]]:
    """(shard, its rows inside that shard) for every shard that samples [start, stop) touch.

    The rows are relative to the shard's first sample, so `shard_data[rows]` is the part of
    [start, stop) that shard s holds. Nothing for an empty range.
    """
    for s in range(start // shard_size, -(-stop // shard_size)):
        first = s * shard_size
        yield s, slice(max(start, first) - first, min(stop, first + shard_size) - first)


def directions_valid(d: np.ndarray) -> bool:
    """True when the int8 directions `d` hold only -1, 0 and +1 (an empty array is valid).

    min/max rather than a lookup: two passes without a temporary, ~3.5x faster than
    `(d + 1).view(uint8).max()` on 256 ImageNet-sized maps (the trainer's hot path).
    """
    return not d.size or (int(d.min()) >= -1 and int(d.max()) <= 1)


class _StoreFiles:
    """The fields writers and readers share, read from a validated manifest."""

    fmt: ClassVar[str] = ""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.identity = StoreIdentity.from_dict(manifest["identity"])
        self.num_samples: int = manifest["num_samples"]
        self.num_shards: int = manifest["num_shards"]
        self.shard_size: int = manifest["shard_size"]
        self.chunk_samples: int = manifest["chunk_samples"]
        self.geometry = self.identity.geometry
        self.num_classes = self.identity.num_classes

    @property
    def keeps_clean_images(self) -> bool:
        """Whether this format stores the clean image and true label beside the directions
        (declared by the format's `registry.StoreFormat`, not by the callers)."""
        return store_format(self.fmt).keeps_clean_images

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


# --------------------------------------------------------------------------- writer


class StoreWriter(_StoreFiles):
    """Writes whole shards of an existing store; safe to use from many processes at once.

    Each shard is written by one writer in one go; its completion record is the last file
    written, so a shard is either done (record valid, files match it) or not done.
    """

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
        image_files: Sequence[tuple[str, bytes]] | None = None,
    ) -> dict:
        """Write all of shard s, then its completion record; returns the record.

        `images` (uint8 [n,C,H,W]) or `image_files` (each sample's image as its source encoded
        it: (extension, bytes), kept byte for byte) and `true_label` (int64 [n]) are used by the
        wds format only (clean image member, `.cls` member); zarr checks and ignores them.
        Writing a done shard again rewrites identical bytes.
        """
        start, stop = self.shard_range(s)
        n = stop - start
        C, H, W = self.geometry
        K = self.num_classes
        direction = _check_array("direction", direction, np.int8, (n, C, H, W), s)
        if not directions_valid(direction):
            raise StoreError(f"shard {s}: direction values must be -1, 0 or +1.")
        logits = _check_array("logits", logits, np.float16, (n, K), s)
        label = _check_array("label", label, np.int64, (n,), s)
        if n and (label.min() < 0 or label.max() >= K):
            raise StoreError(f"shard {s}: label values must lie in [0, {K}).")
        if images is not None:
            images = _check_array("images", images, np.uint8, (n, C, H, W), s)
        if true_label is not None:
            true_label = _check_array("true_label", true_label, np.int64, (n,), s)
        if image_files is not None:
            image_files = list(image_files)
            if images is not None or len(image_files) != n or not all(
                    isinstance(e, str) and isinstance(b, (bytes, bytearray)) for e, b in image_files):
                raise StoreError(f"shard {s}: image_files must be {n} (extension, bytes) pairs, without images.")
        keys = list(keys)
        if len(keys) != n or not all(isinstance(k, str) for k in keys):
            raise StoreError(f"shard {s}: keys must be {n} strings, got {len(keys)} items.")

        try:
            files, extra = self._write_files(
                int(s), start, stop, direction=direction, logits=logits, label=label,
                keys=keys, images=images, true_label=true_label, image_files=image_files,
            )
        except OSError as e:  # zarr's own writes name no file: say which store and shard
            raise naming(e, f"{self.path} (shard {s})")

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


class StoreReader(_StoreFiles):
    """Random access to a store by sample index; contiguous blocks are the fast path.

    Which blocks to read, in which order, is the reader's caller's business (the trainer's
    sampler is `enspipe.sampling.block_order`); read `chunk_samples`-aligned blocks.
    """

    def __init__(self, path: Path, manifest: dict, records: dict[int, dict]) -> None:
        super().__init__(path, manifest)
        self.complete: bool = manifest["complete"]
        self.records = records
        self._done = set(records)
        self._pid = os.getpid()
        # Where the shard files come from when they are not local: a remote.RemoteSource for a
        # store URL (this reader then runs on its local mirror), None for a local store.
        self.source: Any = None

    def __len__(self) -> int:
        return self.num_samples

    @property
    def location(self) -> str:
        """Where the store is, as its user named it: a store URL's URL (its reader runs on a local
        mirror, `path`, which no message should name), else the store folder."""
        return self.source.url if self.source is not None else str(self.path)

    # A reader is the store's handle for a whole run: `open_store` reads and schema-checks the
    # manifest once, and the handle is passed on (verify, the trainer's checks, every epoch's
    # stream and its loader workers) instead of each of them opening the path again.

    def reopened(self) -> StoreReader:
        """A new reader of the same store from this one's validated manifest and records: for
        another process (a forked loader worker must not use its parent's open files)."""
        return _rebuild(type(self), self.path, self.manifest, self.records, self.source)

    def for_this_process(self) -> StoreReader:
        """This reader in the process that opened it, else `reopened()` (no manifest re-read)."""
        return self if self._pid == os.getpid() else self.reopened()

    def __reduce__(self) -> tuple:
        # Pickled (spawned loader workers, dask) as what it was opened from, never its open files.
        return _rebuild, (type(self), self.path, self.manifest, self.records, self.source)

    def _local(self, start: int, stop: int, *,
               only: Callable[[int], list[str]] | None = None) -> contextlib.AbstractContextManager:
        """The shard files that samples [start, stop) need (`only(s)`: those of shard s a read needs,
        e.g. `_direction_files`; default all), present for the duration (a store URL's are fetched
        whole and sha256-checked into the size-capped cache; local stores: nothing)."""
        if self.source is None:
            return contextlib.nullcontext()
        return self.source.local(self.records, [s for s, _ in self._spans(start, stop)], self.records, only=only)

    def _direction_files(self, s: int) -> list[str]:
        """The files of shard s that `read_directions` reads (a backend with one file per array
        names its direction file; default: every file of the shard)."""
        return list(self.records[s]["files"])

    # Whether a shard's keys are in files of their own (`_key_files`), apart from its payload: then
    # a store URL's start check fetches just those to compare the keys (`verify.check_against`);
    # otherwise the keys come with the payload, bound to it by the format on every read.
    keys_apart: ClassVar[bool] = False

    def _key_files(self, s: int) -> list[str]:
        """The files of shard s that `keys` reads (default: every file of the shard)."""
        return list(self.records[s]["files"])

    def prefetch(self, blocks: Sequence[tuple[int, int]]) -> None:
        """A hint: this process reads the directions of these (start, stop) blocks next, in this
        order. A store URL's reader downloads their shards' direction files ahead in a background thread (`RemoteSource.prefetch`);
        a local store's does nothing. Replaces the previous hint."""
        if self.source is None:
            return
        order = dict.fromkeys(s for a, b in blocks for s, _ in self._spans(int(a), int(b)) if s in self._done)
        self.source.prefetch(self.records, list(order), self.records, only=self._direction_files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, N={self.num_samples})"

    def _spans(self, start: int, stop: int) -> Iterator[tuple[int, slice]]:
        """`shard_spans` of this store: for backends that read shard by shard."""
        return shard_spans(start, stop, self.shard_size)

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_samples:
            raise StoreError(f"sample range [{start}, {stop}) is outside store {self.location} (N={self.num_samples}).")
        for s, _ in self._spans(start, stop):
            if s not in self._done:
                raise StoreError(f"shard {s} of store {self.location} is not written; re-run precompute to finish it.")
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
        with self._local(start, stop):
            return self._read(start, stop)

    def _read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def read_directions(self, start: int, stop: int) -> np.ndarray:
        """Only the directions of samples [start, stop): the trainer's hot path."""
        start, stop = self._check_range(start, stop)
        if start == stop:
            return self._empty(0)["direction"]
        with self._local(start, stop, only=self._direction_files):
            d = self._read_directions(start, stop)
        # Cheap value check on the hot path: a damaged chunk whose checksum was forged
        # still cannot smuggle values outside {-1, 0, 1} into training.
        if not directions_valid(d):
            raise StoreError(f"store {self.location}: directions of samples [{start}, {stop}) hold values outside "
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
            raise StoreError(f"sample indices must lie in [0, {self.num_samples}) for store {self.location}.")
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
        if start == stop:
            return []
        with self._local(start, stop, only=self._key_files):
            return self._keys(start, stop)

    def _keys(self, start: int, stop: int) -> list[str]:
        raise NotImplementedError

    def check_keys(self, start: int, stop: int, expected: Sequence[str]) -> None:
        """Raise StoreError unless samples [start, stop) are the samples `expected` names
        (their dataset keys, in order), naming the first shard that holds other samples.

        This binds each shard's payload to its samples: a store made for other data, or a
        shard copied over another one with its keys, is refused. Cheap next to reading the
        directions (zarr reads one small keys file per shard).
        """
        start, stop = self._check_range(start, stop)
        if len(expected) != stop - start:
            raise StoreError(f"check_keys: {len(expected)} keys given for the {stop - start} samples "
                             f"[{start}, {stop}) of store {self.location}.")
        for s, rows in self._spans(start, stop):
            first = s * self.shard_size
            with self._local(first + rows.start, first + rows.stop, only=self._key_files):
                got = self._keys(first + rows.start, first + rows.stop)
            want = list(expected[first + rows.start - start:first + rows.stop - start])
            if got != want:
                j = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                raise StoreError(
                    f"shard {s} of store {self.location} holds other samples than the dataset: sample "
                    f"{first + rows.start + j} is {got[j]!r} in the store but {want[j]!r} in the data (a shard "
                    "copied over another, or a store of other data); re-run precompute for this store."
                )

    def check_compatible(
        self,
        *,
        fingerprint: str,
        geometry: tuple[int, int, int] | Sequence[int],
        num_samples: int,
        num_classes: int | None = None,
        dataset: Any = None,
    ) -> None:
        """Raise StoreError naming the first field where the store does not fit the training data.

        `dataset` (the data source, or its `identity()`) lets a fingerprint mismatch say why: a
        store of the same data in an older sample order (the source's `superseded` fingerprints)
        is refused with what to do, else the message names what differs: the source, split,
        limit, size, geometry or classes, else the files' contents (naming the files modified
        since the store was made, for a source that can list them)."""
        ident = self.identity
        have_fp = str(ident.dataset["fingerprint"])
        # Read only on a mismatch: a source computes its superseded fingerprints when first asked.
        superseded = (getattr(dataset, "superseded", None) or {}) if have_fp != str(fingerprint) else {}
        if have_fp in superseded:
            raise StoreError(f"store {self.location} was made for this dataset, but {superseded[have_fp]} "
                             "(field: dataset.fingerprint).")
        if have_fp != str(fingerprint):
            what = data_difference(ident.dataset, dataset, self.manifest.get("created_at")) \
                if dataset is not None else None
            raise StoreError(
                f"store {self.location} was made for other data: {what}."
                if what else
                f"store {self.location} was made for dataset fingerprint {have_fp[:12]}.. but the training "
                f"data has {str(fingerprint)[:12]}.. (field: dataset.fingerprint)."
            )
        want_geom = tuple(int(g) for g in geometry)
        if ident.geometry != want_geom:
            raise StoreError(
                f"store {self.location} was made for geometry {'x'.join(map(str, ident.geometry))} but the "
                f"training data has {'x'.join(map(str, want_geom))} (field: geometry)."
            )
        if self.num_samples != int(num_samples):
            raise StoreError(
                f"store {self.location} was made for {self.num_samples} samples but the training data has "
                f"{num_samples} (field: num_samples)."
            )
        if num_classes is not None and ident.num_classes != int(num_classes):
            raise StoreError(
                f"store {self.location} was made for {ident.num_classes} classes but the model has "
                f"{num_classes} (field: num_classes)."
            )


def _rebuild(cls: type, path: Path, manifest: dict, records: dict, source: Any) -> StoreReader:
    reader = cls(path, manifest, records)
    reader.source = source
    return reader


def data_difference(store: Mapping[str, Any], data: Any, created_at: str | None = None) -> str:
    """What differs between the dataset identity a store records and the data's (a source or
    its `identity()`), in words, naming the field: the first of source, split, limit, number of
    samples, geometry and classes that differs, else the contents (same names and order, but a
    file re-saved, or other pixels); a source with `files_newer_than(t)` (imagefolder) then
    names the files modified after the store's `created_at`."""
    source = data
    data = data.identity() if hasattr(data, "identity") else data
    def geometry(g: Any) -> str:
        if isinstance(g, Mapping):
            shape = "x".join(str(g.get(k)) for k in ("channels", "height", "width") if k in g)
            return f"{shape} ({g.get('preprocess')})" if g.get("preprocess") else shape
        return str(g)

    for field, show in (("source", str), ("split", str), ("limit", lambda v: "none" if v is None else str(v)),
                        ("num_samples", str), ("geometry", geometry), ("num_classes", str)):
        if field in store and store.get(field) != data.get(field):
            return (f"its {field} is {show(store.get(field))} but the data's is {show(data.get(field))} "
                    f"(field: dataset.{field})")
    newer: list[str] = []
    if created_at and hasattr(source, "files_newer_than"):
        from datetime import datetime

        with contextlib.suppress(ValueError, OSError):
            # created_at has whole seconds: files of the store's own second are not "after" it.
            newer = list(source.files_newer_than(datetime.fromisoformat(created_at).timestamp() + 1))
    named = (f"; modified after the store was made: {', '.join(newer[:3])}"
             + (f" and {len(newer) - 3} more" if len(newer) > 3 else "")) if newer else ""
    return ("the same source, split, limit, size, geometry and classes, but other contents: an image file "
            f"changed (re-saved, or its size or modification time differs), or other labels or pixels{named} "
            "(field: dataset.fingerprint); re-run precompute for this data")


# --------------------------------------------------------------------------- backend protocol


class Backend(Protocol):
    """What a backend module provides; `registry.BACKENDS` maps each format to a loader of one.

    The module itself is the backend (its functions satisfy this protocol structurally).
    """

    Writer: type[StoreWriter]
    Reader: type[StoreReader]

    def chunk_samples_for(self, shard_size: int, geometry: tuple[int, int, int]) -> int:
        """The read unit in samples for a new store; must divide `shard_size`."""
        ...

    def create_layout(self, root: Path, manifest: dict) -> None:
        """Create the format's files of a new store under `root` (once, before any writer runs)."""
        ...

    def store_problems(self, path: Path, manifest: dict) -> list[str]:
        """Store-level problems of the format's metadata (empty when sound); for verify."""
        ...

    def check_shard(self, path: Path, manifest: dict, s: int, record: dict) -> None:
        """Decode all of shard s and check its values; raise on any problem; for verify."""
        ...
