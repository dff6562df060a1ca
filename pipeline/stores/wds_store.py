"""WebDataset backend: one tar per shard in a `*.wds` directory.

Members per sample, named `<index:09d>.<ext>` (storage_schemas/wds_layout.v1.json):
  .idx         sample index, ASCII (the join key with the dataset)
  .key         the dataset's key, UTF-8 (dataset keys may hold dots and slashes, which
               WebDataset member names cannot, so the index names the members)
  .cls         the true class, ASCII (when known)
  .label.cls   the label the attack used, ASCII
  .png / .npy  the clean image, uint8 (PNG for C in (1, 3), .npy [C,H,W] otherwise)
  .dir.npy.gz  the direction as two packed bit planes (sign, zero), .npy in gzip
  .logits.npy  float16 [K]

Writes are deterministic (USTAR headers with mtime 0, uid/gid 0, fixed member order,
gzip mtime 0, fixed PNG settings) and go to a temporary name that is os.replace'd, so a
re-written shard has identical bytes and a reader never sees half a tar.

Reading never uses WebDataset's default decoder (it unpickles .pyd/.pickle and
torch.loads .pth): members are decoded here with numpy (allow_pickle=False) and PIL, and
a tar with a link, a path-like name or a pickle/torch member is refused outright, as is a
tar or member larger than the store's geometry allows (`member_bounds`), before it is read.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from enspipe import tarsafe
from enspipe.errors import StoreError
from enspipe.fileio import atomic_target
from enspipe.tarsafe import PICKLE_EXTENSIONS as FORBIDDEN_EXTS

from .base import StoreReader, StoreWriter
from .manifest import schema_errors, shard_range
from .wds_bounds import max_tar_bytes, member_bounds

PREFIX = "shard"
PNG_LEVEL = 6
GZIP_LEVEL = 6


def chunk_samples_for(shard_size: int, geometry: tuple[int, int, int]) -> int:
    """The read unit of a wds store is a whole tar shard."""
    return shard_size


def create_layout(root: Path, manifest: dict) -> None:
    """Nothing beyond the manifest and `shards/`: tars appear as shards are written."""


def tar_name(s: int) -> str:
    return f"{PREFIX}-{s:06d}.tar"


def sample_key(i: int) -> str:
    return f"{i:09d}"


# --------------------------------------------------------------------------- member codecs


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_direction(d: np.ndarray) -> bytes:
    """{-1,0,1} map -> gzip(npy uint8 [2, ceil(n/8)]): sign plane, zero plane.

    A ±1 map costs 1 bit per element in the sign plane and almost nothing in the
    (all-zero) zero plane, where int8 + deflate cannot go below ~1.2 bits. Decodable with
    numpy and gzip alone. Level 6: level 9 is ~10x slower on sparse zero planes for ~1.5%.
    """
    flat = d.reshape(-1)
    planes = np.stack([np.packbits(flat > 0), np.packbits(flat == 0)])
    return gzip.compress(_npy_bytes(planes), compresslevel=GZIP_LEVEL, mtime=0)


def decode_directions(payloads: list[bytes], geometry: tuple[int, int, int]) -> np.ndarray:
    """Decode many `.dir.npy.gz` members at once into int8 [n, C, H, W]."""
    nel = int(np.prod(geometry))
    planes = np.empty((len(payloads), 2, -(-nel // 8)), np.uint8)
    for j, data in enumerate(payloads):
        p = _load_npy(gzip.decompress(data))
        if p.dtype != np.uint8 or p.shape != planes.shape[1:]:
            raise ValueError(f"direction planes of sample {j} have dtype {p.dtype} and shape {p.shape}")
        planes[j] = p
    # d = 2*sign_bit - 1, computed in place in int8, then zeroed where the zero plane is set.
    d = (np.unpackbits(planes[:, 0], axis=1, count=nel) << 1).view(np.int8)
    d -= 1
    if planes[:, 1].any():  # ±1 maps have an empty zero plane: skip the second unpack
        d *= (1 - np.unpackbits(planes[:, 1], axis=1, count=nel)).view(np.int8)
    return d.reshape(len(payloads), *geometry)


def decode_direction(data: bytes, geometry: tuple[int, int, int]) -> np.ndarray:
    """Decode one `.dir.npy.gz` member into int8 [C, H, W]."""
    return decode_directions([data], geometry)[0]


def encode_image(img: np.ndarray) -> tuple[str, bytes]:
    """uint8 [C,H,W] -> ("png", 8-bit L/RGB PNG) for C in (1, 3), else ("npy", .npy)."""
    from PIL import Image

    C = img.shape[0]
    if C not in (1, 3):
        return "npy", _npy_bytes(img)
    hwc = img[0] if C == 1 else np.ascontiguousarray(img.transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return "png", buf.getvalue()


def decode_image(ext: str, data: bytes, geometry: tuple[int, int, int]) -> np.ndarray:
    C, H, W = geometry
    if ext == "npy":
        img = _load_npy(data)
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            # Check the header before decoding pixels: no surprise decompression bombs.
            if im.size != (W, H) or im.mode != ("L" if C == 1 else "RGB"):
                raise ValueError(f"image is {im.mode} {im.size[0]}x{im.size[1]}, expected {C}x{H}x{W}")
            arr = np.asarray(im)
        img = arr[None] if C == 1 else arr.transpose(2, 0, 1)
    if img.dtype != np.uint8 or img.shape != (C, H, W):
        raise ValueError(f"image has dtype {img.dtype} and shape {img.shape}, expected uint8 {(C, H, W)}")
    return np.ascontiguousarray(img)


# --------------------------------------------------------------------------- tar I/O


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Deterministic USTAR tar, written atomically (fileio.atomic_target)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))


def _check_member(tar: Path, m: tarfile.TarInfo) -> tuple[str, str]:
    """(sample key, extension) of a safe member, else StoreError naming tar and member."""
    name = m.name
    exts = name.split(".")[1:]
    bad = [e for e in exts if e.lower() in FORBIDDEN_EXTS]
    if bad:
        raise StoreError(
            f"tar {tar} member {name!r} has the forbidden extension .{bad[0]} (pickle/torch payloads "
            f"are never loaded); the shard is refused."
        )
    if name.startswith("/") or "\\" in name or ".." in name.split("/") or "/" in name:
        raise StoreError(f"tar {tar} member {name!r} has a path-like name; the shard is refused.")
    if not m.isreg():
        raise StoreError(f"tar {tar} member {name!r} is not a regular file; the shard is refused.")
    key, _, ext = name.partition(".")
    return key, ext


_valid_ext_sets: dict[frozenset[str], str | None] = {}


def _ext_set_problem(exts: frozenset[str]) -> str | None:
    """Schema check of a sample's member set; cached, since every sample has the same set."""
    if exts not in _valid_ext_sets:
        errors = schema_errors({e: 1 for e in exts}, "wds_layout.v1.json")
        _valid_ext_sets[exts] = errors[0] if errors else None
    return _valid_ext_sets[exts]


