"""The trainer's clean images decoded on the device (issue 26; `decoder`, `enspipe.data.decode`).

    stream (loader workers): each sample's JPEG bytes, header checked, nothing decoded
        -> the batch's "x" is an `EncodedChunk` (with the source's resize / crop and shape)
    the step (`clean_images`): one batched decode on the device, then the batch's crops / flips
        (its "aug", drawn by the stream as always) applied there

Everything else about a batch (its samples, order, source draw, eps, directions and their
augmentation) is the stream's as on the PIL path: only where the clean pixels are made moves.

A JPEG whose header passed the worker's check but whose data does not decode fails in the step,
where the batch has no source to name its file: decode_batch raises `UndecodableJPEG` (its sample
index) and the training loop, which holds the source, turns it into the source's own line
(`enspipe.data.decode.named`: the file, as the PIL path names it, and the sample index: the same
line precompute's and evaluate's device batches give).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from enspipe.data.decode import EncodedChunk, augment_on_device, decode_batch, encoded_chunk
from enspipe.train.batches import BatchStream

__all__ = ["DeviceDecodedBatchStream", "clean_images"]


class DeviceDecodedBatchStream(BatchStream):
    """`BatchStream` whose "x" is each sample's encoded file (`EncodedChunk`), decoded in the step."""

    def _pixels(self, index: Any) -> np.ndarray:
        idx = range(len(self.dataset))[index] if isinstance(index, slice) else index
        chunk = encoded_chunk(self.dataset, idx)
        # An object array of (sample, bytes or pixels): the stream slices and concatenates it
        # as it does pixel arrays, and the sample index names a file that fails to decode.
        out = np.empty(len(chunk.items), dtype=object)
        for j, pair in enumerate(zip(chunk.indices, chunk.items)):
            out[j] = pair
        return out

    def _augment_images(self, x: np.ndarray, aug: np.ndarray) -> np.ndarray:
        return x  # the step crops and flips the decoded images with the batch's `aug`

    def _image_tensor(self, x: np.ndarray) -> EncodedChunk:
        return EncodedChunk([item for _, item in x], [i for i, _ in x], self.dataset.device_transform(),
                            self.dataset.geometry.shape)


def clean_images(x: EncodedChunk, device: Any, aug: Any = None, crop_padding: int = 0):
    """A batch's clean images, uint8 [n, C, H, W] on `device`: its encoded files decoded and
    augmented there (a batch of pixels is copied over by the caller, adversarial_inputs)."""
    return augment_on_device(decode_batch([x], x.transform, x.shape, device), aug, crop_padding)
