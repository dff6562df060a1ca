"""WebDataset backend: one tar per shard in a `*.wds` directory.

(Over 400 lines: the writer and the readers of both layouts stay in one file, so what a
tar may hold is decided in one place.)

Members per sample, named `<index:09d>.<ext>` (storage_schemas/wds_layout.v2.json):
  .idx          sample index, ASCII (the join key with the dataset)
  .key          the dataset's key, UTF-8 (dataset keys may hold dots and slashes, which
                WebDataset member names cannot, so the index names the members)
  .cls          the true class, ASCII (when known)
  .label.cls    the label the attack used, ASCII
  .src.<ext>    the clean image exactly as the source encoded it (a JPEG stays that JPEG,
                never decoded and re-encoded), before the geometry's preprocessing; or
  .png / .npy   the clean image as uint8 pixels at the store's geometry, for sources held as
                pixels (digits, mnist, cifar10: lossless PNG for C in (1, 3), else .npy);
                or no image at all (`--wds-images none`)
  .dir.bits.gz  the direction: gzip of the packed sign bits, then the packed zero bits only
                when the map has zeros (`encode_direction`); ~1.0 bit per element
  .logits.npy   float16 [K]

Layout v1 (storage_schemas/wds_layout.v1.json), written before v2, is still read: its
images are always `.png`/`.npy` pixels and its direction member is `.dir.npy.gz` (both bit
planes as an .npy in gzip, whose 128-byte header cost ~0.9 bits per element at 28x28). A tar
holds one layout; the direction member names it.

Since issue 26 every tar ends with an `__index__` member (stores/wds/index.py,
storage_schemas/wds_index.v1.json) listing its members' sizes, and the shard's record says
`member_index`: the reader then slices members out of the tar's bytes without parsing it
(`index.decode_indexed`); tars without one (stores written before) are read member by
member with tarfile, as is any tar whose index does not describe it exactly. WebDataset skips
the index (`__...__` members are metadata to it).

Writes are deterministic (USTAR headers with mtime 0, uid/gid 0, fixed member order,
gzip mtime 0, fixed PNG settings) and go to a temporary name that is os.replace'd, so a
re-written shard has identical bytes and a reader never sees half a tar. Samples are
encoded by a small thread pool (zlib and PIL release the GIL), in order.

Reading never uses WebDataset's default decoder (it unpickles .pyd/.pickle and
torch.loads .pth): members are decoded here with numpy (allow_pickle=False) and PIL, and
a tar with a link, a path-like name or a pickle/torch member is refused outright, as is a
tar or member larger than the store's geometry allows (`member_bounds`), before it is read.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from enspipe.util import tarsafe
from enspipe.util.errors import StoreError
from enspipe.util.fileio import atomic_target
from enspipe.util.limits import current_limits
from enspipe.util.tarsafe import PICKLE_EXTENSIONS as FORBIDDEN_EXTS

from enspipe.stores.base import StoreReader, StoreWriter
from enspipe.stores.manifest import known_verified, note_verified, schema_errors, shard_range
from enspipe.stores.wds.bounds import index_bound, max_tar_bytes, member_bound, member_bounds
from enspipe.stores.wds.index import INDEX_MEMBER, decode_indexed, index_content, listing_problem

PREFIX = "shard"
PNG_LEVEL = 6
GZIP_LEVEL = 6
DIRECTION = "dir.bits.gz"          # layout v2's direction member
DIRECTION_V1 = "dir.npy.gz"        # layout v1's
SOURCE_PREFIX = "src."             # layout v2: the source's encoded image, `src.<ext>`
SOURCE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
ENCODE_SAMPLES = 64                # samples per encoding task of the writer's thread pool
# Whether the writer ends each tar with its member index. Always True in use; tests and
# benchmarks set it False to make the tars of stores written before issue 26.
WRITE_INDEX = True


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


def _gzip(data: bytes, strategy: int) -> bytes:
    """One gzip member (mtime 0: deterministic bytes) made with a zlib strategy."""
    c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31, 8, strategy)
    return c.compress(data) + c.flush()


def encode_direction(d: np.ndarray) -> bytes:
    """{-1,0,1} map -> `.dir.bits.gz`: gzip(packbits(d > 0)) [+ gzip(packbits(d == 0)) if any zero].

    Decompressed (`gzip.decompress` reads both members as one stream) the payload is
    ceil(n/8) bytes for a map without zeros (the usual case: an exact zero gradient is rare),
    else 2*ceil(n/8). Real sign maps at 3x224x224 are close to random bits (1.0015 bits per
    element with deflate at levels 1 and 6, measured on resnet18/50 Step-LL maps; BENCHMARKS.md):
    the sign plane is Huffman-coded only, several times faster for the same size and still
    below 1 bit when signs are skewed; the sparse zero plane gets full deflate. Decodable with
    numpy and gzip alone.
    """
    flat = d.reshape(-1)
    payload = _gzip(np.packbits(flat > 0).tobytes(), zlib.Z_HUFFMAN_ONLY)
    zeros = flat == 0
    if zeros.any():
        payload += _gzip(np.packbits(zeros).tobytes(), zlib.Z_DEFAULT_STRATEGY)
    return payload


def _planes_v2(data: bytes, nbytes: int) -> tuple[np.ndarray, np.ndarray | None]:
    raw = gzip.decompress(data)
    if len(raw) not in (nbytes, 2 * nbytes):
        raise ValueError(f"direction payload is {len(raw)} bytes, expected {nbytes} or {2 * nbytes}")
    planes = np.frombuffer(raw, np.uint8)
    return planes[:nbytes], (planes[nbytes:] if len(raw) > nbytes else None)


def _planes_v1(data: bytes, nbytes: int) -> tuple[np.ndarray, np.ndarray | None]:
    p = _load_npy(gzip.decompress(data))
    if p.dtype != np.uint8 or p.shape != (2, nbytes):
        raise ValueError(f"direction planes have dtype {p.dtype} and shape {p.shape}")
    return p[0], p[1]


def decode_directions(payloads: list[bytes], geometry: tuple[int, int, int], member: str = DIRECTION) -> np.ndarray:
    """Decode many direction members (all `.dir.bits.gz`, or all v1 `.dir.npy.gz`) into int8 [n, C, H, W]."""
    nel = int(np.prod(geometry))
    nbytes = -(-nel // 8)
    split = _planes_v2 if member == DIRECTION else _planes_v1
    signs = np.empty((len(payloads), nbytes), np.uint8)
    zeros: dict[int, np.ndarray] = {}
    for j, data in enumerate(payloads):
        signs[j], z = split(data, nbytes)
        if z is not None:
            zeros[j] = z
    return _lut_directions(signs, zeros, geometry)


# Each packed byte -> its 8 values 2*bit - 1 (most significant bit first, as packbits packs),
# as one uint64: a gather through this table is ~2x faster than unpackbits, shift and subtract.
_SIGN_LUT = np.ascontiguousarray(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.int8) * 2 - 1).view(np.uint64).reshape(256)


def _lut_directions(signs: np.ndarray, zeros: dict[int, np.ndarray], geometry: tuple[int, int, int]) -> np.ndarray:
    """int8 [n, C, H, W] from packed sign planes uint8 [n, ceil(nel/8)] and the zero planes of
    the samples that have one (an all-zero plane, as v1 +-1 maps carry, is skipped)."""
    n, nel = len(signs), int(np.prod(geometry))
    d = np.take(_SIGN_LUT, signs).view(np.int8)
    if d.shape[1] != nel:
        d = np.ascontiguousarray(d[:, :nel])
    for j, z in zeros.items():
        if z.any():
            d[j] *= (1 - np.unpackbits(z, count=nel)).view(np.int8)
    return d.reshape(n, *geometry)


def decode_direction(data: bytes, geometry: tuple[int, int, int], member: str = DIRECTION) -> np.ndarray:
    """Decode one direction member (`member` names its layout) into int8 [C, H, W]."""
    return decode_directions([data], geometry, member)[0]


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


def _ustar_template() -> tuple[bytes, int]:
    """The USTAR header of an empty-named, empty member as tarfile writes ours (mode 0644,
    uid/gid 0, no user/group names, mtime 0), and its checksum with the checksum field blank."""
    head = bytearray(512)
    for off, value in ((100, b"0000644\x00"), (108, b"0000000\x00"), (116, b"0000000\x00"),
                       (136, b"00000000000\x00"), (156, b"0"), (257, b"ustar\x0000")):
        head[off:off + len(value)] = value
    return bytes(head), sum(head) + 8 * ord(" ")


_USTAR, _USTAR_SUM = _ustar_template()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Deterministic USTAR tar, written atomically (fileio.atomic_target).

    The headers are made here, byte-identical to tarfile's for these members (tests check),
    at ~4 µs a member instead of ~33: a 224 px shard has 7 members a sample, and tarfile's
    pure-Python header code held the GIL that the thread driving the GPU needs.
    """
    chunks: list[bytes] = []
    for name, data in members:
        n = name.encode("ascii")
        if len(n) > 100:
            raise StoreError(f"tar member name {name!r} is longer than USTAR's 100 bytes.")
        size = b"%011o\x00" % len(data)
        head = bytearray(_USTAR)
        head[:len(n)] = n
        head[124:136] = size
        head[148:156] = b"%06o\x00 " % (_USTAR_SUM + sum(n) + sum(size))
        chunks += [bytes(head), data, bytes(-len(data) % 512)]
    chunks.append(bytes(1024))  # end of archive: two zero blocks
    chunks.append(bytes(-sum(map(len, chunks)) % tarfile.RECORDSIZE))
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.writelines(chunks)


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


