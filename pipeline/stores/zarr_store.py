"""zarr v3 backend: three sharded arrays in a `*.zarr` directory (LocalStore).

Layout (storage_schemas/zarr_layout.v1.json):
  direction int8    [N, C, H, W]  fill 0
  logits    float16 [N, K]        fill NaN
  label     int64   [N]           fill -1
  keys/NNNNNN.json                {"shard", "start", "keys": [dataset key per sample]}
every array with zarr shards of `shard_size` samples and inner chunks of `chunk_samples`
samples, each chunk blosc(zstd 5, bit-shuffle) compressed (~1 bit per element on ±1 maps,
less on real ones). Keys are JSON files, not a zarr array, because zarr v3 string dtypes
are not yet in the core spec and JSON is readable by anything.

Safety (NOTES, zarr-python #3514/#3682): partial writes of a zarr shard are
read-modify-write and lose data under concurrency. So all arrays are created once by
`create_layout` with final metadata, and each writer writes exactly one whole shard
region `arr[s*shard_size : stop] = ...`. LocalStore writes a temporary file and renames
it, so a shard file is never torn.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from enspipe.util.errors import StoreError

from .base import StoreReader, StoreWriter, directions_valid
from .manifest import schema_errors, sha256_matches, shard_range, write_json_atomic

ARRAYS = ("direction", "logits", "label")
KEYS_DIR = "keys"
# Read unit: 256 samples (NOTES: ~26k samples/s with 256-sample blocks vs ~600/s with
# single samples), but at most 32 MiB of raw int8 direction per chunk for large images.
CHUNK_TARGET_SAMPLES = 256
CHUNK_TARGET_BYTES = 32 << 20


def chunk_samples_for(shard_size: int, geometry: tuple[int, int, int]) -> int:
    """Inner chunk length in samples: the largest divisor of shard_size up to the target.

    zarr requires the inner chunk to divide the shard. When shard_size has no divisor
    near the target (e.g. a prime), one chunk per shard is used: correct, coarser reads.
    Choose shard_size as a multiple of 256 to get 256-sample chunks.
    """
    sample_bytes = int(np.prod(geometry))
    target = max(1, min(CHUNK_TARGET_SAMPLES, CHUNK_TARGET_BYTES // sample_bytes))
    if shard_size <= target:
        return shard_size
    best = max(d for d in range(1, target + 1) if shard_size % d == 0)
    return best if best * 4 >= target else shard_size


def _compressor() -> BloscCodec:
    # typesize is taken from each array's dtype; bit-shuffle turns a ±1 int8 map into
    # bit planes, 7 of which are constant, so zstd stores it at ~1 bit per element.
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


def _array_specs(manifest: dict) -> dict[str, dict[str, Any]]:
    n, size, chunk = manifest["num_samples"], manifest["shard_size"], manifest["chunk_samples"]
    C, H, W = manifest["identity"]["geometry"]
    K = manifest["identity"]["num_classes"]
    return {
        "direction": dict(shape=(n, C, H, W), dtype="int8", chunks=(chunk, C, H, W),
                          shards=(size, C, H, W), fill_value=0,
                          dimension_names=("sample", "channel", "y", "x")),
        "logits": dict(shape=(n, K), dtype="float16", chunks=(chunk, K), shards=(size, K),
                       fill_value=np.nan, dimension_names=("sample", "class")),
        "label": dict(shape=(n,), dtype="int64", chunks=(chunk,), shards=(size,),
                      fill_value=-1, dimension_names=("sample",)),
    }


def shard_file(name: str, s: int, ndim: int) -> str:
    """Path of array `name`'s shard s (default v3 chunk key encoding: name/c/s/0/.../0)."""
    return "/".join([name, "c", str(s)] + ["0"] * (ndim - 1))


NDIMS = {"direction": 4, "logits": 2, "label": 1}


def shard_files(s: int, manifest: dict) -> list[str]:
    return [shard_file(name, s, NDIMS[name]) for name in ARRAYS] + [keys_file(s)]


def keys_file(s: int) -> str:
    return f"{KEYS_DIR}/{s:06d}.json"


