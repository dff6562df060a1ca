"""enspipe.data: canonical order, keys, labels, geometry, fingerprints, safe readers."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from enspipe import data
from enspipe.data import Geometry, create_dataset, resolve_data_root
from enspipe.data.base import class_interleaved
from enspipe.util.errors import DataError, EnspipeError


# -----------------------------------------------------------------------------
# helpers

def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    """Write uint8 `arr` as an IDX file (magic 0,0,8,ndim; big-endian dims; bytes)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw += arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)


def fake_mnist(root: Path, n: int = 20, seed: int = 0, compress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=n, dtype=np.uint8)
    raw = root / "MNIST" / "raw"
    ext = ".gz" if compress else ""
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", x, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", y, compress)
    return x, y


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 [H,W] or [H,W,3] -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def check_common(src: data.SampleSource, n_check: int = 7) -> None:
    """Invariants every source keeps."""
    n = len(src)
    assert len(src.keys) == n == len(src.labels) and src.labels.dtype == np.int64
    assert len(set(src.keys)) == n and not any("." in k or "/" in k for k in src.keys)
    assert len(src.fingerprint) == 64 and src.num_classes == len(src.classes)
    idx = np.arange(min(n, n_check))
    u8 = src.images_uint8(idx)
    x = src.images(idx)
    assert u8.dtype == np.uint8 and u8.shape == (len(idx), *src.geometry.shape)
    assert x.dtype == torch.float32 and x.shape == u8.shape
    assert torch.equal(x, torch.from_numpy(u8).float() / 255)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    stacked = torch.stack([src[int(i)][0] for i in idx])
    assert torch.equal(stacked, x)
    assert [src[int(i)][1] for i in idx] == src.labels[idx].tolist()
    assert torch.equal(src.images(slice(0, len(idx))), x)
    ident = src.identity()
    assert ident["fingerprint"] == src.fingerprint and ident["num_samples"] == n
    assert Geometry.from_dict(ident["geometry"]) == src.geometry


# -----------------------------------------------------------------------------
# digits (offline default)

def test_digits_order_and_fingerprint_stable():
    a = create_dataset("digits")
    b = create_dataset("digits")
    assert a is not b and a.fingerprint == b.fingerprint and a.keys == b.keys
    assert len(a) == 1500 and len(create_dataset("digits", split="test")) == 297
    assert a.geometry.shape == (1, 28, 28) and a.geometry.preprocess == "digits8x8:bilinear->28x28:uint8"
    assert a.keys[0] == "digits-train-000000" and a.name == "digits"
    assert sorted(set(a.labels.tolist())) == list(range(10))
    check_common(a)
    # the subprocess starts fresh: no caches, another hash seed
    code = "from enspipe.data import create_dataset; print(create_dataset('digits').fingerprint)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == a.fingerprint


def test_digits_splits_are_disjoint_and_cover_the_set():
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = create_dataset("digits"), create_dataset("digits", split="test")
    assert np.bincount(np.concatenate([train.labels, test.labels])).tolist() == np.bincount(d.target).tolist()
    # pixels in [0,1] are exactly k/255
    x = train.images(slice(0, 50))
    assert torch.equal(x, torch.round(x * 255) / 255)


def test_fingerprint_changes_with_limit_split_and_geometry():
    base = create_dataset("digits")
    fps = {base.fingerprint,
           create_dataset("digits", limit=100).fingerprint,
           create_dataset("digits", limit=101).fingerprint,
           create_dataset("digits", split="test").fingerprint,
           create_dataset("digits", image_size=32).fingerprint}
    assert len(fps) == 5
    lim = create_dataset("digits", limit=100)
    assert len(lim) == 100 and lim.keys == base.keys[:100] and lim.identity()["limit"] == 100
    assert np.array_equal(lim.images_uint8(slice(None)), base.images_uint8(slice(0, 100)))
    big = create_dataset("digits", split="test", limit=10_000)  # more than there are: keeps all
    assert len(big) == 297 and big.limit == 10_000
    assert create_dataset("digits", image_size=32).geometry.shape == (1, 32, 32)