def carries_sources(record: dict) -> bool:
    """May shard `record`'s tar hold source-encoded images (`.src.<ext>`, up to
    limits.max_image_bytes each)? Only if its writer said so: `source_images` (records since
    issue 25), else `images` (older records, which did not tell pixels from sources)."""
    return bool(record.get("source_images", record.get("images", False)))


def _bounded_member(tar: Path, m: tarfile.TarInfo, bounds: dict[str, int], sources: bool = True) -> tuple[str, str]:
    """`_check_member`, and its size (from its header) within the store's bound for it; a
    source image in a shard that carries none is refused from its header."""
    key, ext = _check_member(tar, m)
    if ext.startswith(SOURCE_PREFIX) and not sources:
        raise StoreError(f"tar {tar} member {m.name!r} is a source image, but this shard's record says it carries "
                         "none; the shard is refused unread.")
    problem = tarsafe.check_member_size(m, member_bound(bounds, ext))
    if problem:
        raise StoreError(f"tar {tar} member {m.name!r} is {problem} for this store's geometry; "
                         "the shard is refused unread.")
    return key, ext


_valid_ext_sets: dict[tuple[frozenset[str], str], str | None] = {}


def _ext_set_problem(exts: frozenset[str], schema: str) -> str | None:
    """Schema check of a sample's member set; cached, since every sample has the same set."""
    if (exts, schema) not in _valid_ext_sets:
        errors = schema_errors({e: 1 for e in exts}, schema)
        images = [e for e in exts if e in ("png", "npy") or e.startswith(SOURCE_PREFIX)]
        if not errors and len(images) > 1:
            errors = [f"more than one image member ({', '.join(sorted(images))})"]
        _valid_ext_sets[exts, schema] = errors[0] if errors else None
    return _valid_ext_sets[exts, schema]


