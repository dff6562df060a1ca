"""Issue 12 item 10, the integrity threat model (RELIABILITY.md): the checksums catch rot and
accidents, the dataset keys bind every zarr shard to its samples, and a store someone rewrote
(records re-hashed) is `enspipe verify --recompute K`'s to catch."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from .forge import forge_checksums, zarr_shard_copied_over
from .processes import enspipe, error_line
from .reference import LIMIT, SHARD, Ref
from .sweep import TALLY

def _shard_copied_over(ref: Ref, dest: Path, *, keys: bool) -> Path:
    """A copy of the reference zarr store whose shard 0 files were copied over shard 1's, the
    keys file too when `keys` (its shard fields edited to pass for shard 1), and shard 1's
    records re-hashed: valid data of the wrong samples, every checksum matching."""
    store = dest / ref.paths[".zarr"].name
    shutil.copytree(ref.paths[".zarr"], store)
    zarr_shard_copied_over(store, 0, 1, keys=keys)
    forge_checksums(store, 1)
    return store


def _recompute_flags(store: Path) -> list[int]:
    """The samples `enspipe verify --recompute 64` names (it exits 1 when it names any)."""
    r = enspipe("verify", store, "--recompute", 64, "--device", "cpu")
    assert r.returncode == 1 and r.stdout.strip() == f"BAD {store}", (r.stdout, r.stderr)
    return sorted({int(m) for m in re.findall(r": sample (\d+)", r.stderr)})


def test_a_zarr_shard_copied_over_another_with_its_keys_is_refused_by_train(ref, tmp_path):
    """Shard 0's files (keys included) copied over shard 1's, records re-hashed: `enspipe
    verify` passes -- the checksums sit beside the data -- but `enspipe train` compares the
    store's keys with the dataset's, refuses in one line naming shard 1 and the first sample,
    and writes nothing into its run directory; `verify --recompute 64` names only samples of
    shard 1."""
    store = _shard_copied_over(ref, tmp_path, keys=True)
    v = enspipe("verify", store)
    assert v.returncode == 0 and v.stdout.startswith(f"OK {store}"), v.stderr
    run = tmp_path / "run"
    r = enspipe("train", "--model", "D", "--dataset", "digits", "--limit", LIMIT, "--mode", "ens-adv", "--shards",
                store, "--epochs", 1, "--device", "cpu", "--out", run)
    assert r.returncode == 1
    line = error_line(r.stderr)
    assert f"shard 1 of store {store} holds other samples than the dataset: sample {SHARD} is " \
           "'digits-train-000000' in the store but 'digits-train-000064' in the data" in line, line
    assert not run.exists() or not any(run.iterdir())
    flagged = _recompute_flags(store)
    assert flagged and all(SHARD <= i < 2 * SHARD for i in flagged), flagged
    TALLY["tampered stores refused by the trainer"] += 1


def test_a_zarr_shards_arrays_copied_over_another_are_verify_recomputes_to_catch(ref, tmp_path):
    """Only shard 0's arrays copied over shard 1's (its keys file left alone), records
    re-hashed: every checksum and every key matches, which is the limit of what checksums
    beside the data can tell (RELIABILITY.md's threat model); `verify --recompute 64`
    recomputes the directions and names only samples of shard 1."""
    store = _shard_copied_over(ref, tmp_path, keys=False)
    v = enspipe("verify", store)
    assert v.returncode == 0, v.stderr
    flagged = _recompute_flags(store)
    assert flagged and all(SHARD <= i < 2 * SHARD for i in flagged), flagged
    TALLY["tampered stores named by verify --recompute"] += 1
