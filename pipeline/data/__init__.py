"""Dataset sources: one canonical sample order, stable keys, labels, geometry, fingerprint.

Every source is a `SampleSource`: sample `i` in `[0, N)` has a stable string key, an int
label and an image preprocessed to a fixed geometry `(C, H, W)`. Images are held and
produced as uint8 pixels, so the float images in `[0, 1]` are exactly `k / 255` and a PNG
round trip in a store is lossless.

Sources (DESIGN §2), one module each, opened by `create_dataset` through `SOURCES`:

    digits              scikit-learn's bundled 8x8 digits resized to 1x28x28 (digits.py)
    mnist               the IDX files under ROOT/MNIST/raw/ (mnist.py)
    cifar10             ROOT/cifar-10-batches-py/, numpy-only unpickler (cifar10.py)
    imagefolder:PATH    class folders (ImageNet layout), decoded lazily (imagefolder.py)
    wds:PATTERN         WebDataset tar shards (image + .cls), read by seeking (wds.py)

The canonical order is the files' own for the in-memory sources (already mixed), and
class-interleaved for imagefolder and wds (`base.class_interleaved`: their files are often
grouped by class, and the block reader mixes classes only if the order does; issue 22).

The fingerprint is the sha256 of a canonical JSON header (source, split, N, limit,
geometry, classes), the keys, the labels and the content. Content is the pixel bytes for
the in-memory sources (digits, mnist, cifar10); for the lazy sources, which may be far
too large to read at load time, it is per-sample file metadata (imagefolder: file size and
mtime; wds: member size and the mtime in its tar header). The lazy sources hash their
source kind, not their path, so a copy that keeps mtimes (rsync -a) keeps its fingerprint.
"""
from __future__ import annotations

import importlib
import os
import socket  # noqa: F401 -- `data.socket`: tests stall the probe's connects through it
from pathlib import Path
from typing import NamedTuple

import numpy as np

from enspipe.util import netcheck
from enspipe.util.errors import DataError
from enspipe.util.netcheck import network_available as _network_available

# The source modules import torch; this package face does not, so the sources' names (the CLI's
# `--help`, the torch-free config modules) cost no torch import. Their names are loaded on first use.
_LAZY = {"DEFAULT_DATA_ROOT": "base", "ArraySource": "base", "Geometry": "base", "LazySource": "base",
         "Opener": "base", "SampleSource": "base", "resolve_data_root": "base",
         "ImageFolderSource": "imagefolder", "WebDatasetSource": "wds",
         "_cifar10_arrays": "cifar10"}  # tests clear its cache


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def _opener(module: str, name: str, **bound: object) -> "Opener":
    """`module.name`, imported when a source of its kind is first opened."""
    def open_source(arg: str | None, **kw: object) -> "SampleSource":
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(arg, **bound, **kw)

    open_source.__qualname__ = open_source.__name__ = name
    return open_source

__all__ = [
    "DEFAULT_DATA_ROOT",
    "KNOWN_SOURCES",
    "SOURCES",
    "SPLITS",
    "ArraySource",
    "Geometry",
    "ImageFolderSource",
    "LazySource",
    "Opener",
    "SampleSource",
    "SourceEntry",
    "WebDatasetSource",
    "create_dataset",
    "parse_source",
    "resolve_data_root",
]

SPLITS = ("train", "test")


def _download_blocker(root: Path, host: str) -> str | None:
    # The probe is looked up here at call time: `_network_available` of this package is
    # the one switch that keeps dataset downloads off (the tests turn it off).
    return netcheck.download_blocker(root, host, probe=_network_available)


class SourceEntry(NamedTuple):
    """One row of SOURCES: the opener, and the name of what follows 'kind:' in a spec
    (None for a source that takes nothing)."""

    open: Opener
    arg: str | None = None


# source kind -> how to open it. A new source is one module and one row here.
SOURCES: dict[str, SourceEntry] = {
    "digits": SourceEntry(_opener("digits", "open_digits")),
    "mnist": SourceEntry(_opener("mnist", "open_mnist", blocker=_download_blocker)),
    "cifar10": SourceEntry(_opener("cifar10", "open_cifar10", blocker=_download_blocker)),
    "imagefolder": SourceEntry(_opener("imagefolder", "open_imagefolder"), arg="PATH"),
    "wds": SourceEntry(_opener("wds", "open_wds"), arg="PATTERN"),
}
KNOWN_SOURCES = tuple(kind if e.arg is None else f"{kind}:{e.arg}" for kind, e in SOURCES.items())


def parse_source(spec: str) -> tuple[str, str | None]:
    """'mnist' -> ('mnist', None); 'imagefolder:/x' -> ('imagefolder', '/x')."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset source must be a non-empty string; known sources are "
                        f"{', '.join(KNOWN_SOURCES)}")
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.lower()
    entry = SOURCES.get(kind)
    if entry is not None and entry.arg is None and not sep:
        return kind, None
    if entry is not None and entry.arg is not None and sep:
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
    """Open a dataset source. `limit` keeps the first N samples of the canonical order
    (imagefolder: a class-stratified subset, see `ImageFolderSource`; a limit above the size
    keeps all, and is still recorded); `image_size` resizes digits/mnist/cifar10/wds to a
    square of that side, or sets imagefolder's center crop."""
    kind, arg = parse_source(spec)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    limit = _check_positive(limit, "limit")
    image_size = _check_positive(image_size, "image size")
    return SOURCES[kind].open(arg, split=split, limit=limit, image_size=image_size,
                              data_root=data_root)