def _image_member(members: dict[str, bytes]) -> str | None:
    return next((e for e in members if e in ("png", "npy") or e.startswith(SOURCE_PREFIX)), None)


def decode_tar(data: bytes | BinaryIO, tar: Path, manifest: dict, s: int, *, with_images: bool = False,
               sources: bool = True, keep_sources: bool = True) -> dict[str, Any]:
    """Decode shard s from the tar (its bytes, or an open file read member by member) into
    arrays; StoreError on anything unexpected, a member name given twice included.

    Pixel images (`.png`/`.npy`) are only decoded `with_images` (PNG decoding dominates
    otherwise); source-encoded images (`.src.<ext>`) are returned as (ext, bytes) in
    `image_files`, and only checked to open `with_images`; `sources` False refuses them.
    Without `keep_sources` (verify) each is checked as it is read and then dropped, so at most
    one member is held at a time, whatever the tar's size.
    """
    start, stop = shard_range(manifest, s)
    n = stop - start
    ident = manifest["identity"]
    geometry = tuple(ident["geometry"])
    K = ident["num_classes"]

    samples: OrderedDict[str, dict[str, bytes]] = OrderedDict()
    bounds = member_bounds(manifest)
    index: bytes | None = None
    listed: list[tuple[str, int]] = []
    try:
        fileobj = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        with tarfile.open(fileobj=fileobj, mode="r:") as tf:
            for m in tf:
                if index is not None:
                    raise StoreError(f"tar {tar} has the member {m.name!r} after its {INDEX_MEMBER} member, which "
                                     "must be last; the shard is refused.")
                if m.name == INDEX_MEMBER and m.isreg():
                    problem = tarsafe.check_member_size(m, index_bound(n))
                    if problem:
                        raise StoreError(f"tar {tar} member {m.name!r} is {problem}; the shard is refused unread.")
                    index = tf.extractfile(m).read()
                    continue
                listed.append((m.name, m.size))
                key, ext = _bounded_member(tar, m, bounds, sources)
                sample = samples.setdefault(key, {})
                if ext in sample:  # tar keeps both; one would silently shadow the other
                    raise StoreError(f"tar {tar} holds the member {m.name!r} twice; the shard is refused.")
                payload = tf.extractfile(m).read()
                if ext.startswith(SOURCE_PREFIX) and not keep_sources:
                    _checked_source(tar, m.name, payload, with_images)
                    payload = b""  # checked; not held while the rest is read
                sample[ext] = payload
    except tarfile.TarError as exc:
        raise StoreError(f"tar {tar} cannot be read: {exc}.") from None

    expected = [sample_key(i) for i in range(start, stop)]
    if list(samples) != expected:
        raise StoreError(f"tar {tar} holds {len(samples)} samples that are not samples {start}..{stop - 1} in order.")
    # The first sample's direction member names the tar's layout; every sample must follow it.
    member = DIRECTION_V1 if n and DIRECTION_V1 in next(iter(samples.values())) else DIRECTION
    schema = "wds_layout.v1.json" if member == DIRECTION_V1 else "wds_layout.v2.json"

    out: dict[str, Any] = {
        "logits": np.empty((n, K), np.float16),
        "label": np.empty((n,), np.int64),
        "keys": [],
    }
    images: list[np.ndarray | None] = []
    files: list[tuple[str, bytes]] = []
    true_labels: list[int] = []
    for j, (key, members) in enumerate(samples.items()):
        problem = _ext_set_problem(frozenset(members), schema)
        if problem:
            raise StoreError(f"tar {tar} sample {key}: members do not follow {schema[:-5]} ({problem}).")
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
            field = _image_member(members) or "image"
            if field.startswith(SOURCE_PREFIX):
                if with_images and keep_sources:
                    check_source_image(members[field])
                files.append((field[len(SOURCE_PREFIX):], members[field]))
            elif field != "image":
                images.append(decode_image(field, members[field], geometry) if with_images else None)
                files.append((field, members[field]))
        except StoreError:
            raise
        except Exception as exc:  # numpy, gzip, PIL and int() all raise their own types
            raise StoreError(f"tar {tar} member {key}.{field} cannot be decoded: {exc}.") from None
    # Images and true labels are all-or-nothing within a shard.
    for name, items in (("images", files), ("true labels", true_labels)):
        if items and len(items) != n:
            raise StoreError(f"tar {tar} has {name} for {len(items)} of {n} samples.")
    if images and len(images) != len(files):
        raise StoreError(f"tar {tar} mixes pixel and source-encoded images.")
    try:
        out["direction"] = decode_directions([m[member] for m in samples.values()], geometry, member)
    except Exception as exc:
        raise StoreError(f"tar {tar} has a .{member} member that cannot be decoded: {exc}.") from None
    if index is not None and (problem := listing_problem(index, listed, start, n)):
        raise StoreError(f"tar {tar} member {INDEX_MEMBER} does not describe the tar ({problem}); the shard is refused "
                         "(re-run precompute to rewrite it).")
    out["has_images"] = bool(files)
    out["images"] = np.stack(images) if images and with_images else None
    out["image_files"] = files or None
    out["true_label"] = np.asarray(true_labels, np.int64) if true_labels else None
    return out


