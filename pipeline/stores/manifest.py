"""Store identity, manifest and per-shard completion records.

(Over 400 lines on purpose: the whole of storage format v1's contract stays in one file.)

Everything here is format-independent: the identity that names a store, the JSON schemas
that every stored JSON document is checked against, atomic JSON writes, and the
per-shard completion records (`shards/NNNNNN.json`) that let concurrent writers finish
shards without ever touching a shared file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from enspipe.util.errors import StoreError
from enspipe.util.fileio import atomic_write_json
from enspipe.util.limits import current_limits

from .registry import FORMATS
from .remote import is_url, local_path

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
RECORDS_DIR = "shards"
LABEL_MODES = ("true", "pred")

Format = str  # one of FORMATS (registry.py declares the formats; a Literal would repeat them)


# --------------------------------------------------------------------------- identity


def _canonical_json_value(value: Any, what: str) -> Any:
    """Round-trip through JSON so that tuples become lists and non-JSON values fail early."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"store identity field {what} is not plain JSON ({exc}).") from None


@dataclass(frozen=True)
class StoreIdentity:
    """Everything that determines the content of a perturbation store.

    Two stores with equal identities hold the same directions, so the identity's hash
    (`key()`) is part of the store's path and `precompute` with the same inputs finds
    the existing store. Not hashable (it holds dicts); compare with `==` or `key()`.
    """

    dataset: dict
    geometry: tuple[int, int, int]
    preprocess: str
    num_classes: int
    model_name: str
    weights_sha256: str
    attack: str
    attack_params: dict
    label_mode: str

    def __post_init__(self) -> None:
        # Normalise so that from_dict(to_dict(x)) == x and key() is stable.
        object.__setattr__(self, "dataset", _canonical_json_value(dict(self.dataset), "dataset"))
        object.__setattr__(
            self, "attack_params", _canonical_json_value(dict(self.attack_params), "attack_params")
        )
        try:
            geometry = tuple(int(g) for g in self.geometry)
        except (TypeError, ValueError):
            raise StoreError(f"store geometry must be (C, H, W) integers, got {self.geometry!r}.") from None
        if len(geometry) != 3 or min(geometry) < 1:
            raise StoreError(f"store geometry must be three positive integers (C, H, W), got {self.geometry!r}.")
        object.__setattr__(self, "geometry", geometry)
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if self.label_mode not in LABEL_MODES:
            raise StoreError(f"store label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}.")
        for name in ("source", "split", "num_samples", "fingerprint"):
            if name not in self.dataset:
                raise StoreError(f"store identity is missing dataset.{name}.")
        validate_identity(self.to_dict())

    @property
    def num_samples(self) -> int:
        return int(self.dataset["num_samples"])

    def to_dict(self) -> dict:
        """JSON-ready dict; the manifest's `identity` object."""
        d = dataclasses.asdict(self)
        d["geometry"] = list(self.geometry)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StoreIdentity:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StoreError(f"store identity has unknown fields {unknown}.")
        missing = sorted(known - set(d))
        if missing:
            raise StoreError(f"store identity is missing fields {missing}.")
        return cls(**{k: d[k] for k in known})

    def key(self) -> str:
        """sha256 hex of the identity as canonical JSON (sorted keys, no whitespace)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode("ascii")).hexdigest()


def identity_diff(a: dict, b: dict, prefix: str = "") -> str | None:
    """Dotted name of the first field (in sorted order) where two identity dicts differ."""
    for name in sorted(set(a) | set(b)):
        field = f"{prefix}{name}"
        if name not in a or name not in b:
            return field
        va, vb = a[name], b[name]
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = identity_diff(va, vb, prefix=f"{field}.")
            if sub is not None:
                return sub
        elif va != vb:
            return field
    return None


def lookup(d: dict, dotted: str) -> Any:
    """Value of a dotted field name in nested dicts (None when absent)."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


_SLUG_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str, max_len: int = 80) -> str:
    """A path component made of [A-Za-z0-9._-]: no '/', ':' or leading dots."""
    s = _SLUG_BAD.sub("-", text).strip("-.")
    s = re.sub(r"-{2,}", "-", s)[:max_len].strip("-.")
    return s or "x"


