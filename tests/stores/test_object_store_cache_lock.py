"""The object-store cache's locks, made deterministic: a reader in another process holds a shard
file of the shared cache mid-read, and a second reader whose cap forces evicting that very file
must wait for it (the eviction's exclusive flock against the read's shared one).

Both sides run the real code with one seam each, never a timing: process A (a fresh interpreter)
stops inside its read (the cache's lock held) until the test says go, and says so with a file;
in the test process, reader B's flock first tries without blocking and says when it would wait.
The test releases A once B waits (the locks work) or has evicted (they do not). The oracles: the
file A reads still exists then, A's read returns the directions the test wrote, and B, once A is
done, evicts A's shard (the cap did force it) and reads its own directions.
"""
from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from enspipe.stores import create_store, open_store, store_path
from test_object_store import SHARD, _arrays, _identity, _write

pytest.importorskip("s3fs", reason="object-store tests need pip install -e '.[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need pip install -e '.[s3]'")

LONG = 300  # bounds far above any run under load, never timings

# Process A: reads shard 0's directions from the shared cache (its default, $ENSPIPE_STORE_CACHE),
# first once to download them when `mode` is "cached" (the held read is then the fast path:
# the process's shared flock, no listing), and stops inside the held read, its lock held, until
# the file `go` appears. Reports which path the held read took and what it read.
READER_A = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from enspipe.stores import open_store
    from enspipe.stores.remote_cache import RemoteSource

    url, sync, mode, shard = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    r = open_store(url)
    if mode == "cached":
        r.read_directions(0, shard)
    slow_calls = []
    real_slow = RemoteSource._slow
    def _slow(self, *a, **k):
        slow_calls.append(1)
        return real_slow(self, *a, **k)
    RemoteSource._slow = _slow
    real_read = type(r)._read_directions
    def held(self, start, stop):
        (sync / "reading").write_text("")
        deadline = time.monotonic() + 300
        while not (sync / "go").exists():
            if time.monotonic() > deadline:
                sys.exit("never released")
            time.sleep(0.01)
        return real_read(self, start, stop)
    type(r)._read_directions = held
    d = r.read_directions(0, shard)
    np.save(sync / "read.npy", d)
    (sync / "path.json").write_text(json.dumps({"slow": len(slow_calls)}))
