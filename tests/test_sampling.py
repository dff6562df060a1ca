"""The trainer's sampler (enspipe.sampling): contiguous blocks, shuffled, split over ranks."""
from __future__ import annotations

import numpy as np
import pytest

from enspipe.errors import StoreError
from enspipe.sampling import block_order


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
