"""cifar10: torchvision's ROOT/cifar-10-batches-py/, read with an unpickler that only builds
numpy arrays (`_NumpyOnlyUnpickler`): nothing from the file runs.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enspipe.util import netcheck
from enspipe.util.errors import DataError

from .base import (ArraySource, Blocker, SampleSource, _download, _native_geometry, _readonly,
                   _resize_uint8, _stamp, resolve_data_root)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_FILES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}
CIFAR10_HOST = "www.cs.toronto.edu"  # where torchvision downloads CIFAR-10 from


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


def _class_names(folder: Path) -> Sequence[str]:
    """The names in batches.meta when it holds ten, else CIFAR-10's published ones."""
    if (folder / "batches.meta").is_file():
        names = _load_cifar_pickle(folder / "batches.meta").get("label_names")
        if isinstance(names, list) and len(names) == 10:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return CIFAR10_CLASSES


def open_cifar10(arg: str | None, *, split: str, limit: int | None, image_size: int | None,
                 data_root: str | os.PathLike | None,
                 blocker: Blocker = netcheck.download_blocker) -> SampleSource:
    root = resolve_data_root(data_root)
    folder = root / "cifar-10-batches-py"
    files = [folder / name for name in CIFAR10_FILES[split]]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        why = _download("CIFAR10", title="CIFAR-10", root=root, folder=folder, split=split,
                        host=CIFAR10_HOST, blocker=blocker)
        if not all(p.is_file() for p in files):
            raise DataError(f"CIFAR-10 not found: expected {', '.join(missing)} in {folder} "
                            f"(set `data_root` or ENSPIPE_DATA); {why}")
    classes = _class_names(folder)
    size, geometry = _native_geometry(3, 32, image_size, "cifar10-batches")
    pixels, labels = _cifar10_arrays(tuple(files), _stamp(*files), size)
    return ArraySource(name="cifar10", split=split, limit=limit, geometry=geometry,
                       classes=classes, pixels=pixels, labels=labels)
