"""What a device batch copies from the host (the review's finding: `out[torch.tensor([...], device=cuda)]`
per image-size group is a pageable host -> device copy, which waits for every GPU op queued before
it — the previous step's backward — inside the training step).

No CUDA here, so the property is checked where it is decided: decode_batch moves host data to the
device only through `decode._to_device` (pinned and non-blocking on CUDA, by reading: two lines), at
most twice per batch (the workers' pixels in one block, and the one index that puts the rows in
place), and builds no tensor on the device from a Python list. The oracle of the pixels: each image
decoded alone, and the workers' pixels as given.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from jpeg_folders import photo


@pytest.fixture
def copies(monkeypatch):
    """Every host tensor decode_batch sends through `_to_device`, and every torch.tensor(...) it
    (or anything it calls) makes with a device named."""
    from enspipe.data import decode

    seen: dict[str, list] = {"to_device": [], "tensor_on_device": []}
    real_to, real_tensor = decode._to_device, torch.tensor

    def to_device(host, device):
        seen["to_device"].append((host.dtype, tuple(host.shape), host.device.type))
        return real_to(host, device)

    def tensor(*a, **kw):
        if kw.get("device") is not None:
            seen["tensor_on_device"].append(kw["device"])
        return real_tensor(*a, **kw)

    monkeypatch.setattr(decode, "_to_device", to_device)
    monkeypatch.setattr(torch, "tensor", tensor)
    return seen


def test_a_mixed_batch_is_put_in_place_by_one_index_sent_like_the_pixels(copies):
    from enspipe.data.decode import DeviceTransform, EncodedChunk, decode_batch

    shape, transform = (3, 24, 24), DeviceTransform("RGB", resize=28, crop=24)
    sizes = [(64, 48), (48, 64), (64, 48), (50, 50), (48, 64)]  # three size groups, interleaved
    jpegs = [photo(i, w, h) for i, (w, h) in enumerate(sizes)]
    pixels = np.random.default_rng(3).integers(0, 256, (2, *shape), dtype=np.uint8)
    items = [jpegs[0], pixels[0], *jpegs[1:3], pixels[1], *jpegs[3:]]
    cpu = torch.device("cpu")
    got = decode_batch([EncodedChunk(items, list(range(len(items))))], transform, shape, cpu)
    assert copies["tensor_on_device"] == []
    assert copies["to_device"] == [(torch.uint8, (2, *shape), "cpu"), (torch.int64, (len(items),), "cpu")]
    copies["to_device"].clear()
    for row, it in enumerate(items):
        want = (torch.from_numpy(it) if isinstance(it, np.ndarray) else
                decode_batch([EncodedChunk([it], [0])], transform, shape, cpu)[0])
        assert torch.equal(got[row], want), row
    assert got.is_contiguous()


def test_a_batch_of_one_size_copies_nothing_from_the_host(copies):
    from enspipe.data.decode import DeviceTransform, EncodedChunk, decode_batch

    shape, transform = (3, 24, 24), DeviceTransform("RGB", resize=28, crop=24)
    items = [photo(i, 64, 48) for i in range(4)]
    got = decode_batch([EncodedChunk(items, list(range(4)))], transform, shape, torch.device("cpu"))
    assert copies == {"to_device": [], "tensor_on_device": []}
    assert got.shape == (4, *shape) and got.is_contiguous()
