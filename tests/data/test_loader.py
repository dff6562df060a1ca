"""The loader (enspipe.data.loader): worker processes decode shard-aligned spans into uint8 chunks
for precompute, and `batches` hands evaluate, the trainer's validation and diagnose a dataset's
batches in order, the same whatever the worker count. Oracle: the images decoded here with PIL
(tests/jpeg_folders.pil_eval_images), never the loader's own path."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from jpeg_folders import make_jpeg_folder, pil_eval_images

from enspipe.data import create_dataset
from enspipe.data.loader import ChunkLoader, batch_spans, batches, chunk_size, open_loader, spans_of, to_device

SIZE = 32  # --image-size: resize to round(32 / 0.875) = 37, center-crop 32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    """An ImageFolder of 40 JPEGs of 48 px in 4 classes (benchmarks/gpu_data.py)."""
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), images=40, size=48, classes=4, workers=2)


@pytest.fixture(scope="module")
def oracle(jpegs) -> tuple[torch.Tensor, torch.Tensor]:
    u8, y = pil_eval_images(jpegs / "train", SIZE)
    return u8.float() / 255, y


def _children() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE}


# --- ChunkLoader (moved here from tests/precompute/test_precompute_parallel.py) -----------------------

def test_loader_chunks_keep_batch_boundaries_and_pixels(jpegs):
    ds = create_dataset(f"imagefolder:{jpegs}", image_size=SIZE)
    spans = batch_spans(16, 40, 10)  # a shard [16, 40) in batches of 10: they start at 16
    assert spans == [(16, 26), (26, 36), (36, 40)]
    chunks_of = spans_of(spans, chunk_size(10, workers=4))
    assert all(any(b <= a < e and c <= e for b, e in spans) for a, c in chunks_of)  # never across a batch
    with ChunkLoader(ds, 2) as loader:
        first = list(loader([(0, 8)]))
        chunks = list(loader(chunks_of))  # a second pass on the same worker processes (a dask worker's next task)
    assert torch.equal(first[0], torch.from_numpy(ds.images_uint8(slice(0, 8))))
    x = to_device(chunks[:2], CPU)  # the first batch, from two chunks
    assert torch.equal(x, ds.images(slice(16, 26)))  # bit for bit what SampleSource.images gives
    assert torch.equal(torch.cat(chunks), torch.from_numpy(ds.images_uint8(slice(16, 40))))


def test_loader_worker_error_is_the_original_one_line(tmp_path, jpegs):
    from enspipe.util.errors import DataError

    broken = tmp_path / "broken"
    shutil.copytree(jpegs, broken)
    before = create_dataset(f"imagefolder:{broken}", image_size=SIZE)
    victim = before.folder / before._files[5]  # sample 5 of the canonical (class-interleaved) order
    victim.write_bytes(b"not a jpeg")
    ds = create_dataset(f"imagefolder:{broken}", image_size=SIZE)
    with ChunkLoader(ds, 2) as loader, pytest.raises(DataError, match="cannot decode image") as e:
        list(loader([(0, 8)]))
    assert "\n" not in str(e.value)


# --- batches: what evaluate, validation and diagnose read --------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_the_pil_images_in_order_whatever_the_workers(jpegs, oracle, workers):
    x_want, y_want = oracle
    ds = create_dataset(f"imagefolder:{jpegs}", image_size=SIZE)
    before = _children()
    got = list(batches(ds, 16, CPU, workers=workers))
    # Batches of 16 from the first sample, the last one partial; pixels and labels bit for bit the oracle's.
    assert [sl for sl, _, _ in got] == [slice(0, 16), slice(16, 32), slice(32, 40)]
    assert torch.equal(torch.cat([x for _, x, _ in got]), x_want)
    assert torch.equal(torch.cat([y for _, _, y in got]), y_want)
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for _, x, y in got)
    assert _children() <= before  # its loader processes ended with the iteration


def test_a_kept_loader_serves_pass_after_pass_and_a_pass_left_early(jpegs, oracle):
    """A loader kept across calls (the trainer's validation, once an epoch) forks its processes
    once: a pass abandoned after one batch leaves the next one whole and in order."""
    x_want, y_want = oracle
    ds = create_dataset(f"imagefolder:{jpegs}", image_size=SIZE)
    before = _children()
    with open_loader(ds, CPU, workers=2) as loader:
        forked = _children() - before
        assert len(forked) == 2
        first = batches(ds, 8, CPU, loader=loader)
        next(first)
        first.close()  # left early: the loader stays open for the next pass
        for _ in range(2):
            got = list(batches(ds, 8, CPU, loader=loader))
            assert torch.equal(torch.cat([x for _, x, _ in got]), x_want)
            assert torch.equal(torch.cat([y for _, _, y in got]), y_want)
        assert _children() - before == forked  # the same processes served every pass
    assert _children() <= before


def test_a_corrupt_jpeg_ends_batches_with_the_files_line_and_no_workers_left(tmp_path, jpegs):
    from enspipe.util.errors import DataError

    broken = tmp_path / "broken"
    shutil.copytree(jpegs, broken)
    ds = create_dataset(f"imagefolder:{broken}", image_size=SIZE)
    victim = ds.folder / ds._files[21]  # in the second batch of 16
    victim.write_bytes(victim.read_bytes()[:60])  # the header survives, the pixels do not
    before = _children()
    with pytest.raises(DataError) as e:
        for _ in batches(ds, 16, CPU, workers=2):
            pass
    assert str(victim) in str(e.value) and "\n" not in str(e.value)
    assert _children() <= before


def test_batches_through_the_device_path_keep_the_order_and_the_labels(jpegs, oracle):
    """With a loader whose workers only read the bytes (the path `decoder` nvjpeg takes on CUDA), the
    batch is decoded where x goes (here torchvision's CPU decode, the device path's fallback): the same
    batches and labels, the pixels within a few levels of PIL's (the device path's stated tolerance)."""
    x_want, y_want = oracle
    ds = create_dataset(f"imagefolder:{jpegs}", image_size=SIZE)
    with ChunkLoader(ds, 2, encoded=True) as loader:
        got = list(batches(ds, 16, CPU, loader=loader))
    assert [sl for sl, _, _ in got] == [slice(0, 16), slice(16, 32), slice(32, 40)]
    assert torch.equal(torch.cat([y for _, _, y in got]), y_want)
    diff = (torch.cat([x for _, x, _ in got]) - x_want).abs() * 255
    assert diff.mean() < 0.5 and diff.max() <= 4.01, (float(diff.mean()), float(diff.max()))


@pytest.mark.parametrize("workers", [0, 2])
def test_only_a_loader_asked_for_files_carries_them(jpegs, monkeypatch, workers):
    """The device path's chunks carry each sample's file only where asked (`files`: precompute with a
    wds store that keeps them): evaluate, validation and diagnose (`open_loader` without it) get the
    JPEGs alone, which the process that drives the device would otherwise rebuild and hold as bytes.
    Asked, the files are the bytes on disk (read here), also through forked workers (pickled)."""
    from enspipe.data import decode as decode_mod

    real = decode_mod.resolve_decoder  # as `auto` resolves on CUDA: the workers hand over the JPEGs' bytes
    monkeypatch.setattr(decode_mod, "resolve_decoder", lambda name, device, decodes=True: real(name, "cuda", decodes))
    ds = create_dataset(f"imagefolder:{jpegs}", image_size=SIZE)
    spans = spans_of(batch_spans(0, len(ds), 16), 8)
    with open_loader(ds, CPU, workers=workers, decoder="nvjpeg") as loader:
        assert loader.encoded
        chunks = list(loader(spans))
    assert sum(map(len, chunks)) == len(ds) and all(c.files is None for c in chunks)
    with ChunkLoader(ds, workers, encoded=True, files=True) as loader:
        chunks = list(loader(spans))
    want = [("jpeg", (ds.folder / f).read_bytes()) for f in ds._files]
    assert [f for c in chunks for f in c.files] == want


def test_a_pickled_chunk_sends_its_jpegs_pixels_and_files_through_shared_memory(jpegs):
    """What a loader worker hands over (`EncodedChunk` pickled for its queue) holds no payload in the
    pickle itself: JPEGs, the PIL path's pixels (channels-last views, as PIL's arrays come) and the
    files that are not JPEG items all go in shared memory (decoder cpu with a wds store keeping the
    files: every item is pixels). Oracle: the sizes and the bytes, computed here."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import numpy as np

    from enspipe.data.decode import EncodedChunk

    ds = create_dataset(f"imagefolder:{jpegs}", image_size=SIZE)
    raw = [(ds.folder / f).read_bytes() for f in ds._files[:6]]
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8).transpose(2, 0, 1) for _ in range(6)]
    for items, files in (
            (pixels, [("png", bytes([k]) * 5000) for k in range(6)]),            # the PIL path's chunk
            ([raw[0], pixels[1], torch.frombuffer(bytearray(raw[2]), dtype=torch.uint8)],
             [("jpeg", raw[0]), ("png", b"\x89PNG" * 999), ("jpeg", raw[2])])):   # the device path's
        chunk = EncodedChunk(list(items), list(range(len(items))), files=list(files))
        payload = sum(it.nbytes if isinstance(it, np.ndarray) else len(it) for it in items)
        payload += sum(len(b) for it, (_, b) in zip(items, files) if isinstance(it, np.ndarray))
        sent = bytes(ForkingPickler.dumps(chunk))
        assert len(sent) < payload / 10, (len(sent), payload)
        got = pickle.loads(sent)
        assert got.indices == chunk.indices and got.files == list(files)
        for a, b in zip(got.items, items):
            if isinstance(b, np.ndarray):
                assert isinstance(a, np.ndarray) and np.array_equal(a, b)
            else:
                assert bytes(a.numpy()) == bytes(b)
