"""What a train or evaluate start checks of a store URL, and what it costs the object store.

A real S3-compatible server (moto's, the fixtures of test_object_store.py) and s3fs; requests
are counted where s3fs sends every one of them (`S3FileSystem._call_s3`), so the oracle is the
store's own shape (how many shards, which objects), not the code under test. A corrupt object
is made on the server itself, after the check passed, and the run must stop at the read that
fetches it, one line naming it, every direction fed before that one the true one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from enspipe.stores import StoreIdentity, check_against, create_store, open_store, store_path, verify_store
from enspipe.util.errors import StoreError
from cli_runner import run_cli

pytest.importorskip("s3fs", reason="object-store tests need pip install -e '.[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need pip install -e '.[s3]'")

SHARD = 256  # digits' 1,500 training samples: 6 shards


@pytest.fixture(scope="module")
def digits():
    from enspipe.data import create_dataset

    return create_dataset("digits", split="train")


def _store(root: str, ds, fmt: str) -> tuple[str, np.ndarray]:
    """A complete store of random directions for `ds` (a URL or a local folder) and the directions."""
    ident = StoreIdentity(dataset=ds.identity(), geometry=ds.geometry.shape, preprocess=ds.geometry.preprocess,
                          num_classes=ds.num_classes, model_name="m", weights_sha256="ab" * 32, attack="fgsm",
                          attack_params={}, label_mode="pred")
    path = store_path(root, ident, fmt)
    w = create_store(path, ident, fmt=fmt, shard_size=SHARD)
    d = np.random.default_rng(1).integers(-1, 2, (len(ds), *ds.geometry.shape)).astype(np.int8)
    for s in range(w.num_shards):
        lo, hi = w.shard_range(s)
        w.write_shard(s, direction=d[lo:hi], logits=np.zeros((hi - lo, ds.num_classes), np.float16),
                      label=ds.labels[lo:hi].astype(np.int64), keys=list(ds.keys[lo:hi]))
    w.finalize()
    return path, d


def _unfinalized(local: str) -> None:
    """Make a written store's manifest what it was before finalize: incomplete, its records in shards/."""
    manifest = json.loads((Path(local) / "manifest.json").read_text())
    manifest.update(complete=False, shards={}, finalized_at=None)
    (Path(local) / "manifest.json").write_text(json.dumps(manifest))


def _copy_to_s3(s3, local: str) -> str:
    """A local store copied object for object under the test bucket: its URL."""
    url = f"s3://{s3['bucket']}/copy/{Path(local).name}"
    s3["fs"].put(str(local), url[len("s3://"):], recursive=True)
    return url


