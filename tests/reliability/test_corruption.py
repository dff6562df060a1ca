"""Promise 2, corruption is found, named and refused: damaged and hostile stores (some with
their checksums forged): `verify` names the shard, file and member of each; the trainer
refuses to start; nothing is unpickled and nothing is written outside the store."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from enspipe.util.errors import EnspipeError
from enspipe.stores import verify_store
from enspipe.stores.manifest import read_manifest

from .forge import (flip, hostile_tar, keys_swapped, member, pickle_member, truncate, truncated_member_forged,
                    unwrite_shard_but_claim_complete)
from .processes import enspipe
from .reference import BATCH, LIMIT, NUM_SHARDS
from .sweep import TALLY, full_sweep


@dataclass(frozen=True)
class Corruption:
    """A named damage to a copy of a reference store, and what `verify` must say of it."""

    id: str
    fmt: str                                    # ".zarr" | ".wds"
    mutate: Callable[[Path, Path], None]        # (store copy, scratch dir outside the store)
    expect: tuple[str, ...]                     # words of the `verify` line that names it
    shard: int


CORRUPTIONS = [
    Corruption("zarr: truncated shard file", ".zarr", lambda s, _: truncate(s / "direction/c/2/0/0/0"),
               ("shard 2:", "direction/c/2/0/0/0", "truncated"), 2),
    Corruption("zarr: a flipped byte in a chunk", ".zarr", lambda s, _: flip(s / "direction/c/3/0/0/0"),
               ("shard 3:", "checksum mismatch", "direction/c/3/0/0/0"), 3),
    Corruption("zarr: a deleted shard file", ".zarr", lambda s, _: (s / "logits/c/4/0").unlink(),
               ("shard 4:", "missing file logits/c/4/0"), 4),
    Corruption("zarr: keys file edited", ".zarr", keys_swapped, ("shard 1:", "checksum mismatch", "keys/000001.json"),
               1),
    Corruption("zarr: manifest edited to claim completion", ".zarr",
               lambda s, _: unwrite_shard_but_claim_complete(s, 5),
               ("shard 5:", "claims the store is complete"), 5),
    Corruption("wds: truncated tar", ".wds", lambda s, _: truncate(s / "shard-000002.tar"),
               ("shard 2:", "shard-000002.tar", "truncated"), 2),
    Corruption("wds: a flipped byte", ".wds", lambda s, _: flip(s / "shard-000003.tar"),
               ("shard 3:", "checksum mismatch", "shard-000003.tar"), 3),
    Corruption("wds: a deleted tar", ".wds", lambda s, _: (s / "shard-000004.tar").unlink(),
               ("shard 4:", "missing file shard-000004.tar"), 4),
    Corruption("wds: manifest edited to claim completion", ".wds",
               lambda s, _: unwrite_shard_but_claim_complete(s, 5),
               ("shard 5:", "claims the store is complete"), 5),
    Corruption("wds: a truncated member (checksums forged)", ".wds", truncated_member_forged,
               ("shard 2:", "shard-000002.tar", "cannot be read"), 2),
    Corruption("wds: member name escaping with ../ (checksums forged)", ".wds",
               hostile_tar(lambda d: member("../escaped.txt", b"written outside the store")),
               ("shard 1:", "'../escaped.txt'", "path-like"), 1),
    Corruption("wds: absolute member name (checksums forged)", ".wds",
               hostile_tar(lambda d: member(str(d / "absolute.txt"), b"x")),
               ("shard 1:", "path-like"), 1),
    Corruption("wds: symlink member (checksums forged)", ".wds",
               hostile_tar(lambda d: member(f"{64:09d}.link", link="/etc/passwd")),
               ("shard 1:", "not a regular file"), 1),
    Corruption("wds: .pyd member (checksums forged)", ".wds", hostile_tar(pickle_member("pyd")),
               ("shard 1:", "forbidden extension .pyd"), 1),
    Corruption("wds: .pickle member (checksums forged)", ".wds", hostile_tar(pickle_member("pickle")),
               ("shard 1:", "forbidden extension .pickle"), 1),
    Corruption("wds: .pth member (checksums forged)", ".wds", hostile_tar(pickle_member("pth")),
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