def store_path(root: str | os.PathLike, identity: StoreIdentity, fmt: Format) -> Path | str:
    """Where the store of `identity` lives under `root`; derived only from identities.

    `root/{source}-{split}/{model}-{weights[:12]}/{attack}-{label_mode}-{key[:16]}.{fmt}`.
    The slugs are for people; the 16 hex digits of the identity hash make it unique. A URL
    root (`s3://bucket/prefix`) gives a URL (str), a local root a Path.
    """
    if fmt not in FORMATS:
        raise StoreError(f"store format must be one of {FORMATS}, got {fmt!r}.")
    ds = identity.dataset
    dataset_slug = slug(f"{ds['source']}-{ds['split']}")
    model_slug = slug(f"{identity.model_name}-{identity.weights_sha256[:12]}")
    name = f"{slug(identity.attack)}-{identity.label_mode}-{identity.key()[:16]}.{fmt}"
    if is_url(root):
        return "/".join([str(root).rstrip("/"), dataset_slug, model_slug, name])
    return Path(local_path(root)) / dataset_slug / model_slug / name


# --------------------------------------------------------------------------- schemas


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """Load `storage_schemas/<name>` shipped as package data (`enspipe.storage_schemas`)."""
    import importlib.resources

    try:
        text = (importlib.resources.files("enspipe.storage_schemas") / name).read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # An editable install made before storage_schemas/ had an __init__.py cannot import
        # it as a package; fall back to the repository layout (pipeline/../storage_schemas).
        path = Path(__file__).resolve().parents[2] / "storage_schemas" / name
        if not path.is_file():
            raise StoreError(f"storage schema {name} is not installed; reinstall enspipe.") from None
        text = path.read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=None)
def _validator(schema_name: str, ref: str | None = None):
    import jsonschema

    schema = load_schema(schema_name)
    if ref is not None:
        # Validate against one $defs entry while keeping the file's other $defs resolvable.
        schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{ref}"}
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(doc: Any, schema_name: str, ref: str | None = None) -> list[str]:
    """Human-readable schema violations of `doc` (empty when valid)."""
    out = []
    for err in sorted(_validator(schema_name, ref).iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        out.append(f"{where}: {err.message}")
    return out


def validate_identity(d: dict) -> None:
    errors = schema_errors(d, "manifest.v1.json", ref="identity")
    if errors:
        raise StoreError(f"store identity is invalid: {errors[0]}.")


# --------------------------------------------------------------------------- JSON files


def write_json_atomic(path: Path, doc: Any, *, indent: int | None = 1) -> None:
    """Write JSON to a unique temporary name in the same directory, fsync, then os.replace.

    Readers see the old or the new file, never a torn one; concurrent writers of the
    same file (a re-run shard) each replace it whole. Sorted keys keep bytes deterministic.
    """
    atomic_write_json(path, doc, indent=indent, sort_keys=True, strict=True)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{what} {path} cannot be read: {exc}.") from None
    except RecursionError:  # json's parser on thousands of nested brackets
        raise StoreError(f"{what} {path} cannot be read: nested too deeply.") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# sha256 checks this process has passed, by (path, device, inode, size, mtime, sha256). A
# reader whose library reads a file by byte ranges (zarr) checks the file on its first read
# and trusts it afterwards until it is replaced (another inode) or rewritten (another
# mtime): the trainer reads a shard block by block. verify's deep check, which the trainer
# runs before training, records its matches here too, so training hashes nothing twice (its
# DataLoader workers fork from the process that verified). Bounded: an ImageNet store has a
# few thousand shard files.
_VERIFIED: OrderedDict[tuple, None] = OrderedDict()
_VERIFIED_MAX = 1 << 16


def _verified_key(path: Path, st: os.stat_result, sha256: str) -> tuple:
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256)


