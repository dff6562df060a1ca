"""The device decode (issue 26): batched `torchvision.io.decode_jpeg` with resize / crop on the device.

No GPU here: the same code runs with device="cpu" (torchvision's libjpeg-turbo on CPU tensors), and
these tests hold that path to the PIL path, whose pixels the test computes itself with PIL. The two
decoders differ by small pixel errors (another decoder build, another resize kernel): the tolerance is
a mean absolute difference under 0.5 levels of 255 and no pixel off by more than 4 levels (measured
here: means 0.14-0.18 levels and no pixel off by more than 1 level, for RGB and grayscale; a crop one
pixel off, or a resize without antialiasing, breaks it).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from jpeg_folders import assert_close_to_pil, make_jpeg_folder, photo, pil_crop
from cli_runner import run_cli


# (w, h) of each image: landscape, portrait, square, odd sizes, so resize and crop both matter
SIZES = [(120, 90), (90, 120), (100, 100), (131, 77), (77, 131), (96, 112)]


@pytest.fixture
def folder(tmp_path) -> Path:
    """imagefolder of 2 classes: the JPEGs of SIZES and one PNG (which the device path leaves to PIL)."""
    root = tmp_path / "imgs"
    for i, (w, h) in enumerate(SIZES):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.jpg").write_bytes(photo(i, w, h))
    (root / "c0" / "z.png").write_bytes(photo(99, 110, 85, "PNG"))
    return root


def test_the_device_path_on_cpu_matches_pil_on_imagefolder(folder):
    """decode_batch(device=cpu) of an imagefolder's chunk: JPEGs within the stated tolerance of the
    PIL decode computed here; the PNG goes through the PIL path, so it is equal bit for bit."""
    import torch

    from enspipe.data import create_dataset
    from enspipe.data.decode import EncodedChunk, decode_batch
    from enspipe.data.loader import encoded_chunk

    ds = create_dataset(f"imagefolder:{folder}", image_size=56)  # resize 64, crop 56
    chunk = encoded_chunk(ds, range(len(ds)))
    assert isinstance(chunk, EncodedChunk) and len(chunk) == len(SIZES) + 1
    kinds = [isinstance(it, bytes) for it in chunk.items]
    assert sum(kinds) == len(SIZES)  # the PNG came back as pixels, the JPEGs as their bytes
    got = decode_batch([chunk], ds.device_transform(), ds.geometry.shape, torch.device("cpu")).numpy()
    assert got.shape == (len(ds), 3, 56, 56) and got.dtype == np.uint8
    for i, f in enumerate(ds._files):
        data = (ds.folder / f).read_bytes()
        if f.endswith(".png"):
            assert np.array_equal(got[i], ds.images_uint8([i])[0])
        else:
            assert_close_to_pil(got[i], pil_crop(data, 64, 56))


def _wds(path: Path, images: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for i, (ext, data) in enumerate(images):
            for name, payload in ((f"s{i:03d}.{ext}", data), (f"s{i:03d}.cls", str(i % 3).encode())):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(payload), 1_700_000_000
                tf.addfile(ti, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_device_path_on_cpu_matches_pil_on_wds(tmp_path, mode):
    """wds with an image size: every image resized to 40x40 (bilinear, as PIL shrinks), in the
    first image's mode (L: grayscale decode), within the tolerance of PIL's own."""
    import torch
    from PIL import Image

    from enspipe.data import create_dataset
    from enspipe.data.loader import encoded_chunk

    images = [("jpg", photo(i, w, h, mode=mode)) for i, (w, h) in enumerate(SIZES)]
    ds = create_dataset(f"wds:{_wds(tmp_path / 'a.tar', images)}", image_size=40)
    assert ds.geometry.shape == ((1 if mode == "L" else 3), 40, 40)
    from enspipe.data.decode import decode_batch

    got = decode_batch([encoded_chunk(ds, range(len(ds)))], ds.device_transform(), ds.geometry.shape,
                       torch.device("cpu")).numpy()
    by_key = dict(zip([f"s{i:03d}" for i in range(len(images))], images))
    for row, key in enumerate(ds._raw_keys):
        im = Image.open(io.BytesIO(by_key[key][1])).convert(mode).resize((40, 40), Image.Resampling.BILINEAR)
        want = np.asarray(im)
        assert_close_to_pil(got[row], want[None] if mode == "L" else want.transpose(2, 0, 1))


def test_wds_without_an_image_size_refuses_another_size_from_the_header(tmp_path):
    """The workers read headers only; an image of another size than the first is refused there with
    the PIL path's own line (naming the sample)."""
    from enspipe.data import create_dataset
    from enspipe.util.errors import DataError
    from enspipe.data.loader import encoded_chunk

    ds = create_dataset(f"wds:{_wds(tmp_path / 'b.tar', [('jpg', photo(0, 32, 32)), ('jpg', photo(1, 40, 32))])}")
    with pytest.raises(DataError, match=r"wds: sample 's001' is 40x32, the first sample is 32x32"):
        encoded_chunk(ds, range(len(ds)))
    with pytest.raises(DataError, match=r"wds: sample 's001' is 40x32, the first sample is 32x32"):
        ds.images_uint8([1])  # the PIL path says the same