def _checked_source(tar: Path, name: str, data: bytes, with_images: bool) -> None:
    if not with_images:
        return
    try:
        check_source_image(data)
    except Exception as exc:  # PIL raises its own types
        raise StoreError(f"tar {tar} member {name} cannot be decoded: {exc}.") from None


def check_source_image(data: bytes) -> None:
    """The source-encoded image opens as an image (PIL checks the header and structure)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.verify()


_HEADERS_CHECKED: set[tuple[str, int, int, int]] = set()  # tars whose headers passed, by identity


def _check_headers(tar: Path, manifest: dict, sources: bool = True) -> None:
    """Every member of `tar` safe and within its bound, from the headers alone (tarfile seeks
    over member data; pax and GNU long-name members are capped by `tarsafe` first)."""
    bounds = member_bounds(manifest)
    try:
        with open(tar, "rb") as f:
            problem = tarsafe.oversized_metadata(f, current_limits().max_metadata_bytes)
            if problem:
                raise StoreError(f"tar {tar} has {problem}; the shard is refused unread.")
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    _bounded_member(tar, m, bounds, sources)
    except tarfile.TarError as exc:
        raise StoreError(f"tar {tar} cannot be read: {exc}.") from None


_CHUNK = 1 << 20  # bytes hashed at a time


def _checked_tar(path: Path, manifest: dict, s: int, record: dict, *, keep: bool,
                 into: np.ndarray | None = None) -> memoryview | None:
    """Check shard s's tar against its bounds and its sha256. With `keep` (the reader decodes
    them) its bytes are read whole (into `into` when it is large enough), hashed and returned;
    else it is hashed in chunks and None returned (verify re-reads member by member, never
    holding the whole tar)."""
    tar = path / tar_name(s)
    sources = carries_sources(record)
    try:
        st = tar.stat()
        if st.st_size > max_tar_bytes(manifest, s):
            # Larger than pixels at this geometry allow: only source images may make it so,
            # and only in a shard that carries them. Every member's header is checked before
            # a byte of data is read, once per file per process (a store of source JPEGs is
            # re-read every epoch).
            if st.st_size > (cap := max_tar_bytes(manifest, s, sources=sources)):
                raise StoreError(f"shard {s}: file {tar_name(s)} of store {path} is {st.st_size} bytes, more than "
                                 f"its samples can take at this geometry ({cap}); refused unread.")
            seen = (str(tar), st.st_ino, st.st_size, st.st_mtime_ns)
            if seen not in _HEADERS_CHECKED:
                _check_headers(tar, manifest, sources)
                _HEADERS_CHECKED.add(seen)
        want = record["files"][tar_name(s)]["sha256"]
        # Hashed once per process and file version, as zarr's shard files are (manifest's
        # _VERIFIED): a tar this process downloaded (a store URL's cache), verified or read before
        # is not hashed again until it is replaced or rewritten. Every read still decodes from
        # the bytes it reads, through the header checks of the index path.
        digest = None if known_verified(tar, want) else hashlib.sha256()
        data = None
        if keep:  # one read into one uninitialised buffer, then hashed: no chunk copies (the hot path)
            data = _read_whole(tar, st.st_size, into)
            if digest is not None:
                digest.update(data)
        elif digest is not None:
            with open(tar, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
    except FileNotFoundError:
        raise StoreError(f"shard {s}: missing file {tar_name(s)} in store {path}.") from None
    if digest is not None:
        if digest.hexdigest() != want:
            raise StoreError(f"shard {s}: checksum mismatch in file {tar_name(s)} of store {path}.")
        note_verified(tar, want, st)  # the version stat saw before the read
    return data


def _read_whole(path: Path, size: int, into: np.ndarray | None = None) -> memoryview:
    """The file's bytes, read with as few read calls as the kernel allows into a buffer that is
    not zeroed first (bytearray(n) would zero ~40 MB a 224 px shard, then copy it again when
    trimmed: 4x the cost of the read itself, measured), `into` when it is large enough."""
    # + 1: a file that grew since stat reads past `size`
    buf = into if into is not None and len(into) >= size + 1 else np.empty(size + 1, np.uint8)
    got = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(memoryview(buf)[got:]):
            got += n
            if got == len(buf):  # it grew: read the rest the slow way, the sha256 sees it all
                return memoryview(np.concatenate([buf[:got], np.frombuffer(f.read(), np.uint8)]))
    return memoryview(buf)[:got]


def read_shard_bytes(path: Path, manifest: dict, s: int, record: dict, into: np.ndarray | None = None) -> memoryview:
    """The tar's bytes, checked against its bounds and the shard's sha256 (in `into` when it is
    large enough: the caller then keeps no view of them once decoded)."""
    return _checked_tar(path, manifest, s, record, keep=True, into=into)  # type: ignore[return-value]


# --------------------------------------------------------------------------- writer / reader


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The encoders' threads, shared by every writer of the process (created on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="enspipe-wds")
        return _POOL


def _source_member(ext: str, s: int, j: int) -> str:
    ext = ext.lower()
    if ext not in SOURCE_EXTS:
        raise StoreError(f"shard {s}: sample {j}'s source image has extension {ext!r}; wds stores carry "
                         f"{', '.join(SOURCE_EXTS)} as is (pass `wds_images` none to leave images out).")
    return SOURCE_PREFIX + ext


class WdsWriter(StoreWriter):
    fmt = "wds"

    def _write_files(self, s: int, start: int, stop: int, **a: Any) -> tuple[list[str], dict]:
        for j, key in enumerate(a["keys"]):
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise StoreError(f"shard {s}: key {a['keys'][j]!r} is not valid UTF-8 text.") from None
        spans = [(lo, min(lo + ENCODE_SAMPLES, stop - start)) for lo in range(0, stop - start, ENCODE_SAMPLES)]
        parts = list(_pool().map(lambda span: self._encode(s, start, *span, a), spans))
        members = [m for part, _ in parts for m in part]
        if WRITE_INDEX:
            members.append((INDEX_MEMBER, index_content(members, start)))
        write_tar(self.path / tar_name(s), members)
        images = a["images"] is not None or a["image_files"] is not None
        return [tar_name(s)], {"direction_bytes": sum(nbytes for _, nbytes in parts), "images": images,
                               "source_images": a["image_files"] is not None,
                               **({"member_index": True} if WRITE_INDEX else {})}

    def _encode(self, s: int, start: int, lo: int, hi: int, a: dict[str, Any]) -> tuple[list[tuple[str, bytes]], int]:
        """The members of samples [lo, hi) of the shard, and their direction bytes."""
        members: list[tuple[str, bytes]] = []
        direction_bytes = 0
        label_is_true = self.identity.label_mode == "true"
        for j in range(lo, hi):
            k = sample_key(start + j)
            members.append((f"{k}.idx", str(start + j).encode("ascii")))
            members.append((f"{k}.key", a["keys"][j].encode("utf-8")))
            if a["true_label"] is not None or label_is_true:
                true = a["true_label"][j] if a["true_label"] is not None else a["label"][j]
                members.append((f"{k}.cls", str(int(true)).encode("ascii")))
            members.append((f"{k}.label.cls", str(int(a["label"][j])).encode("ascii")))
            if a["image_files"] is not None:
                ext, data = a["image_files"][j]
                members.append((f"{k}.{_source_member(ext, s, j)}", bytes(data)))
            elif a["images"] is not None:
                ext, data = encode_image(a["images"][j])
                members.append((f"{k}.{ext}", data))
            dir_bytes = encode_direction(a["direction"][j])
            direction_bytes += len(dir_bytes)
            members.append((f"{k}.{DIRECTION}", dir_bytes))
            members.append((f"{k}.logits.npy", _npy_bytes(a["logits"][j])))
        return members, direction_bytes


class WdsReader(StoreReader):
    """Reads whole tar shards into decoded arrays, keeping the last few in an LRU cache."""

    fmt = "wds"

    def __init__(self, path: Path, manifest: dict, records: dict[int, dict], *, cache_shards: int = 4) -> None:
        super().__init__(path, manifest, records)
        self.cache_shards = max(1, cache_shards)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        # The last tar's buffer, reused for the next: a fresh ~40 MB buffer a 224 px shard costs
        # ~10k page faults. Decoding copies everything it keeps out of it. A list, popped and
        # appended (atomic under the GIL): two threads reading at once never share one.
        self._buffers: list[np.ndarray] = []

    def shard(self, s: int) -> dict[str, Any]:
        """Decoded shard s: direction, logits, label, keys, true_label (or None); images are not decoded."""
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        record = self.records[s]
        try:
            buffer = self._buffers.pop()
        except IndexError:
            buffer = None
        data = read_shard_bytes(self.path, self.manifest, s, record, buffer)
        decoded = None
        if record.get("member_index"):
            decoded = decode_indexed(data, self.path / tar_name(s), self.manifest, s, sources=carries_sources(record))
        if decoded is None:  # written before the index, or an index the fast path does not take
            decoded = decode_tar(data, self.path / tar_name(s), self.manifest, s, sources=carries_sources(record))
        if isinstance(data.obj, np.ndarray) and not self._buffers:
            self._buffers.append(data.obj)
        self._cache[s] = decoded
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return decoded

    def _pieces(self, start: int, stop: int, field: str) -> list[Any]:
        out = []
        for s, rows in self._spans(start, stop):
            value = self.shard(s)[field]
            if value is None:
                raise StoreError(f"shard {s} of store {self.location} has no {field}.")
            out.append(value[rows])
        return out

    def _read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {f: np.concatenate(self._pieces(start, stop, f)) for f in ("direction", "logits", "label")}

    def _keys(self, start: int, stop: int) -> list[str]:
        return [k for piece in self._pieces(start, stop, "keys") for k in piece]

    def read_images(self, start: int, stop: int) -> np.ndarray:
        """The clean images uint8 [n,C,H,W] of samples [start, stop), when the store holds them as
        pixels (sources held as pixels); source-encoded images are `read_image_files`'s.

        Not cached: the trainer takes clean images from the dataset, this is for inspection.
        """
        out = [np.empty((0, *self.geometry), np.uint8)]
        for s, rows, shard in self._decoded(start, stop, with_images=True):
            if shard["images"] is None and shard["has_images"]:
                raise StoreError(f"shard {s} of store {self.location} holds its images as the source encoded them, "
                                 "not as pixels: read them with read_image_files.")
            if shard["images"] is None:
                raise StoreError(f"shard {s} of store {self.location} has no clean images.")
            out.append(shard["images"][rows])
        return np.concatenate(out)

    def read_image_files(self, start: int, stop: int) -> list[tuple[str, bytes]]:
        """Each sample's stored image as (extension, bytes): the source's encoding (layout v2,
        e.g. ("jpeg", the JPEG file's bytes)) or the stored pixels' PNG / .npy."""
        out: list[tuple[str, bytes]] = []
        for s, rows, shard in self._decoded(start, stop, with_images=False):
            if shard["image_files"] is None:
                raise StoreError(f"shard {s} of store {self.location} has no clean images.")
            out.extend(shard["image_files"][rows])
        return out

    def _decoded(self, start: int, stop: int, *, with_images: bool):
        start, stop = self._check_range(start, stop)
        for s, rows in self._spans(start, stop):
            lo, _ = shard_range(self.manifest, s)
            with self._local(lo + rows.start, lo + rows.stop):  # a store URL's tar, fetched into its cache
                data = read_shard_bytes(self.path, self.manifest, s, self.records[s])
                shard = decode_tar(data, self.path / tar_name(s), self.manifest, s, with_images=with_images,
                                   sources=carries_sources(self.records[s]))
            yield s, rows, shard


def store_problems(path: Path, manifest: dict) -> list[str]:
    return []


def check_shard(path: Path, manifest: dict, s: int, record: dict) -> None:
    """Decode all of shard s; raises on any problem (used by verify). The tar is hashed in
    chunks and then decoded from the file member by member, source images checked and
    dropped as they are read: a forged tar of gigabytes is never held whole."""
    _checked_tar(path, manifest, s, record, keep=False)
    with open(path / tar_name(s), "rb") as f:
        decode_tar(f, path / tar_name(s), manifest, s, with_images=True, sources=carries_sources(record),
                   keep_sources=False)


# The classes of the Backend protocol (base.Backend), which open.py instantiates.
Writer = WdsWriter
Reader = WdsReader