""")


class _SaysWhenItWaits:
    """remote_cache's `fcntl` in this process: a lock request that would block sets its events
    first, then blocks as before."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __getattr__(self, name):
        return getattr(fcntl, name)

    def flock(self, fd: int, op: int) -> None:
        if op & (fcntl.LOCK_SH | fcntl.LOCK_EX) and not op & fcntl.LOCK_NB:
            try:
                return fcntl.flock(fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                for e in self.events:
                    e.set()
        return fcntl.flock(fd, op)


def _wait_for(done, what: str, proc=None) -> None:
    deadline = time.monotonic() + LONG
    while not done():
        if proc is not None and proc.poll() is not None and not done():
            pytest.fail(f"process A exited ({proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("mode", ["download", "cached"])
def test_a_reader_in_another_process_keeps_its_shard_until_it_is_done(s3, monkeypatch, tmp_path, mode):
    from enspipe.stores import remote_cache

    a = _arrays()
    url = store_path(f"s3://{s3['bucket']}/st", _identity(), "zarr")
    w = create_store(url, _identity(), fmt="zarr", shard_size=SHARD)
    _write(w, a)
    w.finalize()

    sync = tmp_path / "sync"
    sync.mkdir()
    log = open(tmp_path / "a.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", READER_A, url, str(sync), mode, str(SHARD)],
                            env=s3["env"], stdout=log, stderr=subprocess.STDOUT)
    waiting, evicted, moved = threading.Event(), threading.Event(), threading.Event()
    b_out: dict = {}
    thread = None
    try:
        _wait_for((sync / "reading").exists, "A held its read", proc)

        # B: the same cache, capped at one shard's directions; reading shard 1 must evict shard 0.
        monkeypatch.setattr(remote_cache, "fcntl", _SaysWhenItWaits(waiting, moved))
        real_evict = remote_cache.RemoteSource._evict

        def evict(self, *args, **kw):
            real_evict(self, *args, **kw)
            evicted.set()
            moved.set()

        monkeypatch.setattr(remote_cache.RemoteSource, "_evict", evict)
        probe = open_store(url)
        a_file = probe.path / probe._direction_files(0)[0]
        b_need = probe.records[1]["files"][probe._direction_files(1)[0]]["bytes"]
        assert a_file.is_file()
        b = open_store(url, cache_bytes=b_need)
        assert b.path == probe.path

        def read_b():
            try:
                b_out["d"] = b.read_directions(SHARD, 2 * SHARD)
            except BaseException as e:  # reported by the test thread
                b_out["error"] = e
            finally:
                moved.set()

        thread = threading.Thread(target=read_b, daemon=True)
        thread.start()
        assert moved.wait(LONG), "B neither waited for the lock nor evicted"
        # B waits for A's lock, or it has evicted: A's file must still be there.
        there_while_held = a_file.is_file()
        evicted_while_held = evicted.is_set()
    finally:
        (sync / "go").write_text("")
        try:
            proc.wait(LONG)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        if thread is not None:
            thread.join(LONG)
    a_log = (tmp_path / "a.log").read_text()[-3000:]
    assert not evicted_while_held and waiting.is_set(), "B evicted while A was reading instead of waiting for it"
    assert there_while_held, "the file A was reading left the cache under it"
    assert proc.returncode == 0, a_log
    np.testing.assert_array_equal(np.load(sync / "read.npy"), a["direction"][:SHARD])
    # The read held was the path it was meant to be (the fast path after a download, else the slow one).
    assert json.loads((sync / "path.json").read_text()) == {"slow": 1 if mode == "download" else 0}

    # Then B went on: it evicted A's shard (its cap forced that) and read its own directions.
    assert not thread.is_alive() and "error" not in b_out, b_out.get("error")
    np.testing.assert_array_equal(b_out["d"], a["direction"][SHARD:2 * SHARD])
    assert evicted.is_set() and not a_file.exists()


def test_two_processes_fetching_one_object_at_once_download_it_once(s3, monkeypatch, tmp_path):
    """Ranks of a node starting together (here two RemoteSources of one cache: flocks on their own
    descriptors exclude each other as two processes' do) each need every keys object: while one
    downloads an object, the other waits for it and then finds it in place, one GET in all. The
    seam: the first GET stops until the test says go; the second side's lock says when it would wait."""
    from enspipe.stores import remote, remote_cache
    from enspipe.stores.manifest import sha256_file

    url = store_path(f"s3://{s3['bucket']}/st", _identity(), "zarr")
    w = create_store(url, _identity(), fmt="zarr", shard_size=SHARD)
    _write(w, _arrays())
    w.finalize()
    probe = open_store(url, cache_dir=tmp_path / "cache")
    rel = probe._key_files(0)[0]
    meta = probe.records[0]["files"][rel]
    one, two = (remote_cache.RemoteSource(url, probe.path, 1 << 30) for _ in range(2))
    in_get, go, waiting = threading.Event(), threading.Event(), threading.Event()
    gets: list[str] = []
    real_cat = remote.Remote.cat

    def cat(self, name):
        gets.append(name)
        if len(gets) == 1:
            in_get.set()
            assert go.wait(LONG)
        return real_cat(self, name)

    monkeypatch.setattr(remote.Remote, "cat", cat)
    monkeypatch.setattr(remote_cache, "fcntl", _SaysWhenItWaits(waiting))
    first = threading.Thread(target=one._download, args=({rel: meta},), daemon=True)
    second = threading.Thread(target=two._download, args=({rel: meta},), daemon=True)
    try:
        first.start()
        _wait_for(in_get.is_set, "the first download started")
        second.start()
        _wait_for(lambda: waiting.is_set() or len(gets) > 1, "the second side waited or fetched the object itself")
    finally:
        go.set()
        first.join(LONG)
        second.join(LONG)
    assert gets == [rel]
    assert sha256_file(probe.path / rel) == meta["sha256"]
