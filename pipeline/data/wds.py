"""wds:PATTERN — WebDataset tar shards (image + .cls), indexed once and read by seeking to
each member. Member rules (names, links, refused pickle extensions, sizes) are
`enspipe.util.tarsafe`'s; the caps on sizes, labels and pixels are `enspipe.util.limits`'.

The fingerprint's content is per-sample member size and the mtime in its tar header (the
shards may be far too large to read at load time), and the source kind stands in for the
pattern, so a copy that keeps mtimes (rsync -a) keeps its fingerprint.
"""
from __future__ import annotations

import functools
import io
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from enspipe.util import tarsafe
from enspipe.util.errors import DataError
from enspipe.util.limits import Limits, current_limits, env_name

from .base import (CLASS_INTERLEAVED, SUPERSEDED_FILE_ORDER, Geometry, LazySource, SampleSource, _fingerprint,
                   _sanitise_keys, _stamp, class_interleaved)
from .decode import DeviceTransform, check_jpeg

if TYPE_CHECKING:
    from PIL import Image

WDS_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")

# one indexed sample's image: (shard number, data offset, size, extension, tar mtime)
Member = tuple[int, int, int, str, int]


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


def _member_groups(tf: tarfile.TarFile, shard: Path) -> list[tuple[str, list[tarfile.TarInfo]]]:
    """The shard's samples as (key, members), in tar order. Every member is checked
    before any sample is: a shard with one unsafe or pickle member is refused whole."""
    groups: list[tuple[str, list[tarfile.TarInfo]]] = []
    for ti in tf:
        name = ti.name
        if tarsafe.check_member_name(name) is not None:
            raise DataError(f"wds: unsafe member name {name!r} in {shard}")
        if not tarsafe.is_regular_member(ti):
            continue
        key, _ = tarsafe.split_member(name)
        if tarsafe.is_pickle_member(name):
            raise DataError(f"wds: member {name!r} in {shard} is a pickle; "
                            f"enspipe never unpickles data")
        if key.rpartition("/")[2].startswith("__"):
            continue  # webdataset's metadata members (__index__ etc.)
        if groups and groups[-1][0] == key:  # consecutive members form a sample
            groups[-1][1].append(ti)
        else:
            groups.append((key, [ti]))
    return groups


def _sample(tf: tarfile.TarFile, shard: Path, key: str, tis: list[tarfile.TarInfo], limits: Limits
            ) -> tuple[int, tarfile.TarInfo]:
    """(label, image member) of one sample; only its ascii `.cls` payload is read, and only
    once the headers say both members are within their caps."""
    images = [ti for ti in tis if tarsafe.split_member(ti.name)[1] in WDS_IMAGE_EXTENSIONS]
    cls = [ti for ti in tis if tarsafe.split_member(ti.name)[1] == "cls"]
    if len(images) != 1 or len(cls) != 1:
        raise DataError(f"wds: sample {key!r} in {shard} needs exactly one image "
                        f"({'/'.join(WDS_IMAGE_EXTENSIONS)}) and one .cls member")
    for ti, cap in ((images[0], "max_image_bytes"), (cls[0], "max_label_bytes")):
        problem = tarsafe.check_member_size(ti, getattr(limits, cap))
        if problem:
            raise DataError(f"wds: member {ti.name!r} in {shard} is {problem} (raise it with "
                            f"{env_name(cap)}); refused unread")
    payload = tf.extractfile(cls[0]).read()
    try:
        label = int(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"wds: sample {key!r} in {shard} has a .cls that is not "
                        f"an ascii integer: {payload[:20]!r}") from None
    if label < 0:
        raise DataError(f"wds: sample {key!r} in {shard} has negative label {label}")
    if label >= limits.max_classes:
        raise DataError(f"wds: sample {key!r} in {shard} has label {label}, above the limit of "
                        f"{limits.max_classes} classes (raise it with {env_name('max_classes')})")
    return label, images[0]


@functools.lru_cache(maxsize=4)
def _wds_index(shards: tuple[Path, ...], stamp: tuple, limits: Limits) -> dict:
    """Scan the tars: per sample its raw key, label, and image `Member`. Nothing is
    decoded except the ascii `.cls` payloads, and nothing is read whose size is above its cap."""
    keys: list[str] = []
    labels: list[int] = []
    members: list[Member] = []
    seen: set[str] = set()
    for s, shard in enumerate(shards):
        # tarfile reads pax headers and long names whole while it lists the members:
        # their sizes are checked from the raw headers first.
        with open(shard, "rb") as f:
            problem = tarsafe.oversized_metadata(f, limits.max_metadata_bytes)
        if problem:
            raise DataError(f"wds: {shard} has {problem} (raise it with ENSPIPE_MAX_METADATA_BYTES); "
                            "refused unread")
        try:
            tf = tarfile.open(shard, mode="r:")  # uncompressed: random access needs offsets
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"wds: {shard} is not an uncompressed tar file: {e}") from e
        with tf:
            try:
                for key, tis in _member_groups(tf, shard):
                    if key in seen:
                        raise DataError(f"wds: sample key {key!r} occurs twice (again in {shard})")
                    seen.add(key)
                    label, im = _sample(tf, shard, key, tis, limits)
                    keys.append(key)
                    labels.append(label)
                    members.append((s, im.offset_data, im.size,
                                    tarsafe.split_member(im.name)[1], int(im.mtime)))
            except tarfile.TarError as e:
                raise DataError(f"wds: {shard} is corrupt: {e}") from e
    if not keys:
        raise DataError(f"wds: no samples in {len(shards)} shard(s) starting {shards[0]}")
    return {"keys": keys, "labels": np.asarray(labels, dtype=np.int64), "members": members}


