"""The member index of a wds shard, and the reader that uses it instead of parsing the tar.

Each tar written since issue 26 ends with one more member, `__index__`
(storage_schemas/wds_index.v1.json): the extensions and sizes of every member before it, in
order. WebDataset skips it (a member named `__...__` is metadata to its tar iterator), so a
plain `webdataset.WebDataset` reads the same samples as before. The writer's tars are
deterministic USTAR (`wds_store.write_tar`), so from the sizes alone every member's header
and data offset follow; the reader here reads the shard once, checks its sha256 (the caller),
rebuilds all the headers the index implies with numpy and compares them with the tar's bytes
in one array comparison, then slices members out: no per-member tar parsing, no tarfile.

Anything the fast path does not expect -- no index, an index that does not describe the tar
byte for byte, a member it would not decode -- makes `decode_indexed` return None, and the
caller reads the tar member by member with tarfile as for stores written before the index
(`wds_store.decode_tar`), which refuses unsafe members by name and, when the tar holds an
index, checks that it lists exactly what tarfile listed (`listing_problem`). So both paths
give the same samples, and a tar only ever reads faster, never differently.

Why the index is last, found from the end: readers and tests that walk a tar from its first
member keep seeing sample 0 first; the content ends with a fixed-width trailer holding its own
length, after which a tar has only zero padding.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from enspipe.stores.manifest import shard_range
from enspipe.stores.wds.bounds import index_bound, member_bound, member_bounds

__all__ = ["INDEX_MEMBER", "INDEX_VERSION", "decode_indexed", "index_content", "listing_problem"]

INDEX_MEMBER = "__index__"
INDEX_VERSION = 1
_TRAILER = 13          # b"\n%011d\n": the content's length, trailer included
_BLOCK = 512
_TAIL = _BLOCK + 1024 + 10240  # the most zero bytes after the last member's data


def index_content(members: list[tuple[str, bytes]], start: int) -> bytes:
    """The `__index__` member of a shard whose sample members are `members` (in tar order)."""
    patterns: list[list[str]] = []
    which: dict[tuple[str, ...], int] = {}
    sample_patterns: list[int] = []
    sizes: list[int] = []
    current: list[str] = []
    key = None
    for name, data in members + [("", b"")]:
        k, _, ext = name.partition(".")
        if k != key and key is not None:
            sample_patterns.append(which.setdefault(tuple(current), len(which)))
            if len(which) > len(patterns):
                patterns.append(current)
            current = []
        key = k
        if name:
            current.append(ext)
            sizes.append(len(data))
    body = json.dumps({"format": "enspipe-wds-index", "version": INDEX_VERSION, "first": start,
                       "patterns": patterns, "sample_patterns": sample_patterns, "sizes": sizes},
                      separators=(",", ":")).encode("ascii")
    return body + b"\n%011d\n" % (len(body) + _TRAILER)


def _parse(body: bytes, start: int, n: int) -> tuple[list[list[str]], np.ndarray, np.ndarray] | None:
    """(patterns, pattern per sample, sizes) of an index body, or None if it is not one for
    samples [start, start + n)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(doc, dict) and doc.get("format") == "enspipe-wds-index" and doc.get("version") == INDEX_VERSION
            and doc.get("first") == start):
        return None
    patterns, per_sample, sizes = doc.get("patterns"), doc.get("sample_patterns"), doc.get("sizes")
    if not (isinstance(patterns, list) and patterns and all(
            isinstance(p, list) and p and all(isinstance(e, str) for e in p) for p in patterns)):
        return None
    if not (isinstance(per_sample, list) and len(per_sample) == n and isinstance(sizes, list)):
        return None
    try:
        which = np.asarray(per_sample, np.int64)
        size = np.asarray(sizes, np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    if which.shape != (n,) or size.ndim != 1 or (n and (which.min() < 0 or which.max() >= len(patterns))):
        return None
    if any(type(v) is not int for v in per_sample) or any(type(v) is not int for v in sizes):
        return None  # numpy would have cast 1.5 or True
    lens = np.asarray([len(p) for p in patterns], np.int64)
    if int(lens[which].sum()) != len(size) or (len(size) and size.min() < 0):
        return None
    return patterns, which, size


def listing_problem(content: bytes, listed: list[tuple[str, int]], start: int, n: int) -> str | None:
    """Why the index `content` does not list exactly `listed` ((member name, size) in tar
    order, as tarfile read them), or None: the member-by-member reader's check of the index
    that the fast path trusts."""
    if len(content) < _TRAILER or content[-_TRAILER:] != b"\n%011d\n" % len(content):
        return "its trailer does not give its length"
    parsed = _parse(content[:-_TRAILER], start, n)
    if parsed is None:
        return "it is not an index of these samples"
    patterns, which, size = parsed
    names = [f"{start + j:09d}.{e}" for j, p in enumerate(which.tolist()) for e in patterns[p]]
    if names != [name for name, _ in listed] or size.tolist() != [sz for _, sz in listed]:
        return "it does not list the tar's members"
    return None


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """ASCII octal digits [len(values), digits] of non-negative integers, zero-padded."""
    shifts = 3 * np.arange(digits - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 7).astype(np.uint8) + ord("0")


def _headers(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The USTAR headers uint8 [M, 512] `wds_store.write_tar` writes for members named by the
    rows of `names` (uint8 [M, 100], zero-padded) with these sizes."""
    from enspipe.stores.wds.store import _USTAR, _USTAR_SUM

    head = np.empty((len(sizes), _BLOCK), np.uint8)
    head[:] = np.frombuffer(_USTAR, np.uint8)
    head[:, :100] = names
    head[:, 124:135] = _octal(sizes, 11)
    head[:, 135] = 0
    total = _USTAR_SUM + names.sum(axis=1, dtype=np.int64) + head[:, 124:136].sum(axis=1, dtype=np.int64)
    head[:, 148:154] = _octal(total, 6)
    head[:, 154:156] = (0, ord(" "))
    return head


def _locate(buf: np.ndarray) -> tuple[int, bytes] | None:
    """(offset of the index member's header, its content) of the tar in `buf`, or None."""
    lo = max(0, len(buf) - _TAIL)
    nonzero = np.flatnonzero(buf[lo:])
    if not len(nonzero):
        return None
    end = lo + int(nonzero[-1]) + 1  # one past the trailer's final newline
    trailer = buf[end - _TRAILER:end].tobytes() if end >= _TRAILER else b""
    if len(trailer) != _TRAILER or trailer[:1] != b"\n" or trailer[-1:] != b"\n" or not trailer[1:-1].isdigit():
        return None
    length = int(trailer[1:-1])
    head = end - length - _BLOCK
    if length < _TRAILER or head < 0 or head % _BLOCK:
        return None
    name = np.zeros((1, 100), np.uint8)
    name[0, :len(INDEX_MEMBER)] = np.frombuffer(INDEX_MEMBER.encode("ascii"), np.uint8)
    if not np.array_equal(buf[head:head + _BLOCK], _headers(name, np.asarray([length], np.int64))[0]):
        return None
    # The tar ends as write_tar ends it: the index's padding, two zero blocks, record padding.
    data_end = head + _BLOCK + -(-length // _BLOCK) * _BLOCK
    if len(buf) != -(-(data_end + 1024) // 10240) * 10240:
        return None
    return head, buf[head + _BLOCK:end].tobytes()


def _ints(data: Any, offsets: np.ndarray, sizes: np.ndarray) -> list[int]:
    """ASCII decimal members as ints; ValueError unless each is written as str(int) writes it."""
    values = [int(bytes(data[o:o + sz])) for o, sz in zip(offsets.tolist(), sizes.tolist())]
    if sum(len(str(v)) for v in values) != int(sizes.sum()):  # no signs, spaces or leading zeros
        raise ValueError("a label or index is not plain decimal")
    return values


def _planes(payload: bytes, nbytes: int) -> tuple[bytes, bytes]:
    """The decompressed sign plane, and the zero plane or b"" (the v2 direction member's one or
    two gzip members; gzip.decompress would do the same at ~1.5x the cost)."""
    d = zlib.decompressobj(31)
    signs = d.decompress(payload, nbytes + 1)
    if len(signs) != nbytes or d.unconsumed_tail or not d.eof:
        raise ValueError(f"direction sign plane is not {nbytes} bytes")
    rest = d.unused_data
    if not rest:
        return signs, b""
    z = zlib.decompressobj(31)
    zeros = z.decompress(rest, nbytes + 1)
    if len(zeros) != nbytes or z.unconsumed_tail or z.unused_data or not z.eof:
        raise ValueError(f"direction zero plane is not {nbytes} bytes")
    return signs, zeros


def decode_indexed(data: bytes | memoryview, tar: Path, manifest: dict, s: int, *, sources: bool) -> dict[str, Any] | None:
    """Shard s decoded from its tar's bytes (already sha256-checked) through its index, as
    `wds_store.decode_tar(..., with_images=False)` decodes it but without `image_files` (the
    hot path reads no images); None when the tar has no index that describes it exactly, or
    holds anything this path does not decode (the caller then reads it member by member)."""
    from enspipe.stores.wds.store import DIRECTION, SOURCE_PREFIX, _ext_set_problem, _lut_directions

    start, stop = shard_range(manifest, s)
    n = stop - start
    ident = manifest["identity"]
    geometry = tuple(ident["geometry"])
    K = int(ident["num_classes"])
    buf = np.frombuffer(data, np.uint8)
    found = _locate(buf) if n else None
    if found is None:
        return None
    index_head, content = found
    if len(content) > index_bound(n):  # not parsed: the member-by-member path refuses it by name
        return None
    parsed = _parse(content[:-_TRAILER], start, n)
    if parsed is None:
        return None
    patterns, which, size = parsed

    # Every pattern a layout-v2 sample with one kind of image (pixels or source) and cls in all or none.
    bounds = member_bounds(manifest)
    roles: list[dict[str, int]] = []
    for p in patterns:
        if _ext_set_problem(frozenset(p), "wds_layout.v2.json") or len(set(p)) != len(p):
            return None
        image = [e for e in p if e in ("png", "npy") or e.startswith(SOURCE_PREFIX)]
        if any(e.startswith(SOURCE_PREFIX) for e in image) and not sources:
            return None
        roles.append({("image" if e in image else e): i for i, e in enumerate(p)})
    used = [roles[p] for p in sorted(set(which.tolist()))]
    for optional in ("cls", "image"):
        if len({optional in r for r in used}) > 1:
            return None
    if "image" in used[0] and len({patterns[p][roles[p]["image"]][:4] == SOURCE_PREFIX for p in set(which.tolist())}) > 1:
        return None  # pixel and source-encoded images mixed: the slow path names it

    # Where every member sits: headers one after another from byte 0, the index's right after.
    lens = np.asarray([len(p) for p in patterns], np.int64)
    per_sample = lens[which]
    first = np.concatenate([[0], np.cumsum(per_sample)[:-1]]).astype(np.int64)
    sample_of = np.repeat(np.arange(n, dtype=np.int64), per_sample)
    pos = np.arange(len(size), dtype=np.int64) - first[sample_of]
    row_of = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)[which][sample_of] + pos
    flat_exts = [e for p in patterns for e in p]
    bound = np.asarray([member_bound(bounds, e) for e in flat_exts], np.int64)[row_of]
    if (size > bound).any():
        return None
    span = _BLOCK + -(-size // _BLOCK) * _BLOCK
    head = np.concatenate([[0], np.cumsum(span)]).astype(np.int64)
    if head[-1] != index_head:
        return None

    # The headers the index implies, byte for byte against the tar's.
    table = np.zeros((len(flat_exts), 100), np.uint8)
    for i, e in enumerate(flat_exts):
        name = ("000000000." + e).encode("ascii")
        if len(name) > 100:
            return None
        table[i, :len(name)] = np.frombuffer(name, np.uint8)
    names = table[row_of]
    keys = start + sample_of
    names[:, :9] = (keys[:, None] // 10 ** np.arange(8, -1, -1, dtype=np.int64) % 10).astype(np.uint8) + ord("0")
    # Compared as 64-bit words (headers are 512-aligned, the tar a multiple of 512 bytes): an
    # eighth of the gather's index work of comparing bytes.
    words = buf[:len(buf) // 8 * 8].view(np.uint64)
    got = words[(head[:-1, None] // 8) + np.arange(_BLOCK // 8)]
    if start + n > 10 ** 9 or not np.array_equal(got, _headers(names, size).view(np.uint64)):
        return None

    offset = head[:-1] + _BLOCK

    def member(role: str) -> tuple[np.ndarray, np.ndarray]:
        at = first + np.asarray([r.get(role, -1) for r in roles], np.int64)[which]
        return offset[at], size[at]

    nbytes = -(-int(np.prod(geometry)) // 8)
    try:
        o, sz = member("idx")
        if _ints(data, o, sz) != list(range(start, stop)):
            return None
        o, sz = member("key")
        keys_out = [bytes(data[a:a + b]).decode("utf-8") for a, b in zip(o.tolist(), sz.tolist())]
        o, sz = member("label.cls")
        label = np.asarray(_ints(data, o, sz), np.int64)
        if n and (label.min() < 0 or label.max() >= K):
            return None
        true_label = None
        if "cls" in used[0]:
            o, sz = member("cls")
            true_label = np.asarray(_ints(data, o, sz), np.int64)
        o, sz = member("logits.npy")
        npy = _npy_header(K)
        width = len(npy) + 2 * K
        if n and (sz != width).any():
            return None
        rows = buf[o[:, None] + np.arange(width)]
        if not (rows[:, :len(npy)] == np.frombuffer(npy, np.uint8)).all():
            return None
        logits = np.ascontiguousarray(rows[:, len(npy):]).view(np.float16).reshape(n, K)
        o, sz = member(DIRECTION)
        signs = np.empty((n, nbytes), np.uint8)
        zeros: dict[int, np.ndarray] = {}
        for j, (a, b) in enumerate(zip(o.tolist(), sz.tolist())):
            sign_plane, zero_plane = _planes(data[a:a + b], nbytes)
            signs[j] = np.frombuffer(sign_plane, np.uint8)
            if zero_plane:
                zeros[j] = np.frombuffer(zero_plane, np.uint8)
    except (ValueError, UnicodeDecodeError, zlib.error):
        return None
    return {"direction": _lut_directions(signs, zeros, geometry), "logits": logits, "label": label, "keys": keys_out,
            "has_images": "image" in used[0], "images": None, "image_files": None, "true_label": true_label}


_NPY_HEADERS: dict[int, bytes] = {}


def _npy_header(K: int) -> bytes:
    """The .npy header np.save writes for float16 [K] (what the writer's `_npy_bytes` writes)."""
    if K not in _NPY_HEADERS:
        import io

        b = io.BytesIO()
        np.save(b, np.zeros(K, np.float16), allow_pickle=False)
        _NPY_HEADERS[K] = b.getvalue()[:-2 * K]
    return _NPY_HEADERS[K]
