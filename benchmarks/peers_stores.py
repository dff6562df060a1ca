"""Store read throughput at ImageNet geometry (3x224x224) for benchmarks/bench_peers.py.

The stores are written through enspipe's own writer (`create_store` / `write_shard` /
`finalize`), with synthetic content:
  - directions: i.i.d. uniform random signs in {-1, +1}. This is the worst case for the
    codecs (NOTES: ~1.0 bit per element; real maps are spatially correlated and compress
    better), so the read rates here are a floor for real stores of this geometry.
  - clean images (wds only: precompute writes the clean image beside each direction in wds
    stores): random uint8 noise PNGs, ~150 KB each, incompressible like photographs' PNGs.
  - logits: float16 [1000] (ImageNet's K), labels: int.
Encoding the noise PNGs is most of a wds store's build time (~9 ms a sample on a 2-core
CPU); only the reads are measured.

Readers run in separate processes (multiprocessing "spawn": zarr's event-loop thread must
not be forked). Each opens the store, waits for a common start signal so that imports and
opening are not timed, reads its share of blocks exactly as `BatchStream` does (a group of
`buffer_blocks` blocks concatenated, then permuted in memory), and reports its wall and CPU
time.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np

GEOMETRY = (3, 224, 224)
NUM_CLASSES = 1000


def synthetic_identity(n: int, fmt: str):
    from enspipe.stores import StoreIdentity

    return StoreIdentity(
        dataset={"source": "synthetic:imagenet-geometry", "split": "train", "num_samples": n, "limit": None,
                 "fingerprint": "5e" * 32, "geometry": list(GEOMETRY)},
        geometry=GEOMETRY, preprocess="synthetic:random-sign-directions", num_classes=NUM_CLASSES,
        model_name="resnet50", weights_sha256="0" * 64, attack="fgsm",
        attack_params={"loss": "ce", "target": "pred_label", "direction": "sign(grad)"}, label_mode="pred")


def build_store(root: Path, fmt: str, n: int, shard_size: int, seed: int = 0) -> tuple[Path, float, int]:
    """Write a complete synthetic store; returns (path, seconds, bytes on disk)."""
    from enspipe.stores import create_store, store_path

    ident = synthetic_identity(n, fmt)
    path = store_path(root, ident, fmt)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    writer = create_store(path, ident, fmt=fmt, shard_size=shard_size, extra={"producer": "bench_peers"})
    for s in writer.pending_shards():
        a, b = writer.shard_range(s)
        m = b - a
        direction = (rng.integers(0, 2, size=(m, *GEOMETRY), dtype=np.int8) << 1) - 1
        images = rng.integers(0, 256, size=(m, *GEOMETRY), dtype=np.uint8) if fmt == "wds" else None
        writer.write_shard(s, direction=direction.astype(np.int8),
                           logits=rng.standard_normal((m, NUM_CLASSES)).astype(np.float16),
                           label=rng.integers(0, NUM_CLASSES, size=m).astype(np.int64),
                           keys=[f"synthetic-{i:09d}" for i in range(a, b)], images=images)
    writer.finalize()
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path, seconds, size


def read_order(n: int, block: int, shard_size: int, order: str, seed: int) -> list[tuple[int, int]]:
    """The blocks a trainer epoch reads, in order.

    "shuffled": enspipe's block_order (what BatchStream does).
    "alternate": shuffled blocks re-ordered so that consecutive blocks come from different
      shards; with the wds reader's cache limited to one shard every read then decodes a
      whole tar, which is what a store of ~1,250 shards (ImageNet) sees with the default
      4-shard cache and shuffled blocks.
    """
    from enspipe.sampling import block_order

    blocks = block_order(n, block, seed=seed, epoch=0)
    if order == "shuffled":
        return blocks
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for b in blocks:
        by_shard.setdefault(b[0] // shard_size, []).append(b)
    out: list[tuple[int, int]] = []
    queues = list(by_shard.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _reader(path: str, blocks: list[tuple[int, int]], buffer_blocks: int, cache_shards: int | None,
            ready: Any, start: Any, results: Any) -> None:
    from enspipe.stores import open_store

    reader = open_store(path)
    if cache_shards is not None:
        reader.cache_shards = cache_shards
    rng = np.random.default_rng(0)
    ready.put(True)  # imported and opened: only the reading below is timed
    start.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    samples = 0
    for g in range(0, len(blocks), buffer_blocks):
        group = blocks[g:g + buffer_blocks]
        d = np.concatenate([reader.read(a, b)["direction"] for a, b in group])
        d = d[rng.permutation(len(d))]  # BatchStream shuffles the buffer in memory
        samples += len(d)
    results.put({"samples": samples, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0})


def measure_readers(path: Path, blocks: list[tuple[int, int]], processes: int, *, buffer_blocks: int = 8,
                    cache_shards: int | None = None) -> dict[str, float]:
    """Read all `blocks` with `processes` reader processes (contiguous shares of the order)."""
    ctx = mp.get_context("spawn")
    ready, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    k = len(blocks)
    shares = [blocks[r * k // processes:(r + 1) * k // processes] for r in range(processes)]
    procs = [ctx.Process(target=_reader, args=(str(path), share, buffer_blocks, cache_shards, ready, start, results))
             for share in shares]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    t0 = time.perf_counter()
    start.set()
    parts = [results.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    samples = sum(p["samples"] for p in parts)
    cpu = sum(p["cpu_seconds"] for p in parts)
    return {"samples": samples, "wall_s": wall, "samples_per_s": samples / wall, "cpu_s": cpu,
            "samples_per_cpu_s": samples / cpu if cpu > 0 else float("nan")}
