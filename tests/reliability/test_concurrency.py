"""Promise 4, concurrent users of one ROOT: identical precomputes racing into one ROOT end
with one correct store per format; readers of a store being written see it incomplete; many
DataLoader workers and two trainers reading one store get exactly the stored data."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from enspipe.stores.manifest import read_manifest

from .processes import error_line, outputs, spawn
from .reference import LIMIT, assert_same_store, precompute_args, store_dirs, train_args
from .sweep import TALLY, full_sweep


def _signal_all(procs, sig) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, sig)


def test_two_precomputes_at_once_make_one_store_and_readers_see_it_incomplete(digits_static, ref, tmp_path):
    """Promise 4: two `enspipe precompute` jobs started at the same moment with the same inputs
    and ROOT end with one complete, correct store (per format) and both print its path; a
    `verify` and a trainer started while it is still being written see it as incomplete and
    say so."""
    root = tmp_path / "root"
    jobs = [spawn(*precompute_args(digits_static, root), log=tmp_path / f"job{i}.log") for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not list(root.glob("*/*/*.zarr/shards/*.json")):
            assert all(p.poll() is None for p in jobs), [outputs(p)[1] for p in jobs]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        _signal_all(jobs, signal.SIGSTOP)  # freeze both writers mid-store
        zstore = next(root.glob("*/*/*.zarr"))
        assert not read_manifest(zstore)["complete"], "the store completed before readers could be started"
        readers = [spawn("verify", zstore, log=tmp_path / "verify.log"),
                   spawn("train", "--model", "D", "--dataset", "digits", "--limit", LIMIT, "--epochs", 1,
                         "--mode", "ens-adv", "--attack", "step_ll", "--shards", zstore, "--device", "cpu",
                         "--out", tmp_path / "run", log=tmp_path / "train.log")]
        for r in readers:
            r.wait(timeout=300)
        v_out, v_err = outputs(readers[0])
        assert readers[0].returncode == 1 and v_out.startswith("BAD "), v_err
        assert "store is incomplete" in v_err and "Traceback" not in v_err, v_err
        t_out, t_err = outputs(readers[1])
        assert readers[1].returncode == 1 and "is incomplete" in error_line(t_err), t_err
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        _signal_all(jobs, signal.SIGCONT)
        for p in jobs:
            try:
                p.wait(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
    printed = []
    for p in jobs:
        out, err = outputs(p)
        assert p.returncode == 0, err
        printed.append(out.split())
    assert printed[0] == printed[1] and len(printed[0]) == 2
    assert store_dirs(root) == sorted(Path(p) for p in printed[0])
    for p in map(Path, printed[0]):
        assert_same_store(p, ref.paths[p.suffix], ref.arrays[p.suffix])
    TALLY["concurrent jobs run"] += 4


@full_sweep
@pytest.mark.parametrize("n, stagger", [(2, 0.0), (2, 0.05), (2, 0.3), (2, 1.0), (2, 2.0), (3, 0.0), (3, 0.5)])
def test_many_precomputes_into_one_root(digits_static, ref, tmp_path, n, stagger):
    """Promise 4 (full sweep): n identical precomputes into one ROOT, started `stagger`
    seconds apart, all succeed, print the same paths, and leave one correct store per format."""
    root = tmp_path / "root"
    jobs = []
    for i in range(n):
        jobs.append(spawn(*precompute_args(digits_static, root), log=tmp_path / f"job{i}.log"))
        time.sleep(stagger)
    printed = []
    for p in jobs:
        p.wait(timeout=600)
        out, err = outputs(p)
        assert p.returncode == 0, err
        printed.append(out.split())
    assert all(x == printed[0] for x in printed)
    for p in map(Path, printed[0]):
        assert_same_store(p, ref.paths[p.suffix], ref.arrays[p.suffix])
    assert len(store_dirs(root)) == 2
    TALLY["concurrent jobs run"] += n


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_eight_dataloader_workers_read_correct_directions(ref):
    """Promise 4: eight DataLoader worker processes streaming the zarr and the wds store at
    once hand the trainer exactly the stored direction of every sample, each sample once."""
    from enspipe.data import create_dataset
    from enspipe.train import SELF, BatchStream, TrainConfig

    ds = create_dataset("digits", limit=LIMIT)
    stores = (str(ref.paths[".zarr"]), str(ref.paths[".wds"]))
    cfg = TrainConfig(model="D", dataset="digits", limit=LIMIT, mode="ens-adv", attack="step_ll", shards=stores,
                      workers=8, block_size=64, batch_size=16, adv_fraction=1.0, device="cpu")
    want = ref.arrays[".zarr"]["direction"]
    seen, streamed = [], 0
    for epoch in range(2):
        loader = torch.utils.data.DataLoader(BatchStream(ds, stores, cfg, epoch=epoch), batch_size=None, num_workers=8)
        indices = []
        for batch in loader:
            idx = batch["index"].numpy()
            indices.append(idx)
            np.testing.assert_array_equal(batch["x"].numpy(), ds.images_uint8(idx))
            if batch["source"] != SELF:
                n = batch["n_adv"]
                np.testing.assert_array_equal(batch["d"].numpy(), want[idx[:n]])
                streamed += n
        seen.append(np.sort(np.concatenate(indices)))
        np.testing.assert_array_equal(seen[-1], np.arange(LIMIT))
    assert streamed > LIMIT // 2  # both stores were drawn from
    TALLY["concurrent jobs run"] += 8


def test_two_trainers_reading_one_store_at_once(ref, ref_run, tmp_path):
    """Promise 4: two trainers streaming the same stores at the same time both end with the
    weights of the same training done alone (one epoch: the reference run's first epoch)."""
    epoch1 = lambda out: [*train_args(ref, out)[:8], 1, *train_args(ref, out)[9:]]  # --epochs 1  # noqa: E731
    assert train_args(ref, tmp_path)[7] == "--epochs"
    procs = [spawn(*epoch1(tmp_path / f"run{i}"), log=tmp_path / f"t{i}.log") for i in range(2)]
    for p in procs:
        p.wait(timeout=600)
        assert p.returncode == 0, outputs(p)[1]
    want = torch.load(ref_run.path / "checkpoints" / "epoch-0000.pt", map_location="cpu", weights_only=True)["model"]
    for i in range(2):
        got = torch.load(tmp_path / f"run{i}" / "checkpoints" / "epoch-0000.pt", map_location="cpu",
                         weights_only=True)["model"]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f"run{i}"
    TALLY["concurrent jobs run"] += 2