class _Requests:
    """Every S3 request s3fs makes, by operation, and the object keys its GETs fetch."""

    def __init__(self, monkeypatch) -> None:
        import s3fs

        self.calls: list[tuple[str, str]] = []
        real = s3fs.S3FileSystem._call_s3

        async def _call_s3(fs, method, *args, **kwargs):
            self.calls.append((method, kwargs.get("Key", "")))
            return await real(fs, method, *args, **kwargs)

        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", _call_s3)

    def take(self) -> list[tuple[str, str]]:
        out, self.calls = self.calls, []
        return out


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_train_start_on_a_store_url_lists_once_and_downloads_no_shard_payload(s3, monkeypatch, digits, fmt):
    url, _ = _store(f"s3://{s3['bucket']}/st", digits, fmt)
    shards = -(-len(digits) // SHARD)
    requests = _Requests(monkeypatch)
    fetched: list[list[str]] = []  # the record fetches: one call, all records
    from enspipe.stores import remote

    real = remote.Remote.cat_many
    monkeypatch.setattr(remote.Remote, "cat_many", lambda self, rels: (fetched.append(list(rels)), real(self, rels))[1])
    reader = open_store(url)
    check_against(reader, digits)  # what train and evaluate do before their first step
    calls = requests.take()
    ops = sorted({op for op, _ in calls})
    root = url.split("/", 3)[3]  # the store's prefix in its bucket
    gets = sorted(key[len(root) + 1:] for op, key in calls if op == "get_object")
    keys_objects = [f"keys/{s:06d}.json" for s in range(shards)] if fmt == "zarr" else []
    # One listing (open_store's), the manifest, and (zarr) every shard's keys object: no HEAD, no
    # second listing, no record object (a complete store is read by its manifest's records: at
    # ImageNet scale ~1,250 GETs per rank and store guarding nothing a read uses), no
    # direction/logits/label object, no tar.
    assert ops == ["get_object", "list_objects_v2"], calls
    assert [op for op, _ in calls].count("list_objects_v2") == 1
    assert gets == sorted(["manifest.json", *keys_objects])
    assert fetched == []
    cached = [rel for rec in reader.records.values() for rel in rec["files"] if (reader.source.mirror / rel).is_file()]
    assert sorted(cached) == keys_objects


def _flip(s3, url: str, rel: str) -> None:
    key = f"{url[len('s3://'):]}/{rel}"
    data = bytearray(s3["fs"].cat_file(key))
    data[len(data) // 2] ^= 0x10  # same size: only the sha256 can tell
    s3["fs"].pipe_file(key, bytes(data))


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_byte_flipped_after_the_check_stops_the_read_naming_the_object_and_feeds_nothing_wrong(
        s3, digits, fmt):
    from enspipe.stream import DirectionStream

    url, d = _store(f"s3://{s3['bucket']}/st", digits, fmt)
    reader = open_store(url)
    check_against(reader, digits)  # passes: the store is sound now
    rel = "direction/c/2/0/0/0" if fmt == "zarr" else "shard-000002.tar"
    _flip(s3, url, rel)
    fed = 0
    with pytest.raises(StoreError) as err:
        for batch in DirectionStream(digits, [reader], batch_size=64, block_size=64, seed=0):
            idx = batch["index"].numpy()
            np.testing.assert_array_equal(batch["d"][:, 0].numpy(), d[idx])  # nothing wrong fed
            assert not ((2 * SHARD <= idx) & (idx < 3 * SHARD)).any()
            fed += len(idx)
    assert f"{url}/{rel} does not match its completion record" in str(err.value)
    assert "\n" not in str(err.value) and fed < len(digits)


def test_train_on_a_store_url_with_an_object_corrupted_since_it_was_written_stops_with_one_line(
        s3, digits, tmp_path):
    """The command line: the start check passes (it reads no shard bytes), the read of the
    corrupt object stops the run with one line naming it, and no weights are written."""
    url, _ = _store(f"s3://{s3['bucket']}/st", digits, "zarr")
    rel = "direction/c/1/0/0/0"
    _flip(s3, url, rel)
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "A", "--dataset", "digits", "--mode", "ens-adv", "--epochs", "1",
                   "--device", "cpu", "--shards", url, "--out", out, env={**s3["env"], "ENSPIPE_PROGRESS": "0"})
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert f"{url}/{rel} does not match its completion record" in lines[0]
    assert "failed verification" not in lines[0]  # the read caught it, not the start check
    assert not (out / "model.safetensors").exists()


def _damage_record(read, write) -> None:
    """Shard 1's record, still JSON, no longer a valid record (its `files` gone)."""
    rec = json.loads(read())
    del rec["files"]
    write(json.dumps(rec).encode())


def test_a_damaged_record_gives_the_same_lines_from_verify_locally_and_on_s3(s3, digits, tmp_path):
    local, _ = _store(str(tmp_path / "st"), digits, "zarr")
    url = _copy_to_s3(s3, local)
    rec = "shards/000001.json"
    _damage_record((Path(local) / rec).read_bytes, (Path(local) / rec).write_bytes)
    key = f"{url[len('s3://'):]}/{rec}"
    _damage_record(lambda: s3["fs"].cat_file(key), lambda b: s3["fs"].pipe_file(key, b))
    want = "shard 1: completion record shards/000001.json differs from the manifest's"
    got = {}
    for where in (local, url):
        proc = run_cli("verify", where, env={**s3["env"], "ENSPIPE_PROGRESS": "0"})
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stdout.strip() == f"BAD {where}"
        lines = proc.stderr.strip().splitlines()
        assert all(ln.startswith(f"{where}: ") for ln in lines), proc.stderr[-2000:]
        got[where] = [ln[len(f"{where}: "):] for ln in lines]
    assert got[url] == got[local] == [want]
    # A train start reads the URL by its manifest's records, never the record objects: it passes.
    check_against(open_store(url), digits)


@pytest.mark.parametrize("damage", ["invalid", "other-range", "short-object"])
def test_an_incomplete_store_reports_its_records_alike_locally_and_on_s3(s3, digits, tmp_path, damage):
    local, _ = _store(str(tmp_path / "st"), digits, "zarr")
    _unfinalized(local)
    url = _copy_to_s3(s3, local)
    rec, root = "shards/000001.json", url[len("s3://"):]
    if damage == "short-object":
        for write in (lambda b: (Path(local) / "logits/c/1/0").write_bytes(b),
                      lambda b: s3["fs"].pipe_file(f"{root}/logits/c/1/0", b)):
            write(b"short")
    else:
        def edit(raw: bytes) -> bytes:
            r = json.loads(raw)
            if damage == "invalid":
                r["files"] = {}
            else:
                r["start"] += 1
            return json.dumps(r).encode()

        (Path(local) / rec).write_bytes(edit((Path(local) / rec).read_bytes()))
        s3["fs"].pipe_file(f"{root}/{rec}", edit(s3["fs"].cat_file(f"{root}/{rec}")))
    lines = verify_store(local, deep=False).problems
    assert verify_store(url, deep=False).problems == lines
    shards = -(-len(digits) // SHARD)
    assert lines[0] == f"store is incomplete: {shards - 1} of {shards} shards written; re-run precompute to finish it"
    want = {"invalid": "shard 1: invalid completion record (files: ",
            "other-range": "shard 1: completion record is for another shard or range",
            "short-object": "shard 1: file logits/c/1/0 is 5 bytes but was written with "}[damage]
    assert len(lines) == 2 and lines[1].startswith(want), lines


def test_a_record_object_that_cannot_be_read_is_one_line_naming_it(s3, digits):
    """A record the server refuses to hand out (archived to Glacier: a real S3 error, here moto's
    InvalidObjectState) is neither a missing record nor a crash: one line naming the object."""
    url, _ = _store(f"s3://{s3['bucket']}/st", digits, "zarr")
    key = f"{url[len('s3://'):]}/shards/000002.json"
    s3["fs"].pipe_file(key, s3["fs"].cat_file(key), StorageClass="GLACIER")
    reader = open_store(url)  # a complete store is opened, and checked, by its manifest's records
    check_against(reader, digits)  # which never fetches the record objects
    report = verify_store(url)  # enspipe verify fetches them: one problem, one line
    assert not report.ok and len(report.problems) == 1
    assert report.problems[0].startswith(f"records: cannot read {url}/shards/000002.json: permission denied")


def test_a_zarr_shard_copied_over_another_with_its_records_is_refused_at_a_train_start_on_s3(s3, digits, tmp_path):
    """The keys check on a store URL (its keys objects alone): shard 0's files copied over shard
    1's, records re-hashed so every size and checksum holds, uploaded: the start refuses it,
    naming shard 1, having downloaded no direction object."""
    from reliability.forge import forge_checksums, zarr_shard_copied_over

    local, _ = _store(str(tmp_path / "st"), digits, "zarr")
    zarr_shard_copied_over(Path(local), 0, 1, keys=True)
    forge_checksums(Path(local), 1)
    url = _copy_to_s3(s3, local)
    reader = open_store(url)
    with pytest.raises(StoreError, match=rf"shard 1 of store {re.escape(url)} holds other samples than the dataset: "
                                         rf"sample {SHARD} "):
        check_against(reader, digits)
    assert not any((reader.source.mirror / rel).is_file() for rec in reader.records.values() for rel in rec["files"]
                   if not rel.startswith("keys/"))


def test_loader_workers_download_what_the_check_left_on_the_server(s3, digits):
    """The check in the parent uses the store's filesystem (records, keys objects) and leaves the
    shards on the server: forked loader workers then download them with filesystems of their own
    (s3fs refuses to run in a forked child), and every sample gets its own direction."""
    import torch

    from enspipe.stream import DirectionStream

    url, d = _store(f"s3://{s3['bucket']}/st", digits, "zarr")
    reader = open_store(url)
    check_against(reader, digits)
    seen = 0
    stream = DirectionStream(digits, [reader], batch_size=64, block_size=64, seed=0)
    for batch in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1):
        idx = batch["index"].numpy()
        np.testing.assert_array_equal(batch["d"][:, 0].numpy(), d[idx])
        seen += len(idx)
    assert seen == len(digits)


def test_a_wds_tar_copied_over_another_on_s3_passes_the_start_and_fails_its_first_read(s3, digits, tmp_path):
    """A wds store URL's start check downloads no tar, so it cannot compare the keys inside them;
    what binds a tar to its samples is its `.idx` members, checked on every decode: tar 0 copied
    over tar 1, records re-hashed, is refused by the read of shard 1, naming the tar."""
    import shutil

    from reliability.forge import forge_checksums

    local, _ = _store(str(tmp_path / "st"), digits, "wds")
    shutil.copyfile(Path(local) / "shard-000000.tar", Path(local) / "shard-000001.tar")
    forge_checksums(Path(local), 1)
    url = _copy_to_s3(s3, local)
    reader = open_store(url)
    check_against(reader, digits)
    with pytest.raises(StoreError, match=rf"shard-000001.tar holds {SHARD} samples that are not samples {SHARD}\.\."):
        reader.read_directions(SHARD, 2 * SHARD)


def test_a_store_url_is_named_by_its_url_not_its_cache_folder(s3, digits):
    """Every message about a store URL's reader names the URL the user gave (`location`), never the
    local mirror it runs on: the identity check, a read outside it, and train's record of its stores."""
    from enspipe.data import create_dataset
    from enspipe.train import _check_stores

    url, _ = _store(f"s3://{s3['bucket']}/st", digits, "zarr")
    reader = open_store(url)
    assert reader.location == url and str(reader.path) != url
    other = create_dataset("digits", split="test")  # other samples: the identity check refuses it
    with pytest.raises(StoreError, match=rf"^store {re.escape(url)} was made for other data: "):
        check_against(reader, other)
    with pytest.raises(StoreError, match=rf"outside store {re.escape(url)} "):
        reader.read(0, len(digits) + 1)
    assert [s["path"] for s in _check_stores(digits, [reader])] == [url]


@pytest.mark.parametrize("damage", ["undecodable", "corrupt"])
def test_an_incomplete_store_with_a_damaged_shard_verifies_alike_locally_and_on_s3(s3, digits, tmp_path, damage):
    """Deep verify of an incomplete store: shard 0 not written, shard 1's direction object
    damaged. Undecodable (bytes re-recorded, so only the decode fails): written, one `unreadable`
    line. Corrupt (bytes not as recorded): not written. The count is the same locally and on S3."""
    from reliability.forge import forge_checksums

    local, _ = _store(str(tmp_path / "st"), digits, "zarr")
    rel = "direction/c/1/0/0/0"
    (Path(local) / rel).write_bytes(b"\0" * (Path(local) / rel).stat().st_size)  # same size: not a zarr shard
    if damage == "undecodable":
        forge_checksums(Path(local), 1)
    _unfinalized(local)
    (Path(local) / "shards/000000.json").unlink()
    url = _copy_to_s3(s3, local)
    lines = {where: verify_store(where).problems for where in (local, url)}
    shards = -(-len(digits) // SHARD)
    written = shards - 1 if damage == "undecodable" else shards - 2
    for got in lines.values():
        assert got[0] == f"store is incomplete: {written} of {shards} shards written; re-run precompute to finish it"
        assert got[1] == "shard 0: not written (no completion record shards/000000.json)"
        assert len(got) == 3 and got[2].startswith(
            "shard 1: unreadable (" if damage == "undecodable" else "shard 1: "), got
    if damage == "corrupt":
        assert lines[local][2] == f"shard 1: checksum mismatch in file {rel}"
        assert f"{url}/{rel} does not match its completion record" in lines[url][2]


def test_verify_of_an_incomplete_store_url_lists_it_once_and_fetches_each_object_once(s3, monkeypatch, digits, tmp_path):
    """`enspipe verify URL` (deep) of an incomplete store: one listing, the manifest and every record
    object fetched once (not again to open the reader it downloads through), every shard object once."""
    local, _ = _store(str(tmp_path / "st"), digits, "zarr")
    _unfinalized(local)
    url = _copy_to_s3(s3, local)
    objects = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    requests = _Requests(monkeypatch)
    report = verify_store(url)
    shards = -(-len(digits) // SHARD)
    assert report.problems == [f"store is incomplete: {shards} of {shards} shards written; re-run precompute to finish it"]
    calls = requests.take()
    root = url.split("/", 3)[3]
    gets = sorted(key[len(root) + 1:] for op, key in calls if op == "get_object")
    assert [op for op, _ in calls].count("list_objects_v2") == 1, calls
    # Every object once (zarr.json is made from the manifest, never fetched), none twice.
    assert gets == [rel for rel in objects if rel != "zarr.json" and not rel.endswith("/zarr.json")], calls
