"""nvJPEG itself (issue 26's GPU half): the device decode on a CUDA device, against PIL's pixels
computed here. Skipped without CUDA: CI has none; a session lent a GPU runs these through
benchmarks/gpu_session.sh (tests/data/test_device_decode.py holds the same code path to PIL on
the CPU, where torchvision's libjpeg-turbo stands in for nvJPEG).

The tolerance is the CPU path's (tests/data/test_device_decode.py: mean |diff| under 0.5 levels
of 255, no pixel off by more than 4): nvJPEG is another IDCT and the resize runs on the GPU, and
NOTES.md's figure for it (about 0.15 levels on average, a few at most) sits inside it.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from jpeg_folders import photo, pil_crop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_session.sh)")

SIZES = [(120, 90), (90, 120), (100, 100), (131, 77), (77, 131), (96, 112), (448, 400), (500, 375)]


def test_nvjpeg_on_cuda_matches_pil(tmp_path):
    """One batched nvJPEG call over an imagefolder's JPEGs (and a PNG, which the workers decode with
    PIL: bit for bit), resized and cropped on the GPU: within the tolerance of PIL's pixels."""
    from enspipe.data import create_dataset
    from enspipe.data.decode import decode_batch, encoded_chunk

    for i, (w, h) in enumerate(SIZES):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / f"c{i % 2}" / f"{i}.jpg").write_bytes(photo(i, w, h, "JPEG"))
    (tmp_path / "imgs" / "c0" / "z.png").write_bytes(photo(99, 110, 85, "PNG"))
    ds = create_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=56)  # resize 64, crop 56
    chunk = encoded_chunk(ds, range(len(ds)))
    got = decode_batch([chunk], ds.device_transform(), ds.geometry.shape, torch.device("cuda"))
    assert got.device.type == "cuda" and got.dtype == torch.uint8 and tuple(got.shape) == (len(ds), 3, 56, 56)
    got = got.cpu().numpy()
    diffs = []
    for i, f in enumerate(ds._files):
        data = (ds.folder / f).read_bytes()
        if f.endswith(".png"):
            assert np.array_equal(got[i], ds.images_uint8([i])[0])
            continue
        diffs.append(np.abs(got[i].astype(np.int16) - pil_crop(data, 64, 56).astype(np.int16)))
    d = np.stack(diffs)
    assert d.mean() < 0.5 and d.max() <= 4, f"nvJPEG vs PIL: mean |diff| {d.mean():.3f} levels, max {d.max()}"


def test_a_batch_is_put_in_place_without_waiting_for_the_gpu(monkeypatch):
    """The review's finding, on the device: placing a batch's rows (size groups resized and cropped,
    the workers' pixels copied in, one index) makes no host synchronisation, so the training step does
    not wait for the GPU work queued before it. nvJPEG's own call is left out (decoded beforehand):
    this checks enspipe's placement, not torchvision's decoder. Unrun in the session that wrote it
    (no GPU was lent): tests/data/test_device_decode_copies.py checks the same placement on the CPU."""
    from enspipe.data import decode
    from enspipe.data.decode import DeviceTransform, EncodedChunk, decode_batch

    cuda = torch.device("cuda")
    shape, transform = (3, 24, 24), DeviceTransform("RGB", resize=28, crop=24)
    jpegs = [photo(i, w, h, "JPEG") for i, (w, h) in enumerate(SIZES[:4] + SIZES[:2])]  # repeated sizes
    pixels = np.random.default_rng(5).integers(0, 256, (2, *shape), dtype=np.uint8)
    items = [jpegs[0], pixels[0], *jpegs[1:4], pixels[1], *jpegs[4:]]
    decoded = [t.to(cuda) for t in decode._decode_jpegs(jpegs, "RGB", torch.device("cpu"))]
    monkeypatch.setattr(decode, "_decode_jpegs", lambda data, mode, device: decoded)
    want = decode_batch([EncodedChunk(items, list(range(len(items))))], transform, shape, cuda)  # warm: kernels, pools
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # GPU work queued ahead, as the previous step's backward is
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = decode_batch([EncodedChunk(items, list(range(len(items))))], transform, shape, cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
    for row, it in enumerate(items):
        if isinstance(it, np.ndarray):
            assert np.array_equal(got[row].cpu().numpy(), it), row