def sha256_matches(path: Path, sha256: str, *, trust_checked: bool = False) -> bool:
    """True when the file's sha256 is `sha256` (FileNotFoundError when it is missing). A match
    is remembered for this process; `trust_checked` answers from that memory without hashing
    the same file version again (readers), else the file is always hashed (verify)."""
    st = os.stat(path)
    if trust_checked and _verified_key(path, st, sha256) in _VERIFIED:
        return True
    if sha256_file(path) != sha256:
        return False
    note_verified(path, sha256, st)
    return True


def known_verified(path: Path, sha256: str) -> bool:
    """Has this process hashed the file at `path`, as it is now, to `sha256` (`sha256_matches`,
    `note_verified`)? Never hashes: a reader that reads the bytes anyway skips only the digest."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return _verified_key(path, st, sha256) in _VERIFIED


def note_verified(path: Path, sha256: str, st: os.stat_result | None = None) -> None:
    """Remember that the file at `path` (as it is now, or as `st` saw it before it was read) was
    just hashed to `sha256` by its writer, downloader or reader, so a reader does not hash it
    again (see `sha256_matches`)."""
    _VERIFIED[_verified_key(path, os.stat(path) if st is None else st, sha256)] = None
    while len(_VERIFIED) > _VERIFIED_MAX:
        _VERIFIED.popitem(last=False)


def file_record(root: Path, rel: str) -> dict:
    """{"sha256", "bytes"} of a shard file as it is on disk now."""
    p = root / rel
    return {"sha256": sha256_file(p), "bytes": p.stat().st_size}


# --------------------------------------------------------------------------- manifest


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def num_shards_for(num_samples: int, shard_size: int) -> int:
    return math.ceil(num_samples / shard_size)


def new_manifest(
    identity: StoreIdentity, fmt: Format, shard_size: int, chunk_samples: int, extra: dict | None
) -> dict:
    """The initial manifest (complete=false) written by create_store."""
    from enspipe import __version__

    n = identity.num_samples
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "enspipe_version": __version__,
        "format": fmt,
        "identity": identity.to_dict(),
        "identity_key": identity.key(),
        "num_samples": n,
        "num_shards": num_shards_for(n, shard_size),
        "shard_size": shard_size,
        "chunk_samples": chunk_samples,
        "shards": {},
        "complete": False,
        "created_at": now_utc(),
        "finalized_at": None,
        "extra": _canonical_json_value(dict(extra or {}), "extra"),
    }
    check_manifest(manifest, "new store")
    return manifest


def manifest_problems(manifest: Any) -> list[str]:
    """Schema violations plus the cross-field rules JSON Schema cannot express."""
    errors = schema_errors(manifest, "manifest.v1.json")
    if errors:
        return errors
    m = manifest
    # Before anything loops over the shards (verify, the reader, a resumed precompute): a
    # forged manifest claiming 10^9 shards is refused here, not iterated.
    too_many = current_limits().above("max_shards", m["num_shards"], " shards")
    if too_many:
        return [f"num_shards is {too_many}"]
    try:
        identity = StoreIdentity.from_dict(m["identity"])
    except StoreError as exc:
        return [str(exc)]
    if identity.key() != m["identity_key"]:
        errors.append("identity_key does not match the identity (the identity was edited)")
    if m["num_samples"] != identity.num_samples:
        errors.append("num_samples differs from identity.dataset.num_samples")
    if m["num_shards"] != num_shards_for(m["num_samples"], m["shard_size"]):
        errors.append("num_shards does not equal ceil(num_samples / shard_size)")
    if m["shard_size"] % m["chunk_samples"]:
        errors.append("chunk_samples does not divide shard_size")
    for name, rec in m["shards"].items():
        s = int(name)
        if s >= m["num_shards"] or rec["shard"] != s:
            errors.append(f"shards/{name}: record is for shard {rec['shard']} of {m['num_shards']}")
        elif (rec["start"], rec["stop"]) != shard_range(m, s):
            errors.append(f"shards/{name}: record covers [{rec['start']}, {rec['stop']}), expected {shard_range(m, s)}")
    return errors


def check_manifest(manifest: Any, where: str) -> None:
    problems = manifest_problems(manifest)
    if problems:
        raise StoreError(f"manifest of {where} is invalid: {problems[0]}.")


def existing_manifest(path: str | os.PathLike) -> dict | None:
    """The validated manifest of the store at `path`, or None when no store is there yet.

    "No store" means no `manifest.json` (the path may be absent or an empty directory);
    a manifest that exists but is invalid raises StoreError, as `read_manifest` does.
    This is how a producer asks "reuse, resume or create?" without opening the store.
    """
    path = local_path(path)
    if is_url(path):
        from .remote import existing_remote_manifest

        return existing_remote_manifest(path)
    return read_manifest(Path(path)) if (Path(path) / MANIFEST_NAME).is_file() else None


def read_manifest(path: Path) -> dict:
    """Read and validate `path/manifest.json`; StoreError when absent or invalid."""
    mpath = Path(path) / MANIFEST_NAME
    if not mpath.is_file():
        if Path(path).exists():
            raise StoreError(f"{path} exists but is not an enspipe store (no {MANIFEST_NAME}).")
        raise StoreError(f"store {path} does not exist.")
    manifest = read_json(mpath, "store manifest")
    check_manifest(manifest, f"store {path}")
    return manifest


def write_manifest(path: Path, manifest: dict) -> None:
    check_manifest(manifest, f"store {path}")
    write_json_atomic(Path(path) / MANIFEST_NAME, manifest, indent=2)


def shard_range(manifest: dict, s: int) -> tuple[int, int]:
    size, n = manifest["shard_size"], manifest["num_samples"]
    return s * size, min(n, (s + 1) * size)


# --------------------------------------------------------------------------- shard records


def record_path(path: Path, s: int) -> Path:
    return Path(path) / RECORDS_DIR / f"{s:06d}.json"


def local_sizes(path: Path) -> Callable[[str], int | None]:
    def size_of(rel: str) -> int | None:
        try:
            return (Path(path) / rel).stat().st_size
        except FileNotFoundError:
            return None
    return size_of


def record_lines(manifest: dict, s: int, rec: Any, size_of: Callable[[str], int | None],
                 sha256_ok: Callable[[str, str], bool] | None = None) -> Iterator[str]:
    """Why `rec` is not a valid completion record of shard s, one line per problem: nothing when
    it is. `size_of(rel)`: the bytes of the store's file `rel` now, None when there is none (a
    local store's stat, a store URL's listing); `sha256_ok(rel, sha256)`: whether the file's
    bytes hash to it (deep checks only). A bad record or range stops the checks; file problems
    are reported file by file. Local stores and store URLs give the same lines."""
    errors = schema_errors(rec, "manifest.v1.json", ref="shard_record")
    if errors:
        yield f"shard {s}: invalid completion record ({errors[0]})"
        return
    if rec["shard"] != s or (rec["start"], rec["stop"]) != shard_range(manifest, s):
        yield f"shard {s}: completion record is for another shard or range"
        return
    for rel, meta in sorted(rec["files"].items()):
        size = size_of(rel)
        if size is None:
            yield f"shard {s}: missing file {rel}"
        elif size != meta["bytes"]:
            yield f"shard {s}: file {rel} is {size} bytes but was written with {meta['bytes']} (truncated or replaced)"
        elif sha256_ok is not None and not sha256_ok(rel, meta["sha256"]):
            yield f"shard {s}: checksum mismatch in file {rel}"


def record_problems(path: Path, manifest: dict, s: int, rec: Any, *, deep: bool = False) -> Iterator[str]:
    """`record_lines` of a local store's record: sizes by stat (cheap enough for every open);
    deep: also the sha256 of every file."""
    sha = (lambda rel, sha256: sha256_matches(Path(path) / rel, sha256)) if deep else None
    return record_lines(manifest, s, rec, local_sizes(path), sha)


@dataclass(frozen=True)
class ShardCheck:
    """One shard of `store_records`: `rec`, the record it is read by (None: none to check),
    `lines`, its problems, and `ok`: its record is valid and its files are as recorded."""

    shard: int
    rec: dict | None
    lines: list[str]
    ok: bool


def store_records(manifest: dict, stored: Callable[[int], Any], size_of: Callable[[str], int | None],
                  sha256_ok: Callable[[str, str], bool] | None = None) -> Iterator[ShardCheck]:
    """The problems of a store's completion records against its manifest, shard by shard: the one
    check `verify_store` makes of a local store and of a store URL, and the valid records the
    readers and writers of store URLs take (`remote._records`). `stored(s)`: shard s's record file
    parsed (`shards/NNNNNN.json`: from disk, or fetched from object storage), None when there is
    none or it cannot be parsed; `size_of`, `sha256_ok`: as for `record_lines`.

    A complete store is read by its manifest's records: one missing is a problem, as is a record
    file that differs from it (parseable but not the same: a damaged or replaced record). An
    incomplete store's record files are checked for what they claim."""
    complete = manifest["complete"]
    for s in range(manifest["num_shards"]):
        found = stored(s)
        notes: list[str] = []
        if complete:
            rec = manifest["shards"].get(f"{s:06d}")
            if rec is None:
                yield ShardCheck(s, None, [f"shard {s}: the manifest claims the store is complete but has no record "
                                           "of this shard"], False)
                continue
            if found is not None and found != rec:
                notes.append(f"shard {s}: completion record {RECORDS_DIR}/{s:06d}.json differs from the manifest's")
        else:
            rec = found
            if rec is None:
                yield ShardCheck(s, None, [f"shard {s}: not written (no completion record {RECORDS_DIR}/{s:06d}.json)"],
                                 False)
                continue
        problems = list(record_lines(manifest, s, rec, size_of, sha256_ok))
        yield ShardCheck(s, rec, notes + problems, not problems)


