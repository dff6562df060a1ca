"""What every dataset source shares: geometry, fingerprint, the SampleSource interface,
pixel and key helpers, the data root and the optional torchvision download."""
from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from enspipe.util import netcheck
from enspipe.util.errors import DataError

DEFAULT_DATA_ROOT = Path("~/.cache/enspipe/data")

# (root, host) -> why nothing can be downloaded from host into root, or None
Blocker = Callable[[Path, str], str | None]


# -----------------------------------------------------------------------------
# geometry and fingerprint

@dataclass(frozen=True)
class Geometry:
    """The shape of every image of a source and the preprocessing that produced it."""

    channels: int
    height: int
    width: int
    preprocess: str  # part of the identity: the same pixels cropped differently differ

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(int(d["channels"]), int(d["height"]), int(d["width"]), str(d["preprocess"]))


def _fingerprint(*, source: str, split: str, limit: int | None, geometry: Geometry,
                 classes: Sequence[str], keys: Sequence[str], labels: np.ndarray,
                 content: Iterable[Any], order: str | None = None) -> str:
    """sha256 over header JSON, keys, labels and content; stable across processes and
    machines (no Python hash(), fixed byte order, length-prefixed parts). `order` names a
    sample order other than the source's own (the header of a source without one is as before)."""
    h = hashlib.sha256()
    header = {"fingerprint_version": 1, "source": source, "split": split,
              "num_samples": len(keys), "limit": limit, "geometry": geometry.to_dict(),
              "classes": list(classes)}
    if order is not None:
        header["order"] = order
    parts = [json.dumps(header, sort_keys=True, separators=(",", ":")).encode(),
             "\n".join(keys).encode(),
             np.ascontiguousarray(labels, dtype="<i8").tobytes()]
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    for chunk in content:  # pixel bytes or per-sample metadata records
        h.update(chunk)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# the sample order of class-grouped layouts (issue 22)

CLASS_INTERLEAVED = "class-interleaved"


