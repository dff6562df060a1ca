"""digits: scikit-learn's bundled 8x8 digits, bilinear-resized to 1x28x28 (the offline default).

Split: a fixed permutation (np.random.default_rng(0)) of the 1797 samples; its first 1500
are `train`, the other 297 `test`; each split is kept in scikit-learn's order (sorted
original indices).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F

from .base import ArraySource, Geometry, SampleSource, _quantise, _readonly, _resize_tag

DIGITS_TRAIN_SIZE = 1500  # of 1797; the other 297 are the test split
DIGITS_SIZE = 28  # MNIST's geometry, so MNIST architectures run on the offline default


@functools.lru_cache(maxsize=8)
def _digits_arrays(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: sklearn import takes ~0.7 s

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    idx = np.sort(perm[:DIGITS_TRAIN_SIZE] if split == "train" else perm[DIGITS_TRAIN_SIZE:])
    x = torch.from_numpy(d.images[idx] / 16.0)[:, None]  # float64 [n,1,8,8] in [0,1]
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                      antialias=_resize_tag(8, 8, size) == "bilinear-antialias")
    return _readonly(_quantise(y)), _readonly(d.target[idx].astype(np.int64))


def open_digits(arg: str | None, *, split: str, limit: int | None, image_size: int | None,
                data_root: str | os.PathLike | None) -> SampleSource:
    size = image_size or DIGITS_SIZE
    pixels, labels = _digits_arrays(split, size)
    geometry = Geometry(1, size, size, f"digits8x8:{_resize_tag(8, 8, size)}->{size}x{size}:uint8")
    return ArraySource(name="digits", split=split, limit=limit, geometry=geometry,
                       classes=[str(k) for k in range(10)], pixels=pixels, labels=labels)