def test_the_encoded_loader_feeds_the_same_batches_through_worker_processes(folder):
    """ChunkLoader(encoded=True) with a worker process (which only reads bytes) and batch_to_device
    give the PIL loader's batches within the tolerance, in the same order and spans."""
    import torch

    from enspipe.data import create_dataset
    from enspipe.data.loader import ChunkLoader, batch_to_device, gather, spans_of, to_device

    ds = create_dataset(f"imagefolder:{folder}", image_size=56)
    batches = [(0, 4), (4, 7)]
    spans = spans_of(batches, 2)
    cpu = torch.device("cpu")
    with ChunkLoader(ds, 1, encoded=True) as enc, ChunkLoader(ds, 0) as pil:
        a, b = enc(spans), pil(spans)
        for s, e in batches:
            x = batch_to_device(gather(a, e - s), cpu, ds)
            y = to_device(gather(b, e - s), cpu)
            assert x.dtype == torch.float32 and x.shape == y.shape == (e - s, 3, 56, 56)
            assert_close_to_pil((x * 255).round().to(torch.uint8).numpy(), (y * 255).round().to(torch.uint8).numpy())


def test_decoder_resolution_and_the_store_identity(folder):
    """auto is the PIL path on the CPU and nvjpeg on CUDA; nvjpeg without CUDA is an OptionError naming
    `decoder`; an in-memory source has nothing to decode. The PIL path adds nothing to a store's
    identity (attack params), so keys made before decoders existed stay; nvjpeg is a store of its own."""
    from enspipe.config import OptionError
    from enspipe.data.decode import decoder_params, resolve_decoder
    from enspipe.precompute.plan import _attack_params

    assert resolve_decoder("auto", "cpu") == "cpu"
    assert resolve_decoder("auto", "cuda:0") == "nvjpeg"
    assert resolve_decoder("cpu", "cuda") == "cpu"
    assert resolve_decoder("auto", "cuda", decodes=False) == "cpu"
    with pytest.raises(OptionError) as e:
        resolve_decoder("nvjpeg", "cpu")
    assert e.value.field == "decoder" and "\n" not in str(e.value)
    assert decoder_params("cpu") == {}
    assert _attack_params("fgsm", "pred", "fp32", "cpu") == _attack_params("fgsm", "pred")
    assert _attack_params("fgsm", "pred", "fp32", "nvjpeg")["decoder"] == "nvjpeg"


def test_an_existing_imagefolder_stores_key_is_unchanged():
    """tests/fixtures/legacy_imagefolder's store was written before decoders existed (its manifest is
    the oracle): its identity rebuilt with the PIL decoder (what `auto` is on this CPU) hashes to the
    key in its path; with nvjpeg it does not."""
    from enspipe.data.decode import resolve_decoder
    from enspipe.precompute.plan import _attack_params
    from enspipe.stores import StoreIdentity

    (store,) = (Path(__file__).parents[1] / "fixtures" / "legacy_imagefolder").glob("stores/*/*/*.zarr")
    manifest = json.loads((store / "manifest.json").read_text())
    ident = manifest["identity"]
    for decoder, same in ((resolve_decoder("auto", "cpu"), True), ("nvjpeg", False)):
        rebuilt = StoreIdentity.from_dict({**ident, "attack_params": _attack_params(ident["attack"], "pred", "fp32",
                                                                                    decoder)})
        assert (rebuilt.key() == manifest["identity_key"]) is same
        assert (store.name.endswith(f"-{rebuilt.key()[:16]}.zarr")) is same


def test_nvjpeg_without_cuda_is_one_line_from_the_cli(tmp_path):
    r = run_cli("precompute", "--model", "resnet18", "--pretrained", "--dataset", "digits", "--device", "cpu",
                "--decoder", "nvjpeg", "--out", tmp_path / "s")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--decoder" in lines[0] and "CUDA" in lines[0], r.stderr


