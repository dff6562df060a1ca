"""The device decode's batch-wide ops (issue 26, the step at ImageNet scale): images of one size are
resized and put in place together, and the crops / flips are two gathers for the batch.

Oracles: each image decoded alone (a one-image batch has no group to share) and the PIL path's pixels
copied in where the batch has them; for the augmentation, `stream.apply_augment` (numpy, the PIL path's)
— tests/train/test_device_decode_train.py checks it on random crops and flips, this file at the edges.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from jpeg_folders import photo


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_batch_of_repeated_sizes_is_each_image_decoded_alone_at_its_place(mode):
    from enspipe.data.decode import DeviceTransform, EncodedChunk, decode_batch

    c = 1 if mode == "L" else 3
    shape, transform = (c, 24, 24), DeviceTransform(mode, resize=28, crop=24)
    sizes = [(64, 48), (48, 64), (64, 48), (50, 50), (64, 48), (48, 64)]  # groups of 3, 2 and 1
    jpegs = [photo(i, w, h, mode=mode) for i, (w, h) in enumerate(sizes)]
    pixels = np.random.default_rng(9).integers(0, 256, (2, *shape), dtype=np.uint8)  # PIL-path items
    items = [pixels[0], *jpegs[:3], pixels[1], *jpegs[3:]]  # the JPEGs' rows are not their order among JPEGs
    got = decode_batch([EncodedChunk(items, list(range(len(items))))], transform, shape, torch.device("cpu"))
    cpu = torch.device("cpu")
    want = [torch.from_numpy(it) if isinstance(it, np.ndarray) else
            decode_batch([EncodedChunk([it], [0])], transform, shape, cpu)[0] for it in items]
    assert got.shape == (len(items), *shape)
    for row, w in enumerate(want):
        assert torch.equal(got[row], w), row


def test_the_batch_augment_is_the_streams_at_every_edge():
    """Every crop offset (0 .. 2 * pad on both axes), with and without the flip, on non-square images."""
    from enspipe.data.decode import augment_on_device
    from enspipe.stream import apply_augment

    pad = 2
    aug = np.array([(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (0, 1)],
                   dtype=np.int64)
    x = np.random.default_rng(1).integers(0, 256, (len(aug), 3, 7, 5), dtype=np.uint8)
    got = augment_on_device(torch.from_numpy(x), torch.from_numpy(aug), pad).numpy()
    assert np.array_equal(got, apply_augment(x, aug, pad))
    t = torch.from_numpy(x)
    assert augment_on_device(t, None, pad) is t  # no augmentation: the batch as decoded


class _OneChunk(torch.utils.data.IterableDataset):
    def __init__(self, chunk):
        self.chunk = chunk

    def __iter__(self):
        yield self.chunk


def test_a_chunk_crosses_from_a_loader_worker_as_one_shared_tensor():
    """Through a real DataLoader worker process: the JPEGs arrive as views of one shared-memory tensor
    (not bytes through the worker's pipe), byte for byte the files, at their places among the pixels."""
    from enspipe.data.decode import DeviceTransform, EncodedChunk, decode_batch

    shape, transform = (3, 24, 24), DeviceTransform("RGB", resize=28, crop=24)
    pixels = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    files = [photo(i, 40 + 8 * i, 48) for i in range(3)]
    sent = EncodedChunk([files[0], pixels, files[1], files[2]], [7, 8, 9, 10], transform, shape)
    loader = torch.utils.data.DataLoader(_OneChunk(sent), batch_size=None, num_workers=1)
    (got,) = list(loader)
    assert (got.indices, got.transform, got.shape) == (sent.indices, sent.transform, sent.shape)
    assert np.array_equal(got.items[1], pixels)
    jpegs = [got.items[k] for k in (0, 2, 3)]
    assert all(isinstance(t, torch.Tensor) and t.is_shared() for t in jpegs)
    assert len({t.untyped_storage().data_ptr() for t in jpegs}) == 1  # one tensor for the chunk
    assert [t.numpy().tobytes() for t in jpegs] == files
    cpu = torch.device("cpu")
    assert torch.equal(decode_batch([got], transform, shape, cpu), decode_batch([sent], transform, shape, cpu))
