"""Issue 17's trainer paths, checked on the CPU: autocast precisions, resume, the drawn-store-only
reader, the online share, workers alive across epochs, no per-step host synchronisation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from enspipe.data import create_dataset
from enspipe.stores import StoreReader, open_store
from enspipe.train import SELF, BatchStream, TrainConfig, batch_stream, train
from enspipe.train.kit import epoch_batches
from run_files import metrics as _metrics
from run_files import same_weights
from run_files import steady as _steady

BASE = dict(model="D", dataset="digits", device="cpu", seed=4)


def _same_weights(a: Path, b: Path) -> None:
    assert same_weights(a, b)


def _killed_after(run: Path, epochs_done: int, to: Path) -> Path:
    """A copy of a finished run as if killed right after epoch `epochs_done`'s checkpoint, with
    the records (and a torn line) the killed epoch had already logged."""
    shutil.copytree(run, to)
    for ck in sorted((to / "checkpoints").glob("epoch-*.pt"))[epochs_done:]:
        ck.unlink()
    with open(to / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "epoch": 9, "st')
    return to


def _store(static: Path, root: Path, limit: int) -> Path:
    from enspipe.precompute import PrecomputeConfig, precompute

    (path,) = precompute(PrecomputeConfig(model=str(static), dataset="digits", limit=limit, attacks=("fgsm",),
                                          out=str(root), shard_size=256, device="cpu"))
    return path


@pytest.fixture(scope="module")
def two_stores(digits_static, digits_static2, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("gpu-path-stores")
    return str(_store(digits_static, root, 1500)), str(_store(digits_static2, root, 1500))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_training_runs_and_resumes_exactly(tmp_path, precision):
    """The online pass and the forward under autocast (fp16 with a grad scaler) train, record
    the precision, and a killed run resumes to the uninterrupted run's weights and metrics."""
    cfg = TrainConfig(**BASE, limit=320, mode="adv", epochs=3, batch_size=32, log_every=4, precision=precision,
                      keep_checkpoints=3)  # every epoch's: _killed_after removes the later ones
    train(cfg, tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["train"]["precision"] == precision
    state = torch.load(tmp_path / "full" / "checkpoints" / "epoch-0002.pt", weights_only=True)
    assert ("scaler" in state) == (precision == "fp16")
    run = _killed_after(tmp_path / "full", 1, tmp_path / "killed")
    train(cfg, run, resume=True)
    _same_weights(tmp_path / "full", run)
    full, resumed = _metrics(tmp_path / "full"), _metrics(run)
    assert _steady(resumed) == _steady(full)  # cut back to the checkpoint's step, then the same
    steps = [r["step"] for r in resumed]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_the_drawn_store_only_reader_yields_the_stores_directions(two_stores, monkeypatch):
    """Each batch's adversarial rows carry exactly what the drawn store holds for those
    samples (what the reader of every store gave before), and each sample's directions are
    read from one store at most: about N*K/(K+1) direction reads an epoch instead of N*K."""
    reads: dict[str, int] = {}
    original = StoreReader.read_directions

    def counting(self, start, stop):
        reads[str(self.path)] = reads.get(str(self.path), 0) + (stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(StoreReader, "read_directions", counting)
    ds = create_dataset("digits")
    readers = [open_store(p) for p in two_stores]
    want = [r.read(0, len(ds))["direction"] for r in readers]
    cfg = TrainConfig(**BASE, mode="ens-adv", shards=two_stores, attack="fgsm", batch_size=24, block_size=64,
                      buffer_blocks=4, adv_fraction=0.75)
    sources = set()
    for epoch in range(3):
        reads.clear()
        seen = []
        for batch in BatchStream(ds, cfg.shards, cfg, epoch=epoch):
            idx, n_adv, src = batch["index"].numpy(), batch["n_adv"], batch["source"]
            assert type(src) is int and n_adv == round(0.75 * len(idx))
            sources.add(src)
            seen += idx.tolist()
            if src == SELF:
                assert batch["d"] is None
            else:
                np.testing.assert_array_equal(batch["d"].numpy(), want[src - 1][idx[:n_adv]])
        assert sorted(seen) == list(range(len(ds)))
        assert sum(reads.values()) <= len(ds) and sum(reads.values()) > 0.5 * len(ds)
    assert sources == {0, 1, 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_share_of_online_passes_stays_near_one_over_n(two_stores, seed):
    """Blocks draw their source balanced over the epoch: each source gets 1/n of the blocks up
    to one, so the share of online batches is 1/n within a block's worth of batches."""
    ds = create_dataset("digits")
    cfg = TrainConfig(**{**BASE, "seed": seed}, mode="ens-adv", shards=two_stores, attack="fgsm", batch_size=16,
                      block_size=32)
    for epoch in range(2):
        counts = np.zeros(3)
        samples = np.zeros(3)
        for batch in BatchStream(ds, cfg.shards, cfg, epoch=epoch):
            counts[batch["source"]] += 1
            samples[batch["source"]] += len(batch["index"])
        assert abs(counts[SELF] / counts.sum() - 1 / 3) < 0.04, counts
        assert np.all(np.abs(samples - len(ds) / 3) <= 32 + 16 * 3), samples  # a block, plus the merged leftovers


class _Uneven(torch.utils.data.IterableDataset):
    """Worker w yields w + 2 + epoch batches: workers end their epochs at different times."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info else 0
        for i in range(w + 2 + self.epoch):
            yield {"epoch": self.epoch, "worker": w, "i": i}


def test_workers_alive_across_epochs_give_each_epoch_a_fresh_loaders_order():
    def loader(stream):
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)

    fresh = {e: [(b["worker"], b["i"]) for b in loader(_Uneven(e))] for e in range(1, 4)}
    got = {e: [(b["worker"], b["i"]) for b in batches]
           for e, batches in epoch_batches(_Uneven, loader, range(1, 4), workers=2)}
    assert got == fresh
    capped = {e: len(list(b)) for e, b in epoch_batches(_Uneven, loader, range(1, 4), workers=2, limit=4)}
    assert capped == {1: 4, 2: 4, 3: 4}


def test_persistent_workers_replay_the_data_order_of_a_resumed_run(tmp_path):
    cfg = TrainConfig(**BASE, limit=600, epochs=3, batch_size=32, block_size=64, workers=2, record_indices=True,
                      log_every=5, keep_checkpoints=3)  # every epoch's: _killed_after removes the later ones
    train(cfg, tmp_path / "full")
    run = _killed_after(tmp_path / "full", 1, tmp_path / "killed")
    for f in (run / "indices").glob("*epoch0001.npy"):
        f.unlink()
    train(cfg, run, resume=True)
    ds = create_dataset("digits", limit=600)
    for epoch in range(3):
        name = f"rank0-epoch{epoch:04d}.npy"
        order = np.load(tmp_path / "full" / "indices" / name)
        np.testing.assert_array_equal(np.load(run / "indices" / name), order)
        # ... and it is the order of the batches' numbers (`seq`) a fresh loader of that epoch's stream gives.
        loader = torch.utils.data.DataLoader(batch_stream(ds, cfg, epoch), batch_size=None, num_workers=2)
        np.testing.assert_array_equal(torch.cat([b["index"] for b in sorted(loader, key=lambda b: b["seq"])]).numpy(),
                                      order)
    _same_weights(tmp_path / "full", run)


def test_the_step_does_not_read_the_device_each_batch(tmp_path, monkeypatch):
    """Loss, accuracy and the non-finite check are read once per metrics line, not per step
    (reads by enspipe's own code are counted; torch's optimizers keep their step counts on
    the host)."""
    import sys

    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _original=original, **kw):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("enspipe"):
                reads["n"] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    cfg = TrainConfig(**BASE, limit=640, epochs=2, batch_size=16, log_every=20)
    res = train(cfg, tmp_path / "run")
    monkeypatch.undo()
    steps = res.final["batches"]
    assert steps == 80 and reads["n"] <= steps // cfg.log_every + 2 * cfg.epochs + 10, reads
