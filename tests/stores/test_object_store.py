"""Stores on object storage: a real S3-compatible server (moto's standalone server) on 127.0.0.1,
s3fs as the client, bytes crossing HTTP; nothing of the client is mocked.

The oracles are the local store made from the same arrays (or the same precompute), the arrays
the test wrote, and the objects the test reads back from the server itself with s3fs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enspipe.util.errors import StoreError
from enspipe.stores import StoreIdentity, create_store, list_stores, open_store, store_path, verify_store

pytest.importorskip("s3fs", reason="object-store tests need pip install -e '.[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need pip install -e '.[s3]'")

from cli_runner import run_cli  # noqa: E402 -- forked from the session's pre-imported zygote
from loopback import free_port  # noqa: E402
N, SHARD = 300, 128  # shards of 128, 128, 44


def _identity() -> StoreIdentity:
    return StoreIdentity(dataset={"source": "digits", "split": "train", "num_samples": N, "fingerprint": "f1" * 32},
                         geometry=(1, 8, 8), preprocess="none", num_classes=3, model_name="m",
                         weights_sha256="ab" * 32, attack="fgsm", attack_params={}, label_mode="pred")


def _arrays() -> dict:
    rng = np.random.default_rng(0)
    return {"direction": rng.integers(-1, 2, (N, 1, 8, 8)).astype(np.int8),
            "logits": rng.standard_normal((N, 3)).astype(np.float16),
            "label": rng.integers(0, 3, N).astype(np.int64),
            "keys": [f"digits/{i:05d}" for i in range(N)]}


def _write(w, a: dict, shards=None) -> None:
    for s in (range(w.num_shards) if shards is None else shards):
        lo, hi = w.shard_range(s)
        w.write_shard(s, direction=a["direction"][lo:hi], logits=a["logits"][lo:hi], label=a["label"][lo:hi],
                      keys=a["keys"][lo:hi])


def _objects(s3, url: str) -> dict[str, dict]:
    """{name: info} of every object under a store URL, read from the server with s3fs."""
    fs, root = s3["fs"], url[len("s3://"):]
    fs.invalidate_cache()
    return {k[len(root) + 1:]: v for k, v in fs.find(root, detail=True).items()}


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_store_on_s3_holds_the_bytes_of_the_local_store_and_reads_back(s3, tmp_path, fmt):
    a = _arrays()
    url = store_path(f"s3://{s3['bucket']}/stores", _identity(), fmt)
    assert isinstance(url, str) and url.startswith(f"s3://{s3['bucket']}/stores/") and url.endswith(f".{fmt}")
    w = create_store(url, _identity(), fmt=fmt, shard_size=SHARD)
    _write(w, a)
    w.finalize()
    local = store_path(tmp_path / "local", _identity(), fmt)
    lw = create_store(local, _identity(), fmt=fmt, shard_size=SHARD)
    _write(lw, a)
    lw.finalize()

    # Every shard file is the same object, byte for byte, as the local store's file.
    objects = _objects(s3, url)
    shard_files = [p.relative_to(local).as_posix() for p in local.rglob("*")
                   if p.is_file() and p.name != "manifest.json" and not p.relative_to(local).as_posix().startswith("shards/")
                   and "zarr.json" not in p.name]
    assert shard_files
    for rel in shard_files:
        assert s3["fs"].cat_file(f"{url[5:]}/{rel}") == (local / rel).read_bytes(), rel
    manifest = json.loads(s3["fs"].cat_file(f"{url[5:]}/manifest.json"))
    assert manifest["complete"] and manifest["shards"] == json.loads((local / "manifest.json").read_text())["shards"]
    assert {f"shards/{s:06d}.json" for s in range(3)} <= set(objects)

    r = open_store(url)
    got = r.read(0, N)
    np.testing.assert_array_equal(got["direction"], a["direction"])
    np.testing.assert_array_equal(got["label"], a["label"])
    assert got["logits"].tobytes() == a["logits"].tobytes()
    assert r.keys(250, 260) == a["keys"][250:260]
    assert verify_store(url).ok and verify_store(r).ok
    (info,) = list_stores(f"s3://{s3['bucket']}/stores")
    assert (info.path, info.fmt, info.complete, info.shards_done) == (url, fmt, True, 3)


def _counting_downloads(monkeypatch) -> list[str]:
    from enspipe.stores import remote

    got: list[str] = []
    real_get, real_cat = remote.Remote.get_file, remote.Remote.cat

    def get_file(self, rel, local):
        got.append(rel)
        return real_get(self, rel, local)

    def cat(self, rel):  # small objects are fetched in one GET into memory
        if rel != "manifest.json" and not rel.startswith("shards/"):
            got.append(rel)
        return real_cat(self, rel)

    monkeypatch.setattr(remote.Remote, "get_file", get_file)
    monkeypatch.setattr(remote.Remote, "cat", cat)
    return got


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_second_epoch_reads_from_the_cache_and_the_cache_keeps_its_cap(s3, monkeypatch, fmt):
    a = _arrays()
    url = store_path(f"s3://{s3['bucket']}/st", _identity(), fmt)
    w = create_store(url, _identity(), fmt=fmt, shard_size=SHARD)
    _write(w, a)
    w.finalize()
    downloads = _counting_downloads(monkeypatch)
    r = open_store(url)
    np.testing.assert_array_equal(r.read_directions(0, N), a["direction"])
    objects = sorted(rel for rec in r.records.values() for rel in rec["files"])
    # Directions alone need only the objects they are in (zarr: one array of four; wds: the tar).
    assert sorted(downloads) == [rel for rel in objects if fmt == "wds" or rel.startswith("direction/")]
    got = r.read(0, N)
    assert got["logits"].tobytes() == a["logits"].tobytes() and r.keys(0, N) == a["keys"]
    first = len(downloads)
    assert sorted(downloads) == objects  # then the rest: every shard object downloaded exactly once
    again = open_store(url)  # a new reader (another epoch, another process) on the same cache
    np.testing.assert_array_equal(again.read_directions(0, N), a["direction"])
    assert len(downloads) == first

    # A cap below the store's size: reading everything keeps at most the cap plus the working shard.
    sizes = {rel: meta["bytes"] for rec in r.records.values() for rel, meta in rec["files"].items()}
    one_shard = max(sum(m["bytes"] for m in rec["files"].values()) for rec in r.records.values())
    cap = one_shard + 1
    small = open_store(url, cache_dir=s3["cache"] / "small", cache_bytes=cap)
    for lo in range(0, N, SHARD):
        np.testing.assert_array_equal(small.read_directions(lo, min(N, lo + SHARD)), a["direction"][lo:lo + SHARD])
        held = sum(p.stat().st_size for p in small.path.rglob("*") if p.is_file()
                   and p.relative_to(small.path).as_posix() in sizes)
        assert 0 < held <= cap + one_shard  # 0 would mean the cache layout changed and nothing was counted


def test_resume_on_s3_keeps_finished_shards_and_ignores_objects_without_a_record(s3, monkeypatch):
    a = _arrays()
    url = store_path(f"s3://{s3['bucket']}/st", _identity(), "wds")
    w = create_store(url, _identity(), fmt="wds", shard_size=SHARD)
    _write(w, a, shards=[0, 1])
    before = {k: v["ETag"] for k, v in _objects(s3, url).items() if k.startswith(("shard-00000", "shards/"))}
    # A killed upload of shard 2: its object is there, its completion record is not.
    s3["fs"].pipe_file(f"{url[5:]}/shard-000002.tar", b"half a tar")
    with pytest.raises(StoreError, match="incomplete"):
        open_store(url)
    w2 = create_store(url, _identity(), fmt="wds", shard_size=SHARD)  # the re-run
    assert w2.pending_shards() == [2]
    part = open_store(url, allow_incomplete=True)
    np.testing.assert_array_equal(part.read_directions(0, 2 * SHARD), a["direction"][:2 * SHARD])
    with pytest.raises(StoreError, match="not written"):
        part.read_directions(2 * SHARD, N)
    from enspipe.stores import remote

    uploaded: list[str] = []
    real = remote.Remote.put_file
    monkeypatch.setattr(remote.Remote, "put_file", lambda self, local, rel: (uploaded.append(rel), real(self, local, rel)))
    _write(w2, a, shards=w2.pending_shards())
    w2.finalize()
    assert uploaded == ["shard-000002.tar"]  # finished shards were not rewritten
    after = _objects(s3, url)
    assert all(after[k]["ETag"] == etag for k, etag in before.items())
    np.testing.assert_array_equal(open_store(url).read_directions(0, N), a["direction"])


def test_a_corrupted_object_is_refused_on_read_and_named_by_verify(s3):
    a = _arrays()
    url = store_path(f"s3://{s3['bucket']}/st", _identity(), "zarr")
    w = create_store(url, _identity(), fmt="zarr", shard_size=SHARD)
    _write(w, a)
    w.finalize()
    key = f"{url[5:]}/direction/c/1/0/0/0"
    data = bytearray(s3["fs"].cat_file(key))
    data[len(data) // 2] ^= 0x10  # same size: only the checksum can tell
    s3["fs"].pipe_file(key, bytes(data))
    r = open_store(url)
    np.testing.assert_array_equal(r.read_directions(0, SHARD), a["direction"][:SHARD])
    with pytest.raises(StoreError, match="direction/c/1/0/0/0 does not match its completion record"):
        r.read_directions(SHARD, 2 * SHARD)
    report = verify_store(url)
    assert not report.ok and any("shard 1" in p and "direction/c/1/0/0/0" in p for p in report.problems)


def test_two_concurrent_writers_of_one_store_on_s3_leave_one_sound_store(s3, tmp_path):
    a = _arrays()
    url = store_path(f"s3://{s3['bucket']}/st", _identity(), "zarr")
    np.savez(tmp_path / "a.npz", **{k: v for k, v in a.items() if k != "keys"})
    script = f'''
import numpy as np
from enspipe.stores import StoreIdentity, create_store
a = dict(np.load({str(tmp_path / "a.npz")!r}))
ident = StoreIdentity(**{_identity().to_dict()!r})
w = create_store({url!r}, ident, fmt="zarr", shard_size={SHARD})
for s in range(w.num_shards):
    lo, hi = w.shard_range(s)
    w.write_shard(s, direction=a["direction"][lo:hi], logits=a["logits"][lo:hi], label=a["label"][lo:hi],
                  keys=[f"digits/{{i:05d}}" for i in range(lo, hi)])
w.finalize()
'''
    procs = [subprocess.Popen([sys.executable, "-c", script], env=s3["env"], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert verify_store(url).ok
    np.testing.assert_array_equal(open_store(url).read_directions(0, N), a["direction"])


def _one_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_bad_object_storage_input_is_one_line_naming_the_url(s3, digits_static):
    url = f"s3://{s3['bucket']}/st/x.zarr"
    env = s3["env"]
    run = lambda *argv, **kw: run_cli(*argv, env={**env, **kw}, timeout=600)
    # An endpoint nobody listens on: bounded by the connect timeout, then one line.
    line = _one_line(run("ls", url, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
                         ENSPIPE_REMOTE_TIMEOUT="2"))
    assert url in line and "AWS_ENDPOINT_URL" in line
    # A bucket that does not exist.
    line = _one_line(run("precompute", "--model", str(digits_static), "--dataset", "digits", "--device", "cpu",
                         "--out", "s3://no-such-bucket-here/st"))
    assert "s3://no-such-bucket-here/st" in line and "does not exist" in line
    # No credentials anywhere.
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    proc = run_cli("ls", url, env={**bare, "HOME": str(s3["cache"]), "AWS_CONFIG_FILE": "/nonexistent",
                                   "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}, timeout=600)
    line = _one_line(proc)
    assert url in line and "credentials" in line.lower()
    # Not a store.
    s3["fs"].pipe_file(f"{s3['bucket']}/st/y.zarr/junk", b"x")
    proc = run("verify", f"s3://{s3['bucket']}/st/y.zarr")
    assert proc.returncode == 1 and "is not an enspipe store" in proc.stderr


def test_precompute_on_dask_to_s3_then_train_is_bit_identical_to_local_disk(s3, digits_static, tmp_path):
    """The issue's CI line: precompute --format both to s3:// on a 2-worker dask cluster, train
    ens-adv on the s3:// stores (a loader worker process reading through the cache), and the
    same on local disk: the same stores, byte for byte, and the same weights, bit for bit."""
    env = s3["env"]
    common = ["--model", str(digits_static), "--dataset", "digits", "--format", "both", "--shard-size", "512",
              "--device", "cpu"]
    remote = run_cli("precompute", *common, "--dask-workers", "2", "--out", f"s3://{s3['bucket']}/st", env=env,
                     timeout=900)
    assert remote.returncode == 0, remote.stderr[-3000:]
    urls = [ln for ln in remote.stdout.splitlines() if ln.startswith("s3://")]
    local = run_cli("precompute", *common, "--out", str(tmp_path / "st"), env=env, timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]
    paths = [ln for ln in local.stdout.splitlines() if ln.startswith("/")]
    assert len(urls) == len(paths) == 2
    for url, path in zip(urls, paths):
        assert url.split("/st/", 1)[1] == path.split("/st/", 1)[1]  # content-addressed: the same name
        for rec in json.loads(Path(path, "manifest.json").read_text())["shards"].values():
            for rel in rec["files"]:
                assert s3["fs"].cat_file(f"{url[5:]}/{rel}") == Path(path, rel).read_bytes(), rel
    again = run_cli("precompute", *common, "--out", f"s3://{s3['bucket']}/st", env=env, timeout=900)
    assert again.returncode == 0 and again.stderr.count("reused s3://") == 2, again.stderr[-2000:]

    def train(shards, out):
        argv = ["train", "--model", "A", "--dataset", "digits", "--mode", "ens-adv", "--epochs", "2",
                "--device", "cpu", "--loader-workers", "1", "--out", str(out)]
        for s in shards:
            argv += ["--shards", s]
        proc = run_cli(*argv, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return (out / "model.safetensors").read_bytes()

    assert train(urls, tmp_path / "from_s3") == train(paths, tmp_path / "from_disk")


def test_loader_workers_share_a_cache_smaller_than_the_store_and_read_every_direction(s3, monkeypatch):
    """Two DataLoader worker processes stream one s3:// store through a cache of about one shard:
    they evict each other's shards all epoch long, and every sample still carries its own
    direction (a file removed under a reader would read as zeros or fail)."""
    import torch

    from enspipe.data import create_dataset
    from enspipe.stream import DirectionStream

    ds = create_dataset("digits", split="train")
    n = len(ds)
    ident = StoreIdentity(dataset=ds.identity(), geometry=ds.geometry.shape, preprocess=ds.geometry.preprocess,
                          num_classes=ds.num_classes, model_name="m", weights_sha256="ab" * 32, attack="fgsm",
                          attack_params={}, label_mode="pred")
    url = store_path(f"s3://{s3['bucket']}/st", ident, "zarr")
    w = create_store(url, ident, fmt="zarr", shard_size=256)
    d = np.random.default_rng(1).integers(-1, 2, (n, *ds.geometry.shape)).astype(np.int8)
    for s in range(w.num_shards):
        lo, hi = w.shard_range(s)
        w.write_shard(s, direction=d[lo:hi], logits=np.zeros((hi - lo, ds.num_classes), np.float16),
                      label=ds.labels[lo:hi].astype(np.int64), keys=list(ds.keys[lo:hi]))
    w.finalize()
    r = open_store(url)
    shard_bytes = max(sum(m["bytes"] for m in rec["files"].values()) for rec in r.records.values())
    monkeypatch.setenv("ENSPIPE_STORE_CACHE_BYTES", str(shard_bytes + 1))
    stream = DirectionStream(ds, [url], batch_size=32, block_size=64, seed=3)
    seen = 0
    for batch in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2):
        idx = batch["index"].numpy()
        np.testing.assert_array_equal(batch["d"][:, 0].numpy(), d[idx])
        seen += len(idx)
    assert seen == n