class WebDatasetSource(LazySource):
    """Samples of WebDataset shards, class-interleaved (`class_interleaved`) over their shard,
    then tar order. A member file ending
    in a pickle extension (`tarsafe.PICKLE_EXTENSIONS`) makes the whole source a DataError.
    Geometry is the first image's (mode L -> 1 channel, anything else -> RGB); every other
    image must match it, which is checked as it is decoded (DataError naming the key).
    With image_size every image is resized to image_size x image_size (PIL bilinear)."""

    def __init__(self, pattern: str, split: str, limit: int | None, image_size: int | None):
        self._shards = _expand_shards(pattern)
        self._limits = current_limits()
        index = _wds_index(tuple(self._shards), _stamp(*self._shards), self._limits)
        keys, labels, members = index["keys"], index["labels"], index["members"]
        # Class-interleaved, as imagefolder (issue 22): tars written class by class would
        # otherwise make every block one class; a shuffled set stays shuffled within classes.
        order = class_interleaved(labels)[:limit]
        file_order = (keys[:limit], labels[:limit], members[:limit])  # the superseded order's samples
        keys, labels, members = [keys[i] for i in order], labels[order], [members[i] for i in order]
        self.order = CLASS_INTERLEAVED
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
            content=(f"{ext}:{size}:{mtime}\n".encode() for _, _, size, ext, mtime in members), order=self.order)
        self._file_order = file_order  # for `superseded`, computed only when a store does not match

    def _superseded(self) -> dict[str, str]:
        old_keys, old_labels, old_members = self._file_order
        return {_fingerprint(
            source="wds", split=self.split, limit=self.limit, geometry=self.geometry, classes=self.classes,
            keys=_sanitise_keys(old_keys), labels=np.asarray(old_labels, dtype=np.int64),
            content=(f"{ext}:{size}:{mtime}\n".encode() for _, _, size, ext, mtime in old_members)
        ): SUPERSEDED_FILE_ORDER}

    def _member_bytes(self, i: int) -> bytes:
        shard_no, offset, size, _, _ = self._members[i]
        with open(self._shards[shard_no], "rb") as f:  # open per read: safe in forked workers
            f.seek(offset)
            return f.read(size)

    def encoded_image(self, i: int) -> tuple[str, bytes]:
        return self._members[i][3].lower(), self._member_bytes(i)

    def device_transform(self) -> DeviceTransform:
        """The PIL path's mode and resize, for the device decode (`enspipe.data.decode`)."""
        c, h, w = self.geometry.shape
        return DeviceTransform(self._mode, size=(h, w) if self.image_size else None)

    def jpeg_of(self, i: int, data: bytes) -> bytes | None:
        """Sample i's image member `data` when the device decode takes it (a JPEG; its header
        checked, nothing decoded), else None (the PIL path, `pixels_of`, decodes it or says what is wrong)."""
        shard_no, _, size, _, _ = self._members[i]
        if len(data) != size:
            return None
        wh = check_jpeg(data, f"wds: the image of sample {self._raw_keys[i]!r} in {self._shards[shard_no]}",
                        self._limits)
        if wh is None:
            return None
        c, h, w = self.geometry.shape
        if not self.image_size and wh != (w, h):
            raise DataError(f"wds: sample {self._raw_keys[i]!r} is {wh[0]}x{wh[1]}, "
                            f"the first sample is {w}x{h} (pass an image size to resize all)")
        return data

    def decode_error(self, i: int, reason: str) -> DataError:
        """The PIL path's line for sample i, whose image the device decoder could not decode."""
        return DataError(f"wds: cannot decode the image of sample {self._raw_keys[i]!r} "
                         f"in {self._shards[self._members[i][0]]}: {reason}")

    def _decode(self, i: int, data: bytes | None = None) -> Image.Image:
        """Sample i's image member (`data`: its bytes, already read) opened by PIL."""
        from PIL import Image

        shard_no, _, size, _, _ = self._members[i]
        data = self._member_bytes(i) if data is None else data
        try:
            if len(data) != size:
                raise OSError(f"shard ends after {len(data)} of {size} bytes")
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if (above := self._limits.above("max_image_pixels", w * h, " pixels")) is not None:
                raise DataError(f"wds: the image of sample {self._raw_keys[i]!r} in {self._shards[shard_no]} "
                                f"is {w}x{h} = {above}; refused undecoded")
            im.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"wds: cannot decode the image of sample {self._raw_keys[i]!r} "
                            f"in {self._shards[shard_no]}: {e}") from e
        return im

    def _load(self, i: int) -> np.ndarray:
        return self.pixels_of(i, self._member_bytes(i))

    def pixels_of(self, i: int, data: bytes) -> np.ndarray:
        """The PIL path's pixels of sample i from its member's bytes `data` (read once by the caller,
        which may keep them: a wds store carries the file beside its directions)."""
        from PIL import Image

        im = self._decode(i, data).convert(self._mode)
        c, h, w = self.geometry.shape
        if self.image_size:
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        elif im.size != (w, h):
            raise DataError(f"wds: sample {self._raw_keys[i]!r} is {im.size[0]}x{im.size[1]}, "
                            f"the first sample is {w}x{h} (pass an image size to resize all)")
        a = np.asarray(im, dtype=np.uint8)
        return a[None] if c == 1 else a.transpose(2, 0, 1)


def open_wds(arg: str | None, *, split: str, limit: int | None, image_size: int | None,
             data_root: str | os.PathLike | None) -> SampleSource:
    return WebDatasetSource(arg, split, limit, image_size)
