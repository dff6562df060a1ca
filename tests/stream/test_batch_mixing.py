"""Issue 22: batches mix classes on class-grouped data (ImageNet's layout), in every form the
trainer and `DirectionStream` read it, and every sample is read once per epoch per rank.

The source is class-sorted in its files (1,000 classes x 64 samples, labels only: the pixels
do not matter to the order), and takes its canonical order the way the file-based sources do
(`class_interleaved`). The oracle is the finite-population expectation of distinct classes in
a batch drawn uniformly without replacement, computed here in closed form:

    E[distinct] = K * (1 - C(N - m, B) / C(N, B)),   N = K*m samples, m per class,

and every configuration of the issue's list must reach 0.95 of it (mean over the epoch's full
batches). The same statistic on the class-sorted file order is checked to fail, so the test
can tell a mixed order from an unmixed one.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from enspipe.data import SampleSource
from enspipe.data.base import Geometry, class_interleaved
from enspipe.stream import DirectionStream
from enspipe.train import BatchStream, TrainConfig, batch_loader
from enspipe.train.kit import epoch_batches
from cli_runner import run_cli

K, M = 1000, 64  # classes, samples per class


class ClassSorted(SampleSource):
    """Labels only, 1x1x1 black images; files class by class, canonical order as `order` gives."""

    def __init__(self, classes: int = K, per_class: int = M, *, interleave: bool = True):
        by_class = np.repeat(np.arange(classes, dtype=np.int64), per_class)
        order = class_interleaved(by_class) if interleave else np.arange(len(by_class))
        self.name, self.split, self.limit = "synthetic-class-sorted", "train", None
        self.geometry = Geometry(1, 1, 1, "none")
        self.classes = tuple(str(c) for c in range(classes))
        self.labels = by_class[order]
        self.keys = [f"s{i}" for i in order.tolist()]
        self.fingerprint = f"synthetic-{interleave}"

    def images_uint8(self, indices) -> np.ndarray:
        n = len(range(len(self))[indices]) if isinstance(indices, slice) else len(np.asarray(indices).reshape(-1))
        return np.zeros((n, 1, 1, 1), np.uint8)


class LabelsOnlyBatches(BatchStream):
    """The trainer's BatchStream with its store reads stood in by zeros (a labels-only source has
    no stores); the order, the source draw and the batching are the trainer's own."""

    class _NoStore:
        def prefetch(self, blocks) -> None:  # the stream's read-ahead hint: nothing to fetch
            pass

    def _readers(self):
        return [self._NoStore() for _ in self.stores]

    def _read_block(self, reader, start, stop):
        return np.zeros((stop - start, 1, 1, 1), np.int8)


def iid_distinct(classes: int, per_class: int, batch: int) -> float:
    """E[distinct classes] in `batch` draws without replacement from classes x per_class samples."""
    n = classes * per_class
    missed = math.prod(max(0, n - per_class - i) / (n - i) for i in range(batch))  # P(a class is missed)
    return classes * (1 - missed)


def mean_distinct(batches, labels: np.ndarray, batch_size: int) -> float:
    counts = [len(np.unique(labels[b["index"].numpy()])) for b in batches if len(b["index"]) == batch_size]
    assert counts, "no full batch"
    return float(np.mean(counts))


def trainer_batches(ds, mode: str, stores: int, batch_size: int, workers: int, **kw):
    """One epoch of the trainer's batches, through the trainer's loader and epoch machinery."""
    paths = tuple(f"/nonexistent/store{k}" for k in range(stores))
    cfg = TrainConfig(model="D", dataset="digits", mode=mode, shards=paths, attack="fgsm", batch_size=batch_size,
                      loader_workers=workers, device="cpu", seed=3, **kw)
    (_, batches), = epoch_batches(lambda e: LabelsOnlyBatches(ds, paths, cfg, epoch=e),
                                  lambda st: batch_loader(st, cfg, torch.device("cpu")), range(0, 1), workers)
    return list(batches)


@pytest.fixture(scope="module")
def ds():
    return ClassSorted()


def test_the_oracle_matches_the_with_replacement_limit():
    # Many samples per class: without replacement tends to K(1 - (1 - 1/K)^B).
    assert iid_distinct(1000, 10**6, 32) == pytest.approx(1000 * (1 - (1 - 1 / 1000) ** 32), rel=1e-5)
    assert iid_distinct(10, 1, 10) == pytest.approx(10)  # the whole population: every class


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [32, 256])
@pytest.mark.parametrize("mode,stores", [("clean", 0), ("adv", 0), ("ens-adv", 1), ("ens-adv", 2), ("ens-adv", 4)])
def test_the_trainers_batches_mix_classes_as_iid_draws(ds, mode, stores, batch_size, workers):
    batches = trainer_batches(ds, mode, stores, batch_size, workers)
    want = iid_distinct(K, M, batch_size)
    got = mean_distinct(batches, ds.labels, batch_size)
    assert got >= 0.95 * want, f"{got:.1f} distinct classes per batch, i.i.d. gives {want:.1f}"
    if stores:  # every source is drawn, so the mixing holds with the draw
        assert {b["source"] for b in batches} == set(range(stores + 1))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [32, 256])
