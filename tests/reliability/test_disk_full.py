"""Promise 6, disk full: precompute (and train) into a full disk fail with one clear line,
leave nothing that looks complete and no temp file holding the space, and once space is
freed the same command completes, equal to the reference."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from enspipe.util.errors import StoreError
from enspipe.stores import open_store, verify_store

from . import disk
from .disk import mount_tmpfs, store_usage, umount
from .processes import enspipe, error_line
from .reference import Ref, assert_same_store, precompute_args, store_dirs, train_args
from .sweep import TALLY, full_sweep


@pytest.fixture(scope="module")
def can_mount_tmpfs(tmp_path_factory) -> bool:
    """Whether the real-tmpfs cases can run here (else they use a simulated ENOSPC, or skip)."""
    return disk.can_mount_tmpfs(tmp_path_factory.mktemp("probe") / "m")


def _disk_full_test(static: Path, ref: Ref, work: Path, how: str, fmt: str, fraction: float) -> None:
    mnt = work / "disk"
    root = mnt / "root"
    usage = store_usage(ref.paths[fmt])
    args = precompute_args(static, root, fmt.lstrip("."))
    if how == "tmpfs":
        assert mount_tmpfs(mnt, max(65536, int(usage * fraction) // 4096 * 4096))
        faults: tuple[str, ...] = ()
    else:
        mnt.mkdir(parents=True)
        budget = int(sum(p.stat().st_size for p in ref.paths[fmt].rglob("*") if p.is_file()) * fraction)
        faults = (f"enospc-after:{budget}:{root}/*",)
    try:
        TALLY["disk-full runs"] += 1
        full = enspipe(*args, faults=faults)
        assert full.returncode == 1, full.stderr
        line = error_line(full.stderr)
        assert "No space left on device" in line
        assert f": {root}/" in line, line  # names the file (or store and shard) it could not write
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
            assert mount_tmpfs(mnt, 4 * usage + (1 << 20), remount=True)
        again = enspipe(*args)
        assert again.returncode == 0, again.stderr
        (path,) = map(Path, again.stdout.split())
        assert_same_store(path, ref.paths[fmt], ref.arrays[fmt])
        TALLY["disk-full runs resumed, nothing lost"] += 1
    finally:
        if how == "tmpfs":
            umount(mnt)


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
    assert mount_tmpfs(mnt, 40 << 10)  # room for config.json and metrics.jsonl, not for a checkpoint
    try:
        full = enspipe(*args)
        assert full.returncode == 1
        error_line(full.stderr)
        assert not [p for p in out.rglob("*") if p.suffix == ".tmp"]
        assert mount_tmpfs(mnt, 16 << 20, remount=True)
        again = enspipe(*args, "--resume")
        assert again.returncode == 0, again.stderr
        want = torch.load(ref_run.path / "checkpoints" / "epoch-0000.pt", map_location="cpu", weights_only=True)
        got = torch.load(out / "checkpoints" / "epoch-0000.pt", map_location="cpu", weights_only=True)
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    finally:
        umount(mnt)
