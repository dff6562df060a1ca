"""Perturbation stores (enspipe.stores), both formats, on direction maps made from real digits.

The maps are sign(image - blurred image) of scikit-learn's digits resized to 1x28x28: like
real gradient sign maps they are spatially correlated and hold some exact zeros.
"""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from enspipe.util.errors import StoreError
from enspipe.sampling import block_order
from enspipe.stores import (
    StoreIdentity,
    create_store,
    list_stores,
    open_store,
    open_writer,
    store_path,
    verify_store,
)

FORMATS = ["zarr", "wds"]
SHARD = 512  # 1797 digits -> shards of 512, 512, 512, 261; zarr chunks of 256


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data() -> dict:
    from scipy import ndimage
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images / 16.0
    up = ndimage.zoom(x, (1, 28 / 8, 28 / 8), order=1).clip(0, 1)
    diff = up - ndimage.gaussian_filter(up, sigma=(0, 1.5, 1.5))
    direction = np.sign(np.where(np.abs(diff) < 1e-3, 0.0, diff)).astype(np.int8)[:, None]
    n = len(direction)
    rng = np.random.default_rng(0)
    return {
        "direction": direction,
        "logits": rng.standard_normal((n, 10)).astype(np.float16),
        "label": digits.target.astype(np.int64),
        "images": np.round(up * 255).astype(np.uint8)[:, None],
        "keys": [f"digits/train/{i:05d}.png" for i in range(n)],
    }


def make_identity(n: int, **changes) -> StoreIdentity:
    fields = dict(
        dataset={"source": "digits", "split": "train", "num_samples": n, "limit": None,
                 "fingerprint": "f1" * 32, "geometry": [1, 28, 28]},
        geometry=(1, 28, 28),
        preprocess="resize28-bilinear",
        num_classes=10,
        model_name="mnist_a",
        weights_sha256="ab" * 32,
        attack="fgsm",
        attack_params={},
        label_mode="true",
    )
    fields.update(changes)
    return StoreIdentity(**fields)


def write(writer, data: dict, s: int) -> dict:
    a, b = writer.shard_range(s)
    return writer.write_shard(
        s, direction=data["direction"][a:b], logits=data["logits"][a:b], label=data["label"][a:b],
        keys=data["keys"][a:b], images=data["images"][a:b],
    )


def make_store(root: Path, fmt: str, data: dict, *, shards=None, finalize: bool = True, shard_size: int = SHARD):
    ident = make_identity(len(data["label"]))
    path = store_path(root, ident, fmt)
    w = create_store(path, ident, fmt=fmt, shard_size=shard_size, extra={"torch": "test"})
    for s in range(w.num_shards) if shards is None else shards:
        write(w, data, s)
    if finalize:
        w.finalize()
    return path, w


def shard_file(path: Path, fmt: str, s: int) -> Path:
    return path / (f"direction/c/{s}/0/0/0" if fmt == "zarr" else f"shard-{s:06d}.tar")


def assert_equal_samples(got: dict, data: dict, idx) -> None:
    np.testing.assert_array_equal(got["direction"], data["direction"][idx])
    np.testing.assert_array_equal(got["label"], data["label"][idx])
    # Bitwise equality of float16 (NaN-safe, exact).
    np.testing.assert_array_equal(got["logits"].view(np.uint16), data["logits"][idx].view(np.uint16))


# --------------------------------------------------------------------------- identity


def test_identity_key_roundtrip_and_path(tmp_path):
    ident = make_identity(100, dataset={"source": "imagefolder:/data/imagenet", "split": "val",
                                        "num_samples": 100, "fingerprint": "cd" * 32})
    again = StoreIdentity.from_dict(json.loads(json.dumps(ident.to_dict())))
    assert again == ident and again.key() == ident.key()
    assert make_identity(100, attack="step_ll").key() != make_identity(100).key()
    p = store_path(tmp_path, ident, "zarr")
    rel = p.relative_to(tmp_path)
    assert len(rel.parts) == 3 and ":" not in str(rel)
    assert rel.name == f"fgsm-true-{ident.key()[:16]}.zarr"
    with pytest.raises(StoreError, match="label_mode"):
        make_identity(100, label_mode="bogus")


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, data, fmt):
    path, _ = make_store(tmp_path, fmt, data)
    r = open_store(path)
    n = len(data["label"])
    assert len(r) == n and r.num_shards == 4 and r.geometry == (1, 28, 28)
    assert_equal_samples(r.read(0, n), data, slice(0, n))
    assert_equal_samples(r.read(500, 1030), data, slice(500, 1030))  # spans shards 0, 1, 2
    assert_equal_samples(r.read(1700, n), data, slice(1700, n))  # the short last shard
    idx = np.random.default_rng(1).integers(0, n, 400)  # random order, with repeats
    assert_equal_samples(r.read_indices(idx), data, idx)
    assert r.keys(510, 515) == data["keys"][510:515]
    assert r.read(7, 7)["direction"].shape == (0, 1, 28, 28)
    with pytest.raises(StoreError, match="outside"):
        r.read(0, n + 1)
    if fmt == "wds":
        np.testing.assert_array_equal(r.read_images(1000, 1100), data["images"][1000:1100])
    else:
        assert r.chunk_samples == 256