def decode_tar(data: bytes, tar: Path, manifest: dict, s: int, *, with_images: bool = False) -> dict[str, Any]:
    """Decode shard s from the tar's bytes into arrays; StoreError on anything unexpected.

    Clean images are only decoded `with_images` (PNG decoding dominates otherwise).
    """
    start, stop = shard_range(manifest, s)
    n = stop - start
    ident = manifest["identity"]
    geometry = tuple(ident["geometry"])
    K = ident["num_classes"]

    samples: OrderedDict[str, dict[str, bytes]] = OrderedDict()
    bounds = member_bounds(manifest)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                key, ext = _check_member(tar, m)
                problem = tarsafe.check_member_size(m, bounds.get(ext, max(bounds.values())))
                if problem:
                    raise StoreError(f"tar {tar} member {m.name!r} is {problem} for this store's geometry; "
                                     "the shard is refused.")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    except tarfile.TarError as exc:
        raise StoreError(f"tar {tar} cannot be read: {exc}.") from None

    expected = [sample_key(i) for i in range(start, stop)]
    if list(samples) != expected:
        raise StoreError(f"tar {tar} holds {len(samples)} samples that are not samples {start}..{stop - 1} in order.")

    out: dict[str, Any] = {
        "logits": np.empty((n, K), np.float16),
        "label": np.empty((n,), np.int64),
        "keys": [],
    }
    images: list[np.ndarray | None] = []
    true_labels: list[int] = []
    for j, (key, members) in enumerate(samples.items()):
        problem = _ext_set_problem(frozenset(members))
        if problem:
            raise StoreError(f"tar {tar} sample {key}: members do not follow wds_layout.v1 ({problem}).")
        field = "idx"
        try:
            if int(members["idx"].decode("ascii")) != start + j:
                raise ValueError(f"index {members['idx']!r} is not {start + j}")
            field = "key"
            out["keys"].append(members["key"].decode("utf-8"))
            field = "label.cls"
            label = int(members["label.cls"].decode("ascii"))
            if not 0 <= label < K:
                raise ValueError(f"label {label} outside [0, {K})")
            out["label"][j] = label
            field = "logits.npy"
            logits = _load_npy(members["logits.npy"])
            if logits.dtype != np.float16 or logits.shape != (K,):
                raise ValueError(f"logits have dtype {logits.dtype} and shape {logits.shape}")
            out["logits"][j] = logits
            if "cls" in members:
                field = "cls"
                true_labels.append(int(members["cls"].decode("ascii")))
            for ext in ("png", "npy"):
                if ext in members:
                    field = ext
                    images.append(decode_image(ext, members[ext], geometry) if with_images else None)
        except StoreError:
            raise
        except Exception as exc:  # numpy, gzip, PIL and int() all raise their own types
            raise StoreError(f"tar {tar} member {key}.{field} cannot be decoded: {exc}.") from None
    # Images and true labels are all-or-nothing within a shard.
    for name, items in (("images", images), ("true labels", true_labels)):
        if items and len(items) != n:
            raise StoreError(f"tar {tar} has {name} for {len(items)} of {n} samples.")
    try:
        out["direction"] = decode_directions([m["dir.npy.gz"] for m in samples.values()], geometry)
    except Exception as exc:
        raise StoreError(f"tar {tar} has a .dir.npy.gz member that cannot be decoded: {exc}.") from None
    out["has_images"] = bool(images)
    out["images"] = np.stack(images) if images and with_images else None
    out["true_label"] = np.asarray(true_labels, np.int64) if true_labels else None
    return out


