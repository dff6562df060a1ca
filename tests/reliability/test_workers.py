"""Promise 5, workers dying: with a real local dask cluster, a worker process SIGKILLed in
the middle of a shard is replaced, its shard rerun, the retry logged, and the stores equal
the single-process run's (full sweep; CI covers a worker kill in test_precompute.py)."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from .processes import outputs, spawn
from .reference import NUM_SHARDS, assert_same_store, precompute_args
from .sweep import TALLY, full_sweep


@pytest.fixture(scope="module")
def dask_worker_killed(digits_static, ref, tmp_path_factory):
    """`precompute --dask-workers 2` with one dask worker process SIGKILLed in the middle of a shard.
    Returns (the finished process's stdout, stderr, records written at the kill)."""
    import psutil

    work = tmp_path_factory.mktemp("dask")
    root = work / "root"
    proc = spawn(*precompute_args(digits_static, root, "both", "--dask-workers", 2), log=work / "dask.log")
    deadline = time.monotonic() + 400
    victim = None
    while victim is None:
        assert proc.poll() is None, outputs(proc)[1]
        assert time.monotonic() < deadline, "no shard was ever written"
        if list(root.glob("*/*/*.zarr/shards/*.json")):
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
            assert len(workers) == 2, [c.cmdline() for c in workers]
            victim = workers[0]
            at_kill = len(list(root.glob("*/*/*.zarr/shards/*.json")))
            victim.send_signal(signal.SIGKILL)
        time.sleep(0.01)
    proc.wait(timeout=600)
    out, err = outputs(proc)
    return proc.returncode, out, err, at_kill


@full_sweep
def test_a_dask_worker_killed_mid_shard_still_gives_the_single_process_store(ref, dask_worker_killed):
    """Promise 5: with a real local dask cluster, a worker process killed in the middle of a
    shard is replaced, its shard rerun, and the job completes with stores equal to the
    single-process run's."""
    rc, out, err, at_kill = dask_worker_killed
    assert rc == 0, err
    assert at_kill < NUM_SHARDS, "the job finished before a worker could be killed"
    for p in map(Path, out.split()):
        assert_same_store(p, ref.paths[p.suffix], ref.arrays[p.suffix])
    TALLY["dask workers killed, nothing lost"] += 1


@full_sweep
def test_a_dask_worker_death_is_visible_in_the_log(dask_worker_killed):
    """Promise 5: the retry of a killed worker's shard is visible in the log."""
    import re

    rc, out, err, at_kill = dask_worker_killed
    assert re.search(r"^precompute: dask worker \S+ died while holding \w+ shard \d+.*; retrying", err, re.M), err


@full_sweep
def test_a_dask_run_ends_without_a_traceback(dask_worker_killed):
    """Promise 3/5: a successful `precompute --dask-workers` run prints no traceback, even after a
    worker died."""
    rc, out, err, at_kill = dask_worker_killed
    assert rc == 0 and "Traceback" not in err and "CRITICAL" not in err, err
