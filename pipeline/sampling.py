"""The reader's sample order: which samples each rank reads, and which batches they form.

Two layers, both numpy only (the stores do not know their reader's order):

- `block_order`: the rank's contiguous (start, stop) blocks in a shuffled order. Contiguous
  because stores read fast in blocks and slowly per sample (NOTES: ~26k samples/s with
  256-sample blocks, ~600/s with single samples).
- `epoch_plan`: the rank's whole epoch as *units* of work. A unit is a window of
  `buffer_blocks` consecutive blocks of that order (read whole, each block carrying its drawn
  source), shuffled in memory and cut into whole batches; what a window cannot fill into a
  whole batch of its source goes to the epoch's tail, merged and cut into batches at the end.
  What a window leaves to the tail is the last samples of its blocks of that source (in block
  order), so the window reads its blocks less those samples and a tail unit reads them, as
  contiguous ranges: every sample is read once per epoch, never again by index.
  The plan depends on (seed, epoch, rank, world, sizes) and never on how many loader workers
  execute it: workers take units round robin, and every batch carries its number `seq` in the
  rank's epoch, so any worker count yields the same batches (issue 25 item 3), and the trainer
  puts them back in `seq` order.

Class mixing is not this module's job: a block is as mixed as the canonical order it is cut
from, and the file-based sources hold class-interleaved orders (`enspipe.data.base.class_interleaved`),
so every block of 256 samples spreads over the classes as the whole data set does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# StoreError, as when this sampler lived in enspipe.stores (moved by issue 11 unchanged);
# ConfigError would name the cause better and is left for a change that may alter behaviour.
from enspipe.util.errors import StoreError

__all__ = ["PlannedBatch", "Unit", "block_order", "epoch_plan", "rank_blocks"]


def block_order(
    num_samples: int,
    block_size: int,
    *,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> list[tuple[int, int]]:
    """This rank's contiguous (start, stop) blocks, in a shuffled order.

    Blocks are `[b*block_size, min(N, (b+1)*block_size))`, so a block_size that is a
    multiple or divisor of the store's `chunk_samples` keeps reads chunk-aligned. The
    permutation depends only on (seed, epoch); after shuffling, block b goes to rank
    `b % world_size`, so ranks are disjoint and together cover every sample. Ranks can
    differ by one block; `drop_last=True` trims every rank to the same count (DDP needs
    equal step counts). The trainer calls this once and reads the clean data and every
    store with the same blocks: they are joined by sample index.
    """
    if num_samples < 0 or block_size < 1:
        raise StoreError(f"block_order needs num_samples >= 0 and block_size >= 1, got {num_samples}, {block_size}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise StoreError(f"block_order needs 0 <= rank < world_size, got rank {rank} of {world_size}.")
    if seed < 0 or epoch < 0:
        raise StoreError(f"block_order needs seed >= 0 and epoch >= 0, got {seed}, {epoch}.")
    nblocks = -(-num_samples // block_size)
    # SeedSequence over (seed, epoch): independent, reproducible streams per epoch.
    perm = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(nblocks)
    mine = perm[rank::world_size]
    if drop_last:
        mine = mine[: nblocks // world_size]
    return [(int(b) * block_size, min(num_samples, (int(b) + 1) * block_size)) for b in mine]


def rank_blocks(num_samples: int, block_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                shuffle: bool = True) -> list[tuple[int, int]]:
    """The rank's blocks of an epoch: `block_order`'s, or in file order without shuffle."""
    if shuffle:
        return block_order(num_samples, block_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    nblocks = -(-num_samples // block_size)
    return [(b * block_size, min(num_samples, (b + 1) * block_size)) for b in range(rank, nblocks, world_size)]


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of the plan: its number in the rank's epoch, its source, its samples in order."""

    seq: int
    source: int
    index: np.ndarray  # int64 sample indices


@dataclass(frozen=True)
class Unit:
    """What one loader worker does in one go: read the contiguous ranges `reads` (start, stop,
    source) whole, each once, then serve `batches` from them. `blocks` are the window's blocks
    as drawn (() for a tail unit); `reads` are those blocks less the samples the window leaves
    to the tail, and for a tail unit the ranges of its batch's samples, with the batch's source."""

    blocks: tuple[tuple[int, int, int], ...]
    batches: tuple[PlannedBatch, ...]
    reads: tuple[tuple[int, int, int], ...]


