"""Perturbation stores: precomputed adversarial directions, one interface, two formats.

A store holds, for one identity (dataset fingerprint, static model + weights, attack,
label mode, geometry), per sample `i` in `[0, N)`: the direction `d` int8 [C,H,W] in
{-1,0,+1}, the static model's logits float16 [K] and the label the attack used, plus a
`manifest.json`. The producer (`precompute`) and the consumer (`train`) meet only here,
joined by the sample index. This package stores numpy arrays and knows neither.

Formats (see storage_schemas/*.json for the exact layouts), one backend module each,
declared once in `registry` (name = folder suffix, capabilities) and loaded when a store of
that format is first opened:
  - ``zarr``: zarr v3 arrays `direction`, `logits`, `label`, sharded by `shard_size`
    samples, blosc(zstd, bit-shuffle) chunks; dataset keys in `keys/NNNNNN.json`.
  - ``wds``: one WebDataset tar per shard with per-sample members (clean image too).

Work is cut into shards of `shard_size` whole samples. A shard is written by exactly one
writer in one go, then a per-shard completion record `shards/NNNNNN.json` is replaced
into place; `finalize` gathers the records into the manifest and marks it complete.
Readers refuse incomplete stores.

    w = create_store(store_path(root, ident, "zarr"), ident, fmt="zarr", shard_size=1024)
    for s in w.pending_shards():          # or spread over processes with open_writer(path)
        a, b = w.shard_range(s)
        w.write_shard(s, direction=..., logits=..., label=..., keys=..., images=None)
    w.finalize()
    r = open_store(path)                  # the store's handle: pass it on (verify_store(r),
    batch = r.read(a, b)                  # DirectionStream([r])) rather than reopening the path

A producer decides "reuse, resume or create?" with `existing_manifest(path)`: None where
no store exists yet, else the store's validated manifest (`complete`, `extra`, ...).

The rooms: `manifest` (identity, schemas, manifest and shard records), `base` (writer and
reader base classes, the `Backend` protocol), `registry` (format -> backend), `open`
(create / open), `listing` (ls), `verify`; `zarr_store` and `wds/` (`wds.store`, `wds.bounds`) are the
backends; `wds.decode` has the handlers that read a wds store with plain webdataset (`wds_decoders`);
`remote`, `remote_write`, `remote_read`: stores at fsspec URLs (`s3://...`), which `create_store`,
`open_writer`, `open_store`, `verify_store` and `list_stores` take wherever a path is taken.
"""
from __future__ import annotations

from .base import Backend, StoreReader, StoreWriter
from .listing import StoreInfo, list_stores, store_info
from .manifest import (
    FORMATS,
    SCHEMA_VERSION,
    Format,
    StoreIdentity,
    existing_manifest,
    read_manifest,
    store_path,
)
from .open import create_store, open_store, open_writer
from .registry import BACKENDS, get_backend
from .verify import VerifyReport, check_against, verify_store
from .wds.decode import wds_decoders

__all__ = [
    "BACKENDS",
    "FORMATS",
    "SCHEMA_VERSION",
    "Backend",
    "Format",
    "StoreIdentity",
    "StoreInfo",
    "StoreReader",
    "StoreWriter",
    "VerifyReport",
    "create_store",
    "existing_manifest",
    "get_backend",
    "list_stores",
    "open_store",
    "open_writer",
    "read_manifest",
    "store_info",
    "store_path",
    "check_against",
    "verify_store",
    "wds_decoders",
]