def class_interleaved(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    """The canonical order of a source whose files are grouped by class (an ImageFolder is
    1,000 folders of ~1,281 images): the permutation `p` such that `files[p]` spreads every
    class evenly over the whole order.

    The j-th of a class's n_c samples (in its file order) goes to key (j + 1/2) / n_c; samples
    are sorted by key, then label, then file position. With equal classes this is a round
    robin over the classes; with unequal ones every class keeps its share in every stretch of
    the order, so a contiguous block of 256 samples holds the classes as the whole data set
    does, and the block reader (`enspipe.sampling`) mixes classes without per-sample reads.
    A prefix of the order (`limit`) is a class-stratified subset. Integer keys would need
    fractions; float (2j + 1) / (2 n_c) is a correctly rounded quotient of exact integers, so
    it is the same on every machine.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    by_class = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    rank_in_class = np.empty(n, dtype=np.int64)
    rank_in_class[by_class] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    key = (2 * rank_in_class + 1) / (2 * counts[labels])
    return np.lexsort((np.arange(n), labels, key))


SUPERSEDED_FILE_ORDER = ("it was written in the class-sorted file order that enspipe used before samples "
                         "were class-interleaved; recompute it with `enspipe precompute`")


# -----------------------------------------------------------------------------
# the common interface

class SampleSource(Dataset):
    """A finite image set in one canonical order. Subclasses provide `images_uint8`."""

    name: str  # canonical spec: "digits", "mnist", "cifar10", "imagefolder:/abs", "wds:PAT"
    split: str
    limit: int | None
    geometry: Geometry
    classes: tuple[str, ...]
    keys: list[str]
    labels: np.ndarray  # int64 [N]
    fingerprint: str
    order: str | None = None  # CLASS_INTERLEAVED where the canonical order is not the file order

    @cached_property
    def superseded(self) -> dict[str, str]:
        """Older fingerprints of these samples -> why a store made for one is not read. Computed
        on first read, which a store check does only when a store's fingerprint does not match
        (a second pass over every file's record: never paid by a matching store)."""
        return self._superseded()

    def _superseded(self) -> dict[str, str]:
        """What `superseded` computes: a source whose canonical order changed overrides it."""
        return {}

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = range(len(self))[operator.index(i)]  # IndexError past the end ends iteration
        return self.images(np.array([i]))[0], int(self.labels[i])

    def images_uint8(self, indices: slice | int | Sequence[int] | np.ndarray | torch.Tensor
                     ) -> np.ndarray:
        """The exact pixels, uint8 [n, C, H, W], in a fresh writable array."""
        raise NotImplementedError

    def encoded_image(self, i: int) -> tuple[str, bytes] | None:
        """Sample i's image as the source stores it, (lower-case extension, bytes), before any
        decoding or preprocessing; None for sources held as pixels (digits, mnist, cifar10)."""
        return None

    def images(self, indices: slice | int | Sequence[int] | np.ndarray | torch.Tensor
               ) -> torch.Tensor:
        """float32 [n, C, H, W] in [0, 1]; equal to images_uint8(indices) / 255."""
        return torch.from_numpy(self.images_uint8(indices)).to(torch.float32).div_(255)

    def identity(self) -> dict:
        ident = {"source": self.name, "split": self.split, "num_samples": len(self),
                 "limit": self.limit, "geometry": self.geometry.to_dict(),
                 "fingerprint": self.fingerprint, "num_classes": self.num_classes}
        if self.order is not None:  # only where there is one: other sources' identities stay as they were
            ident["order"] = self.order
        return ident

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, N={len(self)}, "
                f"shape={self.geometry.shape}, fingerprint={self.fingerprint[:12]})")


class Opener(Protocol):
    """How `create_dataset` opens every source: `arg` is what follows 'kind:' in the spec
    (None for sources without one); the other arguments are already validated."""

    def __call__(self, arg: str | None, *, split: str, limit: int | None,
                 image_size: int | None, data_root: str | os.PathLike | None
                 ) -> SampleSource: ...


def _as_index(indices: Any) -> slice | np.ndarray:
    """A slice stays a slice (cheap views); anything else becomes an int64 array."""
    if isinstance(indices, slice):
        return indices
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices)
    if idx.ndim == 0:
        idx = idx.reshape(1)
    if idx.size and idx.dtype.kind not in "iu":
        raise TypeError(f"sample indices must be integers or a slice, got dtype {idx.dtype}")
    return idx.astype(np.int64, copy=False)


class ArraySource(SampleSource):
    """A source held in memory as uint8 [N, C, H, W]: digits, mnist, cifar10."""

    def __init__(self, *, name: str, split: str, limit: int | None, geometry: Geometry,
                 classes: Sequence[str], pixels: np.ndarray, labels: np.ndarray):
        if limit is not None:
            pixels, labels = pixels[:limit], labels[:limit]
        assert pixels.dtype == np.uint8 and pixels.shape[1:] == geometry.shape
        self.name, self.split, self.limit, self.geometry = name, split, limit, geometry
        self.classes = tuple(classes)
        self._pixels = np.ascontiguousarray(pixels)  # a prefix of a C array: no copy
        self.labels = np.array(labels, dtype=np.int64)  # own writable copy for callers
        self.keys = [f"{name}-{split}-{i:06d}" for i in range(len(self.labels))]
        self.fingerprint = _fingerprint(
            source=name, split=split, limit=limit, geometry=geometry, classes=self.classes,
            keys=self.keys, labels=self.labels, content=[self._pixels])

    def images_uint8(self, indices: Any) -> np.ndarray:
        idx = _as_index(indices)
        out = self._pixels[idx]  # vectorised: the hot path of training and precompute
        return out.copy() if isinstance(idx, slice) else out  # fancy indexing copies already


