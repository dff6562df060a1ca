"""Reliability and security (issue #7): faults, corruption and hostile input, tested the way
a storage system is. Each test tries to break one promise, named in its docstring; the
promises, the tests and the counts of the last full sweep are listed in RELIABILITY.md.

  1. Crash consistency  real `enspipe precompute` / `enspipe train` processes are SIGKILLed at
                        exact points (tests/_faults.py) and at seeded random moments; a re-run
                        then equals an uninterrupted run, and no kill leaves a store that
                        `verify` or the reader accepts while it is incomplete.
  2. Corruption         damaged and hostile stores: `verify` names each problem, the trainer
                        refuses them, nothing is unpickled, nothing is written outside.
  3. Hostile input      a table of bad invocations of every command: non-zero exit, one clear
                        line on stderr, no traceback, nothing half-written.
  4. Concurrent users   two precomputes into one ROOT, readers of a store being written,
                        eight DataLoader workers and two trainers reading one store.
  5. Workers dying      a dask worker killed mid-shard (full sweep).
  6. Disk full          a size-limited tmpfs (or a simulated ENOSPC): a clear error, then resume.

The default run is the CI subset (about a minute on two cores). The full sweep runs the
same tests with more kill points, trials and fuzzing, plus the cases marked `slow`:

    ENSPIPE_SWEEP=full python -m pytest tests/test_reliability.py      # everything
    python tests/reliability_sweep.py                                   # same, and prints counts

Product bugs these tests find are marked `xfail(strict=True, reason="BUG: ...")` until fixed;
RELIABILITY.md lists the ones found so far.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from enspipe.errors import EnspipeError, StoreError
from enspipe.stores import open_store, verify_store
from enspipe.stores.manifest import read_manifest, sha256_file

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "_faults.py"
ZYGOTE = REPO / "tests" / "_zygote.py"

FULL = os.environ.get("ENSPIPE_SWEEP", "") == "full"


def full_sweep(fn):
    """Only in the full sweep (ENSPIPE_SWEEP=full); the default CI run skips it."""
    fn = pytest.mark.skipif(not FULL, reason="full sweep only: set ENSPIPE_SWEEP=full (RELIABILITY.md)")(fn)
    return pytest.mark.slow(fn)


# One thread per process: the machine is shared, and a fixed thread count keeps CPU results
# bit-identical between a reference run and its killed-and-resumed twin.
ENV = {**os.environ, "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONDONTWRITEBYTECODE": "1"}
ENV.pop("ENSPIPE_FAULT_LOG", None)

# The workload: 512 digits, shards (and batches) of 64 -> 8 shards per store.
LIMIT, SHARD, BATCH, EPOCHS, SEED = 512, 64, 64, 4, 5
NUM_SHARDS = LIMIT // SHARD


# --------------------------------------------------------------------------- counts

TALLY: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _write_tally():
    """Add this run's counts to $ENSPIPE_RELIABILITY_COUNTS (read by reliability_sweep.py)."""
    yield
    global _zygote
    if _zygote is not None:
        _zygote.close()
        _zygote = None
    while _LOGS:
        shutil.rmtree(_LOGS.pop(), ignore_errors=True)
    path = os.environ.get("ENSPIPE_RELIABILITY_COUNTS")
    if path:
        p = Path(path)
        old = collections.Counter(json.loads(p.read_text())) if p.exists() else collections.Counter()
        p.write_text(json.dumps(dict(old + TALLY), indent=1, sort_keys=True))


# --------------------------------------------------------------------------- running enspipe
#
# Every enspipe run below is a separate process running the real command line. In the full
# sweep each is a fresh `python -m enspipe` interpreter. In the CI subset they are forked from
# tests/_zygote.py, which has done the ~3.5 s of imports once (ENSPIPE_REL_FRESH=1 turns
# that off): the same code from `enspipe.cli.main` on, at a third of the CPU cost.

FRESH = FULL or os.environ.get("ENSPIPE_REL_FRESH") == "1"
_LOGS: list[Path] = []  # a temp dir for the logs of `enspipe()` runs, made on first use


