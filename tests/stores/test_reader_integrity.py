"""Every reader verifies what it reads: a same-size flipped byte anywhere in a shard's files is an
error from `read()` itself (not only from `verify`), and the trainer binds every shard to its
samples by their dataset keys (a zarr shard copied over another, records re-hashed, is refused).
"""
from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from enspipe.util.errors import StoreError
from enspipe.stores import StoreIdentity, create_store, open_store, store_path, verify_store
from reliability.forge import flip, forge_checksums, zarr_shard_copied_over

N, SHARD = 300, 128  # shards of 128, 128, 44; zarr chunks of 128


def _identity() -> StoreIdentity:
    return StoreIdentity(
        dataset={"source": "synthetic", "split": "train", "num_samples": N, "limit": None,
                 "fingerprint": "ab" * 32, "geometry": [1, 28, 28]},
        geometry=(1, 28, 28), preprocess="none", num_classes=10, model_name="m", weights_sha256="cd" * 32,
        attack="fgsm", attack_params={}, label_mode="pred")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A complete zarr and wds store of 300 random samples (clean images in the wds one)."""
    rng = np.random.default_rng(0)
    data = {"direction": rng.integers(-1, 2, (N, 1, 28, 28), dtype=np.int8),
            "logits": rng.standard_normal((N, 10)).astype(np.float16),
            "label": rng.integers(0, 10, N).astype(np.int64),
            "images": rng.integers(0, 256, (N, 1, 28, 28), dtype=np.uint8)}
    root, out = tmp_path_factory.mktemp("stores"), {}
    for fmt in ("zarr", "wds"):
        w = create_store(store_path(root, _identity(), fmt), _identity(), fmt=fmt, shard_size=SHARD)
        for s in range(w.num_shards):
            a, b = w.shard_range(s)
            w.write_shard(s, **{k: v[a:b] for k, v in data.items()}, keys=[f"sample-{i}" for i in range(a, b)])
        w.finalize()
        out[fmt] = w.path
    return out


def _copy(store: Path, dest: Path) -> Path:
    shutil.copytree(store, dest / store.name)
    return dest / store.name


def _reads(store: Path) -> dict[str, object]:
    """What each read of shard 1's samples [128, 256) gives: its value, or the StoreError."""
    out: dict[str, object] = {}
    for name, read in (("read", lambda r: r.read(128, 256)), ("read_directions", lambda r: r.read_directions(130, 140)),
                       ("read_indices", lambda r: r.read_indices([5, 200])), ("keys", lambda r: r.keys(128, 256))):
        try:
            out[name] = read(open_store(store))  # a fresh reader: nothing cached from another read
        except StoreError as e:
            out[name] = e
    return out