class LazySource(SampleSource):
    """A source decoded one file at a time; subclasses provide `_load(i)`."""

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def images_uint8(self, indices: Any) -> np.ndarray:
        idx = _as_index(indices)
        order = range(len(self))[idx] if isinstance(idx, slice) else idx
        out = np.empty((len(order), *self.geometry.shape), dtype=np.uint8)
        positions = range(len(self))
        for j, i in enumerate(order):
            out[j] = self._load(positions[int(i)])  # range indexing checks bounds, wraps -1
        return out


# -----------------------------------------------------------------------------
# pixel helpers

def _quantise(x: torch.Tensor) -> np.ndarray:
    """float in [0, 1] -> uint8, round half to even (torch.round), so k/255 is a fixed point."""
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _resize_tag(height: int, width: int, size: int) -> str:
    # Downscaling without antialiasing aliases; torch's antialias path fixes that.
    return "bilinear" if size >= max(height, width) else "bilinear-antialias"


def _resize_uint8(pixels: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """uint8 [N, C, h, w] -> uint8 [N, C, size, size], torch bilinear in float64.

    float64 keeps the result away from rounding ties, so the quantised pixels (and with
    them the fingerprint) do not depend on the SIMD path a CPU takes."""
    n, c, h, w = pixels.shape
    antialias = _resize_tag(h, w, size) == "bilinear-antialias"
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for s in range(0, n, chunk):
        x = torch.from_numpy(np.asarray(pixels[s:s + chunk], dtype=np.float64) / 255.0)
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=antialias)
        out[s:s + chunk] = _quantise(y)
    return out


def _native_geometry(channels: int, native: int, image_size: int | None, tag: str
                     ) -> tuple[int | None, Geometry]:
    """(the side to resize to, or None to keep the native square pixels; the geometry)
    of a source whose images are `native` x `native`, as pixels of format `tag`."""
    size = image_size if image_size not in (None, native) else None
    preprocess = f"{tag}:uint8"
    if size is not None:
        preprocess += f":{_resize_tag(native, native, size)}->{size}x{size}:uint8"
    return size, Geometry(channels, size or native, size or native, preprocess)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # cached arrays are shared by every source built from them
    return a


# -----------------------------------------------------------------------------
# files: cache stamps and keys of file-based sources

def _stamp(*paths: Path) -> tuple:
    """Cache key part that changes when a file is replaced or rewritten."""
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def _sanitise_keys(names: Sequence[str]) -> list[str]:
    """Paths -> keys without '/' or '.' (WebDataset splits a member name at its first dot).
    Two paths that sanitise alike ("a/b_c.png", "a_b/c.png") are told apart by suffixing
    the later one with its index, which is deterministic given the canonical order."""
    keys, seen = [], set()
    for i, name in enumerate(names):
        key = name.replace("\\", "_").replace("/", "_").replace(".", "_")
        while key in seen:
            key = f"{key}-{i}"
        seen.add(key)
        keys.append(key)
    return keys


# -----------------------------------------------------------------------------
# the data root and downloads (only when files are missing, the root is writable and
# the network is up)

def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """--data-root, else $ENSPIPE_DATA, else ~/.cache/enspipe/data (not created here)."""
    chosen = data_root if data_root not in (None, "") else os.environ.get("ENSPIPE_DATA")
    return Path(chosen or DEFAULT_DATA_ROOT).expanduser().absolute()


def _download(dataset: str, *, title: str, root: Path, folder: Path, split: str, host: str,
              blocker: Blocker = netcheck.download_blocker) -> str:
    """Download torchvision's `dataset` into root if we can. Returns the reason to give
    when files are still missing afterwards: why no download was tried, or that it failed."""
    why_not = blocker(root, host)
    if why_not is not None:
        return why_not
    try:
        import torchvision

        getattr(torchvision.datasets, dataset)(str(root), train=split == "train", download=True)
    except Exception as e:  # any failure of the fetch is the user's environment
        raise DataError(f"{title} not found in {folder} and downloading it failed: "
                        f"{e}".replace("\n", " ")) from e
    return "download failed"
