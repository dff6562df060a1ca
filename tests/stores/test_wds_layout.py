"""wds layout v2: the direction packing round-trips exactly, tars are what tarfile would write,
and a store written in layout v1 by the code before v2 is still read, verified and reused."""
from __future__ import annotations

import gzip
import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from enspipe.stores import open_store, verify_store
from enspipe.stores.wds.store import (DIRECTION, DIRECTION_V1, decode_direction, decode_directions, encode_direction,
                                      write_tar)
from cli_runner import run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LEGACY_WDS_ROOT = FIXTURES / "legacy_wds"


def _maps(rng: np.random.Generator, shape: tuple[int, ...], zeros: float) -> np.ndarray:
    d = rng.choice(np.array([-1, 1], np.int8), size=shape)
    d[rng.random(shape) < zeros] = 0
    return d


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 5, 7), (3, 224, 224), (2, 1, 1)])
@pytest.mark.parametrize("zeros", [0.0, 0.02, 1.0])
def test_direction_packing_round_trips_exactly(shape, zeros):
    rng = np.random.default_rng(sum(shape))
    maps = _maps(rng, (3, *shape), zeros)
    payloads = [encode_direction(d) for d in maps]
    np.testing.assert_array_equal(decode_directions(payloads, shape), maps)
    for d, p in zip(maps, payloads):
        np.testing.assert_array_equal(decode_direction(p, shape), d)
        m = -(-d.size // 8)
        # The documented payload: packed signs, then packed zeros only when the map has one.
        raw = gzip.decompress(p)
        assert len(raw) == (2 * m if (d == 0).any() else m)
        assert raw[:m] == np.packbits(d.reshape(-1) > 0).tobytes()
    assert encode_direction(maps[0]) == payloads[0]  # deterministic bytes


def test_a_random_sign_map_costs_about_one_bit_per_element():
    d = _maps(np.random.default_rng(0), (3, 224, 224), 0.0)
    assert len(encode_direction(d)) * 8 / d.size < 1.01


def test_a_damaged_payload_is_refused():
    d = _maps(np.random.default_rng(1), (1, 28, 28), 0.0)
    short = gzip.compress(gzip.decompress(encode_direction(d))[:-1], mtime=0)
    with pytest.raises(ValueError, match="bytes, expected"):
        decode_direction(short, (1, 28, 28))


def test_tar_writer_matches_tarfile_byte_for_byte(tmp_path):
    members = [(f"{i:09d}.{ext}", bytes(range(i % 256)) * (i % 5 + 1)) for i in range(40)
               for ext in ("idx", "src.jpeg", DIRECTION)]
    write_tar(tmp_path / "a.tar", members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
            tf.addfile(info, io.BytesIO(data))
    assert (tmp_path / "a.tar").read_bytes() == buf.getvalue()


# --- A store written in layout v1 -------------------------------------------------------------------

@pytest.fixture()
def legacy_wds(tmp_path) -> Path:
    root = tmp_path / "stores"
    shutil.copytree(LEGACY_WDS_ROOT, root)
    (path,) = root.glob("*/*/*.wds")
    return path


def test_a_v1_store_is_still_read_and_verified(legacy_wds):
    sys.path.insert(0, str(FIXTURES))
    try:
        from legacy import deterministic_d
    finally:
        sys.path.pop(0)
    import torch

    from enspipe import attacks
    from enspipe.data import create_dataset

    with tarfile.open(legacy_wds / "shard-000000.tar") as tf:
        exts = {m.name.partition(".")[2] for m in tf}
    assert DIRECTION_V1 in exts and "png" in exts and DIRECTION not in exts  # really the old layout
    r = open_store(legacy_wds)
    got = r.read(0, len(r))
    ds = create_dataset("digits", limit=16)
    x = ds.images(slice(0, 16))
    want = torch.cat([attacks.direction(deterministic_d(), x[b:b + 8], attack="step_ll")[0] for b in (0, 8)])
    np.testing.assert_array_equal(got["direction"], want.numpy())  # the same directions as computed today
    np.testing.assert_array_equal(r.read_images(0, 16), ds.images_uint8(slice(0, 16)))
    assert [ext for ext, _ in r.read_image_files(0, 16)] == ["png"] * 16
    report = verify_store(legacy_wds)
    assert report.ok, report.problems


def test_a_v1_store_is_reused_by_precompute(legacy_wds, tmp_path):
    sys.path.insert(0, str(FIXTURES))
    try:
        from legacy import deterministic_d
        from legacy_wds import LEGACY_WDS
    finally:
        sys.path.pop(0)
    from enspipe.models import save_model

    save_model(deterministic_d(), tmp_path / "D")
    root = legacy_wds.parents[2]
    before = {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}
    r = run_cli("precompute", "--model", tmp_path / "D", "--dataset", LEGACY_WDS["dataset"], "--limit",
                LEGACY_WDS["limit"], "--format", "wds", "--shard-size", LEGACY_WDS["shard_size"], "--batch-size",
                LEGACY_WDS["batch_size"], "--device", "cpu", "--out", root)  # forked: zygote
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(legacy_wds)] and r.stderr.splitlines() == [f"reused {legacy_wds}"]
    assert before == {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}