@pytest.mark.parametrize("kwargs, words", [
    ({"spec": "nope"}, "known sources are digits, mnist, cifar10"),
    ({"spec": "imagefolder:"}, "needs a path"),
    ({"spec": "mnist:/x"}, "unknown dataset source"),
    ({"spec": "digits", "split": "validation"}, "unknown split"),
    ({"spec": "digits", "limit": 0}, "limit must be a positive integer"),
    ({"spec": "digits", "limit": -3}, "limit must be a positive integer"),
    ({"spec": "digits", "image_size": 0}, "image size must be a positive integer"),
])
def test_bad_arguments_raise_one_line_data_error(kwargs, words):
    spec = kwargs.pop("spec")
    with pytest.raises(DataError) as e:
        create_dataset(spec, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, EnspipeError)


def test_resolve_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ENSPIPE_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("ENSPIPE_DATA")
    assert resolve_data_root(None) == Path.home() / ".cache" / "enspipe" / "data"


# -----------------------------------------------------------------------------
# mnist

def test_mnist_real_files(mnist_root):
    before = sorted(p.name for p in (mnist_root / "MNIST" / "raw").iterdir())
    train = create_dataset("mnist", data_root=mnist_root)
    test = create_dataset("mnist", split="test", data_root=mnist_root)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.geometry == Geometry(1, 28, 28, "mnist-idx:uint8") and train.classes == tuple("0123456789")
    for src in (train, test):
        counts = np.bincount(src.labels, minlength=10)
        assert counts.size == 10 and counts.min() > 0.08 * len(src) and counts.max() < 0.12 * len(src)
        check_common(src)
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the famous first digits
    assert train.keys[123] == "mnist-train-000123"
    x = train.images(np.arange(0, 60000, 97))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert create_dataset("mnist", data_root=mnist_root).fingerprint == train.fingerprint
    assert train.fingerprint != test.fingerprint
    assert sorted(p.name for p in (mnist_root / "MNIST" / "raw").iterdir()) == before  # nothing written


def test_mnist_fingerprint_follows_pixels_and_accepts_extracted_files(tmp_path):
    x, y = fake_mnist(tmp_path / "a")
    a = create_dataset("mnist", data_root=tmp_path / "a")
    assert np.array_equal(a.images_uint8(slice(None))[:, 0], x) and a.labels.tolist() == y.tolist()
    check_common(a)
    # the same data uncompressed (as torchvision extracts it): same fingerprint
    fake_mnist(tmp_path / "b", compress=False)
    assert create_dataset("mnist", data_root=tmp_path / "b").fingerprint == a.fingerprint
    # one pixel of one image changes: the fingerprint changes
    x2 = x.copy()
    x2[7, 13, 13] ^= 1
    write_idx(tmp_path / "c" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", x2)
    write_idx(tmp_path / "c" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", y)
    c = create_dataset("mnist", data_root=tmp_path / "c")
    assert c.fingerprint != a.fingerprint and c.keys == a.keys
    # one label changes: too
    y2 = y.copy()
    y2[3] = (y2[3] + 1) % 10
    write_idx(tmp_path / "c" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", y2)
    assert create_dataset("mnist", data_root=tmp_path / "c").fingerprint not in (a.fingerprint, c.fingerprint)
    # limit and image size are part of the identity
    assert create_dataset("mnist", data_root=tmp_path / "a", limit=5).fingerprint != a.fingerprint
    r = create_dataset("mnist", data_root=tmp_path / "a", image_size=32)
    assert r.geometry.shape == (1, 32, 32) and r.fingerprint != a.fingerprint
    check_common(r)
    assert create_dataset("mnist", data_root=tmp_path / "a", image_size=28).fingerprint == a.fingerprint


def test_mnist_corrupt_files_raise_data_error(tmp_path):
    fake_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    good = (raw / "train-images-idx3-ubyte.gz").read_bytes()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        create_dataset("mnist", data_root=tmp_path)
    write_idx(raw / "train-images-idx3-ubyte.gz", np.zeros((20, 28, 28), np.uint8))
    raw_bytes = gzip.decompress((raw / "train-images-idx3-ubyte.gz").read_bytes())
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw_bytes[:-10]))  # short data
    with pytest.raises(DataError, match="truncated or corrupt"):
        create_dataset("mnist", data_root=tmp_path)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw_bytes[4:]))
    with pytest.raises(DataError, match="bad magic"):
        create_dataset("mnist", data_root=tmp_path)
    write_idx(raw / "train-images-idx3-ubyte.gz", np.zeros((19, 28, 28), np.uint8))  # 19 images, 20 labels
    with pytest.raises(DataError, match="19 images but"):
        create_dataset("mnist", data_root=tmp_path)


