"""The rules a tar member passes before enspipe reads it, shared by every tar reader.

Two readers open tars that may come from elsewhere: the `wds:` dataset source
(`enspipe.data.wds`) and the WebDataset store backend (`enspipe.stores.wds.store`). Both
refuse what these checks find; each keeps its own error type and its own policy for what
is merely skipped. Every check is a small function of one member that returns a problem
(a short phrase) or a verdict, so a reader composes the ones it needs in its own order.

Sizes are checked from the headers, before a byte of a member is read: `check_member_size`
for the members a reader reads, and `oversized_metadata` for the members tarfile itself reads
whole while it lists a tar (pax headers, GNU long names), which no caller could check after
the fact. The caps come from `enspipe.util.limits` (or from a store's geometry).
"""
from __future__ import annotations

import re
import tarfile
from pathlib import PurePosixPath
from typing import BinaryIO

__all__ = [
    "PICKLE_EXTENSIONS",
    "check_member_name",
    "check_member_size",
    "is_pickle_member",
    "is_regular_member",
    "oversized_metadata",
    "pickle_extension",
    "split_member",
]

# webdataset's default decoders unpickle pyd/pickle/pkl (pickle.loads) and torch.load pth;
# pt is torch.save's other common suffix. Nothing is unpickled from data (DESIGN §5), so a
# member with any of these extensions is refused, never skipped: a shard meant to carry
# them is not what we think it is.
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) by WebDataset's rule: the key is the path up to the first dot of
    the basename, the extension (lower-cased) is the rest of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def check_member_name(name: str) -> str | None:
    """Why a member name could escape the folder it is read into, or None if it cannot."""
    if name.startswith("/"):
        return "an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a '..' component"
    return None


def pickle_extension(name: str) -> str | None:
    """The first extension part of the member's basename that a pickle decoder would
    load (lower-cased), or None."""
    for part in split_member(name)[1].split("."):
        if part in PICKLE_EXTENSIONS:
            return part
    return None


def is_pickle_member(name: str) -> bool:
    return pickle_extension(name) is not None


def is_regular_member(info: tarfile.TarInfo) -> bool:
    """A plain file: not a link (hard or symbolic), directory, device or fifo."""
    return info.isreg()


def check_member_size(info: tarfile.TarInfo, limit: int) -> str | None:
    """Why a member is too large to read (its size as its header gives it), or None."""
    if info.size > limit:
        return f"{info.size} bytes, above the limit of {limit}"
    return None


# Members whose data tarfile reads into memory while it lists the tar (before any caller
# sees them): pax extended headers (x, g) and GNU long names / link names (L, K).
_METADATA_TYPES = frozenset(b"xgLK")
_BLOCK = 512


def _header_size(field: bytes) -> int | None:
    """The size field of a tar header: octal digits, or GNU base-256 (first byte 0x80)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return None  # also base-256 negatives (0xff): not a size


def oversized_metadata(f: BinaryIO, limit: int) -> str | None:
    """Scan a tar's 512-byte headers, seeking over member data, for a metadata member larger
    than `limit` bytes; None if there is none. A header that does not parse ends the scan:
    tarfile then reports the damage itself. A pax header's `size` record (members over 8 GiB)
    is honoured, so the scan lands on the same headers as tarfile."""
    offset, pax_size = 0, None
    while True:
        f.seek(offset)
        block = f.read(_BLOCK)
        if len(block) < _BLOCK or block == bytes(_BLOCK):
            return None
        size = _header_size(block[124:136])
        if size is None:
            return None
        kind = block[156]
        if kind in _METADATA_TYPES:
            if size > limit:
                what = "pax header" if kind in b"xg" else "long name"
                return f"a {what} member of {size} bytes (at byte {offset}), above the limit of {limit} for tar metadata"
            if kind == ord("x"):
                found = re.search(rb"(?:^|\n)\d+ size=(\d+)\n", f.read(size))
                pax_size = int(found.group(1)) if found else None
        else:
            size, pax_size = (pax_size if pax_size is not None else size), None
        offset += _BLOCK + -(-size // _BLOCK) * _BLOCK
