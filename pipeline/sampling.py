"""The trainer's sampler: which contiguous sample blocks each rank reads, in which order.

The trainer reads the clean data and every perturbation store with the same blocks (they
are joined by sample index), so one block order serves all of them. Contiguous blocks
because stores read fast in blocks and slowly per sample (NOTES: ~26k samples/s with
256-sample blocks, ~600/s with single samples); shuffle the blocks, then within a batch.
Depends on numpy only: the stores do not know their reader's order.
"""
from __future__ import annotations

import numpy as np

# StoreError, as when this sampler lived in enspipe.stores (moved by issue 11 unchanged);
# ConfigError would name the cause better and is left for a change that may alter behaviour.
from enspipe.errors import StoreError

__all__ = ["block_order"]


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
