"""mnist: the official IDX files in torchvision's layout ROOT/MNIST/raw/ (.gz or extracted),
read directly; ROOT is never written to unless the files are missing and must be downloaded.
"""
from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from enspipe.util import netcheck
from enspipe.util.errors import DataError

from .base import (ArraySource, Blocker, SampleSource, _download, _native_geometry, _readonly,
                   _resize_uint8, _stamp, resolve_data_root)

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST_HOST = "ossci-datasets.s3.amazonaws.com"  # where torchvision downloads MNIST from


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


def open_mnist(arg: str | None, *, split: str, limit: int | None, image_size: int | None,
               data_root: str | os.PathLike | None,
               blocker: Blocker = netcheck.download_blocker) -> SampleSource:
    root = resolve_data_root(data_root)
    raw_dir = root / "MNIST" / "raw"
    found = _find_idx_files(raw_dir, split)
    if None in found:
        missing = [f"{stem}.gz" for stem, p in zip(MNIST_FILES[split], found) if p is None]
        why = _download("MNIST", title="MNIST", root=root, folder=raw_dir, split=split,
                        host=MNIST_HOST, blocker=blocker)
        found = _find_idx_files(raw_dir, split)
        if None in found:
            raise DataError(f"MNIST not found: expected {' and '.join(missing)} in {raw_dir} "
                            f"(set `data_root` or ENSPIPE_DATA); {why}")
    images, labels = found
    size, geometry = _native_geometry(1, 28, image_size, "mnist-idx")
    pixels, y = _mnist_arrays(images, labels, _stamp(images, labels), size)
    return ArraySource(name="mnist", split=split, limit=limit, geometry=geometry,
                       classes=[str(k) for k in range(10)], pixels=pixels, labels=y)
