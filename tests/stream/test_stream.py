"""enspipe.stream.DirectionStream (the stores as a torch dataset) and reading a wds store with
plain webdataset through enspipe.stores.wds_decoders."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from enspipe.data import create_dataset
from enspipe.util.errors import ConfigError, StoreError
from enspipe.stores import open_store, wds_decoders
from enspipe.stream import DirectionStream

LIMIT = 700  # digits samples: not a multiple of the block size, so the last block is short


def _store(static: Path, root: Path, fmt: str = "zarr") -> Path:
    from enspipe.precompute import PrecomputeConfig, precompute

    (path,) = precompute(PrecomputeConfig(model=str(static), dataset="digits", limit=LIMIT, attacks=("fgsm",),
                                          out=str(root), shard_size=128, fmt=fmt, device="cpu"))
    return path


@pytest.fixture(scope="module")
def stores(digits_static, digits_static2, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stream-stores")
    return _store(digits_static, root), _store(digits_static2, root)


@pytest.fixture(scope="module")
def wds_store(digits_static, tmp_path_factory) -> Path:
    return _store(digits_static, tmp_path_factory.mktemp("wds-store"), fmt="wds")


@pytest.fixture(scope="module")
def ds():
    return create_dataset("digits", limit=LIMIT)


def _directions(paths) -> np.ndarray:
    """[N, K, C, H, W]: every store's directions, read whole."""
    return np.stack([open_store(p).read(0, LIMIT)["direction"] for p in paths], axis=1)


def _check(samples: list[dict], ds, want: np.ndarray) -> list[int]:
    idx = [int(s["index"]) for s in samples]
    for s in samples:
        i = int(s["index"])
        assert s["x"].dtype == torch.uint8 and s["d"].dtype == torch.int8
        np.testing.assert_array_equal(s["x"].numpy(), ds.images_uint8([i])[0])
        assert int(s["y"]) == ds.labels[i]
        np.testing.assert_array_equal(s["d"].numpy(), want[i])
    return idx


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_carries_exactly_its_stores_directions(stores, ds, workers):
    want = _directions(stores)
    stream = DirectionStream(ds, stores, block_size=64, buffer_blocks=3, seed=5)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    samples = list(loader)
    assert samples[0]["d"].shape == (2, 1, 28, 28)
    idx = _check(samples, ds, want)
    assert sorted(idx) == list(range(LIMIT))          # each sample once per epoch
    assert idx != sorted(idx)                          # shuffled
    stream.set_epoch(1)
    assert [int(s["index"]) for s in loader] != idx    # another epoch, another order


def test_two_ranks_read_disjoint_halves_and_batches_match(stores, ds):
    want = _directions(stores)
    seen = []
    for rank in (0, 1):
        stream = DirectionStream(ds, stores, batch_size=32, block_size=64, rank=rank, world_size=2, seed=1)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        idx = []
        for b in loader:
            assert b["d"].shape[1:] == (2, 1, 28, 28) and len(b["index"]) <= 32
            np.testing.assert_array_equal(b["d"].numpy(), want[b["index"].numpy()])
            np.testing.assert_array_equal(b["x"].numpy(), ds.images_uint8(b["index"].numpy()))
            np.testing.assert_array_equal(b["y"].numpy(), ds.labels[b["index"].numpy()])
            idx += b["index"].tolist()
        assert len(idx) == len(set(idx)) == stream.num_samples
        seen.append(set(idx))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(LIMIT))


def test_crops_and_flips_move_image_and_directions_alike(stores, ds):
    want = _directions(stores)
    stream = DirectionStream(ds, stores, augment="crop+flip", crop_padding=2, seed=2)
    for s in list(stream)[:40]:
        i = int(s["index"])
        x0 = np.pad(ds.images_uint8([i])[0], ((0, 0), (2, 2), (2, 2)))
        d0 = np.pad(want[i], ((0, 0), (0, 0), (2, 2), (2, 2)))
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                   if np.array_equal(s["x"].numpy(), (x0[..., dy:dy + 28, dx:dx + 28])[..., ::-1 if f else 1])
                   and np.array_equal(s["d"].numpy(), (d0[..., dy:dy + 28, dx:dx + 28])[..., ::-1 if f else 1])]
        assert matches, f"sample {i}: no single crop/flip gives both the image and its directions"


