"""A store URL's local mirror (stores/remote_read.py, remote_cache.py) on fsspec's in-memory
filesystem (`memory://`: the same fsspec seam as s3://, no server): reads that bypass the cache
and a store written again at the same URL. Oracles: the arrays and image bytes the test wrote."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from enspipe.stores import StoreIdentity, create_store, open_store, store_path

N, SHARD = 40, 16


def _identity() -> StoreIdentity:
    return StoreIdentity(dataset={"source": "digits", "split": "train", "num_samples": N, "fingerprint": "f1" * 32},
                         geometry=(1, 8, 8), preprocess="none", num_classes=3, model_name="m",
                         weights_sha256="ab" * 32, attack="fgsm", attack_params={}, label_mode="pred")


def _write(url: str, fmt: str, seed: int, images: np.ndarray | None = None) -> np.ndarray:
    d = np.random.default_rng(seed).integers(-1, 2, (N, 1, 8, 8)).astype(np.int8)
    w = create_store(url, _identity(), fmt=fmt, shard_size=SHARD)
    for s in range(w.num_shards):
        lo, hi = w.shard_range(s)
        extra = {} if images is None else {"images": images[lo:hi]}
        w.write_shard(s, direction=d[lo:hi], logits=np.zeros((hi - lo, 3), np.float16),
                      label=np.zeros(hi - lo, np.int64), keys=[f"k{i}" for i in range(lo, hi)], **extra)
    w.finalize()
    return d


@pytest.fixture
def root(monkeypatch, tmp_path):
    import fsspec

    monkeypatch.setenv("ENSPIPE_STORE_CACHE", str(tmp_path / "cache"))
    base = f"memory://b{uuid.uuid4().hex[:10]}"
    yield base
    fsspec.filesystem("memory").rm(base.removeprefix("memory://"), recursive=True)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_store_written_again_at_the_same_url_reads_its_new_bytes(root, fmt):
    import fsspec

    url = store_path(f"{root}/stores", _identity(), fmt)
    first = _write(url, fmt, seed=1)
    np.testing.assert_array_equal(open_store(url).read_directions(0, N), first)  # now in the cache
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)
    second = _write(url, fmt, seed=2)  # the same identity, other bytes
    assert (second != first).any()
    np.testing.assert_array_equal(open_store(url).read_directions(0, N), second)


def test_a_wds_store_urls_images_are_fetched_for_reading(root):
    images = np.random.default_rng(3).integers(0, 256, (N, 1, 8, 8)).astype(np.uint8)
    url = store_path(f"{root}/stores", _identity(), "wds")
    _write(url, "wds", seed=1, images=images)
    r = open_store(url)  # nothing read yet: no shard in the cache
    np.testing.assert_array_equal(r.read_images(3, 30), images[3:30])
    assert len(r.read_image_files(0, N)) == N
