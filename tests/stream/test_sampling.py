"""The trainer's sampler (enspipe.sampling): contiguous blocks, shuffled, split over ranks."""
from __future__ import annotations

import numpy as np
import pytest

from enspipe.util.errors import StoreError
from enspipe.sampling import block_order, epoch_plan


def test_block_order():
    n, bs = 1000, 64
    a = block_order(n, bs, seed=3, epoch=0)
    assert a == block_order(n, bs, seed=3, epoch=0)
    assert a != block_order(n, bs, seed=3, epoch=1) and a != block_order(n, bs, seed=4, epoch=0)
    assert sorted(a) == [(s, min(n, s + bs)) for s in range(0, n, bs)]
    ranks = [block_order(n, bs, seed=3, epoch=2, rank=k, world_size=3) for k in range(3)]
    covered = np.concatenate([np.arange(s, e) for r in ranks for s, e in r])
    assert len(covered) == n and set(covered.tolist()) == set(range(n))  # disjoint, complete
    assert all(s % bs == 0 for r in ranks for s, _ in r)
    trimmed = [block_order(n, bs, seed=3, epoch=2, rank=k, world_size=3, drop_last=True) for k in range(3)]
    assert len({len(t) for t in trimmed}) == 1
    with pytest.raises(StoreError):
        block_order(n, bs, seed=0, rank=3, world_size=3)


@pytest.mark.parametrize("batch,block,window,nsrc", [(32, 64, 3, 1), (100, 64, 3, 3), (50, 16, 8, 5), (512, 64, 2, 2)])
def test_epoch_plan_covers_the_rank_once_in_whole_batches(batch, block, window, nsrc):
    n = 2_000
    units = epoch_plan(n, batch_size=batch, block_size=block, buffer_blocks=window, seed=1, epoch=2,
                       sources=range(nsrc))
    batches = [b for u in units for b in u.batches]
    assert [b.seq for b in batches] == list(range(len(batches)))
    idx = np.concatenate([b.index for b in batches])
    assert sorted(idx.tolist()) == list(range(n))                  # every sample once
    assert [len(b.index) for b in batches[:-1]] == [batch] * (len(batches) - 1)  # whole but the last
    assert len(batches) == -(-n // batch)
    for u in units:  # a window's batch holds samples of its blocks that drew the batch's source
        for b in u.batches:
            if u.blocks:
                mine = {i for s, e, src in u.blocks if src == b.source for i in range(s, e)}
                assert set(b.index.tolist()) <= mine
    drawn = np.bincount([src for u in units for _, _, src in u.blocks], minlength=nsrc)
    assert drawn.max() - drawn.min() <= 1                          # balanced over the epoch
    assert [len(u.blocks) for u in units if u.blocks][:-1] == [window] * (len([u for u in units if u.blocks]) - 1)
    again = epoch_plan(n, batch_size=batch, block_size=block, buffer_blocks=window, seed=1, epoch=2,
                       sources=range(nsrc))
    assert all(np.array_equal(a.index, b.index) and a.source == b.source
               for a, b in zip(batches, [b for u in again for b in u.batches]))
    dropped = epoch_plan(n, batch_size=batch, block_size=block, buffer_blocks=window, seed=1, epoch=2,
                         sources=range(nsrc), drop_last=True)
    assert sum(len(b.index) for u in dropped for b in u.batches) == n - n % batch