def test_a_plain_training_loop_on_the_stream(stores, ds):
    """The README's plain-loop recipe, as a test: ensemble adversarial training in 20 lines."""
    from enspipe import attacks
    from enspipe.models import create_model

    torch.manual_seed(0)
    model = create_model("D", num_classes=10, input_size=(1, 28, 28))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = DirectionStream(ds, stores, batch_size=64, seed=0, sources=range(1 + len(stores)))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    losses = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        for b in loader:
            x, y, half = b["x"].float() / 255, b["y"], len(b["y"]) // 2
            if b["source"] == 0:   # the model itself: an online pass, with its predicted label
                d, _, _ = attacks.direction(model, x[:half], attack="fgsm", label="pred")
            else:                  # store source-1: its directions, read from that store only
                d = b["d"][:half]
            x = torch.cat([attacks.apply_direction(x[:half], d, 0.3), x[half:]])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert len(losses) == 2 * int(np.ceil(LIMIT / 64)) and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_drawn_sources_read_one_store_per_batch(stores, ds, monkeypatch):
    """Issue 26 item 3: with `sources`, a batch carries its drawn store's directions (read whole
    from that store, compared here), and an epoch reads about N*K/(K+1) directions, not N*K."""
    from enspipe.stores import StoreReader

    want = _directions(stores)
    reads = {"n": 0}
    original = StoreReader.read_directions

    def counting(self, start, stop):
        reads["n"] += stop - start
        return original(self, start, stop)

    monkeypatch.setattr(StoreReader, "read_directions", counting)
    stream = DirectionStream(ds, stores, batch_size=32, block_size=64, seed=3, sources=[0, 1, 2])
    seen, drawn = [], set()
    for b in stream:
        idx = b["index"].numpy()
        seen += idx.tolist()
        drawn.add(b["source"])
        if b["source"] == 0:
            assert b["d"] is None
        else:
            np.testing.assert_array_equal(b["d"].numpy(), want[idx, b["source"] - 1])
    assert sorted(seen) == list(range(LIMIT)) and drawn == {0, 1, 2}
    assert reads["n"] <= LIMIT * 2 / 3 + 2 * 64  # two of three sources read, up to a block's worth
    with pytest.raises(ConfigError, match="sources needs batch_size"):
        DirectionStream(ds, stores, sources=[0, 1])
    with pytest.raises(ConfigError, match=r"sources must be distinct ids in \[0, 2\]"):
        DirectionStream(ds, stores, batch_size=8, sources=[0, 3])


def test_a_stream_refuses_stores_of_other_data(stores):
    other = create_dataset("digits", limit=LIMIT - 1)
    with pytest.raises(StoreError, match=r"limit is 700 but the data.s is 699 \(field: dataset\.limit\)"):
        DirectionStream(other, stores)
    with pytest.raises(ConfigError, match="list of store paths"):
        DirectionStream(other, str(stores[0]))


# --- plain webdataset -------------------------------------------------------------------------

def _tars(store: Path) -> list[str]:
    return sorted(str(p) for p in Path(store).glob("shard-*.tar"))


def test_plain_webdataset_decodes_the_readers_directions(wds_store):
    import webdataset as wds

    reader = open_store(wds_store)
    want = reader.read(0, LIMIT)
    got = list(wds.WebDataset(_tars(wds_store), shardshuffle=False).decode(*wds_decoders(wds_store)))
    assert len(got) == LIMIT
    for s in got:
        i = s["idx"]
        assert s["dir.bits.gz"].dtype == np.int8 and s["dir.bits.gz"].shape == (1, 28, 28)
        np.testing.assert_array_equal(s["dir.bits.gz"], want["direction"][i])
        np.testing.assert_array_equal(s["logits.npy"], want["logits"][i])
        assert s["label.cls"] == want["label"][i] and s["key"] == reader.keys(i, i + 1)[0]
    # Without webdataset's gzip pre-handler the member keeps its name; geometry may replace the store.
    raw = next(iter(wds.WebDataset(_tars(wds_store), shardshuffle=False)
                    .decode(*wds_decoders(geometry=(1, 28, 28)), pre=[])))
    np.testing.assert_array_equal(raw["dir.bits.gz"], want["direction"][raw["idx"]])