def create_layout(root: Path, manifest: dict) -> None:
    """Create every array with its final shape, chunks, shards and codecs (once, before workers)."""
    store = zarr.storage.LocalStore(root)
    group = zarr.open_group(
        store, mode="w-", attributes={"enspipe": {"manifest": "manifest.json", "schema_version": 1}}
    )
    for name, spec in _array_specs(manifest).items():
        group.create_array(name, compressors=_compressor(), **spec)
    (root / KEYS_DIR).mkdir()


def _open_arrays(path: Path, *, write: bool) -> dict[str, zarr.Array]:
    store = zarr.storage.LocalStore(path, read_only=not write)
    try:
        group = zarr.open_group(store, mode="r+" if write else "r")
        arrays = {name: group[name] for name in ARRAYS}
    except Exception as exc:  # zarr raises several types for missing/corrupt metadata
        raise StoreError(f"zarr arrays of store {path} cannot be opened: {exc}.") from None
    if write:
        # write_empty_chunks is a runtime setting, not stored metadata, and open_array's
        # config argument is ignored in zarr 3.1 (zarr-python PR #3378): use with_config.
        # Writing all-zero chunks keeps one file per shard, so every shard is checksummed.
        arrays = {n: a.with_config({"write_empty_chunks": True}) for n, a in arrays.items()}
    return arrays


def layout_problems(arrays: dict[str, zarr.Array], manifest: dict) -> list[str]:
    """Array metadata vs zarr_layout.v1.json and the manifest."""
    summary = {
        name: {
            "dtype": str(np.dtype(a.dtype)),
            "shape": list(a.shape),
            "chunks": list(a.chunks),
            "shards": list(a.shards or a.chunks),
        }
        for name, a in arrays.items()
    }
    errors = schema_errors(summary, "zarr_layout.v1.json")
    if errors:
        return errors
    for name, spec in _array_specs(manifest).items():
        for field in ("shape", "chunks", "shards"):
            if summary[name][field] != list(spec[field]):
                errors.append(f"{name}.{field} is {summary[name][field]}, the manifest implies {list(spec[field])}")
    return errors


class ZarrWriter(StoreWriter):
    fmt = "zarr"

    def __init__(self, path: Path, manifest: dict) -> None:
        super().__init__(path, manifest)
        self._arrays: dict[str, zarr.Array] | None = None  # opened on first write

    def _write_files(self, s: int, start: int, stop: int, **a: Any) -> tuple[list[str], dict]:
        if self._arrays is None:
            self._arrays = _open_arrays(self.path, write=True)
        # Exactly one whole zarr shard per array (the last one may be shorter: it ends at N).
        for name in ARRAYS:
            self._arrays[name][start:stop] = a[name]
        write_json_atomic(
            self.path / KEYS_DIR / f"{s:06d}.json", {"shard": s, "start": start, "keys": a["keys"]}, indent=None
        )
        files = shard_files(s, self.manifest)
        return files, {"direction_bytes": (self.path / files[0]).stat().st_size}


def check_file_once(root: Path, rel: str, meta: dict, s: int) -> None:
    """Raise StoreError unless file `rel` of shard s holds the bytes its completion record's
    `meta` ({"sha256", "bytes"}) describes; hashed once per process and file version.

    zarr reads a shard file chunk by chunk, by byte range, and only the shard index carries a
    checksum (CRC32C): a flipped byte inside a compressed chunk decodes silently into other
    values (measured: 35 of 60 single-byte flips in a direction shard file, 56 of 60 in a
    logits one).
    """
    p = root / rel
    try:
        ok = p.stat().st_size == meta["bytes"] and sha256_matches(p, meta["sha256"], trust_checked=True)
    except FileNotFoundError:
        raise StoreError(f"shard {s}: missing file {rel} in store {root}.") from None
    if not ok:
        raise StoreError(f"shard {s}: checksum mismatch in file {rel} of store {root}; "
                         "the store is damaged (run enspipe verify).")


