"""How large a WebDataset store's tars and members can be, from the store's own geometry.

A store's manifest fixes every sample's shape: (C, H, W) pixels, K logits. So the largest
size of each member -- a direction's packed bit planes, the logits, a PNG of that many
pixels, a label -- and of a whole shard's tar is known before a byte is read. The reader
checks the tar's size and every member's header against these bounds and refuses what is
larger: a hostile or damaged tar cannot make it read gigabytes (RELIABILITY.md, hostile
input). Labels and images are also capped by `enspipe.util.limits`.

A layout-v2 store may hold each sample's source image as the source encoded it
(`.src.<ext>`, e.g. an ImageNet JPEG larger than its pixels at the store's geometry): those
members are bounded by `limits.max_image_bytes` only, so a tar above the pixel-only bound
(`max_tar_bytes(..., sources=False)`) has its headers checked member by member before it is
read (`wds.store.read_shard_bytes`).
"""
from __future__ import annotations

from enspipe.util.limits import current_limits

from enspipe.stores.manifest import shard_range

__all__ = ["KEY_BYTES", "NPY_HEADER_BYTES", "SOURCE_PREFIX", "index_bound", "max_tar_bytes", "member_bound",
           "member_bounds"]

NPY_HEADER_BYTES = 4096  # numpy's header of a small array is 128 bytes; generous
KEY_BYTES = 65536        # a dataset key is a relative path: PATH_MAX is 4096 on Linux
_BLOCK = 512
SOURCE_PREFIX = "src."   # layout v2's source image members, `src.<ext>`
_DIRECTIONS = ("dir.bits.gz", "dir.npy.gz")
_IMAGES = ("png", "npy")


def member_bounds(manifest: dict) -> dict[str, int]:
    """The largest size each member of a sample can have, by extension, from the store's
    geometry and classes (labels and images also by `enspipe.util.limits`): a member above it is
    refused from its header, before it is read."""
    C, H, W = manifest["identity"]["geometry"]
    K = manifest["identity"]["num_classes"]
    limits = current_limits()
    nel = C * H * W
    raw_png = H * (W * C + 1)  # a filter byte per row

    def deflated(n: int) -> int:  # deflate's worst case is raw + 5 bytes per 16 KiB block
        return n + n // 1000 + 1024

    label = limits.max_label_bytes
    return {
        "idx": label, "cls": label, "label.cls": label, "key": KEY_BYTES,
        "png": min(limits.max_image_bytes, deflated(raw_png) + 12 * (raw_png // 8192 + 1)),
        "npy": NPY_HEADER_BYTES + nel,
        "dir.npy.gz": deflated(NPY_HEADER_BYTES + 2 * -(-nel // 8)),
        "dir.bits.gz": deflated(2 * -(-nel // 8)) + 64,  # two gzip members' headers and trailers
        "logits.npy": NPY_HEADER_BYTES + 2 * K,
    }


def member_bound(bounds: dict[str, int], ext: str) -> int:
    """The bound of a member with extension `ext` (a source image: `limits.max_image_bytes`;
    an extension the layout does not have: the largest bound, the schema check refuses it)."""
    if ext in bounds:
        return bounds[ext]
    if ext.startswith(SOURCE_PREFIX):
        return current_limits().max_image_bytes
    return max(bounds.values())


def index_bound(n: int) -> int:
    """The largest `__index__` member (wds_index) of a shard of n samples: JSON of at most 8
    sizes of 11 digits and a pattern number a sample, and the patterns themselves."""
    return 4096 + 256 * n


def max_tar_bytes(manifest: dict, s: int, *, sources: bool = False) -> int:
    """The largest tar shard s can be: every sample's members at their bound (one image, one
    direction: a tar holds one layout), with headers and padding, and tar's end-of-archive
    blocks and record padding. `sources`: the image may be a source's encoded file."""
    start, stop = shard_range(manifest, s)
    bounds = member_bounds(manifest)

    def padded(b: int) -> int:
        return _BLOCK + -(-b // _BLOCK) * _BLOCK

    image = max([bounds[e] for e in _IMAGES] + ([current_limits().max_image_bytes] if sources else []))
    per_sample = (sum(padded(b) for e, b in bounds.items() if e not in _IMAGES + _DIRECTIONS)
                  + padded(image) + padded(max(bounds[e] for e in _DIRECTIONS)))
    return (stop - start) * per_sample + padded(index_bound(stop - start)) + 2 * 10240