def read_shard_bytes(path: Path, manifest: dict, s: int, record: dict) -> bytes:
    """The tar's bytes, checked against the shard's sha256 (cheap next to decoding)."""
    tar = path / tar_name(s)
    try:
        if (size := tar.stat().st_size) > (cap := max_tar_bytes(manifest, s)):
            raise StoreError(f"shard {s}: file {tar_name(s)} of store {path} is {size} bytes, more than its "
                             f"samples can take at this geometry ({cap}); refused unread.")
        data = tar.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"shard {s}: missing file {tar_name(s)} in store {path}.") from None
    want = record["files"][tar_name(s)]["sha256"]
    if hashlib.sha256(data).hexdigest() != want:
        raise StoreError(f"shard {s}: checksum mismatch in file {tar_name(s)} of store {path}.")
    return data


# --------------------------------------------------------------------------- writer / reader


class WdsWriter(StoreWriter):
    fmt = "wds"

    def _write_files(self, s: int, start: int, stop: int, **a: Any) -> tuple[list[str], dict]:
        members: list[tuple[str, bytes]] = []
        direction_bytes = 0
        label_is_true = self.identity.label_mode == "true"
        for j in range(stop - start):
            k = sample_key(start + j)
            try:
                key_bytes = a["keys"][j].encode("utf-8")
            except UnicodeEncodeError:
                raise StoreError(f"shard {s}: key {a['keys'][j]!r} is not valid UTF-8 text.") from None
            members.append((f"{k}.idx", str(start + j).encode("ascii")))
            members.append((f"{k}.key", key_bytes))
            if a["true_label"] is not None or label_is_true:
                true = a["true_label"][j] if a["true_label"] is not None else a["label"][j]
                members.append((f"{k}.cls", str(int(true)).encode("ascii")))
            members.append((f"{k}.label.cls", str(int(a["label"][j])).encode("ascii")))
            if a["images"] is not None:
                ext, data = encode_image(a["images"][j])
                members.append((f"{k}.{ext}", data))
            dir_bytes = encode_direction(a["direction"][j])
            direction_bytes += len(dir_bytes)
            members.append((f"{k}.dir.npy.gz", dir_bytes))
            members.append((f"{k}.logits.npy", _npy_bytes(a["logits"][j])))
        write_tar(self.path / tar_name(s), members)
        return [tar_name(s)], {"direction_bytes": direction_bytes, "images": a["images"] is not None}


