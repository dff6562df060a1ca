"""The stores as a torch dataset: clean images joined with K stores' directions by sample index.

`DirectionStream` is what `enspipe train` reads its batches through, and what a training
loop of your own (plain PyTorch, Lightning, ...) uses to consume the stores:

    ds = create_dataset("mnist")
    stream = DirectionStream(ds, [store_a, store_b], seed=0)      # one epoch per pass
    loader = DataLoader(stream, batch_size=64, num_workers=4)     # default collate
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for b in loader:   # b["index"] [B], b["x"] uint8 [B,C,H,W], b["y"] [B], b["d"] int8 [B,K,C,H,W]
            ...

Why a stream and not a map-style Dataset: stores read fast in contiguous blocks and slowly
per sample (NOTES: ~26k samples/s with 256-sample blocks, ~600/s one by one; a map-style
wrapper over `open_store` measured 299 samples/s). So the stream reads contiguous blocks in a
shuffled block order (`enspipe.sampling.block_order`), the same blocks from the dataset and
from every store, into a rolling shuffle buffer of `buffer_blocks` blocks in memory
(`ShuffleBuffer`: reads spread evenly, no burst of reads per buffer). Blocks are split
between DDP ranks (`torch.distributed` when initialised, else `rank`/`world_size`) and then
between DataLoader workers, so every sample is read once per epoch by exactly one worker of
one rank. Random crops and flips (`augment`) move an image and its K directions alike.

`batch_size=N` makes the stream yield whole batches (use `DataLoader(stream, batch_size=None)`):
no per-sample collation, the fast path. The order depends only on (seed, epoch, rank,
worker), so a resumed run replays it.

`SourceBatches` is the trainer's form (§4.2): batches whose adversarial source is drawn from
{the model itself} + the K stores. The source is drawn per block before anything is read,
balanced over the epoch, so each block reads only its drawn store's directions (a batch uses
at most one store) and the share of batches of each source is 1/(K+1) up to a block's worth.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from enspipe.data import SampleSource
from enspipe.errors import ConfigError
from enspipe.sampling import block_order

__all__ = ["AUGMENTS", "DirectionStream", "SELF", "ShuffleBuffer", "SourceBatches", "apply_augment",
           "augment_params", "rank_and_world", "worker_blocks"]

AUGMENTS = ("none", "crop", "flip", "crop+flip")
SELF = 0  # source id of the model being trained; store k has source id k + 1


# --- augmentation: the same transform on an image and on its directions -------------------

def augment_params(rng: np.random.Generator, n: int, mode: str, pad: int) -> np.ndarray:
    """Per-sample (dy, dx, flip): a crop offset into the zero-padded image and a flip flag."""
    params = np.zeros((n, 3), dtype=np.int64)
    params[:, :2] = rng.integers(0, 2 * pad + 1, size=(n, 2)) if "crop" in mode else pad
    if "flip" in mode:
        params[:, 2] = rng.random(n) < 0.5
    return params


def apply_augment(a: np.ndarray, params: np.ndarray, pad: int) -> np.ndarray:
    """Apply per-sample crops/flips to `a` [n, ..., H, W]; the same params give the same
    transform on an image [n, C, H, W] and on its directions [n, K, C, H, W]."""
    h, w = a.shape[-2:]
    padded = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(pad, pad), (pad, pad)])
    out = np.empty_like(a)
    for i, (dy, dx, flip) in enumerate(params):
        crop = padded[i, ..., dy:dy + h, dx:dx + w]
        out[i] = crop[..., ::-1] if flip else crop
    return out


# --- which blocks this reader reads -----------------------------------------------------------

def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The DDP rank and world size: given ones, else torch.distributed's when initialised."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ConfigError("pass both rank and world_size, or neither")
        return int(rank), int(world_size)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def worker_blocks(num_samples: int, block_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  worker: int = 0, workers: int = 1, shuffle: bool = True) -> list[tuple[int, int]]:
    """The (start, stop) blocks one DataLoader worker of one rank reads in an epoch, in order:
    the rank's blocks (`block_order`) dealt round-robin to its workers."""
    if shuffle:
        blocks = block_order(num_samples, block_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    else:
        nblocks = -(-num_samples // block_size)
        blocks = [(b * block_size, min(num_samples, (b + 1) * block_size)) for b in range(rank, nblocks, world_size)]
    return blocks[worker::workers]


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShuffleBuffer:
    """A rolling shuffle buffer of samples (a dict of equal-length arrays): blocks go in as they
    are read, random batches come out once it holds `fill` samples beyond the batch.

    Rolling rather than read-a-buffer-then-serve: a worker reads one block, serves what it
    can, reads the next, so its reads spread evenly over the epoch instead of arriving in
    bursts that leave the GPU waiting (and the next epoch's first batch needs one block, not
    a whole buffer). The buffer fills up gradually at an epoch's start (`ready` asks for half
    of what was read so far, up to `fill`), as webdataset's shuffle(bufsize, initial) does.
    A batch taken out leaves its holes filled from the end (O(batch) copies, not O(buffer)).
    """

    def __init__(self, shuffle: bool = True):
        self.shuffle, self.arrays, self.n, self.read = shuffle, {}, 0, 0

    def add(self, part: dict[str, np.ndarray]) -> None:
        m = len(part["index"])
        for key, v in part.items():
            a = self.arrays.get(key)
            if a is None or len(a) < self.n + m:
                grown = np.empty((max(2 * (0 if a is None else len(a)), self.n + m), *v.shape[1:]), v.dtype)
                if a is not None:
                    grown[:self.n] = a[:self.n]
                self.arrays[key] = a = grown
            a[self.n:self.n + m] = v
        self.n += m
        self.read += m

    def ready(self, k: int, fill: int) -> bool:
        return self.n >= k + min(fill, self.read // 2)

    def take(self, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """k samples: at random positions (shuffle), else the k oldest."""
        n, k = self.n, min(k, self.n)
        sel = np.sort(rng.choice(n, k, replace=False)) if self.shuffle else np.arange(k)
        out = {key: a[sel] for key, a in self.arrays.items()}
        if self.shuffle:  # the survivors among the last k rows move into the holes below n - k
            tail = np.setdiff1d(np.arange(n - k, n), sel, assume_unique=True)
            holes = sel[sel < n - k]
            for a in self.arrays.values():
                a[holes] = a[tail]
        else:
            for a in self.arrays.values():
                a[:n - k] = a[k:n].copy()
        self.n -= k
        return out


class DirectionStream(torch.utils.data.IterableDataset):
    """Samples of `dataset` with the directions of every store in `stores` (see the module doc).

    Per sample: {"index": int, "x": uint8 [C,H,W], "y": int, "d": int8 [K,C,H,W]} (K = len(stores),
    store order); with `batch_size`, the same keys batched ([B], [B,C,H,W], [B], [B,K,C,H,W]).
    Every store is checked against the dataset (fingerprint, geometry, N) when the stream is
    made; readers are opened in the process that iterates (file handles do not cross processes).
    """

    def __init__(self, dataset: SampleSource, stores: Sequence[str | os.PathLike] = (), *,
                 batch_size: int | None = None, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 block_size: int = 256, buffer_blocks: int = 8, augment: str = "none", crop_padding: int = 2,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 check: bool = True):
        if isinstance(stores, (str, os.PathLike)):
            raise ConfigError("stores must be a list of store paths, not one path")
        if augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}, not {augment!r}")
        for name, value in (("block_size", block_size), ("buffer_blocks", buffer_blocks),
                            ("batch_size", 1 if batch_size is None else batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be at least 1, not {value!r}")
        self.dataset = dataset
        self.stores = tuple(os.fspath(s) for s in stores)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.block_size, self.buffer_blocks = block_size, buffer_blocks
        self.augment, self.crop_padding = augment, crop_padding
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.drop_last = drop_last
        if check:
            for reader in self._readers():
                reader.check_compatible(fingerprint=dataset.fingerprint, geometry=dataset.geometry.shape,
                                        num_samples=len(dataset), dataset=dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (its block order, shuffle and augmentation). Call it before
        each epoch, as with DistributedSampler; worker processes made after the call see it."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (all of its blocks)."""
        return sum(e - s for s, e in worker_blocks(len(self.dataset), self.block_size, seed=self.seed,
                                                   epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                                                   shuffle=self.shuffle))

    def _readers(self) -> list[Any]:
        from enspipe.stores import open_store

        return [open_store(p) for p in self.stores]

    def _blocks(self, worker: int, workers: int) -> list[tuple[int, int]]:
        return worker_blocks(len(self.dataset), self.block_size, seed=self.seed, epoch=self.epoch, rank=self.rank,
                             world_size=self.world_size, worker=worker, workers=workers, shuffle=self.shuffle)

    def _rng(self, worker: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank, worker, 0x5EED])

    def _images(self, group: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
        index = np.concatenate([np.arange(s, e) for s, e in group])
        x = np.concatenate([self.dataset.images_uint8(slice(s, e)) for s, e in group])
        return {"index": index, "x": x, "y": self.dataset.labels[index]}

    @property
    def fill(self) -> int:
        """Samples the shuffle buffer holds beyond the batch it serves (buffer_blocks blocks)."""
        return self.buffer_blocks * self.block_size

    def _block(self, readers: list[Any], start: int, stop: int) -> dict[str, np.ndarray]:
        part = self._images([(start, stop)])
        C, H, W = self.dataset.geometry.shape
        d = np.empty((stop - start, len(readers), C, H, W), np.int8)
        for k, r in enumerate(readers):
            d[:, k] = r.read_directions(start, stop)
        part["d"] = d
        return part

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nworkers = _worker()
        readers = self._readers()
        rng = self._rng(wid)
        unit = self.batch_size or 64  # samples taken out at a time (yielded one by one without batch_size)
        buf = ShuffleBuffer(self.shuffle)
        for start, stop in self._blocks(wid, nworkers):
            buf.add(self._block(readers, start, stop))
            while buf.ready(unit, self.fill):
                yield from self._emit(buf.take(unit, rng), rng)
        while buf.n:  # the epoch's end: what the buffer holds, in random order
            if self.batch_size is not None and self.drop_last and buf.n < self.batch_size:
                return
            yield from self._emit(buf.take(unit, rng), rng)

    def _emit(self, part: dict[str, np.ndarray], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        part = self._augmented(part, rng)
        if self.batch_size is not None:
            yield self._tensors(part)
        else:
            yield from self._samples(part)

    def _augmented(self, part: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.augment == "none":
            return part
        aug = augment_params(rng, len(part["index"]), self.augment, self.crop_padding)
        return {**part, "x": apply_augment(part["x"], aug, self.crop_padding),
                "d": apply_augment(part["d"], aug, self.crop_padding)}

    @staticmethod
    def _tensors(part: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"index": torch.from_numpy(part["index"].astype(np.int64)),
                "x": torch.from_numpy(np.ascontiguousarray(part["x"])),
                "y": torch.from_numpy(part["y"].astype(np.int64)),
                "d": torch.from_numpy(np.ascontiguousarray(part["d"]))}

    @staticmethod
    def _samples(buf: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        x, d = torch.from_numpy(buf["x"]), torch.from_numpy(buf["d"])
        for i in range(len(buf["index"])):
            yield {"index": int(buf["index"][i]), "x": x[i], "y": int(buf["y"][i]), "d": d[i]}


class SourceBatches(DirectionStream):
    """Batches whose adversarial source is drawn from {the model itself (SELF)} + the K stores.

    Each block's source is drawn before it is read: a balanced draw over this rank's blocks of
    the epoch (every source gets floor or ceil of nblocks / nsources blocks, in random order),
    so a batch's source is uniform and the share of each source is 1/nsources up to a block.
    A block of a store reads that store's directions only; a SELF block reads none (the model's
    direction is made online). Each source has its own rolling shuffle buffer (together as
    large as DirectionStream's one) and a batch is taken from one of them, so the order of
    sources follows the shuffled blocks. At the end the buffers' full batches come out in
    random order, then their leftovers merged into batches whose source is drawn uniformly
    (their few missing directions read by index).

    Yields {"index", "x", "y", "source": int, "d": int8 [n_d, C,H,W] of the drawn store (None
    for SELF), "aug": the crop/flip params (or None)}; `n_d` is `adv_rows(n)` (the whole batch
    by default): only the rows a step perturbs are copied and augmented.
    """

    def __init__(self, dataset: SampleSource, stores: Sequence[str | os.PathLike] = (), *, batch_size: int,
                 include_self: bool = True, **kw: Any):
        super().__init__(dataset, stores, batch_size=batch_size, **kw)
        self.include_self = include_self
        if not include_self and not self.stores:
            raise ConfigError("SourceBatches needs a store when the model itself is not a source")

    @property
    def sources(self) -> list[int]:
        return ([SELF] if self.include_self else []) + [k + 1 for k in range(len(self.stores))]

    def adv_rows(self, n: int) -> int:
        """How many leading rows of an n-sample batch need the source's direction."""
        return n

    def block_sources(self) -> np.ndarray:
        """The drawn source of each of this rank's blocks of the epoch (in block_order's order)."""
        nblocks = len(self._blocks(0, 1))
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 0x50C])
        src = np.asarray(self.sources)
        return rng.permutation(np.resize(rng.permutation(src), nblocks))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nworkers = _worker()
        readers = self._readers()
        rng = self._rng(wid)
        bs = self.batch_size
        # One shuffle buffer per source, together as large as DirectionStream's one.
        fill = max(bs, self.fill // len(self.sources))
        pools = {s: ShuffleBuffer(self.shuffle) for s in self.sources}
        for (start, stop), s in zip(self._blocks(wid, nworkers), self.block_sources()[wid::nworkers].tolist()):
            part = self._images([(start, stop)])
            if s != SELF:
                part["d"] = self._read_block(readers[s - 1], start, stop)
            pools[s].add(part)
            while pools[s].ready(bs, fill):
                yield self._source_batch(s, pools[s].take(bs, rng), rng)
        # The epoch's end: the pools' full batches in random order, then their leftovers merged.
        while full := [s for s in self.sources if pools[s].n >= bs]:
            s = full[int(rng.integers(len(full)))] if self.shuffle else full[0]
            yield self._source_batch(s, pools[s].take(bs, rng), rng)
        yield from self._leftovers({s: p.take(p.n, rng) for s, p in pools.items() if p.n}, readers, rng)

    def _read_block(self, reader: Any, start: int, stop: int) -> np.ndarray:
        """A store's directions of samples [start, stop) (a subclass may stand in for the read)."""
        return reader.read_directions(start, stop)

    def _read_rows(self, reader: Any, indices: list[int]) -> np.ndarray:
        """A store's directions of scattered samples (the end of an epoch's merged leftovers)."""
        return reader.read_indices(indices)["direction"]

    def _leftovers(self, pools: dict[int, dict[str, np.ndarray]], readers: list[Any],
                   rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        parts = [dict(p, src=np.full(len(p["index"]), s)) for s, p in sorted(pools.items()) if len(p["index"])]
        if not parts:
            return
        keys = ("index", "x", "y", "src")
        rest = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        perm = rng.permutation(len(rest["index"])) if self.shuffle else np.arange(len(rest["index"]))
        rest = {k: v[perm] for k, v in rest.items()}
        have = {s: dict(zip(p["index"].tolist(), p["d"])) for s, p in pools.items() if "d" in p}
        n = len(rest["index"])
        stop = n - n % self.batch_size if self.drop_last else n
        for b in range(0, stop, self.batch_size):
            part = {k: v[b:b + self.batch_size] for k, v in rest.items()}
            s = int(rng.choice(self.sources))
            if s != SELF:
                rows = part["index"][:self.adv_rows(len(part["index"]))]
                missing = [i for i in rows.tolist() if i not in have.get(s, {})]
                fetched = dict(zip(missing, self._read_rows(readers[s - 1], missing))) if missing else {}
                got = {**have.get(s, {}), **fetched}
                part["d"] = np.stack([got[i] for i in rows.tolist()])
            del part["src"]
            yield self._source_batch(s, part, rng)

    def _source_batch(self, source: int, part: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
        n = len(part["index"])
        x = part["x"]
        d = part["d"][:self.adv_rows(n)] if source != SELF else None
        aug = None
        if self.augment != "none":
            aug = augment_params(rng, n, self.augment, self.crop_padding)
            x = apply_augment(x, aug, self.crop_padding)
            if d is not None:
                d = apply_augment(d, aug[:len(d)], self.crop_padding)
        return {"index": torch.from_numpy(part["index"].astype(np.int64)),
                "x": torch.from_numpy(np.ascontiguousarray(x)),
                "y": torch.from_numpy(part["y"].astype(np.int64)),
                "source": int(source),
                "d": torch.from_numpy(np.ascontiguousarray(d)) if d is not None else None,
                "aug": torch.from_numpy(aug) if aug is not None else None}