class _Forked:
    """The part of subprocess.Popen the tests use, for a process forked by the zygote."""

    def __init__(self, zygote: "_Zygote", rid: int, pid: int, args: list, log: Path) -> None:
        self.zygote, self.rid, self.pid, self.args, self.log = zygote, rid, pid, args, log

    @property
    def returncode(self) -> int | None:
        return self.zygote.exits.get(self.rid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.zygote.cond:
            if not self.zygote.cond.wait_for(lambda: self.rid in self.zygote.exits, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Zygote:
    """A client of tests/_zygote.py: forks enspipe processes on request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=ENV, cwd=REPO)
        self.cond = threading.Condition()
        self.pids: dict[int, int] = {}
        self.exits: dict[int, int] = {}
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            event = json.loads(line)
            with self.cond:
                (self.pids if "pid" in event else self.exits)[event["id"]] = event.get("pid", event.get("exit"))
                self.cond.notify_all()

    def spawn(self, args: list, *, log: Path, faults=(), env: dict, cwd: Path, uid: int | None = None) -> _Forked:
        with self.cond:
            rid, self.next_id = self.next_id, self.next_id + 1
        request = {"id": rid, "argv": [str(a) for a in args], "env": env, "cwd": str(cwd), "faults": list(faults),
                   "uid": uid, "out": str(log.with_suffix(".out")), "err": str(log.with_suffix(".err"))}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        with self.cond:
            assert self.cond.wait_for(lambda: rid in self.pids, 120), "the zygote does not answer"
        return _Forked(self, rid, self.pids[rid], args, log)

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)


_zygote: _Zygote | None = None


def spawn(*args, log: Path, faults: tuple[str, ...] = (), env: dict | None = None, cwd: Path = REPO,
          uid: int | None = None, fresh: bool | None = None):
    """Start enspipe ARGS without waiting; stdout/stderr go to LOG.out / LOG.err. The result
    has Popen's pid, poll, wait, send_signal, kill and returncode (negative: the signal)."""
    global _zygote
    fresh = FRESH if fresh is None else fresh
    if fresh:
        assert uid is None, "a fresh interpreter cannot run as another user (the venv is under /root)"
        if faults:
            cmd = [sys.executable, str(FAULTS), *[x for f in faults for x in ("--fault", f)], "--", *map(str, args)]
        else:
            cmd = [sys.executable, "-m", "enspipe", *map(str, args)]
        proc = subprocess.Popen(cmd, stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"),
                                stdin=subprocess.DEVNULL, env=env or ENV, cwd=cwd)
        proc.log = log  # type: ignore[attr-defined]
        return proc
    if _zygote is None:
        _zygote = _Zygote()
    return _zygote.spawn(list(args), log=log, faults=faults, env=env or ENV, cwd=cwd, uid=uid)


def enspipe(*args, faults: tuple[str, ...] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    """Run enspipe ARGS to the end; stdout and stderr as text."""
    if not _LOGS:
        _LOGS.append(Path(tempfile.mkdtemp(prefix="enspipe-rel-logs-")))
    proc = spawn(*args, faults=faults, log=_LOGS[0] / f"run-{time.monotonic_ns()}.log")
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = outputs(proc)
    return subprocess.CompletedProcess(list(args), proc.returncode, out, err)


def outputs(proc: subprocess.Popen) -> tuple[str, str]:
    log: Path = proc.log  # type: ignore[attr-defined]
    return log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def error_line(stderr: str, info_prefixes: tuple[str, ...] = ("precompute: ", "reused ")) -> str:
    """The one error line of a failed command: no traceback, nothing but enspipe's own
    progress lines before it. Returns the line."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    *before, last = lines
    assert last.startswith("enspipe") and ": error: " in last, stderr
    assert all(ln.startswith(info_prefixes) for ln in before), stderr
    return last


# --------------------------------------------------------------------------- stores

def store_dirs(root: Path) -> list[Path]:
    """Every store directory under ROOT (complete or not; not the hidden temp dirs)."""
    return sorted(p for p in root.glob("*/*/*") if p.suffix in (".zarr", ".wds") and not p.name.startswith("."))


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    r = open_store(path)
    return {**r.read(0, len(r)), "keys": np.array(r.keys(0, len(r)))}


def assert_same_store(got: Path, want: Path, want_arrays: dict | None = None) -> None:
    """`got` verifies, and equals `want`: arrays, keys and bit-identical shard files."""
    report = verify_store(got)
    assert report.ok, report
    a, b = store_arrays(got), want_arrays or store_arrays(want)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{got}: {name}")
    files = lambda p: {s: r["files"] for s, r in read_manifest(p)["shards"].items()}  # noqa: E731
    assert files(got) == files(want)


def assert_nothing_falsely_complete(root: Path, ref: "Ref") -> int:
    """Promise 1: whatever a kill left under ROOT, a store that `verify` or the reader
    accepts is the whole, correct store. Returns how many stores were (rightly) refused."""
    refused = 0
    for p in store_dirs(root):
        report = verify_store(p)
        try:
            reader = open_store(p)
        except StoreError:
            reader = None
        if report.ok or reader is not None:
            assert p.relative_to(root) == ref.paths[p.suffix].relative_to(ref.root)
            assert_same_store(p, ref.paths[p.suffix], ref.arrays[p.suffix])
        else:
            refused += 1
    return refused


def precompute_args(static: Path, root: Path, fmt: str = "both", *extra) -> list:
    return ["precompute", "--model", static, "--dataset", "digits", "--limit", LIMIT, "--shard-size", SHARD,
            "--batch-size", BATCH, "--format", fmt, "--device", "cpu", "--out", root, *extra]


@dataclass
class Ref:
    """The uninterrupted reference precompute (both formats) and how long its phases took."""

    root: Path
    paths: dict[str, Path]           # ".zarr" / ".wds" -> store
    arrays: dict[str, dict]
    work: float                      # seconds from "N shard(s) to compute" until both stores were complete


def _timed(args, started: Callable[[Path, int], bool], done: Callable[[], bool],
           log: Path) -> tuple[subprocess.Popen, float]:
    """Run to the end; return the process and the seconds from `started` (its work began) to
    `done` (its last result is on disk)."""
    t0_ns = time.time_ns()
    proc = spawn(*args, log=log)
    t_start = t_done = None
    while proc.poll() is None or t_done is None:
        if t_start is None and started(log, t0_ns):
            t_start = time.monotonic()
        if t_start is not None and t_done is None and (done() or proc.poll() is not None):
            t_done = time.monotonic()
        time.sleep(0.002)
    assert t_start is not None, outputs(proc)[1]
    return proc, t_done - t_start


def precompute_started(log: Path, t0_ns: int) -> bool:
    """A precompute has planned its work and starts computing shards (also true of a re-run)."""
    try:
        return "shard(s) to compute" in log.with_suffix(".err").read_text()
    except FileNotFoundError:  # not created yet
        return False


def train_started(out: Path) -> Callable[[Path, int], bool]:
    """A training run (or its resumption) has written config.json: it starts its epochs."""
    def started(log: Path, t0_ns: int) -> bool:
        try:
            return (out / "config.json").stat().st_mtime_ns >= t0_ns
        except FileNotFoundError:
            return False
    return started


@pytest.fixture(scope="module")
def ref(digits_static, tmp_path_factory) -> Ref:
    """The reference: `enspipe precompute --format both`, uninterrupted, in a subprocess."""
    root = tmp_path_factory.mktemp("ref") / "root"
    def done() -> bool:
        stores = store_dirs(root)
        return len(stores) == 2 and all(read_manifest(p)["complete"] for p in stores)

    proc, work = _timed(precompute_args(digits_static, root), precompute_started, done, root.parent / "ref.log")
    out, err = outputs(proc)
    assert proc.returncode == 0, err
    paths = {Path(p).suffix: Path(p) for p in out.split()}
    assert set(paths) == {".zarr", ".wds"}
    return Ref(root, paths, {k: store_arrays(p) for k, p in paths.items()}, work)


# --------------------------------------------------------------------------- kill points

@dataclass(frozen=True)
class Kill:
    """Where a run is killed: an exact point (a tests/_faults.py spec), or a moment: `delay`
    seconds after `started` says the run began its work (the timing of imports and of a
    loaded machine varies far more than the work itself)."""

    name: str
    fault: str | None = None
    delay: float | None = None
    started: Callable[[Path, int], bool] | None = None


def run_killed(args, kill: Kill, work: Path) -> tuple[bool, str]:
    """Run enspipe and SIGKILL it at `kill`. Returns (fired, stderr): fired is False when the
    run ended on its own first (a moment after its end, or a point it never reached)."""
    log = work / f"kill-{time.monotonic_ns()}.log"
    env = {**ENV, "ENSPIPE_FAULT_LOG": str(log.with_suffix(".fired"))}
    t0_ns = time.time_ns()
    proc = spawn(*args, faults=(kill.fault,) if kill.fault else (), env=env, log=log)
    try:
        if kill.delay is not None:
            while kill.started is not None and not kill.started(log, t0_ns) and proc.poll() is None:
                time.sleep(0.002)
            try:
                proc.wait(timeout=kill.delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True, outputs(proc)[1]
        else:
            proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, err = outputs(proc)
    if proc.returncode == -signal.SIGKILL:
        fired = log.with_suffix(".fired")
        assert fired.exists() and kill.fault in fired.read_text(), f"killed, but not at {kill.name}: {err}"
        return True, err
    assert proc.returncode == 0, f"{kill.name}: the run failed instead of being killed:\n{err}"
    return False, err


def kill_chain(args: Callable[[], list], kills: list[Kill], work: Path, check: Callable[[], None],
               *, require_exact: bool = True) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the command once per kill point, each run killed at its point and the leftovers
    checked with `check`; each run after the first is a re-run of the killed one. Then run
    it once more, uninterrupted. Returns the kill points that fired and the last run."""
    fired = []
    for kill in kills:
        did, err = run_killed(args(), kill, work)
        if did:
            fired.append(kill.name)
            check()
        elif kill.fault and require_exact:
            raise AssertionError(f"kill point never reached: {kill.name} ({kill.fault})\n{err}")
    final = enspipe(*args())
    assert final.returncode == 0, final.stderr
    return fired, final


# --------------------------------------------------------------------------- 1. crash consistency: precompute

# Exact kill points of a `--format both` precompute (the zarr store is written before the wds
# one, shard by shard; each shard: zarr arrays, keys, record; then the wds tar and its record).
PRECOMPUTE_POINTS = [
    Kill("store creation: the layout built in a temp dir, not yet renamed into place",
         "kill-before-replace:*.zarr"),
    Kill("store creation: the empty store renamed into place", "kill-after-replace:*.wds"),
    Kill("during a shard write: a zarr shard file half written", "kill-mid-write:*.zarr/direction/c/*.partial#2"),
    Kill("during a shard write: a wds tar half written", "kill-mid-write:*.wds/.shard-*.tar.*.tmp#2"),
    Kill("inside a shard: its direction array written, its logits not", "kill-after-replace:*.zarr/direction/c/*#3"),
    Kill("inside a shard: every file written, the completion record not", "kill-before-replace:*.zarr/shards/*.json#2"),
    Kill("between shards: a completion record just written", "kill-after-replace:*.wds/shards/*.json#4"),
    Kill("during the manifest update: half of the new manifest written", "kill-mid-write:*.zarr/.manifest.json.*.tmp"),
    Kill("during the manifest update: the new manifest written, not renamed", "kill-before-replace:*.wds/manifest.json"),
    Kill("between the two stores' manifest updates", "kill-after-replace:*.zarr/manifest.json"),
]


def _precompute_crash_test(static: Path, ref: Ref, kills: list[Kill], work: Path, **kw) -> list[str]:
    root = work / "root"
    work.mkdir(parents=True, exist_ok=True)
    args = lambda: precompute_args(static, root)  # noqa: E731
    TALLY["kill points tried: precompute"] += len(kills)

    def check() -> None:
        TALLY["incomplete stores refused after a kill"] += assert_nothing_falsely_complete(root, ref)

    fired, final = kill_chain(args, kills, work, check, **kw)
    paths = [Path(p) for p in final.stdout.split()]
    assert [p.relative_to(root) for p in paths] == [ref.paths[p.suffix].relative_to(ref.root) for p in paths]
    for p in paths:
        assert_same_store(p, ref.paths[p.suffix], ref.arrays[p.suffix])
    TALLY["kill points fired, nothing lost: precompute"] += len(fired)
    _tally_kinds("precompute", kills, fired)
    return fired


def _tally_kinds(command: str, kills: list[Kill], fired: list[str]) -> None:
    for k in kills:
        kind = "exact points" if k.fault else "random moments"
        TALLY[f"{kind} tried: {command}"] += 1
        TALLY[f"{kind} fired: {command}"] += k.name in fired


def random_moments(work: float, seed: int) -> tuple[float, float]:
    """Two seeded moments (seconds after the work began): one in a run, one in its re-run,
    which has only what the first kill left to do."""
    u1, u2 = np.random.default_rng([7, seed]).uniform(size=2)
    return float(u1 * work), float(u2 * max(0.25, 1 - u1) * work)


def test_precompute_killed_at_four_points_resumes_to_the_same_stores(digits_static, ref, tmp_path):
    """Promise 1 (CI subset): one precompute killed four times in a row -- at a seeded random
    moment, during a shard write, between shards, during the manifest update -- each time
    re-run; nothing on disk is accepted while incomplete, and the last re-run's stores equal
    an uninterrupted run's, bit for bit."""
    # Within the first 30% of the work: the exact points after it need work left to hit.
    moment = 0.3 * random_moments(ref.work, seed=0)[0]
    kills = [
        Kill(f"a seeded random moment ({moment:.2f} s into the work)", delay=moment, started=precompute_started),
        Kill("during a shard write (zarr)", "kill-mid-write:*.zarr/direction/c/*.partial"),
        Kill("between shards", "kill-after-replace:*.wds/shards/*.json"),
        Kill("during the manifest update", "kill-before-replace:*.zarr/manifest.json"),
    ]
    fired = _precompute_crash_test(digits_static, ref, kills, tmp_path, require_exact=True)
    assert [k.name for k in kills[1:]] == [f for f in fired if f != kills[0].name]


@full_sweep
@pytest.mark.parametrize("kill", PRECOMPUTE_POINTS, ids=lambda k: k.name)
def test_precompute_killed_at_a_named_point_resumes(digits_static, ref, tmp_path, kill):
    """Promise 1 (full sweep): killed at this exact point, precompute leaves nothing that is
    accepted while incomplete, and a re-run completes to the uninterrupted run's stores."""
    assert _precompute_crash_test(digits_static, ref, [kill], tmp_path) == [kill.name]


@full_sweep
@pytest.mark.parametrize("seed", range(16))
def test_precompute_killed_at_random_moments_resumes(digits_static, ref, tmp_path, seed):
    """Promise 1 (full sweep): killed at a seeded random moment, and its re-run killed again
    at another, precompute still completes to the uninterrupted run's stores."""
    first, second = random_moments(ref.work, seed)
    kills = [Kill(f"random moment {first:.2f} s", delay=first, started=precompute_started),
             Kill(f"random moment {second:.2f} s", delay=second, started=precompute_started)]
    _precompute_crash_test(digits_static, ref, kills, tmp_path, require_exact=False)


# --------------------------------------------------------------------------- 1. crash consistency: train

def train_args(ref: Ref, out: Path, *extra) -> list:
    """ens-adv training of D streaming both reference stores (zarr and wds)."""
    return ["train", "--model", "D", "--dataset", "digits", "--limit", LIMIT, "--epochs", EPOCHS,
            "--batch-size", BATCH, "--mode", "ens-adv", "--attack", "step_ll", "--shards", ref.paths[".zarr"],
            "--shards", ref.paths[".wds"], "--seed", SEED, "--device", "cpu", "--log-every", 4, "--out", out, *extra]


def train_rerun(ref: Ref, out: Path) -> list:
    """The first attempt is the plain command; every re-run adds --resume, as a requeue loop
    would, whatever the killed attempt left (even an --out with no config.json yet)."""
    return train_args(ref, out, *(["--resume"] if out.exists() else []))


@dataclass
class RefRun:
    path: Path
    weights: dict[str, torch.Tensor]
    work: float                      # seconds from config.json appearing until the last checkpoint


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def assert_same_run(got: Path, want: RefRun) -> None:
    """Equal final weights (bitwise, CPU), model.json describing those weights, and the same
    last checkpoint."""
    from enspipe.models import load_model, weights_sha256

    w = _weights(got)
    assert w.keys() == want.weights.keys()
    for k in w:
        assert torch.equal(w[k], want.weights[k]), f"{got}: tensor {k} differs from the uninterrupted run"
    meta = json.loads((got / "model.json").read_text())
    assert meta["weights_sha256"] == weights_sha256(load_model(got)), "model.json describes other weights"
    assert meta["provenance"]["epochs_done"] == EPOCHS
    last = sorted((got / "checkpoints").glob("epoch-*.pt"))[-1]
    assert last.name == f"epoch-{EPOCHS - 1:04d}.pt"
    state = torch.load(last, map_location="cpu", weights_only=True)["model"]
    ref_state = torch.load(want.path / "checkpoints" / last.name, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def assert_run_not_falsely_done(run: Path, want: RefRun) -> None:
    """After a kill: a run whose model.json claims every epoch done must hold the final weights."""
    meta = run / "model.json"
    if meta.exists() and json.loads(meta.read_text())["provenance"]["epochs_done"] == EPOCHS:
        assert_same_run(run, want)


@pytest.fixture(scope="module")
def ref_run(ref, tmp_path_factory) -> RefRun:
    """The reference training run, uninterrupted, in a subprocess."""
    out = tmp_path_factory.mktemp("ref-run") / "run"
    last = out / "checkpoints" / f"epoch-{EPOCHS - 1:04d}.pt"
    proc, work = _timed(train_args(ref, out), train_started(out), last.exists, out.parent / "train.log")
    assert proc.returncode == 0, outputs(proc)[1]
    return RefRun(out, _weights(out), work)


TRAIN_POINTS = [
    Kill("before training: config.json written, not renamed", "kill-before-replace:*/run/config.json"),
    Kill("during a checkpoint write: the temp file complete, not renamed", "kill-before-replace:*/checkpoints/epoch-*.pt"),
    Kill("between an epoch's checkpoint and its model files", "kill-after-replace:*/checkpoints/epoch-0001.pt"),
    Kill("during the model write: model.safetensors temp written, not renamed",
         "kill-before-replace:*/model.safetensors#2"),
    Kill("between model.safetensors and model.json", "kill-after-replace:*/model.safetensors#1"),
    Kill("during the model.json write: half written", "kill-mid-write:*/.model.json.*.tmp#3"),
    Kill("during a later checkpoint write (epoch 3 of 4)", "kill-before-replace:*/checkpoints/epoch-0002.pt"),
]


def _train_crash_test(ref: Ref, ref_run: RefRun, kills: list[Kill], work: Path, **kw) -> list[str]:
    out = work / "run"
    TALLY["kill points tried: train"] += len(kills)
    fired, _ = kill_chain(lambda: train_rerun(ref, out), kills, work,
                          lambda: assert_run_not_falsely_done(out, ref_run), **kw)
    assert_same_run(out, ref_run)
    TALLY["kill points fired, nothing lost: train"] += len(fired)
    _tally_kinds("train", kills, fired)
    return fired


def test_train_killed_at_four_points_resumes_to_the_same_weights(ref, ref_run, tmp_path):
    """Promise 1 (CI subset): one training run killed four times in a row -- in a checkpoint
    write, between a checkpoint and the model files, between model.safetensors and model.json,
    at a seeded random moment -- each time resumed; the final weights equal an uninterrupted
    run's bit for bit (CPU)."""
    moment = 0.4 * random_moments(ref_run.work, seed=0)[0]  # two of the four epochs are left by then
    kills = [
        Kill("during a checkpoint write", "kill-before-replace:*/checkpoints/epoch-*.pt"),
        Kill("between a checkpoint and the model files", "kill-after-replace:*/checkpoints/epoch-*.pt"),
        Kill("between model.safetensors and model.json", "kill-after-replace:*/model.safetensors"),
        Kill(f"a seeded random moment ({moment:.2f} s into the work)", delay=moment,
             started=train_started(tmp_path / "run")),
    ]
    fired = _train_crash_test(ref, ref_run, kills, tmp_path)
    assert fired[:3] == [k.name for k in kills[:3]]


@full_sweep
@pytest.mark.parametrize("kill", TRAIN_POINTS, ids=lambda k: k.name)
def test_train_killed_at_a_named_point_resumes(ref, ref_run, tmp_path, kill):
    """Promise 1 (full sweep): killed at this exact point and resumed, training ends with the
    uninterrupted run's weights."""
    assert _train_crash_test(ref, ref_run, [kill], tmp_path) == [kill.name]


@full_sweep
@pytest.mark.parametrize("seed", range(16))
def test_train_killed_at_random_moments_resumes(ref, ref_run, tmp_path, seed):
    """Promise 1 (full sweep): killed at a seeded random moment and its resumption killed
    again at another, training still ends with the uninterrupted run's weights."""
    first, second = random_moments(ref_run.work, seed)
    started = train_started(tmp_path / "run")
    kills = [Kill(f"random moment {first:.2f} s", delay=first, started=started),
             Kill(f"random moment {second:.2f} s", delay=second, started=started)]
    _train_crash_test(ref, ref_run, kills, tmp_path, require_exact=False)


def test_train_killed_after_its_last_checkpoint_resumes_to_the_final_weights(ref, ref_run, tmp_path):
    """Promise 1: the kill point between the last epoch's checkpoint and its model files."""
    kill = Kill("after the last checkpoint, before the final model files",
                f"kill-after-replace:*/checkpoints/epoch-{EPOCHS - 1:04d}.pt")
    _train_crash_test(ref, ref_run, [kill], tmp_path)


def test_train_resume_is_a_safe_rerun_even_before_the_run_started(ref, ref_run, tmp_path):
    """Promise 1: re-running the same command with --resume completes whatever the kill point,
    including one before config.json was written."""
    out = tmp_path / "run"
    did, _ = run_killed(train_args(ref, out), TRAIN_POINTS[0], tmp_path)
    assert did
    res = enspipe(*train_args(ref, out, "--resume"))
    assert res.returncode == 0, res.stderr
    assert_same_run(out, ref_run)


# --------------------------------------------------------------------------- 2. corruption

class _Pwn:
    """Unpickling this creates `marker`: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tar_members(tar: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar) as tf:
        return [(m, tf.extractfile(m).read() if m.isreg() else b"") for m in tf]


def _write_tar(tar: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    tar.write_bytes(buf.getvalue())


def _member(name: str, data: bytes = b"", *, link: str | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
    else:
        info.size = len(data)
    return info, data


def _forge_checksums(store: Path, s: int) -> None:
    """What a hostile producer would do: record the tampered files' sha256 and size, in the
    manifest and in the shard's completion record, so only deeper checks can notice."""
    mpath = store / "manifest.json"
    manifest = json.loads(mpath.read_text())
    rec = manifest["shards"][f"{s:06d}"]
    for rel in rec["files"]:
        rec["files"][rel] = {"sha256": sha256_file(store / rel), "bytes": (store / rel).stat().st_size}
    mpath.write_text(json.dumps(manifest, indent=2))
    (store / "shards" / f"{s:06d}.json").write_text(json.dumps(rec, sort_keys=True, indent=1) + "\n")


def _flip(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _unwrite_shard_but_claim_complete(store: Path, s: int) -> None:
    """A store missing shard s whose manifest has been edited to claim completion."""
    manifest = json.loads((store / "manifest.json").read_text())
    rec = manifest["shards"].pop(f"{s:06d}")
    for rel in rec["files"]:
        (store / rel).unlink()
    (store / "shards" / f"{s:06d}.json").unlink()
    manifest["complete"] = True
    (store / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _hostile_tar(member: Callable[[Path], tuple[tarfile.TarInfo, bytes]], s: int = 1) -> Callable:
    """Insert one hostile member into shard s's tar (after the first sample's members), forged."""
    def mutate(store: Path, scratch: Path) -> None:
        tar = store / f"shard-{s:06d}.tar"
        members = _tar_members(tar)
        members.insert(3, member(scratch))
        _write_tar(tar, members)
        _forge_checksums(store, s)
    return mutate


def _truncated_member_forged(store: Path, scratch: Path) -> None:
    tar = store / "shard-000002.tar"
    members = _tar_members(tar)
    # Cut the tar inside the data of a member near its middle.
    offset = members[len(members) // 2][0].offset_data + 10
    tar.write_bytes(tar.read_bytes()[:offset])
    _forge_checksums(store, 2)


def _keys_swapped(store: Path, scratch: Path) -> None:
    p = store / "keys" / "000001.json"
    doc = json.loads(p.read_text())
    doc["keys"][0], doc["keys"][1] = doc["keys"][1], doc["keys"][0]
    p.write_text(json.dumps(doc, sort_keys=True) + "\n")


def _pickle_member(ext: str) -> Callable[[Path], tuple[tarfile.TarInfo, bytes]]:
    def make(scratch: Path):
        payload = _Pwn(scratch / f"PWNED-{ext}")
        if ext == "pth":
            buf = io.BytesIO()
            torch.save({"x": payload}, buf)
            return _member(f"{64:09d}.{ext}", buf.getvalue())
        return _member(f"{64:09d}.{ext}", pickle.dumps(payload))
    return make


@dataclass(frozen=True)
class Corruption:
    id: str
    fmt: str                                    # ".zarr" | ".wds"
    mutate: Callable[[Path, Path], None]        # (store copy, scratch dir outside the store)
    expect: tuple[str, ...]                     # words of the `verify` line that names it
    shard: int


CORRUPTIONS = [
    Corruption("zarr: truncated shard file", ".zarr", lambda s, _: _truncate(s / "direction/c/2/0/0/0"),
               ("shard 2:", "direction/c/2/0/0/0", "truncated"), 2),
    Corruption("zarr: a flipped byte in a chunk", ".zarr", lambda s, _: _flip(s / "direction/c/3/0/0/0"),
               ("shard 3:", "checksum mismatch", "direction/c/3/0/0/0"), 3),
    Corruption("zarr: a deleted shard file", ".zarr", lambda s, _: (s / "logits/c/4/0").unlink(),
               ("shard 4:", "missing file logits/c/4/0"), 4),
    Corruption("zarr: keys file edited", ".zarr", _keys_swapped, ("shard 1:", "checksum mismatch", "keys/000001.json"),
               1),
    Corruption("zarr: manifest edited to claim completion", ".zarr",
               lambda s, _: _unwrite_shard_but_claim_complete(s, 5),
               ("shard 5:", "claims the store is complete"), 5),
    Corruption("wds: truncated tar", ".wds", lambda s, _: _truncate(s / "shard-000002.tar"),
               ("shard 2:", "shard-000002.tar", "truncated"), 2),
    Corruption("wds: a flipped byte", ".wds", lambda s, _: _flip(s / "shard-000003.tar"),
               ("shard 3:", "checksum mismatch", "shard-000003.tar"), 3),
    Corruption("wds: a deleted tar", ".wds", lambda s, _: (s / "shard-000004.tar").unlink(),
               ("shard 4:", "missing file shard-000004.tar"), 4),
    Corruption("wds: manifest edited to claim completion", ".wds",
               lambda s, _: _unwrite_shard_but_claim_complete(s, 5),
               ("shard 5:", "claims the store is complete"), 5),
    Corruption("wds: a truncated member (checksums forged)", ".wds", _truncated_member_forged,
               ("shard 2:", "shard-000002.tar", "cannot be read"), 2),
    Corruption("wds: member name escaping with ../ (checksums forged)", ".wds",
               _hostile_tar(lambda d: _member("../escaped.txt", b"written outside the store")),
               ("shard 1:", "'../escaped.txt'", "path-like"), 1),
    Corruption("wds: absolute member name (checksums forged)", ".wds",
               _hostile_tar(lambda d: _member(str(d / "absolute.txt"), b"x")),
               ("shard 1:", "path-like"), 1),
    Corruption("wds: symlink member (checksums forged)", ".wds",
               _hostile_tar(lambda d: _member(f"{64:09d}.link", link="/etc/passwd")),
               ("shard 1:", "not a regular file"), 1),
    Corruption("wds: .pyd member (checksums forged)", ".wds", _hostile_tar(_pickle_member("pyd")),
               ("shard 1:", "forbidden extension .pyd"), 1),
    Corruption("wds: .pickle member (checksums forged)", ".wds", _hostile_tar(_pickle_member("pickle")),
               ("shard 1:", "forbidden extension .pickle"), 1),
    Corruption("wds: .pth member (checksums forged)", ".wds", _hostile_tar(_pickle_member("pth")),
               ("shard 1:", "forbidden extension .pth"), 1),
]


def _snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in skip]
        for n in filenames:
            out[str(d / n)] = (d / n).stat().st_size
    return out


@pytest.fixture
def damaged(ref, tmp_path, request) -> tuple[Corruption, Path, Path]:
    """(case, a damaged copy of the reference store, scratch dir) for Corruption `request.param`."""
    case: Corruption = request.param
    store = tmp_path / "stores" / ref.paths[case.fmt].name
    shutil.copytree(ref.paths[case.fmt], store)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    case.mutate(store, scratch)
    TALLY["corruptions tried"] += 1
    return case, store, scratch


def _assert_nothing_escaped(tmp_path: Path, store: Path, scratch: Path, before: dict | None = None) -> None:
    assert not list(scratch.glob("PWNED*")), "something was unpickled"
    assert not (store.parent / "escaped.txt").exists() and not (scratch / "absolute.txt").exists()
    if before is not None:
        assert _snapshot(tmp_path, (store, tmp_path / "run")) == before, "a file was written outside the store"


@pytest.mark.parametrize("damaged", CORRUPTIONS, ids=lambda c: c.id, indirect=True)
def test_verify_names_each_corruption(damaged, tmp_path, capsys):
    """Promise 2: `enspipe verify` exits 1 and names the shard, the file (and the member) of
    every corruption; it never decodes a byte it has not checksummed, unpickles nothing and
    writes nothing outside the store."""
    from enspipe.cli import main

    case, store, scratch = damaged
    before = _snapshot(tmp_path, (store, tmp_path / "run"))
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(store)])
    assert exit_.value.code == 1
    cap = capsys.readouterr()
    assert cap.out.strip() == f"BAD {store}"
    lines = cap.err.splitlines()
    assert all(ln.startswith(f"{store}: ") for ln in lines) and "Traceback" not in cap.err
    assert any(all(w in ln for w in case.expect) for ln in lines), (case.expect, lines)
    _assert_nothing_escaped(tmp_path, store, scratch, before)
    TALLY["corruptions named by verify"] += 1




@pytest.mark.parametrize("damaged", CORRUPTIONS, ids=lambda c: c.id, indirect=True)
def test_trainer_refuses_a_corrupt_store_before_starting(damaged, tmp_path):
    """Promise 2: `enspipe train --shards DAMAGED` refuses to start -- an error naming the
    shard before anything is written to the run directory; nothing unpickled or escaped."""
    from enspipe.train import TrainConfig, train

    case, store, scratch = damaged
    before = _snapshot(tmp_path, (store, tmp_path / "run"))
    run = tmp_path / "run"
    cfg = TrainConfig(model="D", dataset="digits", limit=LIMIT, mode="ens-adv", attack="step_ll",
                      shards=(str(store),), epochs=1, batch_size=BATCH, device="cpu")
    with pytest.raises(EnspipeError) as err:
        train(cfg, run)
    names = (f"shard {case.shard}", f"shard-{case.shard:06d}.tar", f"/c/{case.shard}/")
    assert any(n in str(err.value) for n in names), err.value
    assert not run.exists() or not any(run.iterdir()), sorted(run.rglob("*"))
    _assert_nothing_escaped(tmp_path, store, scratch, before)
    TALLY["corruptions refused by the trainer"] += 1


@full_sweep
@pytest.mark.parametrize("fmt", [".zarr", ".wds"])
def test_random_corruption_is_always_caught_by_verify(ref, tmp_path, fmt):
    """Promise 2 (full sweep, fuzz): 60 seeded random damages -- flipped bits, truncations,
    appended bytes, zeroed ranges, deletions -- of the files a shard's data lives in; `verify`
    flags every one, naming the damaged shard, and never raises."""
    rng = np.random.default_rng(11 if fmt == ".zarr" else 12)
    manifest = read_manifest(ref.paths[fmt])
    for trial in range(60):
        store = tmp_path / f"t{trial}" / ref.paths[fmt].name
        shutil.copytree(ref.paths[fmt], store)
        s = int(rng.integers(NUM_SHARDS))
        rel = sorted(manifest["shards"][f"{s:06d}"]["files"])[int(rng.integers(len(manifest["shards"][f"{s:06d}"]["files"])))]
        path = store / rel
        size = path.stat().st_size
        how = ["flip", "truncate", "append", "zero", "delete"][int(rng.integers(5))]
        if how == "flip":
            raw = bytearray(path.read_bytes())
            raw[int(rng.integers(size))] ^= 1 << int(rng.integers(8))
            path.write_bytes(bytes(raw))
        elif how == "truncate":
            path.write_bytes(path.read_bytes()[: int(rng.integers(size))])
        elif how == "append":
            path.write_bytes(path.read_bytes() + rng.bytes(int(rng.integers(1, 100))))
        elif how == "zero":
            raw = bytearray(path.read_bytes())
            a = int(rng.integers(size))
            b = min(size, a + int(rng.integers(1, 64)))
            if any(raw[a:b]):
                raw[a:b] = bytes(b - a)
            else:  # already zeros: make it a change
                raw[a] = 0xFF
            path.write_bytes(bytes(raw))
        else:
            path.unlink()
        report = verify_store(store)
        assert not report.ok, (trial, how, rel)
        assert any(p.startswith(f"shard {s}:") for p in report.problems), (trial, how, rel, report)
        shutil.rmtree(store.parent)
        TALLY["corruptions tried"] += 1
        TALLY["corruptions named by verify"] += 1


def test_ls_lists_good_and_damaged_stores(ref, tmp_path):
    """Promise 2/3: `enspipe ls` lists a ROOT holding a complete store and a damaged one,
    flagging the damaged one, without a traceback."""
    root = tmp_path / "root"
    shutil.copytree(ref.root, root)
    bad = root / "x" / "y" / "broken.zarr"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text("{ not json")
    res = enspipe("ls", root)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    lines = res.stdout.splitlines()
    (broken,) = [ln for ln in lines if str(bad) in ln]
    assert "BROKEN" in broken
    for store in ref.paths.values():
        store = root / store.relative_to(ref.root)
        (line,) = [ln for ln in lines if ln.rstrip().endswith(str(store))]
        assert "complete" in line


# --------------------------------------------------------------------------- 3. hostile input

class _Scene:
    """Files the bad invocations point at (built once per module)."""

    def __init__(self, base: Path, public: Path, static: Path, ref: Ref, ref_run: RefRun) -> None:
        self.base, self.public, self.static, self.ref, self.ref_run = base, public, static, ref, ref_run
        self.afile = base / "afile.txt"
        self.afile.write_text("not a directory\n")
        self.emptydir = base / "emptydir"
        self.emptydir.mkdir()
        self.marker = base / "PWNED"
        # Checkpoints that are really pickles whose loading would create self.marker.
        self.evil_pt = base / "evil.pt"
        torch.save({"net.0.weight": _Pwn(self.marker)}, self.evil_pt)
        self.evil_st = base / "evil.safetensors"
        self.evil_st.write_bytes(pickle.dumps(_Pwn(self.marker)))
        self.evil_run = base / "evil_run"
        shutil.copytree(static, self.evil_run)
        (self.evil_run / "model.safetensors").write_bytes(pickle.dumps(_Pwn(self.marker)))
        # Run dirs of the reference run whose last checkpoint is a pickle / truncated.
        self.resume_pickle = base / "resume_pickle"
        shutil.copytree(ref_run.path, self.resume_pickle)
        last = sorted((self.resume_pickle / "checkpoints").glob("*.pt"))[-1]
        torch.save({"model": _Pwn(self.marker)}, last)
        self.resume_truncated = base / "resume_truncated"
        shutil.copytree(ref_run.path, self.resume_truncated)
        last = sorted((self.resume_truncated / "checkpoints").glob("*.pt"))[-1]
        last.write_bytes(last.read_bytes()[:1000])
        # Datasets: RGB images (wrong geometry for a 1x28x28 model), no images, empty and mixed wds.
        from PIL import Image

        self.rgb = base / "rgb"
        for c in ("a", "b"):
            (self.rgb / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (28, 28), (40 * i, 80, 120)).save(self.rgb / c / f"{i}.png")
        self.noimages = base / "noimages"
        (self.noimages / "a").mkdir(parents=True)
        (self.noimages / "a" / "readme.txt").write_text("no images here")
        self.wds_empty = base / "empty.tar"
        _write_tar(self.wds_empty, [])
        self.wds_mixed = base / "mixed.tar"
        members = []
        for i in range(70):
            size = 20 if i == 66 else 28
            buf = io.BytesIO()
            Image.new("L", (size, size), i).save(buf, format="PNG")
            members += [_member(f"s{i:04d}.png", buf.getvalue()), _member(f"s{i:04d}.cls", b"%d" % (i % 10))]
        _write_tar(self.wds_mixed, members)
        # Stores: garbage manifest; (public) unreadable manifest.
        self.garbage_store = base / "garbage.zarr"
        self.garbage_store.mkdir()
        (self.garbage_store / "manifest.json").write_bytes(b"\x00\xffnot json")
        self.unreadable_store = public / "unreadable.zarr"
        shutil.copytree(ref.paths[".zarr"], self.unreadable_store)
        (self.unreadable_store / "manifest.json").chmod(0)
        self.unreadable_run = public / "unreadable_run"
        self.unreadable_run.mkdir()
        (self.unreadable_run / "config.json").write_text("{}")
        (self.unreadable_run / "config.json").chmod(0)
        # Job specs.
        self.jobs = base / "jobs"
        self.jobs.mkdir()
        spec = '[job]\nname = "x"\n{extra}\n[data]\ndataset = "digits"\n\n[models.a]\narch = "D"\n{model}\n'
        (self.jobs / "loop_a.toml").write_text('[job]\ninclude = ["loop_b.toml"]\n')
        (self.jobs / "loop_b.toml").write_text('[job]\ninclude = ["loop_a.toml"]\n')
        (self.jobs / "unknown_key.toml").write_text(spec.format(extra="", model="warmup = 3"))
        (self.jobs / "bad_syntax.toml").write_text("[job\nname = \n")
        (self.jobs / "bad_eps.toml").write_text(spec.format(extra="", model='eps = "1/0"'))
        (self.jobs / "include_dir.toml").write_text(spec.format(extra='include = ["."]', model=""))
        (self.jobs / "cycle.toml").write_text(
            '[data]\ndataset = "digits"\n[models.a]\narch = "D"\nmode = "ens-adv"\nstores = ["s"]\n'
            '[stores.s]\nmodel = "a"\n')
        self.unreadable_spec = public / "unreadable.toml"
        self.unreadable_spec.write_text(spec.format(extra="", model=""))
        self.unreadable_spec.chmod(0)

    current = "case"  # the bad invocation being built: each gets its own output path

    def out(self) -> Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.current).strip("-")
        return self.base / "out" / slug


@dataclass(frozen=True)
class Bad:
    """A bad invocation: argv (built from the scene), words the error line must contain."""

    id: str
    argv: Callable[[_Scene], list]
    words: tuple[str, ...]
    usage: bool = False          # a click usage error: exit 2 (else 1)
    uid: int | None = None       # run as this user (root reads chmod-000 files)
    out: bool = False            # the command was asked to write s.out(): it must stay unwritten
    marks: tuple = ()


NOBODY = 65534


def _train(s: _Scene, *extra, limit=64, out=None) -> list:
    return ["train", "--model", "D", "--dataset", "digits", "--limit", limit, "--epochs", 1, "--device", "cpu",
            *extra, "--out", out or s.out()]


def _evaluate(s: _Scene, *extra, model=None, out=None) -> list:
    return ["evaluate", "--model", model or s.static, "--dataset", "digits", "--limit", 32, "--device", "cpu",
            *extra, "--out", out or s.out()]


def _pre(s: _Scene, *extra, model=None, limit=64, out=None) -> list:
    return ["precompute", "--model", model or s.static, "--dataset", "digits", "--limit", limit, "--shard-size", 64,
            "--device", "cpu", *extra, "--out", out or s.out()]


BAD = [
    # train
    Bad("train: eps as 1/0", lambda s: _train(s, "--eps", "1/0"), ("--eps",), usage=True, out=True),
    Bad("train: eps nan", lambda s: _train(s, "--eps", "nan"), ("--eps", "nan"), usage=True, out=True),
    Bad("train: eps negative", lambda s: _train(s, "--eps", "-0.1"), ("--eps",), usage=True, out=True),
    Bad("train: epochs not a number", lambda s: _train(s, "--epochs", "many"), ("--epochs",), usage=True, out=True),
    Bad("train: negative batch size", lambda s: _train(s, "--batch-size", "-5"), ("--batch-size",), out=True),
    Bad("train: lr nan", lambda s: _train(s, "--lr", "nan"), ("--lr",), out=True),
    Bad("train: adv-fraction nan", lambda s: _train(s, "--mode", "adv", "--adv-fraction", "nan"),
        ("--adv-fraction",), out=True),
    Bad("train: limit 0", lambda s: _train(s, limit=0), ("--limit",), usage=True, out=True),
    Bad("train: --out is a file", lambda s: _train(s, out=s.afile), ("afile.txt", "is a file"), usage=True),
    Bad("train: weights that are a pickle (.pt)", lambda s: _train(s, "--weights", s.evil_pt), ("evil.pt",), out=True),
    Bad("train: a pickle named .safetensors", lambda s: _train(s, "--weights", s.evil_st),
        ("evil.safetensors", "safetensors"), out=True),
    Bad("train: dataset path is a file", lambda s: _train(s, "--dataset", f"imagefolder:{s.afile}"),
        ("not a directory",), out=True),
    Bad("train: empty dataset (no images)", lambda s: _train(s, "--dataset", f"imagefolder:{s.noimages}"),
        ("no images",), out=True),
    Bad("train: empty dataset (wds tar without samples)", lambda s: _train(s, "--dataset", f"wds:{s.wds_empty}"),
        ("no samples",), out=True),
    Bad("train: images of the wrong geometry (wds)", lambda s: _train(s, "--dataset", f"wds:{s.wds_mixed}", limit=70),
        ("s0066", "20x20"), out=True),
    Bad("train: --shards is a file", lambda s: _train(s, "--mode", "ens-adv", "--shards", s.afile),
        ("not an enspipe store",), out=True),
    Bad("train: --device cuda without a GPU", lambda s: _train(s, "--device", "cuda"), ("CUDA",), out=True),
    Bad("train: --resume from a checkpoint that is a pickle",
        lambda s: train_args(s.ref, s.resume_pickle, "--resume"), ("checkpoint",)),
    Bad("train: --resume from a truncated checkpoint",
        lambda s: train_args(s.ref, s.resume_truncated, "--resume"), ("checkpoint",)),
    Bad("train: --resume with an unreadable config.json",
        lambda s: _train(s, "--resume", out=s.unreadable_run), ("Permission denied", "config.json"), uid=NOBODY),
    # evaluate
    Bad("evaluate: unknown attack", lambda s: _evaluate(s, "--attacks", "fgsm,bogus"), ("bogus",), out=True),
    Bad("evaluate: eps 0", lambda s: _evaluate(s, "--eps", "0"), ("--eps",), usage=True, out=True),
    Bad("evaluate: batch size 0", lambda s: _evaluate(s, "--batch-size", "0"), ("--batch-size",), usage=True,
        out=True),
    Bad("evaluate: a model that does not exist", lambda s: _evaluate(s, "--model", s.base / "nope"), ("nope",),
        out=True),
    Bad("evaluate: a run whose weights are a pickle", lambda s: _evaluate(s, model=s.evil_run),
        ("model.safetensors",), out=True),
    Bad("evaluate: --out is a file", lambda s: _evaluate(s, out=s.afile), ("afile.txt",)),
    Bad("evaluate: images of the wrong geometry", lambda s: _evaluate(s, "--dataset", f"imagefolder:{s.rgb}"),
        ("(1, 28, 28)", "(3, 224, 224)"), out=True),
    # precompute
    Bad("precompute: negative shard size", lambda s: _pre(s, "--shard-size", "-1"), ("--shard-size",), usage=True,
        out=True),
    Bad("precompute: batch size 0", lambda s: _pre(s, "--batch-size", "0"), ("--batch-size",), usage=True,
        out=True),
    Bad("precompute: --out is a file", lambda s: _pre(s, out=s.afile), ("afile.txt",), usage=True),
    Bad("precompute: --data-root is a file", lambda s: _pre(s, "--data-root", s.afile), ("afile.txt",), usage=True,
        out=True),
    Bad("precompute: empty --attack", lambda s: _pre(s, "--attack", ""), ("--attack",), out=True),
    Bad("precompute: unknown format", lambda s: _pre(s, "--format", "hdf5"), ("--format",), usage=True,
        out=True),
    Bad("precompute: --workers not a number", lambda s: _pre(s, "--workers", "two"), ("--workers",), usage=True,
        out=True),
    Bad("precompute: unknown split", lambda s: _pre(s, "--split", "bogus"), ("bogus",), out=True),
    Bad("precompute: images of the wrong geometry", lambda s: _pre(s, "--dataset", f"imagefolder:{s.rgb}"),
        ("1x28x28", "3x"), out=True),
    Bad("precompute: weights that are a pickle", lambda s: _pre(s, "--weights", s.evil_pt, model="D"), ("evil.pt",),
        out=True),
    Bad("precompute: a run whose weights are a pickle", lambda s: _pre(s, model=str(s.evil_run)),
        ("model.safetensors",), out=True),
    Bad("precompute: a bare name without weights", lambda s: _pre(s, model="D"), ("--weights",), out=True),
    Bad("precompute: images of the wrong size mid-run (wds)",
        lambda s: _pre(s, "--dataset", f"wds:{s.wds_mixed}", limit=70), ("s0066", "20x20"), out=True),
    # verify
    Bad("verify: a store that does not exist", lambda s: ["verify", s.base / "nope.zarr"], ("does not exist",)),
    Bad("verify: a file", lambda s: ["verify", s.afile], ("not an enspipe store",)),
    Bad("verify: a garbage manifest", lambda s: ["verify", s.garbage_store], ("cannot be read",)),
    Bad("verify: an unreadable manifest", lambda s: ["verify", s.unreadable_store], ("Permission denied",), uid=NOBODY),
    Bad("verify: negative --recompute", lambda s: ["verify", s.ref.paths[".zarr"], "--recompute", "-1"],
        ("--recompute",), usage=True),
    # ls
    Bad("ls: a ROOT that does not exist", lambda s: ["ls", s.base / "nope"], ("does not exist",), usage=True),
    Bad("ls: a ROOT that is a file", lambda s: ["ls", s.afile], ("is a file",), usage=True),
    # run
    Bad("run: a spec that does not exist", lambda s: ["run", s.jobs / "nope.toml", "--dry-run"], ("does not exist",)),
    Bad("run: an include loop", lambda s: ["run", s.jobs / "loop_a.toml", "--dry-run"], ("include loop",)),
    Bad("run: an unknown key", lambda s: ["run", s.jobs / "unknown_key.toml", "--dry-run"], ("unknown key 'warmup'",)),
    Bad("run: invalid TOML", lambda s: ["run", s.jobs / "bad_syntax.toml", "--dry-run"], ("bad_syntax.toml",)),
    Bad("run: eps 1/0 in a spec", lambda s: ["run", s.jobs / "bad_eps.toml", "--dry-run"], ("eps",)),
    Bad("run: an include that is a directory", lambda s: ["run", s.jobs / "include_dir.toml", "--dry-run"],
        ("include_dir.toml",)),
    Bad("run: a dependency cycle", lambda s: ["run", s.jobs / "cycle.toml", "--dry-run"], ("cycle",)),
    Bad("run: an unreadable spec", lambda s: ["run", s.unreadable_spec, "--dry-run"], ("is not readable",),
        usage=True, uid=NOBODY),
    # diagnose
    Bad("diagnose: limit 0", lambda s: ["diagnose", "--model", s.static, "--limit", "0", "--out", s.out()],
        ("--limit",), usage=True, out=True),
    Bad("diagnose: eps nan", lambda s: ["diagnose", "--model", s.static, "--eps", "nan", "--out", s.out()],
        ("--eps",), usage=True, out=True),
    Bad("diagnose: a model that does not exist",
        lambda s: ["diagnose", "--model", s.base / "nope", "--device", "cpu", "--out", s.out()], ("nope",),
        out=True),
    # report
    Bad("report: a directory that does not exist", lambda s: ["report", s.base / "nope"], ("does not exist",),
        usage=True),
    Bad("report: a file", lambda s: ["report", s.afile], ("is a file",), usage=True),
]


def _half_written(path: Path) -> list[str]:
    """Artefacts a failed command must not leave: complete stores, models, checkpoints, results."""
    if not path.exists():
        return []
    bad = []
    for p in path.rglob("*"):
        if p.name in ("model.safetensors", "model.json", "results.json", "diagnostics.json", "report.md",
                      "job.json") or p.suffix in (".pt", ".png"):
            bad.append(str(p))
    for store in list(path.glob("**/*.zarr")) + list(path.glob("**/*.wds")):
        if (store / "manifest.json").is_file() and read_manifest(store)["complete"]:
            bad.append(f"complete store {store}")
    return bad


@pytest.fixture(scope="module")
def scene(digits_static, ref, ref_run, tmp_path_factory):
    public = Path(tempfile.mkdtemp(prefix="enspipe-rel-public-"))
    public.chmod(0o755)  # the uid=nobody cases must reach their (unreadable) files
    try:
        yield _Scene(tmp_path_factory.mktemp("scene"), public, digits_static, ref, ref_run)
    finally:
        shutil.rmtree(public, ignore_errors=True)


def _run_cases(cases: list[dict], work: Path, *, fresh: bool, parallel: int = 2) -> list[dict]:
    """Run each bad invocation as its own enspipe process, `parallel` at a time."""
    results: list[dict | None] = [None] * len(cases)
    pending = list(enumerate(cases))
    running: list[tuple[int, object]] = []
    while pending or running:
        while pending and len(running) < parallel:
            i, case = pending.pop(0)
            log = work / f"{'fresh' if fresh else 'forked'}{i}.log"
            running.append((i, spawn(*case["argv"], log=log, cwd=Path(case["cwd"]), uid=case["uid"], fresh=fresh)))
        time.sleep(0.01)
        for item in list(running):
            i, proc = item
            if proc.poll() is not None:  # type: ignore[attr-defined]
                out, err = outputs(proc)  # type: ignore[arg-type]
                results[i] = {"rc": proc.returncode, "stdout": out, "stderr": err}  # type: ignore[attr-defined]
                running.remove(item)
    return results  # type: ignore[return-value]


@pytest.fixture(scope="module")
def bad_results(scene, tmp_path_factory) -> dict[str, list[dict]]:
    """Every bad invocation, run once: forked from one pre-imported interpreter (fast), and in
    the full sweep also as genuine `python -m enspipe` processes."""
    work = tmp_path_factory.mktemp("bad")
    cases = []
    for b in BAD:
        scene.current = b.id
        cases.append({"argv": [str(a) for a in b.argv(scene)], "cwd": str(scene.public if b.uid else scene.base),
                      "uid": b.uid})
    results = {b.id: [r] for b, r in zip(BAD, _run_cases(cases, work, fresh=False))}
    if FULL:
        real = [(b, c) for b, c in zip(BAD, cases) if b.uid is None]
        for (b, _), r in zip(real, _run_cases([c for _, c in real], work, fresh=True)):
            results[b.id].append(r)
    return results


@pytest.mark.parametrize("bad", [pytest.param(b, marks=b.marks, id=b.id) for b in BAD])
def test_bad_invocation_is_one_line_and_writes_nothing(bad, scene, bad_results):
    """Promise 3: a bad invocation exits non-zero (2 for usage errors, else 1) with one clear
    line on stderr naming the problem, no traceback, no output on stdout, nothing half-written,
    and never executes a pickle."""
    for res in bad_results[bad.id]:
        TALLY["bad inputs tried"] += 1
        assert res["rc"] == (2 if bad.usage else 1), (res["rc"], res["stderr"])
        if bad.id.startswith("verify:") and not bad.usage:  # verify reports: `STORE: problem`, BAD on stdout
            assert res["stdout"].startswith("BAD ") and "Traceback" not in res["stderr"], res
            (line,) = res["stderr"].strip().splitlines()
        else:
            line = error_line(res["stderr"])
            assert res["stdout"] == "", res["stdout"]
        for word in bad.words:
            assert word in line, (word, line)
        assert not scene.marker.exists(), "a pickle was executed"
        if bad.out:
            scene.current = bad.id
            assert not _half_written(scene.out()), _half_written(scene.out())
        TALLY["bad inputs rejected cleanly"] += 1


def test_the_package_never_loads_code_from_files():
    """Promise 3: every torch.load in the package passes weights_only=True; nothing calls
    pickle.load(s)/np.load(allow_pickle=True)/eval/exec on data, except the CIFAR unpickler
    whose find_class allows only numpy's array rebuilders (tested in test_data.py)."""
    import ast

    problems = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}"
            if name.endswith("torch.load") and kw.get("weights_only") != "True":
                problems.append(where)
            if name in ("pickle.load", "pickle.loads", "eval", "exec", "marshal.loads", "yaml.load"):
                problems.append(where)
            if name.endswith("np.load") and kw.get("allow_pickle", "False") != "False":
                problems.append(where)
    assert not problems, problems


# --------------------------------------------------------------------------- 4. concurrent users of one ROOT

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


# --------------------------------------------------------------------------- 5. workers dying

@pytest.fixture(scope="module")
def dask_worker_killed(digits_static, ref, tmp_path_factory):
    """`precompute --workers 2` with one dask worker process SIGKILLed in the middle of a shard.
    Returns (the finished process's stdout, stderr, records written at the kill)."""
    import psutil

    work = tmp_path_factory.mktemp("dask")
    root = work / "root"
    proc = spawn(*precompute_args(digits_static, root, "both", "--workers", 2), log=work / "dask.log")
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
    """Promise 3/5: a successful `precompute --workers` run prints no traceback, even after a
    worker died."""
    rc, out, err, at_kill = dask_worker_killed
    assert rc == 0 and "Traceback" not in err and "CRITICAL" not in err, err


# --------------------------------------------------------------------------- 6. disk full

def _store_usage(path: Path) -> int:
    """Bytes a store occupies on a page-granular filesystem like tmpfs (4 KiB per file page)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


def _tmpfs(path: Path, size: int, remount: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"remount,size={size}" if remount else f"size={size}"
    cmd = ["mount", "-o", opts, str(path)] if remount else ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def can_mount_tmpfs(tmp_path_factory) -> bool:
    probe = tmp_path_factory.mktemp("probe") / "m"
    if shutil.which("mount") is None or not _tmpfs(probe, 65536):
        return False
    _umount(probe)
    return True


def _disk_full_test(static: Path, ref: Ref, work: Path, how: str, fmt: str, fraction: float) -> None:
    mnt = work / "disk"
    root = mnt / "root"
    usage = _store_usage(ref.paths[fmt])
    args = precompute_args(static, root, fmt.lstrip("."))
    if how == "tmpfs":
        assert _tmpfs(mnt, max(65536, int(usage * fraction) // 4096 * 4096))
        faults: tuple[str, ...] = ()
    else:
        mnt.mkdir(parents=True)
        budget = int(sum(p.stat().st_size for p in ref.paths[fmt].rglob("*") if p.is_file()) * fraction)
        faults = (f"enospc-after:{budget}:{root}/*",)
    try:
        TALLY["disk-full runs"] += 1
        full = enspipe(*args, faults=faults)
        assert full.returncode == 1, full.stderr
        assert "No space left on device" in error_line(full.stderr)
        assert full.stdout == ""
        (store,) = store_dirs(root) or [None]
        if store is not None:  # nothing looks complete, and no temp file is left holding space
            assert not verify_store(store).ok
            with pytest.raises(StoreError, match="incomplete"):
                open_store(store)
        leftovers = [p for p in root.rglob("*") if p.suffix in (".partial", ".tmp") or ".creating-" in p.name]
        assert not leftovers, leftovers
        # Space is freed: the same command finishes the store.
        if how == "tmpfs":
            assert _tmpfs(mnt, 4 * usage + (1 << 20), remount=True)
        again = enspipe(*args)
        assert again.returncode == 0, again.stderr
        (path,) = map(Path, again.stdout.split())
        assert_same_store(path, ref.paths[fmt], ref.arrays[fmt])
        TALLY["disk-full runs resumed, nothing lost"] += 1
    finally:
        if how == "tmpfs":
            _umount(mnt)


def test_disk_full_fails_clearly_and_the_store_resumes(digits_static, ref, tmp_path, can_mount_tmpfs):
    """Promise 6: precompute into a size-limited tmpfs (else a simulated ENOSPC from the
    writer) fails with one clear line; the store is left incomplete, no temp file holds the
    space, and once space is freed the same command completes it, equal to the reference."""
    _disk_full_test(digits_static, ref, tmp_path, "tmpfs" if can_mount_tmpfs else "enospc", ".zarr", 0.5)


@full_sweep
@pytest.mark.parametrize("fraction", [0.1, 0.35, 0.6, 0.9])
@pytest.mark.parametrize("fmt", [".zarr", ".wds"])
@pytest.mark.parametrize("how", ["tmpfs", "enospc"])
def test_disk_full_sweep(digits_static, ref, tmp_path, can_mount_tmpfs, how, fmt, fraction):
    """Promise 6 (full sweep): the disk fills at several points of each format's store, on a
    real tmpfs and through a simulated ENOSPC; each time a clear error, then a full resume."""
    if how == "tmpfs" and not can_mount_tmpfs:
        pytest.skip("cannot mount a tmpfs here")
    _disk_full_test(digits_static, ref, tmp_path, how, fmt, fraction)


def test_train_on_a_full_disk_fails_clearly_and_resumes(ref, ref_run, tmp_path, can_mount_tmpfs):
    """Promise 6 (and 3): training whose checkpoint write hits a full disk fails with one clear
    line and leaves no temp file; with space freed, --resume finishes the run."""
    if not can_mount_tmpfs:
        pytest.skip("cannot mount a tmpfs here")
    mnt = tmp_path / "disk"
    out = mnt / "run"
    args = [*train_args(ref, out)[:8], 1, *train_args(ref, out)[9:]]  # --epochs 1
    assert _tmpfs(mnt, 40 << 10)  # room for config.json and metrics.jsonl, not for a checkpoint
    try:
        full = enspipe(*args)
        assert full.returncode == 1
        error_line(full.stderr)
        assert not [p for p in out.rglob("*") if p.suffix == ".tmp"]
        assert _tmpfs(mnt, 16 << 20, remount=True)
        again = enspipe(*args, "--resume")
        assert again.returncode == 0, again.stderr
        want = torch.load(ref_run.path / "checkpoints" / "epoch-0000.pt", map_location="cpu", weights_only=True)
        got = torch.load(out / "checkpoints" / "epoch-0000.pt", map_location="cpu", weights_only=True)
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    finally:
        _umount(mnt)