def epoch_plan(num_samples: int, *, batch_size: int, block_size: int, buffer_blocks: int, seed: int, epoch: int,
               rank: int = 0, world_size: int = 1, sources: Sequence[int] = (0,), shuffle: bool = True,
               drop_last: bool = False) -> list[Unit]:
    """The rank's epoch as units (see the module doc), batches numbered 0, 1, ... in unit order.

    Sources are drawn per block, balanced over the rank's blocks (each source gets floor or ceil
    of nblocks / nsources), so a block reads one store only; a batch holds samples of one source,
    from the blocks of its window that drew it. Every sample of the rank is in exactly one batch;
    only the last batch of the epoch may be partial (`drop_last` drops it).
    """
    if batch_size < 1 or buffer_blocks < 1:
        raise StoreError(f"epoch_plan needs batch_size >= 1 and buffer_blocks >= 1, got {batch_size}, {buffer_blocks}.")
    blocks = rank_blocks(num_samples, block_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                         shuffle=shuffle)
    sources = [int(s) for s in sources]
    if len(sources) > 1:
        rng = np.random.default_rng([seed, epoch, rank, 0x50C])
        drawn = rng.permutation(np.resize(rng.permutation(sources), len(blocks)))
    else:
        drawn = np.full(len(blocks), sources[0])
    units: list[Unit] = []
    tail: list[tuple[int, int]] = []  # (start, stop) ranges no window filled into a whole batch
    seq = 0
    for w, at in enumerate(range(0, len(blocks), buffer_blocks)):
        window = [(s, e, int(src)) for (s, e), src in zip(blocks[at:at + buffer_blocks], drawn[at:at + buffer_blocks])]
        rng = np.random.default_rng([seed, epoch, rank, w, 0x817])
        cut: list[tuple[int, np.ndarray]] = []
        kept = {s: e for s, e, _ in window}  # each block's start -> where the window's read stops
        for src in sources:
            mine = [(s, e) for s, e, t in window if t == src]
            if not mine:
                continue
            left = sum(e - s for s, e in mine) % batch_size
            # The tail takes the source's last `left` samples in block order: contiguous ranges
            # that the window then does not read (a sample is read once, by one unit).
            for s, e in reversed(mine):
                take = min(left, e - s)
                if take:
                    tail.append((e - take, e))
                    kept[s], left = e - take, left - take
            pool = np.concatenate([np.arange(s, kept[s], dtype=np.int64) for s, _ in mine])
            if shuffle:
                pool = rng.permutation(pool)
            cut += [(src, pool[i:i + batch_size]) for i in range(0, len(pool), batch_size)]
        if shuffle:  # the sources' batches interleave
            cut = [cut[i] for i in rng.permutation(len(cut))]
        reads = tuple((s, kept[s], t) for s, _, t in window if kept[s] > s)
        units.append(Unit(tuple(window), tuple(PlannedBatch(seq + k, s, ix) for k, (s, ix) in enumerate(cut)), reads))
        seq += len(cut)
    if tail:  # what no window filled: merged over the epoch, each batch's source drawn uniformly
        # In window order: a tail batch reads a few contiguous ranges of neighbouring windows
        # (each sample's only read), shuffled in memory.
        rest = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in tail])
        rng = np.random.default_rng([seed, epoch, rank, 0x7A1])
        stop = len(rest) - len(rest) % batch_size if drop_last else len(rest)
        for i in range(0, stop, batch_size):
            src = sources[int(rng.integers(len(sources)))] if shuffle else sources[0]
            index = rest[i:i + batch_size]
            units.append(Unit((), (PlannedBatch(seq, src, rng.permutation(index) if shuffle else index),),
                              tuple((int(s), int(e), src) for s, e in _runs(index))))
            seq += 1
    return units


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """The contiguous (start, stop) runs of `index` (ascending within each run), in its order."""
    cuts = np.flatnonzero(np.diff(index) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(index, cuts)]
