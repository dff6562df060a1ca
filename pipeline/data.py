"""Dataset sources: one canonical sample order, stable keys, labels, geometry, fingerprint.

Every source is a `SampleSource`: sample `i` in `[0, N)` has a stable string key, an int
label and an image preprocessed to a fixed geometry `(C, H, W)`. Images are held and
produced as uint8 pixels, so the float images in `[0, 1]` are exactly `k / 255` and a PNG
round trip in a store is lossless.

Sources (DESIGN §2):

    digits              scikit-learn's bundled 8x8 digits, bilinear-resized to 1x28x28.
                        Split: a fixed permutation (np.random.default_rng(0)) of the 1797
                        samples; its first 1500 are `train`, the other 297 `test`; each
                        split is kept in scikit-learn's order (sorted original indices).
    mnist               the official IDX files in torchvision's layout ROOT/MNIST/raw/
                        (.gz or extracted), read directly; ROOT is never written to unless
                        the files are missing and must be downloaded.
    cifar10             torchvision's ROOT/cifar-10-batches-py/, read with an unpickler
                        that only builds numpy arrays (see `_NumpyOnlyUnpickler`).
    imagefolder:PATH    class folders (ImageNet layout), decoded lazily with PIL.
    wds:PATTERN         WebDataset tar shards (image + .cls), indexed once and read by
                        seeking to each member.

The fingerprint is the sha256 of a canonical JSON header (source, split, N, limit,
geometry, classes), the keys, the labels and the content. Content is the pixel bytes for
the in-memory sources (digits, mnist, cifar10); for the lazy sources, which may be far
too large to read at load time, it is per-sample file metadata (imagefolder: file size and
mtime; wds: member size and the mtime in its tar header). The lazy sources hash their
source kind, not their path, so a copy that keeps mtimes (rsync -a) keeps its fingerprint.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import operator
import os
import pickle
import socket
import tarfile
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from enspipe.errors import DataError

SPLITS = ("train", "test")
KNOWN_SOURCES = ("digits", "mnist", "cifar10", "imagefolder:PATH", "wds:PATTERN")
DEFAULT_DATA_ROOT = Path("~/.cache/enspipe/data")

DIGITS_TRAIN_SIZE = 1500  # of 1797; the other 297 are the test split
DIGITS_SIZE = 28  # MNIST's geometry, so MNIST architectures run on the offline default

IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGEFOLDER_RESIZE, IMAGEFOLDER_CROP = 256, 224  # the standard ImageNet eval transform
IMAGEFOLDER_CROP_FRACTION = 0.875  # resize = round(crop / 0.875) when image_size is given

WDS_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
# webdataset's default decoders unpickle these (pickle.loads / torch.load): we refuse them.
WDS_PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth", "pt")


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
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(int(d["channels"]), int(d["height"]), int(d["width"]), str(d["preprocess"]))


def _fingerprint(*, source: str, split: str, limit: int | None, geometry: Geometry,
                 classes: Sequence[str], keys: Sequence[str], labels: np.ndarray,
                 content: Iterable[Any]) -> str:
    """sha256 over header JSON, keys, labels and content; stable across processes and
    machines (no Python hash(), fixed byte order, length-prefixed parts)."""
    h = hashlib.sha256()
    header = {"fingerprint_version": 1, "source": source, "split": split,
              "num_samples": len(keys), "limit": limit, "geometry": geometry.to_dict(),
              "classes": list(classes)}
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
# the common interface

class SampleSource(Dataset):
    """A finite image set in one canonical order. Subclasses provide `_pixels_at`."""

    name: str  # canonical spec: "digits", "mnist", "cifar10", "imagefolder:/abs", "wds:PAT"
    split: str
    limit: int | None
    geometry: Geometry
    classes: tuple[str, ...]
    keys: list[str]
    labels: np.ndarray  # int64 [N]
    fingerprint: str

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

    def images(self, indices: slice | int | Sequence[int] | np.ndarray | torch.Tensor
               ) -> torch.Tensor:
        """float32 [n, C, H, W] in [0, 1]; equal to images_uint8(indices) / 255."""
        return torch.from_numpy(self.images_uint8(indices)).to(torch.float32).div_(255)

    def identity(self) -> dict:
        return {"source": self.name, "split": self.split, "num_samples": len(self),
                "limit": self.limit, "geometry": self.geometry.to_dict(),
                "fingerprint": self.fingerprint, "num_classes": self.num_classes}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, N={len(self)}, "
                f"shape={self.geometry.shape}, fingerprint={self.fingerprint[:12]})")


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


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # cached arrays are shared by every source built from them
    return a


# -----------------------------------------------------------------------------
# downloads (only when files are missing, the root is writable and the network is up)

def _network_available(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """Can we open a TCP connection to host? Bounded by `timeout` even if DNS hangs."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _download_blocker(root: Path, host: str) -> str | None:
    """Why files cannot be downloaded into root, or None if they can."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return f"{existing} is read-only, so they cannot be downloaded there"
    if not _network_available(host):
        return "no network to download them"
    return None


# -----------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 digits (offline default)

@functools.lru_cache(maxsize=8)
def _digits_arrays(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: sklearn import takes ~0.7 s

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    idx = np.sort(perm[:DIGITS_TRAIN_SIZE] if split == "train" else perm[DIGITS_TRAIN_SIZE:])
    x = torch.from_numpy(d.images[idx] / 16.0)[:, None]  # float64 [n,1,8,8] in [0,1]
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                      antialias=_resize_tag(8, 8, size) == "bilinear-antialias")
    return _readonly(_quantise(y)), _readonly(d.target[idx].astype(np.int64))


def _digits(split: str, limit: int | None, image_size: int | None) -> SampleSource:
    size = image_size or DIGITS_SIZE
    pixels, labels = _digits_arrays(split, size)
    geometry = Geometry(1, size, size, f"digits8x8:{_resize_tag(8, 8, size)}->{size}x{size}:uint8")
    return ArraySource(name="digits", split=split, limit=limit, geometry=geometry,
                       classes=[str(k) for k in range(10)], pixels=pixels, labels=labels)


# -----------------------------------------------------------------------------
# mnist: IDX files, read directly (the root may be read-only)

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (LeCun's format) of unsigned bytes: magic 0x0000_08_<ndim>, big-endian
    uint32 dims, then the data. Read-only array over the file's bytes."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation EOF
        raise DataError(f"cannot read {path}: {e} (delete it and download it again)") from e
    head = 4 + 4 * ndim
    if len(raw) < head or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes "
                        f"(bad magic number {raw[:4].hex() or 'none'})")
    dims = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    expected = head + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or corrupt: its header promises {expected} "
                        f"bytes, the file holds {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _stamp(*paths: Path) -> tuple:
    """Cache key part that changes when a file is replaced or rewritten."""
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


@functools.lru_cache(maxsize=4)
def _mnist_arrays(images: Path, labels: Path, stamp: tuple, size: int | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    x, y = _parse_idx(images, 3), _parse_idx(labels, 1)
    if x.shape[1:] != (28, 28):
        raise DataError(f"{images} holds {x.shape[1]}x{x.shape[2]} images, MNIST's are 28x28")
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if y.size and y.max() > 9:
        raise DataError(f"{labels} holds label {int(y.max())}, MNIST's labels are 0..9")
    pixels = x[:, None]  # [N,1,28,28], a view
    if size is not None:
        pixels = _readonly(_resize_uint8(pixels, size))
    return pixels, _readonly(y.astype(np.int64))


def _find_idx_files(raw_dir: Path, split: str) -> list[Path | None]:
    # Prefer the extracted file (torchvision leaves both); fall back to the .gz.
    found: list[Path | None] = []
    for stem in MNIST_FILES[split]:
        hits = [p for p in (raw_dir / stem, raw_dir / f"{stem}.gz") if p.is_file()]
        found.append(hits[0] if hits else None)
    return found


def _mnist(split: str, limit: int | None, image_size: int | None, root: Path) -> SampleSource:
    raw_dir = root / "MNIST" / "raw"
    found = _find_idx_files(raw_dir, split)
    if None in found:
        missing = [f"{stem}.gz" for stem, p in zip(MNIST_FILES[split], found) if p is None]
        blocker = _download_blocker(root, "ossci-datasets.s3.amazonaws.com")
        if blocker is None:
            try:
                import torchvision

                torchvision.datasets.MNIST(str(root), train=split == "train", download=True)
            except Exception as e:  # any failure of the fetch is the user's environment
                raise DataError(f"MNIST not found in {raw_dir} and downloading it failed: "
                                f"{e}".replace("\n", " ")) from e
            found = _find_idx_files(raw_dir, split)
        if None in found:
            raise DataError(f"MNIST not found: expected {' and '.join(missing)} in {raw_dir} "
                            f"(set --data-root or ENSPIPE_DATA); {blocker or 'download failed'}")
    images, labels = found
    size = image_size if image_size not in (None, 28) else None
    pixels, y = _mnist_arrays(images, labels, _stamp(images, labels), size)
    preprocess = "mnist-idx:uint8"
    if size is not None:
        preprocess += f":{_resize_tag(28, 28, size)}->{size}x{size}:uint8"
    return ArraySource(name="mnist", split=split, limit=limit,
                       geometry=Geometry(1, size or 28, size or 28, preprocess),
                       classes=[str(k) for k in range(10)], pixels=pixels, labels=y)


# -----------------------------------------------------------------------------
# cifar10: torchvision's pickled batches, read without running anything from the file

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_FILES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR-10 batches are pickled dicts of numpy arrays, lists, ints and strings.

    A pickle can call any importable function (os.system included), and DESIGN §5 says
    nothing is unpickled from data. Plain containers and scalars need no globals at all;
    so this unpickler resolves only the names that rebuild a numpy array (and
    `_codecs.encode`, which Python 3 protocol-2 pickles use for bytes). Anything else
    raises DataError before it runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def __init__(self, file: io.BufferedReader, path: Path):
        super().__init__(file, encoding="latin1")  # the batches were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise DataError(f"{self.path} is not a plain CIFAR-10 batch: refusing to unpickle "
                            f"{module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.path} is not a plain CIFAR-10 batch: it has persistent ids")


def _load_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # a corrupt pickle fails in many ways; all mean "bad file"
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a dict)")
    # Python 2 str keys arrive as str (latin1), Python 3 bytes keys as bytes.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


@functools.lru_cache(maxsize=4)
def _cifar10_arrays(files: tuple[Path, ...], stamp: tuple, size: int | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for path in files:
        batch = _load_cifar_pickle(path)
        x, y = batch.get("data"), batch.get("labels")
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2
                and x.shape[1] == 3 * 32 * 32 and y is not None and len(y) == len(x)):
            raise DataError(f"{path} is not a CIFAR-10 batch (expected uint8 data [n, 3072] "
                            f"and n labels)")
        xs.append(x.reshape(-1, 3, 32, 32))  # rows are R, G, B planes: already CHW
        ys.append(np.asarray(y, dtype=np.int64))
    pixels, labels = np.concatenate(xs), np.concatenate(ys)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 labels must be 0..9, found {labels.min()}..{labels.max()}")
    if size is not None:
        pixels = _resize_uint8(pixels, size)
    return _readonly(pixels), _readonly(labels)


def _cifar10(split: str, limit: int | None, image_size: int | None, root: Path) -> SampleSource:
    folder = root / "cifar-10-batches-py"
    files = [folder / name for name in CIFAR10_FILES[split]]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        blocker = _download_blocker(root, "www.cs.toronto.edu")
        if blocker is None:
            try:
                import torchvision

                torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
            except Exception as e:
                raise DataError(f"CIFAR-10 not found in {folder} and downloading it failed: "
                                f"{e}".replace("\n", " ")) from e
        if not all(p.is_file() for p in files):
            raise DataError(f"CIFAR-10 not found: expected {', '.join(missing)} in {folder} "
                            f"(set --data-root or ENSPIPE_DATA); {blocker or 'download failed'}")
    classes: Sequence[str] = CIFAR10_CLASSES
    if (folder / "batches.meta").is_file():
        names = _load_cifar_pickle(folder / "batches.meta").get("label_names")
        if isinstance(names, list) and len(names) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    size = image_size if image_size not in (None, 32) else None
    pixels, labels = _cifar10_arrays(tuple(files), _stamp(*files), size)
    preprocess = "cifar10-batches:uint8"
    if size is not None:
        preprocess += f":{_resize_tag(32, 32, size)}->{size}x{size}:uint8"
    return ArraySource(name="cifar10", split=split, limit=limit,
                       geometry=Geometry(3, size or 32, size or 32, preprocess),
                       classes=classes, pixels=pixels, labels=labels)


# -----------------------------------------------------------------------------
# keys of file-based sources

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
# imagefolder:PATH — ImageNet layout, decoded lazily

def _imagefolder_split_dirs(root: Path, split: str) -> tuple[Path, list[Path]]:
    """The folder of this split, and every split folder (their classes are pooled so that
    a label means the same class in train and test even if one split lacks a class)."""
    present = [root / s for s in ("train", "val", "test") if (root / s).is_dir()]
    if not present:
        return root, [root]  # no split folders: PATH itself serves every split
    wanted = ["train"] if split == "train" else ["val", "test"]
    for name in wanted:
        if (root / name).is_dir():
            return root / name, present
    raise DataError(f"{root} has split folders but no {' or '.join(f'{w}/' for w in wanted)} "
                    f"for split '{split}'")


def _class_dirs(folder: Path) -> list[str]:
    return [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]


class ImageFolderSource(LazySource):
    """Class folders of images: classes are the sorted folder names, files are walked in
    sorted order (hidden files skipped: macOS '._x.jpg' files are not images). Each image
    is decoded to RGB, its shorter side resized to `resize` (bilinear, antialiased) and
    center-cropped to `crop`, with torchvision's functions, as ImageNet evaluation does."""

    def __init__(self, path: Path, split: str, limit: int | None, image_size: int | None):
        root = path.expanduser().resolve()
        if not root.is_dir():
            raise DataError(f"imagefolder: {root} is not a directory")
        folder, split_dirs = _imagefolder_split_dirs(root, split)
        self.crop = image_size or IMAGEFOLDER_CROP
        self.resize = (round(self.crop / IMAGEFOLDER_CROP_FRACTION) if image_size
                       else IMAGEFOLDER_RESIZE)
        self.classes = tuple(sorted({c for d in split_dirs for c in _class_dirs(d)}))
        if not self.classes:
            raise DataError(f"imagefolder: {folder} has no class folders (expected "
                            f"{folder}/CLASS/IMAGE.jpg)")
        files: list[str] = []
        labels: list[int] = []
        for label, cls in enumerate(self.classes):
            if not (folder / cls).is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(folder / cls, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if not fn.startswith(".") and fn.lower().endswith(IMAGEFOLDER_EXTENSIONS):
                        files.append(os.path.relpath(os.path.join(dirpath, fn), folder))
                        labels.append(label)
        if not files:
            raise DataError(f"imagefolder: no images ({', '.join(IMAGEFOLDER_EXTENSIONS)}) "
                            f"under {folder}")
        if limit is not None:
            files, labels = files[:limit], labels[:limit]
        self.name, self.split, self.limit = f"imagefolder:{root}", split, limit
        self.folder = folder
        self._files = [f.replace(os.sep, "/") for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = _sanitise_keys(self._files)
        self.geometry = Geometry(3, self.crop, self.crop,
                                 f"rgb:resize{self.resize}:center-crop{self.crop}:bilinear:uint8")
        stats = (os.stat(folder / f) for f in self._files)  # size+mtime: see module docstring
        self.fingerprint = _fingerprint(
            source="imagefolder", split=split, limit=limit, geometry=self.geometry,
            classes=self.classes, keys=self.keys, labels=self.labels,
            content=(f"{s.st_size}:{s.st_mtime_ns}\n".encode() for s in stats))

    def _load(self, i: int) -> np.ndarray:
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        path = self.folder / self._files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {path}: {e}") from e
        im = TF.resize(im, self.resize, interpolation=InterpolationMode.BILINEAR)
        im = TF.center_crop(im, [self.crop, self.crop])
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


# -----------------------------------------------------------------------------
# wds:PATTERN — WebDataset tar shards, indexed once, read by seeking

def _expand_shards(pattern: str) -> list[Path]:
    from braceexpand import braceexpand  # a webdataset dependency

    if "://" in pattern or pattern.startswith("pipe:"):
        raise DataError(f"wds: only local shard files are supported, got {pattern!r}")
    shards = [Path(p).expanduser().absolute() for p in braceexpand(pattern)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"wds: shard {missing[0]} does not exist{more}")
    return shards


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


@functools.lru_cache(maxsize=4)
def _wds_index(shards: tuple[Path, ...], stamp: tuple) -> dict:
    """Scan the tars: per sample its raw key, label, and image member (shard, offset, size,
    extension, tar mtime). Nothing is decoded except the ascii `.cls` payloads."""
    keys: list[str] = []
    labels: list[int] = []
    members: list[tuple[int, int, int, str, int]] = []
    seen: set[str] = set()
    for s, shard in enumerate(shards):
        try:
            tf = tarfile.open(shard, mode="r:")  # uncompressed: random access needs offsets
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"wds: {shard} is not an uncompressed tar file: {e}") from e
        with tf:
            groups: list[tuple[str, list[tarfile.TarInfo]]] = []
            try:
                for ti in tf:
                    name = ti.name
                    if name.startswith("/") or ".." in PurePosixPath(name).parts:
                        raise DataError(f"wds: unsafe member name {name!r} in {shard}")
                    if not ti.isfile():
                        continue
                    key, ext = _split_member(name)
                    if any(part in WDS_PICKLE_EXTENSIONS for part in ext.split(".")):
                        raise DataError(f"wds: member {name!r} in {shard} is a pickle; "
                                        f"enspipe never unpickles data")
                    if key.rpartition("/")[2].startswith("__"):
                        continue  # webdataset's metadata members (__index__ etc.)
                    if groups and groups[-1][0] == key:  # consecutive members form a sample
                        groups[-1][1].append(ti)
                    else:
                        groups.append((key, [ti]))
                for key, tis in groups:
                    if key in seen:
                        raise DataError(f"wds: sample key {key!r} occurs twice (again in {shard})")
                    seen.add(key)
                    images = [ti for ti in tis if _split_member(ti.name)[1] in WDS_IMAGE_EXTENSIONS]
                    cls = [ti for ti in tis if _split_member(ti.name)[1] == "cls"]
                    if len(images) != 1 or len(cls) != 1:
                        raise DataError(f"wds: sample {key!r} in {shard} needs exactly one image "
                                        f"({'/'.join(WDS_IMAGE_EXTENSIONS)}) and one .cls member")
                    payload = tf.extractfile(cls[0]).read()
                    try:
                        label = int(payload.decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        raise DataError(f"wds: sample {key!r} in {shard} has a .cls that is not "
                                        f"an ascii integer: {payload[:20]!r}") from None
                    if label < 0:
                        raise DataError(f"wds: sample {key!r} in {shard} has negative label {label}")
                    im = images[0]
                    keys.append(key)
                    labels.append(label)
                    members.append((s, im.offset_data, im.size, _split_member(im.name)[1],
                                    int(im.mtime)))
            except tarfile.TarError as e:
                raise DataError(f"wds: {shard} is corrupt: {e}") from e
    if not keys:
        raise DataError(f"wds: no samples in {len(shards)} shard(s) starting {shards[0]}")
    return {"keys": keys, "labels": np.asarray(labels, dtype=np.int64), "members": members}


class WebDatasetSource(LazySource):
    """Samples of WebDataset shards in shard order, then tar order. Member files ending in
    a pickle extension (WDS_PICKLE_EXTENSIONS) make the whole source a DataError: refusing
    is safer than skipping, since a shard meant to carry them is not what we think it is.
    Geometry is the first image's (mode L -> 1 channel, anything else -> RGB); every other
    image must match it, which is checked as it is decoded (DataError naming the key).
    With image_size every image is resized to image_size x image_size (PIL bilinear)."""

    def __init__(self, pattern: str, split: str, limit: int | None, image_size: int | None):
        self._shards = _expand_shards(pattern)
        index = _wds_index(tuple(self._shards), _stamp(*self._shards))
        keys, labels, members = index["keys"], index["labels"], index["members"]
        if limit is not None:
            keys, labels, members = keys[:limit], labels[:limit], members[:limit]
        self.name = f"wds:{os.path.abspath(os.path.expanduser(pattern))}"
        self.split, self.limit = split, limit
        self._members = members
        self._raw_keys = keys
        self.keys = _sanitise_keys(keys)
        self.labels = np.array(labels, dtype=np.int64)
        self.classes = tuple(str(k) for k in range(int(index["labels"].max()) + 1))
        self.image_size = image_size
        first = self._decode(0)
        self._mode = "L" if first.mode in ("L", "1") else "RGB"
        c = 1 if self._mode == "L" else 3
        if image_size:
            h = w = image_size
            preprocess = f"wds:{self._mode.lower()}:resize{image_size}x{image_size}:bilinear:uint8"
        else:
            w, h = first.size
            preprocess = f"wds:{self._mode.lower()}:uint8"
        self.geometry = Geometry(c, h, w, preprocess)
        self.fingerprint = _fingerprint(
            source="wds", split=split, limit=limit, geometry=self.geometry,
            classes=self.classes, keys=self.keys, labels=self.labels,
            content=(f"{ext}:{size}:{mtime}\n".encode() for _, _, size, ext, mtime in members))

    def _decode(self, i: int) -> "Image.Image":
        from PIL import Image

        shard_no, offset, size, _, _ = self._members[i]
        with open(self._shards[shard_no], "rb") as f:  # open per read: safe in forked workers
            f.seek(offset)
            data = f.read(size)
        try:
            if len(data) != size:
                raise OSError(f"shard ends after {len(data)} of {size} bytes")
            im = Image.open(io.BytesIO(data))
            im.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"wds: cannot decode the image of sample {self._raw_keys[i]!r} "
                            f"in {self._shards[shard_no]}: {e}") from e
        return im

    def _load(self, i: int) -> np.ndarray:
        from PIL import Image

        im = self._decode(i).convert(self._mode)
        c, h, w = self.geometry.shape
        if self.image_size:
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        elif im.size != (w, h):
            raise DataError(f"wds: sample {self._raw_keys[i]!r} is {im.size[0]}x{im.size[1]}, "
                            f"the first sample is {w}x{h} (pass an image size to resize all)")
        a = np.asarray(im, dtype=np.uint8)
        return a[None] if c == 1 else a.transpose(2, 0, 1)


# -----------------------------------------------------------------------------
# entry points

def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """--data-root, else $ENSPIPE_DATA, else ~/.cache/enspipe/data (not created here)."""
    chosen = data_root if data_root not in (None, "") else os.environ.get("ENSPIPE_DATA")
    return Path(chosen or DEFAULT_DATA_ROOT).expanduser().absolute()


def parse_source(spec: str) -> tuple[str, str | None]:
    """'mnist' -> ('mnist', None); 'imagefolder:/x' -> ('imagefolder', '/x')."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset source must be a non-empty string; known sources are "
                        f"{', '.join(KNOWN_SOURCES)}")
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind in ("digits", "mnist", "cifar10") and not sep:
        return kind, None
    if kind in ("imagefolder", "wds") and sep:
        if not arg:
            raise DataError(f"dataset source {spec!r} needs a path after '{kind}:'")
        return kind, arg
    raise DataError(f"unknown dataset source {spec!r}; known sources are {', '.join(KNOWN_SOURCES)}")


def _check_positive(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def create_dataset(spec: str, *, split: str = "train", limit: int | None = None,
                   data_root: str | os.PathLike | None = None,
                   image_size: int | None = None) -> SampleSource:
    """Open a dataset source. `limit` keeps the first N samples of the canonical order (a
    limit above the size keeps all, and is still recorded); `image_size` resizes digits/
    mnist/cifar10/wds to a square of that side, or sets imagefolder's center crop."""
    kind, arg = parse_source(spec)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    limit = _check_positive(limit, "limit")
    image_size = _check_positive(image_size, "image size")
    if kind == "digits":
        return _digits(split, limit, image_size)
    if kind == "mnist":
        return _mnist(split, limit, image_size, resolve_data_root(data_root))
    if kind == "cifar10":
        return _cifar10(split, limit, image_size, resolve_data_root(data_root))
    if kind == "imagefolder":
        return ImageFolderSource(Path(arg), split, limit, image_size)
    return WebDatasetSource(arg, split, limit, image_size)
