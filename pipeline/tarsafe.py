"""The rules a tar member passes before enspipe reads it, shared by every tar reader.

Two readers open tars that may come from elsewhere: the `wds:` dataset source
(`enspipe.data.wds`) and the WebDataset store backend (`enspipe.stores.wds_store`). Both
refuse what these checks find; each keeps its own error type and its own policy for what
is merely skipped. Every check is a small function of one member that returns a problem
(a short phrase) or a verdict, so a reader composes the ones it needs in its own order.

Issue 12 adds bounds on member sizes: they belong here, as one more check of the same
shape (`check_member_size(info) -> str | None`) beside `check_member_name`.
"""
from __future__ import annotations

import tarfile
from pathlib import PurePosixPath

__all__ = [
    "PICKLE_EXTENSIONS",
    "check_member_name",
    "is_pickle_member",
    "is_regular_member",
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