class WdsReader(StoreReader):
    """Reads whole tar shards into decoded arrays, keeping the last few in an LRU cache."""

    fmt = "wds"

    def __init__(self, path: Path, manifest: dict, records: dict[int, dict], *, cache_shards: int = 4) -> None:
        super().__init__(path, manifest, records)
        self.cache_shards = max(1, cache_shards)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def shard(self, s: int) -> dict[str, Any]:
        """Decoded shard s: direction, logits, label, keys, true_label (or None); images are not decoded."""
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        data = read_shard_bytes(self.path, self.manifest, s, self.records[s])
        decoded = decode_tar(data, self.path / tar_name(s), self.manifest, s)
        self._cache[s] = decoded
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return decoded

    def _pieces(self, start: int, stop: int, field: str) -> list[Any]:
        out = []
        for s, rows in self._spans(start, stop):
            value = self.shard(s)[field]
            if value is None:
                raise StoreError(f"shard {s} of store {self.path} has no {field}.")
            out.append(value[rows])
        return out

    def _read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {f: np.concatenate(self._pieces(start, stop, f)) for f in ("direction", "logits", "label")}

    def _keys(self, start: int, stop: int) -> list[str]:
        return [k for piece in self._pieces(start, stop, "keys") for k in piece]

    def read_images(self, start: int, stop: int) -> np.ndarray:
        """The clean images uint8 [n,C,H,W] of samples [start, stop) (when the store has them).

        Not cached: the trainer takes clean images from the dataset, this is for inspection.
        """
        start, stop = self._check_range(start, stop)
        out = [np.empty((0, *self.geometry), np.uint8)]
        for s, rows in self._spans(start, stop):
            data = read_shard_bytes(self.path, self.manifest, s, self.records[s])
            images = decode_tar(data, self.path / tar_name(s), self.manifest, s, with_images=True)["images"]
            if images is None:
                raise StoreError(f"shard {s} of store {self.path} has no clean images.")
            out.append(images[rows])
        return np.concatenate(out)


def store_problems(path: Path, manifest: dict) -> list[str]:
    return []


def check_shard(path: Path, manifest: dict, s: int, record: dict) -> None:
    """Decode all of shard s; raises on any problem (used by verify)."""
    decode_tar(read_shard_bytes(path, manifest, s, record), path / tar_name(s), manifest, s, with_images=True)


# The classes of the Backend protocol (base.Backend), which open.py instantiates.
Writer = WdsWriter
Reader = WdsReader
