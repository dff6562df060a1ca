"""wds shards carry a member index (issue 26): the reader slices members out of the tar's bytes
through it, returns exactly what was written, and reads the same samples WebDataset reads;
tars without an index (stores written before) and tars whose index does not describe them are
read member by member, and an index that lies is refused by read and by verify."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from enspipe.util.errors import StoreError
from enspipe.stores import StoreIdentity, create_store, open_store, store_path, verify_store, wds_decoders
from enspipe.stores.wds import store as wds_store
from enspipe.stores.wds.index import INDEX_MEMBER

GEOMETRY = (3, 5, 7)   # 105 elements: not a multiple of 8, the packed planes' last byte is partial
K = 11
N, SHARD = 45, 16      # three shards, the last one short


def _identity(n: int) -> StoreIdentity:
    return StoreIdentity(
        dataset={"source": "synthetic:wds-index", "split": "train", "num_samples": n, "limit": None,
                 "fingerprint": "ab" * 32, "geometry": list(GEOMETRY)},
        geometry=GEOMETRY, preprocess="synthetic", num_classes=K, model_name="m", weights_sha256="0" * 64,
        attack="fgsm", attack_params={"loss": "ce"}, label_mode="pred")


def _content(seed: int = 0) -> dict:
    """What the test writes: the oracle every read is compared with."""
    rng = np.random.default_rng(seed)
    d = rng.choice(np.array([-1, 1], np.int8), size=(N, *GEOMETRY))
    d[::5][rng.random((len(d[::5]), *GEOMETRY)) < 0.1] = 0  # every fifth map has zeros: a second bit plane
    return {"direction": d, "logits": rng.standard_normal((N, K)).astype(np.float16),
            "label": rng.integers(0, K, N).astype(np.int64), "true_label": rng.integers(0, K, N).astype(np.int64),
            # keys with what member names cannot hold: dots, slashes, non-ASCII
            "keys": [f"train/cl.{i % 3}/bild-ü{i}.JPEG" for i in range(N)]}


def _write(root: Path, content: dict, *, image_files: bool = False) -> Path:
    path = store_path(root, _identity(N), "wds")
    w = create_store(path, _identity(N), fmt="wds", shard_size=SHARD)
    for s in w.pending_shards():
        a, b = w.shard_range(s)
        files = None
        if image_files:  # a source whose files are JPEGs and PNGs: two member patterns in one shard
            files = [(("jpg", b"\xff\xd8jpeg %d" % i) if i % 3 else ("png", b"\x89PNG %d" % i)) for i in range(a, b)]
        w.write_shard(s, direction=content["direction"][a:b], logits=content["logits"][a:b],
                      label=content["label"][a:b], true_label=content["true_label"][a:b],
                      keys=content["keys"][a:b], image_files=files)
    w.finalize()
    return path


@pytest.fixture(scope="module")
def content() -> dict:
    return _content()


@pytest.fixture(scope="module")
def store(content, tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("indexed"), content)


def _read_all(path: Path) -> tuple[dict, list[str], np.ndarray]:
    r = open_store(path)
    true = np.concatenate([r.shard(s)["true_label"] for s in range(r.num_shards)])
    return r.read(0, N), r.keys(0, N), true


def _assert_written(got: tuple[dict, list[str], np.ndarray], content: dict) -> None:
    arrays, keys, true = got
    for f in ("direction", "logits", "label"):
        np.testing.assert_array_equal(arrays[f], content[f])
    assert keys == content["keys"]
    np.testing.assert_array_equal(true, content["true_label"])


def _no_tarfile(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("the tar was parsed member by member")
    monkeypatch.setattr(wds_store, "decode_tar", refuse)


def test_the_index_reader_returns_what_was_written_without_parsing_the_tar(store, content, monkeypatch):
    names = tarfile.open(store / "shard-000000.tar").getnames()
    assert names[-1] == INDEX_MEMBER and names.count(INDEX_MEMBER) == 1
    assert all(r["member_index"] for r in json.loads((store / "manifest.json").read_text())["shards"].values())
    _no_tarfile(monkeypatch)
    _assert_written(_read_all(store), content)


def test_shards_of_several_member_patterns_take_the_index_path(content, tmp_path, monkeypatch):
    path = _write(tmp_path, content, image_files=True)
    _no_tarfile(monkeypatch)
    _assert_written(_read_all(path), content)
    monkeypatch.undo()  # the images themselves are read member by member (not the hot path)
    files = open_store(path).read_image_files(0, N)
    assert files[3] == ("png", b"\x89PNG 3") and files[4] == ("jpg", b"\xff\xd8jpeg 4")


def test_webdataset_reads_the_same_samples_and_skips_the_index(store, content):
    wds = pytest.importorskip("webdataset")
    tars = sorted(str(p) for p in store.glob("shard-*.tar"))
    got = list(wds.WebDataset(tars, shardshuffle=False).decode(*wds_decoders(store)))
    assert len(got) == N
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(N)]
    assert not any(k.startswith("__index") for s in got for k in s)
    for i, s in enumerate(got):
        np.testing.assert_array_equal(s["dir.bits.gz"], content["direction"][i])
        np.testing.assert_array_equal(s["logits.npy"], content["logits"][i])
        assert (s["label.cls"], s["cls"], s["key"]) == (content["label"][i], content["true_label"][i],
                                                        content["keys"][i])


def test_a_store_written_before_the_index_is_read_member_by_member(content, tmp_path, monkeypatch):
    monkeypatch.setattr(wds_store, "WRITE_INDEX", False)
    path = _write(tmp_path, content)
    monkeypatch.undo()
    assert INDEX_MEMBER not in tarfile.open(path / "shard-000001.tar").getnames()
    assert not any("member_index" in r for r in json.loads((path / "manifest.json").read_text())["shards"].values())
    calls = []
    real = wds_store.decode_tar
    monkeypatch.setattr(wds_store, "decode_tar", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    _assert_written(_read_all(path), content)
    assert sorted(set(calls)) == [0, 1, 2]
    assert verify_store(path).ok


def _forge(store: Path, s: int, members: list[tuple[str, bytes]], *, gnu: bool = False) -> None:
    """Rewrite shard s's tar with `members` and record its new sha256 and size, as a hostile or
    buggy producer would (only checks deeper than the checksum can notice)."""
    tar = store / f"shard-{s:06d}.tar"
    if gnu:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        tar.write_bytes(buf.getvalue())
    else:
        wds_store.write_tar(tar, members)
    meta = {"sha256": hashlib.sha256(tar.read_bytes()).hexdigest(), "bytes": tar.stat().st_size}
    for p in (store / "manifest.json", store / "shards" / f"{s:06d}.json"):
        doc = json.loads(p.read_text())
        rec = doc["shards"][f"{s:06d}"] if p.name == "manifest.json" else doc
        rec["files"][tar.name] = meta
        p.write_text(json.dumps(doc))


def _members(store: Path, s: int) -> list[tuple[str, bytes]]:
    with tarfile.open(store / f"shard-{s:06d}.tar") as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf]


def _copy(store: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(store, tmp_path / store.name))


def test_a_tar_not_written_as_the_writer_writes_it_is_read_member_by_member(store, content, tmp_path):
    """The same members and a true index, in a GNU tar (other headers): the index path cannot
    vouch for its headers, the member-by-member path reads it, same samples."""
    path = _copy(store, tmp_path)
    _forge(path, 1, _members(path, 1), gnu=True)
    _assert_written(_read_all(path), content)
    assert verify_store(path).ok


def test_an_index_that_does_not_describe_its_tar_is_refused_by_read_and_verify(store, tmp_path):
    path = _copy(store, tmp_path)
    members = _members(path, 2)
    name, index = members[-1]
    doc = json.loads(index[:-13])
    doc["sizes"][0] += 1  # sample 32's .idx is one byte longer than the index says
    body = json.dumps(doc, separators=(",", ":")).encode()
    _forge(path, 2, members[:-1] + [(name, body + b"\n%011d\n" % (len(body) + 13))])
    with pytest.raises(StoreError, match=r"shard-000002.tar member __index__ does not describe the tar"):
        open_store(path).read(32, 40)
    report = str(verify_store(path))
    assert report.startswith("FAILED") and "shard 2:" in report and "__index__ does not describe" in report
    # the other shards still read
    np.testing.assert_array_equal(open_store(path).read(0, 32)["label"], _content()["label"][:32])


def test_a_member_after_the_index_is_refused(store, tmp_path):
    path = _copy(store, tmp_path)
    members = _members(path, 0)
    _forge(path, 0, members + [("000000999.idx", b"999")])
    with pytest.raises(StoreError, match=r"'000000999.idx' after its __index__ member"):
        open_store(path).read(0, 4)


def test_an_index_member_that_is_too_large_is_refused_unread(store, tmp_path):
    path = _copy(store, tmp_path)
    members = _members(path, 0)
    for content in (b" " * (1 << 20), b" " * (1 << 20) + b"\n%011d\n" % ((1 << 20) + 13)):  # no trailer; a true one
        _forge(path, 0, members[:-1] + [(INDEX_MEMBER, content)])
        with pytest.raises(StoreError, match=rf"__index__' is {len(content)} bytes, above the limit"):
            open_store(path).read(0, 4)


def test_a_member_renamed_behind_the_index_is_refused(store, tmp_path):
    """Sizes and index as written, but one header names another member: what the index says is
    a label is not one to tarfile (nor to WebDataset), so the index is not trusted over the headers."""
    path = _copy(store, tmp_path)
    members = _members(path, 1)
    i = next(i for i, (n, _) in enumerate(members) if n == "000000017.label.cls")
    members[i] = ("000000017.label.txt", members[i][1])
    _forge(path, 1, members)
    with pytest.raises(StoreError, match=r"sample 000000017: members do not follow wds_layout.v2"):
        open_store(path).read(16, 20)
    assert "shard 1:" in str(verify_store(path))


def test_the_index_follows_its_published_schema(store):
    from enspipe.stores.manifest import schema_errors

    name, content = _members(store, 2)[-1]
    assert name == INDEX_MEMBER and content.endswith(b"\n%011d\n" % len(content))
    doc = json.loads(content[:-13])
    assert schema_errors(doc, "wds_index.v1.json") == []
    assert doc["first"] == 32 and len(doc["sample_patterns"]) == N - 32
    # every size listed is the size tarfile gives the member
    assert doc["sizes"] == [len(data) for _, data in _members(store, 2)[:-1]]