def test_default_loader_workers_leave_a_core_for_the_writer():
    """cores - 2 decoders (one core drives the compute, one writes), at least 1; none in memory."""
    from enspipe.data import create_dataset
    from enspipe.data.loader import default_workers

    from enspipe.data import LazySource

    lazy = object.__new__(type("Files", (LazySource,), {}))  # needs_decoding looks at the type only
    assert [default_workers(lazy, c) for c in (1, 2, 3, 16, 64)] == [1, 1, 1, 14, 32]
    assert default_workers(create_dataset("digits"), 16) == 0


def test_precompute_through_the_device_path_end_to_end(tmp_path, monkeypatch):
    """A precompute whose decoder resolves to nvjpeg (as `auto` does on CUDA; here the device path runs
    on the CPU): the store is another store than the PIL path's (its identity names the decoder), its
    directions are the attack on the device path's pixels of each batch (computed here from the source
    without the loader, 2 loader workers in the run), and `verify --recompute` of it passes."""
    import torch

    from enspipe import attacks
    from enspipe.data import create_dataset
    from enspipe.data import decode as decode_mod
    from enspipe.models import create_model, save_model
    from enspipe.precompute import PrecomputeConfig, precompute
    from enspipe.data.loader import batch_to_device, encoded_chunk
    from enspipe.precompute.recheck import recompute_check
    from enspipe.stores import open_store

    jpegs = make_jpeg_folder(tmp_path / "jpegs", images=20, size=48, classes=4, workers=1)
    torch.manual_seed(3)
    model = save_model(create_model("C", num_classes=4, input_size=(3, 32, 32)), tmp_path / "C")
    cfg = dict(model=str(model), dataset=f"imagefolder:{jpegs}", image_size=32, out=str(tmp_path / "s"),
               shard_size=16, batch_size=8, device="cpu", attacks=("fgsm",), loader_workers=2)
    (pil,) = precompute(PrecomputeConfig(**cfg))
    real = decode_mod.resolve_decoder
    monkeypatch.setattr(decode_mod, "resolve_decoder",
                        lambda name, device, decodes=True: real(name, "cuda", decodes))  # as on CUDA
    (dev,) = precompute(PrecomputeConfig(**cfg))
    assert dev != pil and dev.parent == pil.parent
    reader = open_store(dev)
    assert reader.identity.attack_params["decoder"] == "nvjpeg"
    assert "decoder" not in open_store(pil).identity.attack_params
    ds = create_dataset(f"imagefolder:{jpegs}", image_size=32)
    from enspipe.models import load_model_for

    net = load_model_for(str(model), ds, torch.device("cpu")).requires_grad_(False)
    stored = reader.read_indices(np.arange(len(ds)))["direction"]
    for b, e in ((0, 8), (8, 16), (16, 20)):  # precompute's batches: shards of 16 in batches of 8
        x = batch_to_device([encoded_chunk(ds, range(b, e))], torch.device("cpu"), ds)
        d, _, _ = attacks.direction(net, x, None, attack="fgsm", label="pred")
        assert np.array_equal(d.numpy(), stored[b:e]), (b, e)
    assert recompute_check(dev, k=4, seed=0) == []
    monkeypatch.undo()  # a CPU again: the store's decoder is not at hand
    from enspipe.util.errors import StoreError

    with pytest.raises(StoreError, match=r"was decoded by nvjpeg: recompute it on a CUDA device"):
        recompute_check(dev, k=4, seed=0)


def test_a_jpeg_that_does_not_decode_is_named_in_one_line(folder):
    """A JPEG whose header reads well but whose data is cut short passes the worker's check; the
    batched decode fails, and the line names the file, as the PIL path's does."""
    import torch

    from enspipe.data import create_dataset
    from enspipe.util.errors import DataError
    from enspipe.data.loader import batch_to_device, encoded_chunk

    bad = folder / "c1" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:-1500])
    ds = create_dataset(f"imagefolder:{folder}", image_size=56)
    with pytest.raises(DataError, match=rf"cannot decode image {bad}: .*truncated") as e:
        batch_to_device([encoded_chunk(ds, range(len(ds)))], torch.device("cpu"), ds)
    # One line, the trainer's (tests/train/test_train_decoder_record.py): the file, then the sample.
    assert "\n" not in str(e.value) and str(e.value).endswith(f" (sample {ds._files.index('c1/1.jpg')})"), e.value
    with pytest.raises(DataError, match=rf"cannot decode image {bad}: .*truncated"):
        ds.images_uint8([ds._files.index("c1/1.jpg")])  # the PIL path's line