def test_wds_tar_is_plain_webdataset(tmp_path, data):
    """The shards are ordinary WebDataset tars: samples group by key, members are the documented ones."""
    wds = pytest.importorskip("webdataset")
    from enspipe.stores.wds.store import decode_direction

    path, _ = make_store(tmp_path, "wds", data, shards=[1], finalize=False)
    ds = wds.WebDataset(str(path / "shard-000001.tar"), shardshuffle=False, empty_check=False)
    samples = list(ds)  # raw bytes: no decoder, hence nothing unpickled
    assert len(samples) == SHARD
    first = samples[0]
    assert first["__key__"] == f"{SHARD:09d}" and int(first["idx"]) == SHARD
    # Layout v2's members (v1's "dir.npy.gz" is checked on a v1 store in test_wds_layout.py).
    assert {"idx", "key", "cls", "label.cls", "png", "dir.bits.gz", "logits.npy"} <= set(first)
    np.testing.assert_array_equal(decode_direction(first["dir.bits.gz"], (1, 28, 28)), data["direction"][SHARD])


# --------------------------------------------------------------------------- create / reopen


@pytest.mark.parametrize("fmt", FORMATS)
def test_reopen_same_identity_keeps_done_shards(tmp_path, data, fmt):
    path, w = make_store(tmp_path, fmt, data, shards=[0, 2], finalize=False)
    record = (path / "shards" / "000002.json").read_bytes()
    w2 = create_store(path, make_identity(len(data["label"])), fmt=fmt, shard_size=SHARD)
    assert w2.pending_shards() == [1, 3] and w2.shard_done(0)
    assert (path / "shards" / "000002.json").read_bytes() == record
    assert open_writer(path).pending_shards() == [1, 3]


@pytest.mark.parametrize("fmt", FORMATS)
def test_create_conflicts(tmp_path, data, fmt):
    n = len(data["label"])
    path, _ = make_store(tmp_path, fmt, data, shards=[], finalize=False)
    other = make_identity(n, dataset={**make_identity(n).dataset, "fingerprint": "00" * 32})
    with pytest.raises(StoreError, match=r"field: dataset\.fingerprint"):
        create_store(path, other, fmt=fmt, shard_size=SHARD)
    with pytest.raises(StoreError, match="field: shard_size"):
        create_store(path, make_identity(n), fmt=fmt, shard_size=256)
    with pytest.raises(StoreError, match="field: label_mode"):
        create_store(path, make_identity(n, label_mode="pred"), fmt=fmt, shard_size=SHARD)
    junk = tmp_path / "junk.zarr"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not an enspipe store"):
        create_store(junk, make_identity(n), fmt=fmt, shard_size=SHARD)


