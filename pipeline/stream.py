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
wrapper over `open_store` measured 299 samples/s). So the stream follows `enspipe.sampling.epoch_plan`:
contiguous blocks in a shuffled block order, the same blocks from the dataset and from every
store, read a window of `buffer_blocks` blocks at a time, shuffled in memory and cut into
whole batches. Blocks are split between DDP ranks (`torch.distributed` when initialised, else
`rank`/`world_size`); windows are dealt round robin to DataLoader workers, so every sample is
read once per epoch by exactly one worker of one rank, and the batches (each numbered `seq`
in the rank's epoch) are the same whatever the number of workers. Random crops and flips
(`augment`) move an image and its K directions alike.

Batches mix classes because the blocks do: the sources' canonical order spreads the classes
(`enspipe.data.base.class_interleaved` for the class-grouped file layouts), so the stream needs
no per-sample reads to mix them.

`batch_size=N` makes the stream yield whole batches (use `DataLoader(stream, batch_size=None)`):
no per-sample collation, the fast path. The batches depend only on (seed, epoch, rank), so a
resumed run replays them.

`SourceBatches` is the trainer's form (§4.2): batches whose adversarial source is drawn from
{the model itself} + the K stores. The source is drawn per block before anything is read,
balanced over the epoch, so each block reads only its drawn store's directions (a batch uses
one store) and the share of batches of each source is 1/(K+1) up to a block's worth.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from enspipe.data import SampleSource
from enspipe.util.errors import ConfigError
from enspipe.sampling import PlannedBatch, Unit, epoch_plan, rank_blocks
from enspipe.stores import StoreReader

__all__ = ["AUGMENTS", "DirectionStream", "SELF", "SourceBatches", "apply_augment", "augment_params",
           "rank_and_world"]

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



# --- which samples this reader reads ---------------------------------------------------------

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


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _rows(blocks: Sequence[tuple[int, int]], index: np.ndarray) -> np.ndarray:
    """Rows of `index` in the concatenation of the contiguous `blocks` (each index in one)."""
    starts = np.array([s for s, _ in blocks], dtype=np.int64)
    offsets = np.cumsum([0] + [e - s for s, e in blocks])[:-1]
    by_start = np.argsort(starts)
    j = by_start[np.searchsorted(starts[by_start], index, side="right") - 1]
    return offsets[j] + index - starts[j]


