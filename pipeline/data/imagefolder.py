"""imagefolder:PATH — class folders (ImageNet layout), decoded lazily with PIL.

The fingerprint's content is per-file size and mtime (the images may be far too many to
read at load time), and the source kind stands in for the path, so a copy that keeps
mtimes (rsync -a) keeps its fingerprint.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from enspipe.errors import DataError

from .base import Geometry, LazySource, SampleSource, _fingerprint, _sanitise_keys

IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGEFOLDER_RESIZE, IMAGEFOLDER_CROP = 256, 224  # the standard ImageNet eval transform
IMAGEFOLDER_CROP_FRACTION = 0.875  # resize = round(crop / 0.875) when image_size is given


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

    def encoded_image(self, i: int) -> tuple[str, bytes]:
        path = self.folder / self._files[i]
        return path.suffix[1:].lower(), path.read_bytes()

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


def open_imagefolder(arg: str | None, *, split: str, limit: int | None,
                     image_size: int | None, data_root: str | os.PathLike | None
                     ) -> SampleSource:
    return ImageFolderSource(Path(arg), split, limit, image_size)
