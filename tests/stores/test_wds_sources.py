"""A wds store of source images larger than their pixels at the store's geometry (ImageNet
JPEGs at 224 px are often several times the size of 224x224x3) is read, verified and served
with the source's bytes; a forged member above `limits.max_image_bytes` is still refused
from its header, before it is read."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from enspipe.util.errors import StoreError
from enspipe.stores import StoreIdentity, create_store, open_store, store_path, verify_store

GEOMETRY = (3, 8, 8)   # pixels at this geometry: a PNG of at most ~200 bytes
N = 12


def _noisy_jpeg(seed: int, side: int = 384) -> bytes:
    """A JPEG far larger than any 8x8 image could be (noise does not compress)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture()
def source_store(tmp_path):
    ident = StoreIdentity(
        dataset={"source": "synthetic-jpegs", "split": "train", "fingerprint": "f" * 64, "num_samples": N}, geometry=GEOMETRY,
        preprocess="resize 8", num_classes=4, model_name="synthetic", weights_sha256="0" * 64,
        attack="fgsm", attack_params={"loss": "ce", "target": "pred_label", "direction": "sign(grad)"},
        label_mode="pred")
    path = store_path(tmp_path, ident, "wds")
    writer = create_store(path, ident, fmt="wds", shard_size=N // 2)
    rng = np.random.default_rng(0)
    files = [("jpg", _noisy_jpeg(i)) for i in range(N)]
    directions = (rng.integers(0, 2, size=(N, *GEOMETRY), dtype=np.int8) * 2 - 1).astype(np.int8)
    for s in writer.pending_shards():
        a, b = writer.shard_range(s)
        writer.write_shard(s, direction=directions[a:b], logits=np.zeros((b - a, 4), np.float16),
                           label=np.zeros(b - a, np.int64), keys=[f"c/{i}.JPEG" for i in range(a, b)],
                           image_files=files[a:b])
    writer.finalize()
    return path, files, directions


def test_source_images_larger_than_their_pixels_are_read(source_store):
    path, files, directions = source_store
    # Above every pixel-member bound (the largest is a key's 64 KiB), so the tar is above its pixel-only bound.
    assert min(len(data) for _, data in files) > 65536
    reader = open_store(path)
    np.testing.assert_array_equal(reader.read(0, N)["direction"], directions)
    report = verify_store(path)
    assert report.ok, report


def test_a_source_member_above_the_image_cap_is_refused_unread(source_store, monkeypatch):
    path, files, _ = source_store
    monkeypatch.setenv("ENSPIPE_MAX_IMAGE_BYTES", str(min(len(d) for _, d in files) - 1))
    with pytest.raises(StoreError, match="member .*src.jpg.* bytes, above the limit"):
        open_store(path).read(0, N)