def test_a_flipped_byte_in_any_wds_member_is_an_error_from_read(stores, tmp_path):
    """For every member kind of a wds sample (index, key, labels, image, direction, logits): a
    same-size flipped byte inside it passes open_store's cheap size check, and then every read
    of the shard (read, read_directions, read_indices, keys) raises naming the shard and the
    checksum, while the other shards still read."""
    tar = stores["wds"] / "shard-000001.tar"
    with tarfile.open(tar) as tf:
        members = [m for m in tf if m.name.startswith(f"{150:09d}.")]
    assert len(members) >= 5, [m.name for m in members]
    for m in members:
        work = tmp_path / m.name
        work.mkdir()
        store = _copy(stores["wds"], work)
        flip(store / tar.name, m.offset_data + m.size // 2)
        reader = open_store(store)
        for name, got in _reads(store).items():
            assert isinstance(got, StoreError), (m.name, name)
            assert "shard 1: checksum mismatch in file shard-000001.tar" in str(got), (m.name, name, got)
        np.testing.assert_array_equal(reader.read(0, 128)["direction"], open_store(stores["wds"]).read(0, 128)["direction"])


ZARR_FILES = ["direction/c/1/0/0/0", "logits/c/1/0", "label/c/1", "keys/000001.json"]


@pytest.mark.parametrize("rel", ZARR_FILES)
def test_a_flipped_byte_in_any_zarr_shard_file_is_an_error_from_read(stores, tmp_path, rel):
    """A same-size flipped byte in a zarr shard file -- in a compressed chunk (zarr would decode
    most of these silently into other values: only the shard index carries a CRC32C), in the
    index, at the start -- is an error from every read that touches the file, naming the shard,
    the file and the checksum; reads of the other shards and files still work."""
    size = (stores["zarr"] / rel).stat().st_size
    for k, offset in enumerate((3, size // 3, size // 2, size - 5)):
        store = _copy(stores["zarr"], tmp_path / f"{k}")
        flip(store / rel, offset)
        got = _reads(store)
        touched = {"keys"} if rel.startswith("keys") else {"read", "read_indices"} | (
            {"read_directions"} if rel.startswith("direction") else set())
        for name, value in got.items():
            if name in touched:
                assert isinstance(value, StoreError), (rel, offset, name)
                assert f"shard 1: checksum mismatch in file {rel}" in str(value), value
            else:
                assert not isinstance(value, StoreError), (rel, offset, name, value)
        assert open_store(store).read(0, 128)["label"].shape == (128,)


def _count_hashes(monkeypatch, store: Path) -> list[str]:
    """The files of `store` hashed from now on, relative to it (a list that grows)."""
    from enspipe.stores import manifest

    hashed: list[str] = []
    real = manifest.sha256_file

    def sha256_file(p):
        hashed.append(Path(p).resolve().relative_to(store.resolve()).as_posix())
        return real(p)

    monkeypatch.setattr(manifest, "sha256_file", sha256_file)
    return hashed


def test_zarr_reader_hashes_each_shard_file_once_per_version(stores, tmp_path, monkeypatch):
    """The trainer reads a shard block by block: each shard file is hashed on its first read
    only (the hot path stays fast), and again after it is replaced -- a replaced file with
    other bytes is then refused."""
    store = _copy(stores["zarr"], tmp_path)
    hashed = _count_hashes(monkeypatch, store)
    r = open_store(store)
    for a in range(0, N, 16):
        r.read_directions(a, min(N, a + 16))
    open_store(store).read_directions(0, N)  # another reader in this process: nothing re-hashed
    assert sorted(hashed) == [f"direction/c/{s}/0/0/0" for s in range(3)]  # once each
    r.read(0, 10)
    assert hashed[3:] == ["logits/c/0/0", "label/c/0"]  # on their first read
    # A file replaced (new inode) is hashed again; here by shard 0's bytes: refused.
    replacement = store / "direction" / "c" / "1" / "0" / "0" / "0.new"
    shutil.copyfile(store / "direction/c/0/0/0/0", replacement)
    os.replace(replacement, store / "direction/c/1/0/0/0")
    with pytest.raises(StoreError, match="shard 1: checksum mismatch in file direction/c/1/0/0/0"):
        r.read_directions(128, 256)


def test_verify_always_hashes_and_readers_reuse_its_checks(stores, tmp_path, monkeypatch):
    """verify re-hashes every file each time, even one rewritten in place with its size and
    mtime restored; a reader trusts the checks verify made in this process, so the trainer
    (which verifies its stores before training) hashes nothing twice while it trains."""
    store = _copy(stores["zarr"], tmp_path)
    hashed = _count_hashes(monkeypatch, store)
    assert verify_store(store).ok and len(hashed) == 3 * 4  # 3 shards x (3 arrays + keys)
    open_store(store).read(0, N)
    assert len(hashed) == 12
    f = store / "direction/c/1/0/0/0"
    st = f.stat()
    flip(f, st.st_size // 2)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = verify_store(store)
    assert "shard 1: checksum mismatch in file direction/c/1/0/0/0" in report.problems, report


def test_check_keys_names_the_shard_of_other_samples(stores):
    """check_keys(start, stop, keys) passes for the dataset's keys of any range, and names the
    shard and the first sample whose key differs otherwise."""
    keys = [f"sample-{i}" for i in range(N)]
    for fmt in ("zarr", "wds"):
        r = open_store(stores[fmt])
        r.check_keys(0, N, keys)
        r.check_keys(100, 260, keys[100:260])
        other = keys[:]
        other[200] = "sample-x"
        with pytest.raises(StoreError, match=r"shard 1 of store .* sample 200 is 'sample-200' in the store but "
                                             r"'sample-x' in the data"):
            r.check_keys(0, N, other)
        with pytest.raises(StoreError, match="3 keys given for the 4 samples"):
            r.check_keys(0, 4, keys[:3])


# --- A shard copied over another (issue 12, item 10) ---------------------------------------------

@pytest.fixture(scope="module")
def digits_stores(digits_static, tmp_path_factory) -> dict[str, Path]:
    """FGSM stores (zarr, wds) of the static D over the first 256 digits, shards of 64."""
    from enspipe.precompute import PrecomputeConfig, precompute

    paths = precompute(PrecomputeConfig(model=str(digits_static), out=str(tmp_path_factory.mktemp("stores")),
                                        limit=256, attacks=("fgsm",), fmt="both", shard_size=64, device="cpu"))
    return {p.suffix: p for p in paths}


def _train_on(store: Path, run: Path) -> None:
    from enspipe.train import TrainConfig, train

    train(TrainConfig(model="D", dataset="digits", limit=256, mode="ens-adv", shards=(str(store),), epochs=1,
                      device="cpu"), run)


def test_training_hashes_each_file_once(digits_stores, tmp_path, monkeypatch):
    """The trainer's hot path stays fast: a 2-epoch ens-adv run on a zarr store hashes each
    of its files once, in the check before training, and none while it reads them."""
    from enspipe.train import TrainConfig, train

    store = _copy(digits_stores[".zarr"], tmp_path)
    hashed = _count_hashes(monkeypatch, store)
    train(TrainConfig(model="D", dataset="digits", limit=256, mode="ens-adv", shards=(str(store),), epochs=2,
                      device="cpu", log_every=1000), tmp_path / "run")
    files = [rel for rec in open_store(store).records.values() for rel in rec["files"]]
    assert sorted(hashed) == sorted(files) and len(files) == 16


def test_a_zarr_shard_copied_over_another_is_refused_when_read_for_training(digits_stores, tmp_path):
    """A zarr shard 0's files copied over shard 1's (valid data, the wrong samples; the keys
    file's shard fields edited to pass for shard 1's):
    - records untouched: the reader refuses it (sizes, checksums);
    - records re-hashed: verify passes and
      the reader returns the data (checksums sit beside the data: they catch rot and accidents,
      not a rewrite), but the trainer's store check compares the keys with the dataset's and
      refuses to start, naming shard 1."""
    from enspipe.util.errors import EnspipeError

    src = digits_stores[".zarr"]
    for rehash in (False, True):
        store = _copy(src, tmp_path / f"rehash-{rehash}")
        zarr_shard_copied_over(store, 0, 1, keys=True)
        if rehash:
            forge_checksums(store, 1)
            assert verify_store(store).ok
            np.testing.assert_array_equal(open_store(store).read(64, 128)["direction"],
                                          open_store(src).read(0, 64)["direction"])
            message = r"shard 1 of store .* holds other samples than the dataset: sample 64 is 'digits-train-000000'"
        else:  # shard 0's files have other sizes than shard 1's: refused at open, or else at read
            with pytest.raises(StoreError, match="shard 1: (checksum mismatch in )?file (direction/c/1/0/0/0|keys/000001.json)"):
                open_store(store).read_directions(64, 128)
            message = "shard 1: (checksum mismatch in )?file "
        with pytest.raises(EnspipeError, match=message):
            _train_on(store, tmp_path / f"run-{rehash}")
        assert not (tmp_path / f"run-{rehash}" / "checkpoints").exists()


def test_a_wds_tar_copied_over_another_is_refused_even_with_records_rehashed(digits_stores, tmp_path):
    """A wds shard carries its sample indices: tar 0 copied over tar 1, records re-hashed, is
    refused by the reader itself."""
    store = _copy(digits_stores[".wds"], tmp_path)
    shutil.copyfile(store / "shard-000000.tar", store / "shard-000001.tar")
    forge_checksums(store, 1)
    with pytest.raises(StoreError, match="shard-000001.tar holds 64 samples that are not samples 64..127"):
        open_store(store).read_directions(64, 128)
    assert not verify_store(store).ok
