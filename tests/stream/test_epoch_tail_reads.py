"""The epoch's tail (what no window fills into a whole batch, when the batch size does not divide
a window's share of a source) is read as contiguous ranges, each sample once per epoch: never
again by index after its window read its block. Counted on real zarr stores by recording every
range the readers are asked for; the oracle is the sample count itself (each of the N samples
once per store it is read from) and, for the chunks, one read per chunk plus at most one split
per (window, source) where a window leaves its last samples to the tail."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

LIMIT = 700  # digits samples: 11 blocks of 64 (the last one short)
BLOCK, WINDOW, BATCH = 64, 3, 50  # 192 samples a window: 50 does not divide it


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    import torch

    from enspipe.models import create_model, save_model
    from enspipe.precompute import PrecomputeConfig, precompute

    root = tmp_path_factory.mktemp("tail-stores")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        run = root / f"run{seed}"
        save_model(create_model("D", num_classes=10, input_size=(1, 28, 28)).eval(), run)
        (path,) = precompute(PrecomputeConfig(model=str(run), dataset="digits", limit=LIMIT, attacks=("fgsm",),
                                              out=str(root / "stores"), shard_size=128, device="cpu"))
        out.append(path)
    return tuple(out)


@pytest.fixture
def reads(monkeypatch):
    """Every (store, start, stop) the stores are asked for, through any read method."""
    from enspipe.stores import StoreReader

    asked: list[tuple[str, int, int]] = []
    for name in ("read", "read_directions"):
        original = getattr(StoreReader, name)

        def recording(self, start, stop, _original=original):
            asked.append((str(self.path), int(start), int(stop)))
            return _original(self, start, stop)

        monkeypatch.setattr(StoreReader, name, recording)
    return asked


def _per_sample(asked, store) -> Counter:
    return Counter(i for path, s, e in asked if path == str(store) for i in range(s, e))


def test_every_store_reads_each_sample_once_per_epoch(stores, reads):
    from enspipe.data import create_dataset
    from enspipe.stores import open_store
    from enspipe.stream import DirectionStream

    ds = create_dataset("digits", limit=LIMIT)
    want = np.stack([open_store(p).read(0, LIMIT)["direction"] for p in stores], axis=1)
    reads.clear()
    stream = DirectionStream(ds, stores, batch_size=BATCH, block_size=BLOCK, buffer_blocks=WINDOW, seed=3)
    seen = []
    for b in stream:
        idx = b["index"].numpy()
        np.testing.assert_array_equal(b["d"].numpy(), want[idx])  # still each sample's own directions
        seen += idx.tolist()
    assert sorted(seen) == list(range(LIMIT)) and len(stream.plan()[-1].batches[0].index) == BATCH
    for store in stores:
        assert _per_sample(reads, store) == Counter(range(LIMIT))  # each sample once, none twice
    # Reads are ranges, not samples: each block in at most two parts (the window's, the tail's),
    # and a tail batch's boundary may cut one more.
    nblocks, tail_batches = -(-LIMIT // BLOCK), sum(1 for u in stream.plan() if not u.blocks)
    assert tail_batches and len(reads) <= len(stores) * (2 * nblocks + tail_batches)


def test_drawn_sources_read_each_sample_once_from_its_store(stores, reads):
    from enspipe.data import create_dataset
    from enspipe.stream import SourceBatches

    ds = create_dataset("digits", limit=LIMIT)
    reads.clear()
    stream = SourceBatches(ds, stores, batch_size=BATCH, block_size=BLOCK, buffer_blocks=WINDOW, seed=5)
    from_store: Counter = Counter()
    for b in stream:
        if b["source"]:
            from_store.update(b["index"].numpy().tolist())
    got = _per_sample(reads, stores[0]) + _per_sample(reads, stores[1])
    assert got == from_store and max(got.values()) == 1  # read once, from the store its batch drew


@pytest.mark.parametrize("batch,block,window,nsrc,drop_last", [
    (50, 64, 3, 1, False), (100, 64, 3, 3, False), (50, 16, 8, 5, True), (512, 64, 2, 2, False), (7, 10, 1, 2, True)])
def test_the_plan_reads_every_served_sample_in_exactly_one_range(batch, block, window, nsrc, drop_last):
    """Pure plan (no store): the units' `reads` cover exactly the samples their batches serve,
    each once over the epoch, and a unit's batch reads its samples from the source it drew."""
    from enspipe.sampling import epoch_plan

    n = 1_000
    units = epoch_plan(n, batch_size=batch, block_size=block, buffer_blocks=window, seed=1, epoch=2,
                       sources=range(nsrc), drop_last=drop_last)
    read = Counter(i for u in units for s, e, _ in u.reads for i in range(s, e))
    served = Counter(int(i) for u in units for b in u.batches for i in b.index)
    assert read == served and max(read.values()) == 1
    assert sum(served.values()) == (n - n % batch if drop_last else n)
    for u in units:
        source_of = {i: src for s, e, src in u.reads for i in range(s, e)}
        assert all(source_of[int(i)] == b.source for b in u.batches for i in b.index)