def store_shard_lines(manifest: dict, stored: Callable[[int], Any], size_of: Callable[[str], int | None],
                      sha256_ok: Callable[[str, str], bool] | None = None,
                      read_whole: Callable[[int, dict], tuple[list[str], bool]] | None = None) -> tuple[list[str], int]:
    """(problems, shards checked) of a store's shards: `store_records`' lines shard by shard, each
    sound shard read whole by `read_whole(s, rec)` when given (deep verify: its lines, and whether
    the shard's bytes are as recorded -- a store URL checks their sha256 as it downloads them, a
    local store in `sha256_ok`), and for an incomplete store first the line counting its written
    shards: those whose record, files and bytes are as recorded, decodable or not (a decode
    failure is reported on its own line). The one count of local stores and store URLs."""
    lines: list[str] = []
    checked = written = 0
    for shard in store_records(manifest, stored, size_of, sha256_ok):
        if shard.rec is not None:
            checked += 1
        lines += shard.lines
        if shard.ok:
            found, intact = read_whole(shard.shard, shard.rec) if read_whole is not None else ([], True)
            written += intact
            lines += found
    if not manifest["complete"]:
        lines.insert(0, f"store is incomplete: {written} of {manifest['num_shards']} shards written; "
                        "re-run precompute to finish it")
    return lines, checked


def record_problem(path: Path, manifest: dict, s: int, rec: Any, *, deep: bool = False) -> str | None:
    """The first of `record_problems` (None when the record is valid)."""
    return next(record_problems(path, manifest, s, rec, deep=deep), None)


def read_record(path: Path, s: int) -> Any:
    """The parsed JSON of shard s's completion record file, unchecked; None when absent or unparsable."""
    try:
        return json.loads(record_path(path, s).read_text("utf-8"))
    except (OSError, ValueError, RecursionError):  # bad UTF-8, bad JSON, nested too deeply
        return None


def load_record(path: Path, manifest: dict, s: int) -> dict | None:
    """The shard's completion record if present and valid (shallow check), else None."""
    rec = read_record(path, s)
    return None if rec is None or record_problem(path, manifest, s, rec) else rec


def done_records(path: Path, manifest: dict) -> dict[int, dict]:
    """Valid records of the finished shards: from the manifest once complete, else the files."""
    if manifest["complete"]:
        return {int(k): v for k, v in manifest["shards"].items()}
    out = {}
    for s in range(manifest["num_shards"]):
        rec = load_record(path, manifest, s)
        if rec is not None:
            out[s] = rec
    return out