@pytest.mark.parametrize("fmt", FORMATS)
def test_incomplete_store_refused(tmp_path, data, fmt):
    path, w = make_store(tmp_path, fmt, data, shards=[0, 3], finalize=False)
    with pytest.raises(StoreError, match="incomplete: 2 of 4 shards written"):
        open_store(path)
    with pytest.raises(StoreError, match="2 of 4 shards are not written"):
        w.finalize()
    r = open_store(path, allow_incomplete=True)
    assert_equal_samples(r.read(0, 100), data, slice(0, 100))
    with pytest.raises(StoreError, match="shard 1 .* not written"):
        r.read(500, 600)
    for s in (1, 2):
        write(w, data, s)
    first = w.finalize()
    assert first["complete"] and w.finalize() == first  # idempotent
    assert len(open_store(path)) == len(data["label"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_shard_validates(tmp_path, data, fmt):
    _, w = make_store(tmp_path, fmt, data, shards=[], finalize=False)
    a, b = w.shard_range(0)
    good = dict(direction=data["direction"][a:b], logits=data["logits"][a:b], label=data["label"][a:b],
                keys=data["keys"][a:b], images=None)
    with pytest.raises(StoreError, match="logits must be float16"):
        w.write_shard(0, **{**good, "logits": good["logits"].astype(np.float32)})
    with pytest.raises(StoreError, match="shape"):
        w.write_shard(0, **{**good, "direction": good["direction"][:-1]})
    with pytest.raises(StoreError, match=r"-1, 0 or \+1"):
        w.write_shard(0, **{**good, "direction": good["direction"] * 2})
    with pytest.raises(StoreError, match="out of range"):
        w.write_shard(9, **good)
    assert w.pending_shards() == [0, 1, 2, 3]


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_shard_without_images(tmp_path, data, fmt):
    """An all-zero shard still gets its files (zarr skips fill-value chunks by default)."""
    _, w = make_store(tmp_path, fmt, data, shards=[], finalize=False)
    a, b = w.shard_range(3)
    rec = w.write_shard(3, direction=np.zeros((b - a, 1, 28, 28), np.int8), logits=data["logits"][a:b],
                        label=data["label"][a:b], keys=data["keys"][a:b], images=None)
    assert all((w.path / f).is_file() for f in rec["files"]) and w.shard_done(3)
    r = open_store(w.path, allow_incomplete=True)
    assert not r.read(a, b)["direction"].any()
    if fmt == "wds":
        with pytest.raises(StoreError, match="no clean images"):
            r.read_images(a, a + 1)


# --------------------------------------------------------------------------- concurrency, idempotence

WORKER = """
import sys
import numpy as np
from enspipe.stores import open_writer
path, npz, shards = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
z = np.load(npz, allow_pickle=False)
w = open_writer(path)
for s in shards:
    a, b = w.shard_range(s)
    w.write_shard(s, direction=z["direction"][a:b], logits=z["logits"][a:b], label=z["label"][a:b],
                  keys=[str(k) for k in z["keys"][a:b]], images=None)
"""


def test_concurrent_writers_zarr(tmp_path, data):
    """4 processes write interleaved whole shards of one zarr store: nothing is lost."""
    path, w = make_store(tmp_path, "zarr", data, shards=[], finalize=False, shard_size=128)
    npz = tmp_path / "data.npz"
    np.savez(npz, direction=data["direction"], logits=data["logits"], label=data["label"],
             keys=np.array(data["keys"]))
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(npz),
                          ",".join(str(s) for s in range(p, w.num_shards, 4))])
        for p in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert w.pending_shards() == []
    w.finalize()
    n = len(data["label"])
    assert_equal_samples(open_store(path).read(0, n), data, slice(0, n))
    assert verify_store(path).ok


@pytest.mark.parametrize("fmt", FORMATS)
def test_rewrite_is_byte_identical(tmp_path, data, fmt):
    path, w = make_store(tmp_path, fmt, data)
    rec = json.loads((path / "shards" / "000003.json").read_text())
    files = [*rec["files"], "shards/000003.json"]
    before = {f: (path / f).read_bytes() for f in files}
    assert write(open_writer(path), data, 3) == rec
    assert {f: (path / f).read_bytes() for f in files} == before
    assert verify_store(path).ok and w.finalize()["complete"]


