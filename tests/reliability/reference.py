"""The workload every reliability test runs, and its uninterrupted reference.

512 digits, shards (and batches) of 64: 8 shards per store. The reference is a
`precompute --format both` of the static model D and an ens-adv training run streaming
both its stores, each run once, uninterrupted, in a subprocess (conftest.py's `ref` and
`ref_run`); a killed, damaged or concurrent run is judged by equality with them.
"""
from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from enspipe.util.errors import StoreError
from enspipe.stores import open_store, verify_store
from enspipe.stores.manifest import read_manifest

from .processes import outputs, spawn

LIMIT, SHARD, BATCH, EPOCHS, SEED = 512, 64, 64, 4, 5
NUM_SHARDS = LIMIT // SHARD


# --- Commands ----------------------------------------------------------------------------------

def precompute_args(static: Path, root: Path, fmt: str = "both", *extra) -> list:
    return ["precompute", "--model", static, "--dataset", "digits", "--limit", LIMIT, "--shard-size", SHARD,
            "--batch-size", BATCH, "--format", fmt, "--device", "cpu", "--out", root, *extra]


def train_args(ref: Ref, out: Path, *extra) -> list:
    """ens-adv training of D streaming both reference stores (zarr and wds)."""
    return ["train", "--model", "D", "--dataset", "digits", "--limit", LIMIT, "--epochs", EPOCHS,
            "--batch-size", BATCH, "--mode", "ens-adv", "--attack", "step_ll", "--shards", ref.paths[".zarr"],
            "--shards", ref.paths[".wds"], "--seed", SEED, "--device", "cpu", "--log-every", 4,
            "--keep-checkpoints", EPOCHS, "--out", out, *extra]  # every epoch's checkpoint: the oracles compare them


def train_rerun(ref: Ref, out: Path) -> list:
    """The first attempt is the plain command; every re-run adds --resume, as a requeue loop
    would, whatever the killed attempt left (even an --out with no config.json yet)."""
    return train_args(ref, out, *(["--resume"] if out.exists() else []))


# --- The reference store and run ---------------------------------------------------------------

@dataclass
class Ref:
    """The uninterrupted reference precompute (both formats) and how long its phases took."""

    root: Path
    paths: dict[str, Path]           # ".zarr" / ".wds" -> store
    arrays: dict[str, dict]
    work: float                      # seconds from "N shard(s) to compute" until both stores were complete


@dataclass
class RefRun:
    """The uninterrupted reference training run and how long its epochs took."""

    path: Path
    weights: dict[str, torch.Tensor]
    work: float                      # seconds from config.json appearing until the last checkpoint


def run_timed(args, started: Callable[[Path, int], bool], done: Callable[[], bool],
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


def make_ref(static: Path, root: Path) -> Ref:
    """The reference: `enspipe precompute --format both` of `static` into ROOT, uninterrupted."""
    def done() -> bool:
        stores = store_dirs(root)
        return len(stores) == 2 and all(read_manifest(p)["complete"] for p in stores)

    proc, work = run_timed(precompute_args(static, root), precompute_started, done, root.parent / "ref.log")
    out, err = outputs(proc)
    assert proc.returncode == 0, err
    paths = {Path(p).suffix: Path(p) for p in out.split()}
    assert set(paths) == {".zarr", ".wds"}
    return Ref(root, paths, {k: store_arrays(p) for k, p in paths.items()}, work)


def make_ref_run(ref: Ref, out: Path) -> RefRun:
    """The reference training run into OUT, uninterrupted."""
    last = out / "checkpoints" / f"epoch-{EPOCHS - 1:04d}.pt"
    proc, work = run_timed(train_args(ref, out), train_started(out), last.exists, out.parent / "train.log")
    assert proc.returncode == 0, outputs(proc)[1]
    return RefRun(out, final_weights(out), work)


# --- Judging a store or a run by the reference ---------------------------------------------------

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


def assert_nothing_falsely_complete(root: Path, ref: Ref) -> int:
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


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """A run's model.safetensors, loaded."""
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def assert_same_run(got: Path, want: RefRun) -> None:
    """Equal final weights (bitwise, CPU), model.json describing those weights, and the same
    last checkpoint."""
    from enspipe.models import load_model, weights_sha256

    w = final_weights(got)
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