class ZarrReader(StoreReader):
    fmt = "zarr"

    def __init__(self, path: Path, manifest: dict, records: dict[int, dict]) -> None:
        super().__init__(path, manifest, records)
        self._arrays = _open_arrays(self.path, write=False)
        problems = layout_problems(self._arrays, manifest)
        if problems:
            raise StoreError(f"store {path} has an unexpected zarr layout: {problems[0]}.")
        self._key_cache: OrderedDict[int, list[str]] = OrderedDict()

    def _verify(self, names: tuple[str, ...], start: int, stop: int) -> None:
        """Every shard file of arrays `names` that samples [start, stop) touch matches its record."""
        for s, _ in self._spans(start, stop):
            files = self.records[s]["files"]
            for name in names:
                rel = shard_file(name, s, NDIMS[name])
                check_file_once(self.path, rel, files[rel], s)

    def _direction_files(self, s: int) -> list[str]:
        # A store URL's reader of directions (the trainer) downloads this one object per shard.
        return [shard_file("direction", s, NDIMS["direction"])]

    keys_apart = True  # one small keys object per shard, beside the arrays

    def _key_files(self, s: int) -> list[str]:
        # A store URL's check of the keys (the trainer's, before its first step) downloads this
        # small object per shard, not the shard's arrays.
        return [keys_file(s)]

    def _read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        self._verify(ARRAYS, start, stop)
        return {name: np.asarray(self._arrays[name][start:stop]) for name in ARRAYS}

    def _read_directions(self, start: int, stop: int) -> np.ndarray:
        # One array instead of three: logits and labels are not needed to train.
        self._verify(("direction",), start, stop)
        return np.asarray(self._arrays["direction"][start:stop])

    def _shard_keys(self, s: int) -> list[str]:
        if s not in self._key_cache:
            self._key_cache[s] = read_keys(self.path, self.manifest, s,
                                           sha256=self.records[s]["files"][keys_file(s)]["sha256"])
            while len(self._key_cache) > 8:
                self._key_cache.popitem(last=False)
        return self._key_cache[s]

    def _keys(self, start: int, stop: int) -> list[str]:
        return [k for s, rows in self._spans(start, stop) for k in self._shard_keys(s)[rows]]


def read_keys(path: Path, manifest: dict, s: int, *, sha256: str | None = None) -> list[str]:
    """Shard s's dataset keys; with `sha256`, its keys file must have that checksum."""
    start, stop = shard_range(manifest, s)
    rel = keys_file(s)
    try:
        raw = (path / rel).read_bytes()
    except OSError:
        raw = None
    if raw is not None and sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise StoreError(f"shard {s}: checksum mismatch in file {rel} of store {path}; "
                         "the store is damaged (run enspipe verify).")
    try:
        doc = json.loads(raw)
        keys = doc["keys"]
        ok = doc["shard"] == s and doc["start"] == start and len(keys) == stop - start
    except (ValueError, KeyError, TypeError, RecursionError):
        ok = False
    if not ok or not all(isinstance(k, str) for k in keys):
        raise StoreError(f"shard {s}: keys file {rel} of store {path} is unreadable or wrong.")
    return keys


def store_problems(path: Path, manifest: dict) -> list[str]:
    """Store-level problems: zarr metadata that cannot be opened or does not fit the manifest."""
    try:
        arrays = _open_arrays(path, write=False)
    except StoreError as exc:
        return [str(exc)]
    return [f"zarr layout: {p}" for p in layout_problems(arrays, manifest)]


def check_shard(path: Path, manifest: dict, s: int, record: dict) -> None:
    """Decode all of shard s and check its values; raises on any problem (used by verify)."""
    start, stop = shard_range(manifest, s)
    arrays = _open_arrays(path, write=False)
    d = np.asarray(arrays["direction"][start:stop])
    if not directions_valid(d):
        raise StoreError("direction values outside {-1, 0, 1}")
    label = np.asarray(arrays["label"][start:stop])
    if label.min() < 0 or label.max() >= manifest["identity"]["num_classes"]:
        raise StoreError("label values outside [0, K) (unwritten data?)")
    np.asarray(arrays["logits"][start:stop])
    read_keys(path, manifest, s)


# The classes of the Backend protocol (base.Backend), which open.py instantiates.
Writer = ZarrWriter
Reader = ZarrReader