def test_mnist_missing_names_expected_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_network_available", lambda *a, **k: False)
    with pytest.raises(DataError) as e:
        create_dataset("mnist", split="test", data_root=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in msg and "\n" not in msg
    assert "t10k-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "no network" in msg and not (tmp_path / "nowhere").exists()


def test_network_probe_is_bounded(monkeypatch):
    import threading

    assert data._network_available("no-such-host.invalid", timeout=0.5) is False
    # A connect (or DNS lookup) that hangs until the test lets it go: the probe answers while it
    # still hangs (no wall-clock bound to assert: the hang ends only after the answer).
    release, entered, waited_out = threading.Event(), threading.Event(), threading.Event()

    def hang(*a, **k):
        entered.set()
        if not release.wait(60):  # a probe that waited for the connect ends here, and fails below
            waited_out.set()
        raise OSError("released by the test")

    monkeypatch.setattr(data.socket, "create_connection", hang)
    try:
        assert data._network_available("example.org", timeout=0.3) is False
        assert entered.is_set() and not waited_out.is_set()
    finally:
        release.set()


# -----------------------------------------------------------------------------
# cifar10 (no real data here: a fake batch folder with the same pickle structure)

def fake_cifar(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch).tolist()
        batch = {b"batch_label": b"fake", b"labels": y, b"data": x,
                 b"filenames": [b"f%d.png" % i for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        if name != "test_batch":
            xs.append(x)
            ys.extend(y)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.array(ys)


def test_cifar10_reads_numpy_pickles(tmp_path):
    x, y = fake_cifar(tmp_path)
    src = create_dataset("cifar10", data_root=tmp_path)
    assert len(src) == 20 and src.geometry.shape == (3, 32, 32) and src.classes[0] == "airplane"
    assert np.array_equal(src.images_uint8(slice(None)), x) and src.labels.tolist() == y.tolist()
    assert len(create_dataset("cifar10", split="test", data_root=tmp_path)) == 4
    check_common(src)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=2)
    data._cifar10_arrays.cache_clear()
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        create_dataset("cifar10", data_root=tmp_path)
    assert not marker.exists()


def test_cifar10_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_network_available", lambda *a, **k: False)
    with pytest.raises(DataError, match="cifar-10-batches-py.*no network"):
        create_dataset("cifar10", data_root=tmp_path)


# -----------------------------------------------------------------------------
# imagefolder

def make_image_tree(root: Path, classes=("cat", "ant", "bee"), per_class=3, size=(40, 30)) -> dict:
    """Solid-colour PNGs (colour encodes class and index) in class folders."""
    from PIL import Image

    colours = {}
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = (10 * c + 1, 7 * i + 2, 200)
            name = f"img.{i}.png" if i % 2 else f"IMG_{i}.PNG"  # dots and upper-case extensions
            Image.new("RGB", size, colour).save(root / cls / name)
            colours[f"{cls}/{name}"] = colour
    junk = root / classes[-1]
    (junk / "notes.txt").write_text("not an image")
    (junk / "._junk.png").write_bytes(b"macOS resource fork")
    return colours


def test_imagefolder(tmp_path):
    colours = make_image_tree(tmp_path / "flat")
    src = create_dataset(f"imagefolder:{tmp_path / 'flat'}", image_size=16)
    assert src.classes == ("ant", "bee", "cat") and len(src) == 9
    assert src.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]  # classes interleaved (issue 22)
    assert src.geometry == Geometry(3, 16, 16, "rgb:resize18:center-crop16:bilinear:uint8")
    assert src.name == f"imagefolder:{(tmp_path / 'flat').resolve()}"
    assert src.keys[0] == "ant_IMG_0_PNG" and src.keys[3] == "ant_IMG_2_PNG" and src.keys[6] == "ant_img_1_png"
    assert src.keys[1] == "bee_IMG_0_PNG" and src.order == "class-interleaved"
    check_common(src, n_check=9)
    for i, rel in enumerate(src._files):  # the pixels are the file's solid colour
        assert (src.images_uint8([i])[0].reshape(3, -1).T == colours[rel]).all()
    default = create_dataset(f"imagefolder:{tmp_path / 'flat'}", split="train", limit=2)
    assert default.geometry.shape == (3, 224, 224) and "resize256:center-crop224" in default.geometry.preprocess
    assert len(default) == 2 and default.fingerprint != src.fingerprint
    with pytest.raises(DataError, match="no train/, val/ or test/ folder.*`split` train"):
        create_dataset(f"imagefolder:{tmp_path / 'flat'}", split="test")  # it would be the training images
    # content changes are seen through size and mtime
    before = src.fingerprint
    f = tmp_path / "flat" / "bee" / "img.1.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert create_dataset(f"imagefolder:{tmp_path / 'flat'}", image_size=16).fingerprint != before


def test_imagefolder_split_folders(tmp_path):
    make_image_tree(tmp_path / "ds" / "train", per_class=2)
    make_image_tree(tmp_path / "ds" / "val", classes=("ant", "cat"), per_class=1)
    train = create_dataset(f"imagefolder:{tmp_path / 'ds'}", image_size=8)
    val = create_dataset(f"imagefolder:{tmp_path / 'ds'}", split="test", image_size=8)
    assert train.classes == val.classes == ("ant", "bee", "cat")  # labels agree across splits
    assert len(train) == 6 and val.labels.tolist() == [0, 2]
    only_train = tmp_path / "t"
    make_image_tree(only_train / "train", per_class=1)
    with pytest.raises(DataError, match="no val/ or test/"):
        create_dataset(f"imagefolder:{only_train}", split="test")
    with pytest.raises(DataError, match="not a directory"):
        create_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        create_dataset(f"imagefolder:{tmp_path / 'empty'}")


# -----------------------------------------------------------------------------
# wds

def write_shards(folder: Path, n_shards=2, per_shard=5, shape=(12, 10), gray=False) -> tuple[list, list]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    images, labels = [], []
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"train-{s:06d}.tar")) as w:
            for i in range(per_shard):
                px = rng.integers(0, 256, size=shape if gray else (*shape, 3), dtype=np.uint8)
                label = int(rng.integers(0, 7))
                w.write({"__key__": f"s{s}/sample{i:03d}", "png": png_bytes(px), "cls": label})
                images.append(px[None] if gray else px.transpose(2, 0, 1))
                labels.append(label)
    return images, labels