def test_plain_webdataset_decodes_a_layout_v1_store():
    """Stores written before layout v2 (`.dir.npy.gz` bit planes) decode to the reader's directions too."""
    import webdataset as wds

    store = next((Path(__file__).resolve().parents[1] / "fixtures" / "legacy_wds").glob("*/*/*.wds"))
    reader = open_store(store)
    want = reader.read(0, reader.num_samples)
    got = list(wds.WebDataset(_tars(store), shardshuffle=False).decode(*wds_decoders(store)))
    assert len(got) == reader.num_samples
    for s in got:
        np.testing.assert_array_equal(s["dir.npy.gz"], want["direction"][s["idx"]])


def test_without_enspipes_decoders_webdataset_gets_bit_planes(wds_store):
    """The trap the handlers exist for: the default decoder returns the packed planes."""
    import webdataset as wds

    s = next(iter(wds.WebDataset(_tars(wds_store), shardshuffle=False).decode()))
    assert isinstance(s["dir.bits.gz"], bytes) and len(s["dir.bits.gz"]) == 98  # the packed sign bits
    v1 = next((Path(__file__).resolve().parents[1] / "fixtures" / "legacy_wds").glob("*/*/*.wds"))
    s = next(iter(wds.WebDataset(_tars(v1), shardshuffle=False).decode()))
    assert s["dir.npy.gz"].dtype == np.uint8 and s["dir.npy.gz"].ndim == 2 and s["dir.npy.gz"].shape[0] == 2


def test_the_decoders_refuse_pickles_and_need_a_shape(tmp_path):
    import webdataset as wds

    tar = tmp_path / "bad-000000.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (("000000001.pyd", b"\x80\x04K\x01."), ("000000002.dir.bits.gz", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    def why(e: BaseException) -> str:  # webdataset wraps a handler's error in its DecodingError
        return f"{e} {why(e.__cause__)}" if e.__cause__ is not None else str(e)

    with pytest.raises(Exception) as e:
        list(wds.WebDataset([str(tar)], shardshuffle=False).decode(*wds_decoders(geometry=(1, 28, 28))))
    assert "forbidden extension .pyd" in why(e.value)
    with pytest.raises(Exception) as e:
        list(wds.WebDataset([str(tar)], shardshuffle=False).select(lambda s: "dir.bits.gz" in s)
             .decode(*wds_decoders(), pre=[]))
    assert "needs the store" in why(e.value)


def test_the_batches_are_the_same_whatever_the_loader_workers(stores, ds):
    """Issue 25 item 3: windows of blocks are dealt to workers whole, so 0, 2 and 3 workers give
    the same batches (numbered by `seq`), and every batch is whole but the epoch's last."""
    def batches(workers: int) -> dict[int, dict]:
        stream = DirectionStream(ds, stores, batch_size=48, block_size=64, buffer_blocks=2, augment="crop+flip", seed=4)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        return {int(b["seq"]): b for b in loader}

    ref = batches(0)
    assert sorted(ref) == list(range(len(ref))) == list(range(-(-LIMIT // 48)))
    assert [len(ref[k]["index"]) for k in ref] == [48] * (LIMIT // 48) + [LIMIT % 48]
    for workers in (2, 3):
        got = batches(workers)
        assert sorted(got) == sorted(ref)
        for k, b in ref.items():
            for key in ("index", "x", "y", "d"):
                assert torch.equal(got[k][key], b[key]), (workers, k, key)
