"""Stores on a throttled S3: the session's moto server behind tests/loopback.py's ThrottleProxy,
which answers chosen requests with S3's own 503 SlowDown / 500 InternalError XML or cuts the
connection off, with real s3fs/botocore in between (nothing of the client is mocked).

Oracles: the same precompute written with no throttling (its objects' bytes), the arrays the test
wrote, and the proxy's own count of what it refused.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from enspipe.stores import StoreIdentity, create_store, open_store, store_path, verify_store
from enspipe.util.errors import StoreError

pytest.importorskip("s3fs", reason="object-store tests need pip install -e '.[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need pip install -e '.[s3]'")

from loopback import throttled  # noqa: E402,F401 -- the proxy factory fixture

N, SHARD = 128, 64  # 2 shards
FAULTS = ("slowdown", "drop", "internal")  # an object's 1st, 2nd and 3rd refusals
CALLS_IN_FLIGHT = 2  # precompute's writer: a shard's upload and its completion record, one after another


def _precompute(model, out: str) -> str:
    from enspipe.precompute import PrecomputeConfig, precompute

    (path,) = precompute(PrecomputeConfig(model=str(model), dataset="digits", limit=N, attacks=("fgsm",),
                                          format="zarr", shard_size=SHARD, device="cpu", out=out))
    return str(path)


def _objects(s3, url: str) -> dict[str, bytes]:
    """{name: bytes} of every object under a store URL, read from the server itself (not the proxy)."""
    fs, root = s3["fs"], url[len("s3://"):]
    fs.invalidate_cache()
    return {k[len(root) + 1:]: fs.cat_file(k) for k in fs.find(root)}


def test_a_precompute_through_throttling_completes_with_the_bytes_of_an_unthrottled_one(s3, throttled, digits_static,
                                                                                       monkeypatch):
    """Each object's first three requests answered SlowDown, cut off, then InternalError: with the
    settings before (botocore's 3 attempts, s3fs trying again a SlowDown or a cut-off but not an
    InternalError) the very first call fails."""
    oracle = _precompute(digits_static, f"s3://{s3['bucket']}/plain")  # no proxy yet
    proxy = throttled(first=3, kinds=FAULTS)
    got = _precompute(digits_static, f"s3://{s3['bucket']}/throttled")
    assert got.split("/throttled/", 1)[1] == oracle.split("/plain/", 1)[1]  # content-addressed: the same name
    counts = proxy.reset()
    want, have = _objects(s3, oracle), _objects(s3, got)
    assert sum(counts["faults"].values()) >= 3 * len(want), counts  # every object's first 3 requests refused
    assert set(have) == set(want)
    for name in sorted(want):
        if name != "manifest.json":  # the manifest alone holds times
            assert have[name] == want[name], name
    m_have, m_want = json.loads(have["manifest.json"]), json.loads(want["manifest.json"])
    assert m_have["complete"] and m_have["shards"] == m_want["shards"]


def _identity() -> StoreIdentity:
    return StoreIdentity(dataset={"source": "digits", "split": "train", "num_samples": N, "fingerprint": "f1" * 32},
                         geometry=(1, 8, 8), preprocess="none", num_classes=3, model_name="m",
                         weights_sha256="ab" * 32, attack="fgsm", attack_params={}, label_mode="pred")


def _store(s3) -> tuple[str, dict]:
    """A complete zarr store URL written with no throttling, and the arrays it holds."""
    rng = np.random.default_rng(0)
    a = {"direction": rng.integers(-1, 2, (N, 1, 8, 8)).astype(np.int8),
         "logits": rng.standard_normal((N, 3)).astype(np.float16), "label": rng.integers(0, 3, N).astype(np.int64),
         "keys": [f"digits/{i:05d}" for i in range(N)]}
    url = store_path(f"s3://{s3['bucket']}/stores", _identity(), "zarr")
    w = create_store(url, _identity(), fmt="zarr", shard_size=SHARD)
    for s in range(w.num_shards):
        lo, hi = w.shard_range(s)
        w.write_shard(s, **{k: v[lo:hi] for k, v in a.items()})
    w.finalize()
    return url, a


def _same(got: dict, a: dict) -> None:
    np.testing.assert_array_equal(got["direction"], a["direction"])
    np.testing.assert_array_equal(got["label"], a["label"])
    assert got["logits"].tobytes() == a["logits"].tobytes()


def test_a_read_and_verify_through_throttling_feed_the_bytes_written(s3, throttled):
    url, a = _store(s3)
    proxy = throttled(first=3, kinds=FAULTS)
    reader = open_store(url)
    _same(reader.read(0, N), a)
    assert reader.keys(0, N) == a["keys"]
    report = verify_store(url)  # deep: every object downloaded again and hashed
    assert report.ok, report.problems
    assert sum(proxy.reset()["faults"].values()) >= 3 * 8  # listing, manifest, and every shard object's GETs


def test_sustained_throttling_ends_in_one_line_naming_the_url_and_leaves_no_store_that_looks_complete(
        s3, throttled, digits_static, monkeypatch):
    """After the first shards are written every request is answered SlowDown: precompute stops
    with one line that names the store and says it was throttled, after a bounded number of tries."""
    monkeypatch.setenv("ENSPIPE_REMOTE_RETRIES", "2")
    monkeypatch.setenv("ENSPIPE_REMOTE_RETRY_S", "60")  # the tries bound it, not the seconds
    counter = throttled()  # nothing refused: how many requests a whole precompute makes
    _precompute(digits_static, f"s3://{s3['bucket']}/counted")
    whole = counter.reset()["requests"]
    proxy = throttled(always=True, after=whole // 2, methods=("PUT",), kinds=("slowdown",))  # with a body: "SlowDown"
    root = f"s3://{s3['bucket']}/st"
    with pytest.raises(StoreError) as e:
        _precompute(digits_static, root)
    line = str(e.value)
    assert "\n" not in line and root in line and "SlowDown" in line and "throttled" in line, line
    assert "fewer ranks" in line, line  # throttling: the request rate is the user's to change
    counts = proxy.reset()
    # Bounded by ENSPIPE_REMOTE_RETRIES: 2 tries of the failing call, one request each (neither s3fs
    # nor botocore tries again on its own), CALLS_IN_FLIGHT calls at once at most.
    assert 0 < counts["faults"]["slowdown"] <= 2 * 1 * CALLS_IN_FLIGHT, counts
    # What was written is not taken for a store: its manifest says incomplete, and a reader refuses it.
    (manifest,) = [k for k in s3["fs"].find(f"{s3['bucket']}/st") if k.endswith("/manifest.json")]
    assert json.loads(s3["fs"].cat_file(manifest))["complete"] is False
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.upstream.geturl())
    with pytest.raises(StoreError, match="incomplete"):
        open_store(f"s3://{manifest.rsplit('/', 1)[0]}")


def test_a_shard_get_cut_off_mid_body_is_fetched_again_and_a_short_body_is_refused(s3, throttled, tmp_path):
    url, a = _store(s3)
    # Each direction object's first GET cut off after half its bytes (Content-Length still whole).
    proxy = throttled(first=1, methods=("GET",), match="/direction/", kinds=("drop",))
    _same(open_store(url).read(0, N), a)
    assert proxy.reset()["faults"]["drop"] == N // SHARD  # one per shard's direction object
    # A body short but said to be whole (Content-Length halved too), the object's S3 checksum
    # header kept: botocore's check sees it, and the GET is tried again.
    proxy = throttled(first=1, methods=("GET",), match="/direction/", kinds=("truncate",))
    _same(open_store(url, cache_dir=tmp_path / "checked").read(0, N), a)
    assert proxy.reset()["faults"]["truncate"] == N // SHARD
    # Without the checksum header (an object or server without one): only the record sees it, by
    # the size (a short body) or by the sha256 (a changed byte).
    for kind in ("truncate-unchecked", "flip-unchecked"):
        proxy = throttled(first=1, methods=("GET",), match="/direction/", kinds=(kind,))
        reader = open_store(url, cache_dir=tmp_path / kind)  # an empty cache: every object fetched
        with pytest.raises(StoreError, match="does not match its completion record") as e:
            reader.read(0, N)
        assert "/direction/" in str(e.value) and url in str(e.value)
        kept = [p for p in (reader.source.mirror / "direction").rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert not kept  # no shard object kept: nothing read from it
        assert proxy.reset()["faults"][kind] >= 1
        throttled()  # nothing refused now: the same cache reads the bytes written
        _same(open_store(url, cache_dir=tmp_path / kind).read(0, N), a)


@pytest.mark.parametrize("name, value", [("ENSPIPE_REMOTE_RETRIES", "many"), ("ENSPIPE_REMOTE_RETRIES", "0"),
                                         ("ENSPIPE_REMOTE_RETRY_S", "-1"), ("ENSPIPE_REMOTE_RETRY_MODE", "legacy"),
                                         ("ENSPIPE_REMOTE_TIMEOUT", "soon"), ("ENSPIPE_REMOTE_TIMEOUT", "0")])
def test_a_bad_retry_setting_is_one_line_naming_it(monkeypatch, name, value):
    from enspipe.stores.remote import Remote

    monkeypatch.setenv(name, value)
    with pytest.raises(StoreError, match=name) as e:
        Remote("s3://bucket/stores")
    line = str(e.value)
    assert "\n" not in line and value in line, line


@pytest.mark.parametrize("value", ["lots", "-1"])
def test_a_bad_store_cache_cap_is_one_line_naming_it(monkeypatch, value):
    """A negative cap would evict the whole mirror on every read and never let a prefetch fit."""
    from enspipe.stores.remote import cache_settings

    monkeypatch.setenv("ENSPIPE_STORE_CACHE_BYTES", value)
    with pytest.raises(StoreError, match="ENSPIPE_STORE_CACHE_BYTES") as e:
        cache_settings()
    assert "\n" not in str(e.value) and value in str(e.value)


def test_a_root_whose_bucket_denies_its_head_is_not_called_missing(s3, throttled):
    """S3 answers a HEAD of a bucket 403 only when it exists: the check lets the first real call
    name the denial, never "does not exist; create it first" (every request denied here)."""
    from enspipe.stores.remote import check_remote_root

    proxy = throttled(always=True, kinds=("denied",))
    check_remote_root(f"s3://{s3['bucket']}/stores")
    assert proxy.reset()["faults"]["denied"] >= 1


def test_a_failing_gateway_is_reported_as_the_store_s_health_not_the_request_rate(s3, throttled, monkeypatch):
    """Every request answered 500 InternalError (a node or gateway down, not throttling): the line
    says to check the store, not to run fewer ranks."""
    from enspipe.stores.remote import Remote

    monkeypatch.setenv("ENSPIPE_REMOTE_RETRIES", "2")
    monkeypatch.setenv("ENSPIPE_REMOTE_RETRY_S", "60")
    s3["fs"].pipe_file(f"{s3['bucket']}/health/x", b"x")  # straight to the server
    throttled(always=True, kinds=("internal",))
    with pytest.raises(StoreError) as e:
        Remote(f"s3://{s3['bucket']}/health").cat("x")
    line = str(e.value)
    assert "InternalError" in line and "2 tries" in line and "health" in line, line
    assert "request rate" not in line and "fewer ranks" not in line, line