def test_wds_round_trip_exact_pixels(tmp_path):
    images, labels = write_shards(tmp_path / "rgb")
    pattern = str(tmp_path / "rgb" / "train-{000000..000001}.tar")
    src = create_dataset(f"wds:{pattern}")
    assert len(src) == 10 and src.geometry == Geometry(3, 12, 10, "wds:rgb:uint8")
    order = class_interleaved(labels)  # the tars' samples, classes interleaved (issue 22)
    assert np.array_equal(src.images_uint8(slice(None)), np.stack(images)[order])
    assert src.labels.tolist() == np.asarray(labels)[order].tolist() and src.num_classes == max(labels) + 1
    keys = [f"s{i // 5}_sample{i % 5:03d}" for i in range(10)]
    assert src.keys == [keys[i] for i in order]
    check_common(src, n_check=10)
    again = create_dataset(f"wds:{pattern}")
    assert again.fingerprint == src.fingerprint
    assert create_dataset(f"wds:{pattern}", limit=3).fingerprint != src.fingerprint
    resized = create_dataset(f"wds:{pattern}", image_size=8)
    assert resized.geometry.shape == (3, 8, 8) and resized.fingerprint != src.fingerprint
    check_common(resized)
    # a single shard, grayscale
    gimages, glabels = write_shards(tmp_path / "gray", n_shards=1, gray=True)
    g = create_dataset(f"wds:{tmp_path / 'gray' / 'train-000000.tar'}")
    gorder = class_interleaved(glabels)
    assert g.geometry.shape == (1, 12, 10) and np.array_equal(g.images_uint8(slice(None)), np.stack(gimages)[gorder])