class DirectionStream(torch.utils.data.IterableDataset):
    """Samples of `dataset` with the directions of every store in `stores` (see the module doc).

    Per sample: {"index": int, "x": uint8 [C,H,W], "y": int, "d": int8 [K,C,H,W]} (K = len(stores),
    store order); with `batch_size`, the same keys batched ([B], [B,C,H,W], [B], [B,K,C,H,W]) and
    "seq", the batch's number in the rank's epoch. Every store is checked against the dataset
    (fingerprint, geometry, N) when the stream is made; readers are opened in the process that
    iterates (file handles do not cross processes).
    A store may be given as a path or as an open reader (`open_store`'s handle): a reader's
    validated manifest is reused, in loader workers too, so each store is opened once per run.

    `sources` (with `batch_size`): draw each block's source from these ids, 0 for none (the
    model being trained, SELF) and k for store k-1, balanced over the epoch; a batch then holds
    one source's samples and reads that store only (a loop that uses one store per batch reads
    one store, not K). It yields "source" and "d" int8 [B,C,H,W] of the drawn store (None for 0)
    instead of every store's directions; this is `SourceBatches`, the trainer's form.
    """

    SAMPLE_UNIT = 64  # samples shuffled out at a time when yielding single samples

    def __init__(self, dataset: SampleSource, stores: Sequence[str | os.PathLike | StoreReader] = (), *,
                 batch_size: int | None = None, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 block_size: int = 256, buffer_blocks: int = 8, augment: str = "none", crop_padding: int = 2,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 check: bool = True, sources: Sequence[int] | None = None):
        if isinstance(stores, (str, os.PathLike, StoreReader)):
            raise ConfigError("stores must be a list of store paths, not one path")
        if sources is not None:
            sources = [int(k) for k in sources]
            if batch_size is None:
                raise ConfigError("sources needs batch_size: a drawn source is a batch's")
            if not sources or len(set(sources)) != len(sources) or not all(0 <= k <= len(stores) for k in sources):
                raise ConfigError(f"sources must be distinct ids in [0, {len(stores)}] (0: none, k: store k-1), "
                                  f"not {sources!r}")
        self.draw = sources
        if augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}, not {augment!r}")
        for name, value in (("block_size", block_size), ("buffer_blocks", buffer_blocks),
                            ("batch_size", 1 if batch_size is None else batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be at least 1, not {value!r}")
        self.dataset = dataset
        self._handles = [s if isinstance(s, StoreReader) else None for s in stores]
        self.stores = tuple(os.fspath(s.path if isinstance(s, StoreReader) else s) for s in stores)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.block_size, self.buffer_blocks = block_size, buffer_blocks
        self.augment, self.crop_padding = augment, crop_padding
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.drop_last = drop_last
        if check:
            self._handles = self._readers()  # opened here once; the iterating processes reuse them
            for reader in self._handles:
                reader.check_compatible(fingerprint=dataset.fingerprint, geometry=dataset.geometry.shape,
                                        num_samples=len(dataset),
                                        dataset=dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (its block order, shuffle and augmentation). Call it before
        each epoch, as with DistributedSampler; worker processes made after the call see it."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (all of its blocks)."""
        return sum(e - s for s, e in rank_blocks(len(self.dataset), self.block_size, seed=self.seed, epoch=self.epoch,
                                                  rank=self.rank, world_size=self.world_size, shuffle=self.shuffle))

    @property
    def plan_sources(self) -> list[int]:
        """The sources a block is drawn from (without `sources`: one, every block reads every store)."""
        return [0] if self.draw is None else self.draw

    def adv_rows(self, n: int) -> int:
        """How many leading rows of an n-sample batch need the drawn source's direction."""
        return n

    def plan(self) -> list[Unit]:
        """The rank's epoch as `enspipe.sampling.epoch_plan` units (the same in every worker)."""
        return epoch_plan(len(self.dataset), batch_size=self.batch_size or self.SAMPLE_UNIT,
                          block_size=self.block_size, buffer_blocks=self.buffer_blocks, seed=self.seed,
                          epoch=self.epoch, rank=self.rank, world_size=self.world_size, sources=self.plan_sources,
                          shuffle=self.shuffle, drop_last=self.drop_last and self.batch_size is not None)

    def _readers(self) -> list[Any]:
        from enspipe.stores import open_store

        return [open_store(p) if h is None else h.for_this_process() for p, h in zip(self.stores, self._handles)]

    def _batch_rng(self, seq: int) -> np.random.Generator:
        # Per batch, so augmentation and eps draws do not depend on which worker made the batch.
        return np.random.default_rng([self.seed, self.epoch, self.rank, seq, 0xA06])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nworkers = _worker()
        readers = self._readers()
        mine = [unit for u, unit in enumerate(self.plan()) if u % nworkers == wid]
        for k, r in enumerate(readers):
            # The blocks this worker reads from each store, in order: a store URL's shards are
            # downloaded ahead of the reads (a local store ignores the hint).
            r.prefetch([(s, e) for unit in mine for s, e, src in unit.reads if self.draw is None or src == k + 1])
        for unit in mine:
            yield from self._unit(unit, readers)

    def _unit(self, unit: Unit, readers: list[Any]) -> Iterator[dict[str, Any]]:
        # A window or the epoch's tail alike: its contiguous `reads`, each read once.
        if not unit.batches:  # a window whose every sample went to the tail
            return
        if self.draw is not None:
            yield from self._drawn_unit(unit, readers)
            return
        spans = [(s, e) for s, e, _ in unit.reads]
        window = self._window(unit, readers)
        for b in unit.batches:
            rows = _rows(spans, b.index)
            yield from self._emit(b, {k: v[rows] for k, v in window.items()})

    def _drawn_unit(self, unit: Unit, readers: list[Any]) -> Iterator[dict[str, Any]]:
        spans = [(s, e) for s, e, _ in unit.reads]
        x, index = self._images(unit.reads), np.concatenate([np.arange(s, e) for s, e in spans])
        # Directions of the store ranges only, each from its drawn store.
        read = [(s, e, src) for s, e, src in unit.reads if src != SELF]
        d = np.concatenate([self._read_block(readers[src - 1], s, e) for s, e, src in read]) if read else None
        for b in unit.batches:
            rows = _rows(spans, b.index)
            part = {"index": index[rows], "x": x[rows], "y": self.dataset.labels[b.index]}
            if b.source != SELF:
                part["d"] = d[_rows([(s, e) for s, e, _ in read], b.index[:self.adv_rows(len(b.index))])]
            yield self._source_batch(b.source, part, self._batch_rng(b.seq), seq=b.seq)

    def _read_block(self, reader: Any, start: int, stop: int) -> np.ndarray:
        """A store's directions of samples [start, stop) (a subclass may stand in for the read)."""
        return reader.read_directions(start, stop)

    def _source_batch(self, source: int, part: dict[str, np.ndarray], rng: np.random.Generator, *,
                      seq: int = 0) -> dict[str, Any]:
        n = len(part["index"])
        x = part["x"]
        d = part["d"][:self.adv_rows(n)] if source != SELF else None
        aug = None
        if self.augment != "none":
            aug = augment_params(rng, n, self.augment, self.crop_padding)
            x = self._augment_images(x, aug)
            if d is not None:
                d = apply_augment(d, aug[:len(d)], self.crop_padding)
        return {"index": torch.from_numpy(part["index"].astype(np.int64)),
                "x": self._image_tensor(x),
                "y": torch.from_numpy(part["y"].astype(np.int64)),
                "seq": int(seq),
                "source": int(source),
                "d": torch.from_numpy(np.ascontiguousarray(d)) if d is not None else None,
                "aug": torch.from_numpy(aug) if aug is not None else None}

    def _window(self, unit: Unit, readers: list[Any]) -> dict[str, np.ndarray]:
        index = np.concatenate([np.arange(s, e) for s, e, _ in unit.reads])
        C, H, W = self.dataset.geometry.shape
        d = np.empty((len(index), len(readers), C, H, W), np.int8)
        at = 0
        for s, e, _ in unit.reads:
            for k, r in enumerate(readers):
                d[at:at + e - s, k] = r.read_directions(s, e)
            at += e - s
        return {"index": index, "x": self._images(unit.reads), "y": self.dataset.labels[index], "d": d}

    def _images(self, blocks: Sequence[tuple[int, int, int]]) -> np.ndarray:
        return np.concatenate([self._pixels(slice(s, e)) for s, e, _ in blocks])

    # The clean images' three steps, which a stream that decodes on the device replaces
    # (enspipe.train.device_batches: encoded files here, decoded and augmented in the step).
    def _pixels(self, index: Any) -> np.ndarray:
        """uint8 [n, C, H, W]: the clean images of samples `index` (a slice or indices)."""
        return self.dataset.images_uint8(index)

    def _augment_images(self, x: np.ndarray, aug: np.ndarray) -> np.ndarray:
        return apply_augment(x, aug, self.crop_padding)

    def _image_tensor(self, x: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(x))

    def _emit(self, b: PlannedBatch, part: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        part = self._augmented(part, self._batch_rng(b.seq))
        if self.batch_size is not None:
            yield {**self._tensors(part), "seq": b.seq}
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

    Each block's source is drawn before it is read (`epoch_plan`: balanced over this rank's
    blocks of the epoch, every source gets floor or ceil of nblocks / nsources blocks, in random
    order), so a batch's source is uniform and the share of each source is 1/nsources up to a
    block. A block of a store reads that store's directions only; a SELF block reads none (the
    model's direction is made online). A batch is cut from its window's blocks of one source;
    the epoch's tail (what no window filled) is merged into batches whose source is drawn
    uniformly, their samples read as contiguous ranges (each sample once per epoch).

    Yields {"index", "x", "y", "seq", "source": int, "d": int8 [n_d, C,H,W] of the drawn store
    (None for SELF), "aug": the crop/flip params (or None)}; `n_d` is `adv_rows(n)` (the whole
    batch by default): only the rows a step perturbs are copied and augmented.
    """

    def __init__(self, dataset: SampleSource, stores: Sequence[str | os.PathLike | StoreReader] = (), *, batch_size: int,
                 include_self: bool = True, **kw: Any):
        if not include_self and not stores:
            raise ConfigError("SourceBatches needs a store when the model itself is not a source")
        self.include_self = include_self
        super().__init__(dataset, stores, batch_size=batch_size,
                         sources=([SELF] if include_self else []) + [k + 1 for k in range(len(stores))], **kw)