def test_direction_streams_batches_mix_classes_as_iid_draws(ds, batch_size, workers):
    stream = DirectionStream(ds, (), batch_size=batch_size, seed=1)
    batches = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
    want = iid_distinct(K, M, batch_size)
    got = mean_distinct(batches, ds.labels, batch_size)
    assert got >= 0.95 * want, f"{got:.1f} distinct classes per batch, i.i.d. gives {want:.1f}"


def test_the_statistic_tells_a_class_sorted_order_apart():
    """The planted bug: the same reader over the class-sorted file order (no interleave) falls far
    short (a block of 256 samples is 4 classes), so the tests above can fail."""
    sorted_ds = ClassSorted(interleave=False)
    got = mean_distinct(trainer_batches(sorted_ds, "ens-adv", 2, 32, 0), sorted_ds.labels, 32)
    assert got < 0.5 * iid_distinct(K, M, 32)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_reads_every_sample_once_per_rank_and_no_batch_twice(workers, world):
    """Batch 100 with blocks of 64 leaves remainders in every window (the epoch's tail merges
    them); 4,000 samples over 2 ranks; 0 and 2 loader workers."""
    small = ClassSorted(classes=40, per_class=100)
    per_rank = []
    for rank in range(world):
        paths = ("/nonexistent/a", "/nonexistent/b")
        cfg = TrainConfig(model="D", dataset="digits", mode="ens-adv", shards=paths, attack="fgsm", batch_size=100,
                          block_size=64, buffer_blocks=3, loader_workers=workers, device="cpu", seed=7)
        (_, batches), = epoch_batches(
            lambda e: LabelsOnlyBatches(small, paths, cfg, epoch=e, rank=rank, world_size=world),
            lambda st: batch_loader(st, cfg, torch.device("cpu")), range(0, 1), workers)
        seen = []
        for b in batches:
            idx = b["index"].tolist()
            assert len(idx) == len(set(idx)), "a sample twice in one batch"
            assert 0 < len(idx) <= 100
            seen += idx
        assert len(seen) == len(set(seen)), "a sample twice in one epoch"
        assert sum(len(b["index"]) < 100 for b in batches) <= 1  # only the epoch's last batch is partial
        per_rank.append(set(seen))
    assert set().union(*per_rank) == set(range(len(small)))
    assert sum(len(s) for s in per_rank) == len(small)  # ranks disjoint


def test_class_interleaved_spreads_unequal_classes_evenly():
    """Oracle: in every prefix of length p, class c's count is within 1 + K*share_c/2 of share_c*p
    (each class is at n_c*t +- 1/2 samples at a key t, so p is at N*t +- K/2), a bound that does
    not grow with N: a class-sorted order misses it by up to N*share_c*(1 - share_c)."""
    labels = np.repeat(np.arange(5), [1, 7, 30, 30, 100])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]  # file order need not be grouped
    order = class_interleaved(labels)
    assert sorted(order.tolist()) == list(range(len(labels)))
    out = labels[order]
    share = np.bincount(labels) / len(labels)
    for p in range(1, len(out) + 1):
        assert np.all(np.abs(np.bincount(out[:p], minlength=5) - share * p) <= 1 + 5 * share / 2 + 1e-9), p
    # within a class, the file order is kept
    for c in range(5):
        assert np.all(np.diff(order[out == c]) > 0)


# --- an ImageFolder store written under the old class-sorted order -------------------------------

def _legacy_imagefolder(tmp_path):
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from legacy_imagefolder import IMAGE_SIZE, stamp

    root = tmp_path / "legacy"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "legacy_imagefolder", root)
    stamp(root / "data")
    (store,) = root.glob("stores/*/*/*.zarr")
    return root / "data", store, IMAGE_SIZE


def test_an_imagefolder_store_of_the_old_order_is_refused_in_one_line(tmp_path):
    """tests/fixtures/legacy_imagefolder: a store written by the package before issue 22 (its
    fingerprint is the old code's own, the oracle). It is refused, never read in the new order,
    by DirectionStream and by `enspipe train`, in one line that says to recompute it."""
    from enspipe.data import create_dataset
    from enspipe.util.errors import StoreError
    from enspipe.stores import open_store

    data, store, size = _legacy_imagefolder(tmp_path)
    ds = create_dataset(f"imagefolder:{data}", image_size=size)
    old_fp = open_store(store).identity.dataset["fingerprint"]
    assert ds.fingerprint != old_fp and old_fp in ds.superseded  # the same files, the old order
    assert ds.identity()["order"] == "class-interleaved"
    with pytest.raises(StoreError, match="class-sorted file order.*recompute it with `enspipe precompute`"):
        DirectionStream(ds, [store])
    r = run_cli("train", "--model", "D", "--dataset", f"imagefolder:{data}", "--image-size", str(size), "--mode",
                "ens-adv", "--shards", str(store), "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"),
                timeout=900)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "recompute it with `enspipe precompute`" in lines[0], r.stderr