def test_wds_refuses_pickles_and_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    shard = tmp_path / "bad-000000.tar"
    payload = pickle.dumps(_Evil(marker))
    with tarfile.open(shard, "w") as tf:
        for name, blob in [("a.png", png_bytes(np.zeros((4, 4), np.uint8))), ("a.cls", b"1"),
                           ("a.pickle", payload)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    with pytest.raises(DataError, match="'a.pickle'.*never unpickles"):
        create_dataset(f"wds:{shard}")
    assert not marker.exists()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, blob in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))


def test_wds_bad_shards(tmp_path):
    img = png_bytes(np.zeros((4, 4), np.uint8))
    _tar(tmp_path / "up.tar", [("../a.png", img), ("../a.cls", b"1")])
    with pytest.raises(DataError, match="unsafe member name"):
        create_dataset(f"wds:{tmp_path / 'up.tar'}")
    _tar(tmp_path / "nocls.tar", [("a.png", img)])
    with pytest.raises(DataError, match="sample 'a'.*one .cls"):
        create_dataset(f"wds:{tmp_path / 'nocls.tar'}")
    _tar(tmp_path / "badcls.tar", [("a.png", img), ("a.cls", b"cat")])
    with pytest.raises(DataError, match="not an ascii integer"):
        create_dataset(f"wds:{tmp_path / 'badcls.tar'}")
    _tar(tmp_path / "dup.tar", [("a.png", img), ("a.cls", b"1"), ("b.png", img), ("b.cls", b"0"),
                                ("a.jpg", img), ("a.cls", b"1")])
    with pytest.raises(DataError, match="'a' occurs twice"):
        create_dataset(f"wds:{tmp_path / 'dup.tar'}")
    _tar(tmp_path / "mixed.tar", [("a.png", img), ("a.cls", b"1"),
                                  ("b.png", png_bytes(np.zeros((5, 4), np.uint8))), ("b.cls", b"0")])
    mixed = create_dataset(f"wds:{tmp_path / 'mixed.tar'}")
    with pytest.raises(DataError, match="sample 'a' is 4x4, the first sample is 4x5"):  # b (class 0) comes first
        mixed.images(slice(None))
    assert create_dataset(f"wds:{tmp_path / 'mixed.tar'}", image_size=4).images(slice(None)).shape == (2, 1, 4, 4)
    with pytest.raises(DataError, match="does not exist"):
        create_dataset(f"wds:{tmp_path / 'nothere-{0..2}.tar'}")
    (tmp_path / "gz.tar").write_bytes(gzip.compress(b"x" * 1000))
    with pytest.raises(DataError, match="not an uncompressed tar"):
        create_dataset(f"wds:{tmp_path / 'gz.tar'}")


def test_wds_reader_and_store_refuse_the_same_pickle_extensions(tmp_path):
    from enspipe.util import tarsafe
    from enspipe.stores.wds.store import FORBIDDEN_EXTS

    # one list: the store backend refuses exactly what the dataset reader refuses
    assert FORBIDDEN_EXTS == tarsafe.PICKLE_EXTENSIONS and "pt" in FORBIDDEN_EXTS
    img = png_bytes(np.zeros((4, 4), np.uint8))
    for ext in sorted(tarsafe.PICKLE_EXTENSIONS):
        shard = tmp_path / f"{ext}-000000.tar"
        _tar(shard, [("a.png", img), ("a.cls", b"1"), (f"a.{ext}", b"not read")])
        with pytest.raises(DataError, match=f"'a.{ext}'.*never unpickles"):
            create_dataset(f"wds:{shard}")