# --------------------------------------------------------------------------- verify


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_finds_damaged_shards(tmp_path, data, fmt):
    path, _ = make_store(tmp_path, fmt, data)
    report = verify_store(path)
    assert report.ok and report.shards_checked == 4, report

    truncated = shard_file(path, fmt, 1)
    truncated.write_bytes(truncated.read_bytes()[:100])
    flipped = shard_file(path, fmt, 2)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    shard_file(path, fmt, 3).unlink()

    report = verify_store(path)
    assert not report.ok
    rel = lambda s: shard_file(path, fmt, s).relative_to(path).as_posix()  # noqa: E731
    assert any(p.startswith("shard 1:") and "truncated" in p for p in report.problems), report
    assert f"shard 2: checksum mismatch in file {rel(2)}" in report.problems, report
    assert f"shard 3: missing file {rel(3)}" in report.problems, report
    assert not any(p.startswith("shard 0") for p in report.problems), report
    with pytest.raises(StoreError, match="damaged"):
        open_store(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_catches_manifest_claiming_completion(tmp_path, data, fmt):
    path, _ = make_store(tmp_path, fmt, data, shards=[0, 1, 3], finalize=False)
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["shards"] = {f"{s:06d}": json.loads((path / "shards" / f"{s:06d}.json").read_text()) for s in (0, 1, 3)}
    manifest["complete"] = True
    mpath.write_text(json.dumps(manifest))
    report = verify_store(path)
    assert not report.ok
    assert [p for p in report.problems if p.startswith("shard")] == [
        "shard 2: the manifest claims the store is complete but has no record of this shard"
    ]
    with pytest.raises(StoreError, match="shard 2"):
        open_store(path)


def test_verify_reports_a_broken_manifest(tmp_path, data):
    path, _ = make_store(tmp_path, "zarr", data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["surprise"] = 1  # unknown top-level field: only `extra` may hold those
    (path / "manifest.json").write_text(json.dumps(manifest))
    report = verify_store(path)
    assert not report.ok and report.problems[0].startswith("manifest:") and "surprise" in report.problems[0]
    with pytest.raises(StoreError, match="surprise"):
        open_store(path)


# --------------------------------------------------------------------------- compatibility


def test_check_compatible_names_the_field(tmp_path, data):
    path, _ = make_store(tmp_path, "zarr", data)
    r = open_store(path)
    n = len(data["label"])
    good = dict(fingerprint="f1" * 32, geometry=(1, 28, 28), num_samples=n, num_classes=10)
    r.check_compatible(**good)
    for change, field in [
        ({"fingerprint": "cd" * 32}, "dataset.fingerprint"),
        ({"geometry": (3, 32, 32)}, "geometry"),
        ({"num_samples": n - 1}, "num_samples"),
        ({"num_classes": 1000}, "num_classes"),
    ]:
        with pytest.raises(StoreError, match=rf"\(field: {field}\)"):
            r.check_compatible(**{**good, **change})


# --------------------------------------------------------------------------- security


class _WritesAFile:
    """Unpickling this creates a file: proof of whether anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_wds_pickle_member_is_refused_not_unpickled(tmp_path, data):
    from enspipe.stores.manifest import sha256_file

    path, _ = make_store(tmp_path, "wds", data)
    marker = tmp_path / "PWNED"
    tar = path / "shard-000000.tar"
    with tarfile.open(tar) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    members.insert(3, (f"{0:09d}.pickle", pickle.dumps(_WritesAFile(marker))))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    tar.write_bytes(buf.getvalue())

    # A hostile producer would also fix up the checksums: do so, so the reader parses the tar.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shards"]["000000"]["files"]["shard-000000.tar"] = {
        "sha256": sha256_file(tar), "bytes": tar.stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))

    r = open_store(path)
    with pytest.raises(StoreError, match=r"shard-000000\.tar member '000000000\.pickle'.*forbidden"):
        r.read(0, 10)
    report = verify_store(path)
    assert any(p.startswith("shard 0:") and "pickle" in p for p in report.problems), report
    assert not marker.exists()


# --------------------------------------------------------------------------- shard spans


def test_shard_spans_cut_a_range_at_shard_boundaries():
    from enspipe.stores.base import shard_spans

    assert list(shard_spans(0, 0, SHARD)) == []
    assert list(shard_spans(500, 1030, SHARD)) == [(0, slice(500, 512)), (1, slice(0, 512)), (2, slice(0, 6))]
    assert list(shard_spans(512, 1024, SHARD)) == [(1, slice(0, 512))]
    assert list(shard_spans(1790, 1797, SHARD)) == [(3, slice(254, 261))]  # the short last shard


# --------------------------------------------------------------------------- read in block order


def test_block_order_reads_cover_the_store(tmp_path, data):
    path, _ = make_store(tmp_path, "zarr", data)
    r = open_store(path)
    blocks = block_order(r.num_samples, r.chunk_samples, seed=0, epoch=0)
    seen = np.concatenate([r.read(a, b)["label"] for a, b in blocks])
    assert sorted(seen.tolist()) == sorted(data["label"].tolist())


# --------------------------------------------------------------------------- listing


def test_list_stores_reports_size_and_completion(tmp_path, data):
    zpath, _ = make_store(tmp_path, "zarr", data)
    wpath, _ = make_store(tmp_path, "wds", data, shards=[0, 1], finalize=False)
    infos = {i.fmt: i for i in list_stores(tmp_path)}
    assert set(infos) == {"zarr", "wds"}
    z, w = infos["zarr"], infos["wds"]
    assert z.path == zpath and z.complete and z.shards_done == z.num_shards == 4
    assert z.num_samples == len(data["label"]) and z.model == "mnist_a" and z.attack == "fgsm"
    assert z.bits_per_element < 2.0  # blosc(zstd, bit-shuffle) on correlated sign maps
    assert z.bytes_on_disk > 0 and z.problem is None
    assert w.path == wpath and not w.complete and (w.shards_done, w.num_shards) == (2, 4)
    assert w.bits_per_element is not None and w.bits_per_element < 8.0
