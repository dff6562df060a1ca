"""imagefolder:PATH — class folders (ImageNet layout), decoded lazily with PIL.

The fingerprint's content is per-file size and mtime (the images may be far too many to
read at load time), and the source kind stands in for the path, so a copy that keeps
mtimes (rsync -a) keeps its fingerprint. Samples are class-interleaved (issue 22): a store
written under the old class-sorted order is refused with a line that says to recompute it.

Symbolic links are followed (datasets are often assembled from links), but never around a
loop: a link to a folder that contains it (`a/up -> ..`) would repeat the tree forever and
label other classes' images as this one. Such a link is skipped with a warning naming it, as
is a second way into a folder already walked for the same class. `limit` takes a
class-stratified subset, and a folder without split folders has only a training split.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np

from enspipe.util.errors import DataError
from enspipe.util.limits import current_limits

from .base import (CLASS_INTERLEAVED, SUPERSEDED_FILE_ORDER, Geometry, LazySource, SampleSource, _fingerprint,
                   _sanitise_keys, class_interleaved)
from .decode import DeviceTransform, check_jpeg

IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGEFOLDER_RESIZE, IMAGEFOLDER_CROP = 256, 224  # the standard ImageNet eval transform
IMAGEFOLDER_CROP_FRACTION = 0.875  # resize = round(crop / 0.875) when image_size is given


def _imagefolder_split_dirs(root: Path, split: str) -> tuple[Path, list[Path]]:
    """The folder of this split, and every split folder (their classes are pooled so that
    a label means the same class in train and test even if one split lacks a class)."""
    present = [root / s for s in ("train", "val", "test") if (root / s).is_dir()]
    if not present:
        if split != "train":
            # Serving PATH as the test split too would evaluate on the training images.
            raise DataError(f"imagefolder: {root} has no train/, val/ or test/ folder, so it has no "
                            f"'{split}' split; pass `split` train to use its images anyway")
        return root, [root]  # no split folders: PATH is the training split
    wanted = ["train"] if split == "train" else ["val", "test"]
    for name in wanted:
        if (root / name).is_dir():
            return root / name, present
    raise DataError(f"{root} has split folders but no {' or '.join(f'{w}/' for w in wanted)} "
                    f"for split '{split}'")


def _class_dirs(folder: Path) -> list[str]:
    return [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]


_log = logging.getLogger(__name__)
DirId = tuple[int, int]  # (st_dev, st_ino): a folder's identity, whatever path leads to it


def _real_ancestors(path: Path) -> set[DirId]:
    """The identities of `path` and of every folder above its real location, up to /."""
    real = path.resolve()
    out = set()
    for p in (real, *real.parents):
        st = os.stat(p)
        out.add((st.st_dev, st.st_ino))
    return out


def _image_files(top: Path, folder: Path) -> list[str]:
    """The images under class folder `top` as paths relative to `folder`, in the order
    `os.walk(top, followlinks=True)` gives them with sorted names (a folder's files, then its
    subfolders in turn), hidden names skipped. A folder is entered at most once per class and
    never through a link to a folder that contains it (a loop); each skip is logged."""
    files: list[str] = []
    # A link back to any folder above the class folder or the split folder is a loop (it
    # would reach this class again, or the other classes under this class's label).
    above = _real_ancestors(folder)
    st = os.stat(top)
    if (st.st_dev, st.st_ino) in above:
        _log.warning("imagefolder: skipped the class folder %s -> %s: it leads back to a folder that "
                     "contains it (a symlink loop)", top, os.path.realpath(top))
        return files
    entered: dict[DirId, str] = {}  # folders walked for this class -> the path walked first
    stack: list[tuple[str, frozenset[DirId]]] = [(str(top), frozenset(above | _real_ancestors(top)))]
    while stack:
        dirpath, chain = stack.pop()
        try:
            entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
        except OSError:
            continue  # as os.walk: an unreadable folder contributes nothing
        subdirs = []
        for e in entries:
            if e.name.startswith("."):  # macOS '._x.jpg' files are not images
                continue
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(e)
            elif e.name.lower().endswith(IMAGEFOLDER_EXTENSIONS):
                files.append(os.path.relpath(e.path, folder))
        for e in reversed(subdirs):  # a stack: pushed last-first, walked in sorted order
            try:
                st = os.stat(e.path)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in chain:
                _log.warning("imagefolder: skipped the link %s -> %s: it leads back to a folder that "
                             "contains it (a symlink loop)", e.path, os.path.realpath(e.path))
                continue
            if ident in entered:
                _log.warning("imagefolder: skipped %s: it is the folder %s again (already read for this "
                             "class)", e.path, entered[ident])
                continue
            entered[ident] = e.path
            stack.append((e.path, chain | {ident}))
    return files


def _stratified(files: list[list[str]], limit: int) -> list[list[str]]:
    """The subset `limit` kept before samples were class-interleaved (only the superseded
    fingerprint of stores written then needs it): the first `limit` files of a round-robin over classes in class order, each class's
    files in their sorted order: --limit 20 of 10 classes is 2 per class (a class with fewer
    files than its share gives its turns to the others)."""
    take = [0] * len(files)
    left = limit
    while left > 0:
        took = False
        for c, names in enumerate(files):
            if left and take[c] < len(names):
                take[c] += 1
                left -= 1
                took = True
        if not took:  # every class exhausted: the limit is above the size
            break
    return [names[:n] for names, n in zip(files, take)]


def _check_empty_classes(classes: tuple[str, ...], per_class: list[list[str]], folder: Path,
                         split_dirs: list[Path]) -> None:
    """A class folder without images would be a silent extra class (one more output of every
    model's head, never seen): refused when no split has images of it; a warning line when
    only this split lacks them (labels stay shared between splits)."""
    empty = [c for c, names in zip(classes, per_class) if not names]
    if not empty:
        return
    elsewhere = {c: [d.name for d in split_dirs if d != folder and (d / c).is_dir() and _image_files(d / c, d)]
                 for c in empty}
    nowhere = [c for c in empty if not elsewhere[c]]
    if nowhere:
        where = " or ".join(str(d / nowhere[0]) for d in split_dirs if (d / nowhere[0]).is_dir()) or str(folder)
        raise DataError(f"imagefolder: the class folder {where} has no images ({', '.join(IMAGEFOLDER_EXTENSIONS)})"
                        + (f" (nor have {len(nowhere) - 1} more: {', '.join(nowhere[1:4])})" if len(nowhere) > 1 else "")
                        + "; it would be an extra class that no sample has: add images or remove the folder")
    _log.warning("imagefolder: %d class(es) have no images in %s but do in another split (%s), so they keep "
                 "their labels: %s", len(empty), folder, ", ".join(sorted({s for c in empty for s in elsewhere[c]})),
                 ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))


class ImageFolderSource(LazySource):
    """Class folders of images: classes are the sorted folder names, files are walked in
    sorted order (hidden files skipped: macOS '._x.jpg' files are not images), and the canonical
    order interleaves the classes (`class_interleaved`: ImageNet's 1,000 folders would otherwise
    make every 256-sample block one class). Each image
    is decoded to RGB, its shorter side resized to `resize` (bilinear, antialiased) and
    center-cropped to `crop`, with torchvision's functions, as ImageNet evaluation does.
    `limit` keeps the first samples of that order: a class-stratified subset."""

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
        per_class = [_image_files(folder / cls, folder) if (folder / cls).is_dir() else []
                     for cls in self.classes]
        if not any(per_class):
            raise DataError(f"imagefolder: no images ({', '.join(IMAGEFOLDER_EXTENSIONS)}) "
                            f"under {folder}")
        _check_empty_classes(self.classes, per_class, folder, split_dirs)
        # The canonical order interleaves the classes (issue 22; `class_interleaved`), so that
        # contiguous blocks of it mix classes; `limit` keeps its first samples.
        by_class = [f for names in per_class for f in names]
        by_class_labels = np.asarray([label for label, names in enumerate(per_class) for _ in names], dtype=np.int64)
        order = class_interleaved(by_class_labels)[:limit]
        files = [by_class[i] for i in order]
        self.name, self.split, self.limit = f"imagefolder:{root}", split, limit
        self.folder = folder
        self._files = [f.replace(os.sep, "/") for f in files]
        self.labels = by_class_labels[order]
        self.keys = _sanitise_keys(self._files)
        self.geometry = Geometry(3, self.crop, self.crop,
                                 f"rgb:resize{self.resize}:center-crop{self.crop}:bilinear:uint8")
        self._limits = current_limits()
        self.order = CLASS_INTERLEAVED
        self.fingerprint = _fingerprint(
            source="imagefolder", split=split, limit=limit, geometry=self.geometry, classes=self.classes,
            keys=self.keys, labels=self.labels, content=self._file_records(self._files), order=self.order)
        self._per_class = per_class  # for `superseded`, computed only when a store does not match

    def _superseded(self) -> dict[str, str]:
        # What a store written under the old class-sorted order carries: refused with a line that says so.
        old = _stratified(self._per_class, self.limit) if self.limit is not None else self._per_class
        old_files = [f.replace(os.sep, "/") for names in old for f in names]
        return {_fingerprint(
            source="imagefolder", split=self.split, limit=self.limit, geometry=self.geometry, classes=self.classes,
            keys=_sanitise_keys(old_files), labels=np.asarray([c for c, names in enumerate(old) for _ in names],
                                                             dtype=np.int64),
            content=self._file_records(old_files)): SUPERSEDED_FILE_ORDER}

    def _file_records(self, files: list[str]):
        """size:mtime per file (see the module docstring); a file above the size cap is refused
        here, before anything reads it."""
        cap = self._limits.max_image_bytes
        for f in files:
            st = os.stat(self.folder / f)
            if st.st_size > cap:
                above = self._limits.above("max_image_bytes", st.st_size, " bytes")
                raise DataError(f"imagefolder: {self.folder / f} is {above}; refused unread")
            yield f"{st.st_size}:{st.st_mtime_ns}\n".encode()

    def files_newer_than(self, t: float) -> list[str]:
        """The images (relative paths) modified after time `t` (seconds since the epoch): what a
        store made at `t` did not see, named when its fingerprint no longer matches."""
        return [f for f in self._files if os.stat(self.folder / f).st_mtime > t]

    def encoded_image(self, i: int) -> tuple[str, bytes]:
        path = self.folder / self._files[i]
        try:
            with open(os.fspath(path), "rb") as f:  # a str, as PIL opens it: the same error line as before
                data = f.read()
        except OSError as e:
            raise DataError(f"cannot decode image {path}: {e}") from e
        return path.suffix[1:].lower(), data

    def device_transform(self) -> DeviceTransform:
        """The PIL path's resize and crop, for the device decode (`enspipe.data.decode`)."""
        return DeviceTransform("RGB", resize=self.resize, crop=self.crop)

    def jpeg_of(self, i: int, data: bytes) -> bytes | None:
        """Image i's file `data` when the device decode takes it (a JPEG; its header checked,
        nothing decoded), else None (the PIL path, `pixels_of`, decodes it)."""
        return data if check_jpeg(data, f"imagefolder: {self.folder / self._files[i]}", self._limits) else None

    def decode_error(self, i: int, reason: str) -> DataError:
        """The PIL path's line for image i, which the device decoder could not decode."""
        return DataError(f"cannot decode image {self.folder / self._files[i]}: {reason}")

    def _load(self, i: int) -> np.ndarray:
        return self.pixels_of(i, self.encoded_image(i)[1])

    def pixels_of(self, i: int, data: bytes) -> np.ndarray:
        """The PIL path's pixels of image i from its file's bytes `data` (read once by the caller,
        which may keep them: a wds store carries the file beside its directions)."""
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        path = self.folder / self._files[i]
        try:
            with Image.open(io.BytesIO(data)) as im:
                # The header gives the size: refuse a decompression bomb before decoding it.
                w, h = im.size
                if (above := self._limits.above("max_image_pixels", w * h, " pixels")) is not None:
                    raise DataError(f"imagefolder: {path} is {w}x{h} = {above}; refused undecoded")
                im = im.convert("RGB")
        except Image.UnidentifiedImageError as e:  # PIL names the BytesIO: name the file, as Image.open(path) did
            raise DataError(f"cannot decode image {path}: cannot identify image file {os.fspath(path)!r}") from e
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {path}: {e}") from e
        im = TF.resize(im, self.resize, interpolation=InterpolationMode.BILINEAR)
        im = TF.center_crop(im, [self.crop, self.crop])
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def open_imagefolder(arg: str | None, *, split: str, limit: int | None,
                     image_size: int | None, data_root: str | os.PathLike | None
                     ) -> SampleSource:
    return ImageFolderSource(Path(arg), split, limit, image_size)
