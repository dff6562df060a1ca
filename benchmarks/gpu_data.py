"""Synthetic ImageNet-like data for the GPU benchmarks: class folders of JPEGs, made in parallel.

    python benchmarks/gpu_data.py OUT --images 4096 --size 256 --classes 16

Each image is smooth noise tinted by its class (so a model can learn it and JPEG compresses it
like a photograph, ~15-25 KB at 256 px and quality 90), written by a pool of processes: 4,096
images of 256 px took 3.2 s over 16 processes on the H200 machine (NOTES.md). The layout is
ImageFolder's: OUT/train/CLASS/NNNNNN.JPEG (and OUT/val/... when --val is given).
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _write(job: tuple[str, int, int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    path, index, label, classes, size = job
    rng = np.random.default_rng(index)
    coarse = rng.random((size // 16 + 1, size // 16 + 1, 3))
    # Upsampled coarse noise: photo-like low frequencies, so the JPEG size is realistic.
    img = np.kron(coarse, np.ones((16, 16, 1)))[:size, :size]
    img = 0.6 * img + 0.4 * rng.random((size, size, 3)) * 0.3
    img[..., label % 3] += 0.3 * (1 + label // 3) / (1 + classes // 3)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)


def make_jpeg_folder(root: str | os.PathLike, *, images: int = 4096, size: int = 256, classes: int = 16,
                     split: str = "train", workers: int | None = None) -> Path:
    """ImageFolder `root/split/CLASS/*.JPEG` of `images` JPEGs (existing complete folders are kept)."""
    root = Path(root)
    folder = root / split
    done = folder / ".complete"
    if done.exists() and done.read_text().strip() == f"{images} {size} {classes}":
        return root
    jobs = []
    for i in range(images):
        label = i % classes
        d = folder / f"class{label:03d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"{i:06d}.JPEG"), i + (0 if split == "train" else 10**7), label, classes, size))
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        list(pool.map(_write, jobs, chunksize=64))
    done.write_text(f"{images} {size} {classes}\n")
    return root


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--val", type=int, default=0, help="also make OUT/val with this many images")
    a = ap.parse_args(argv)
    make_jpeg_folder(a.out, images=a.images, size=a.size, classes=a.classes)
    if a.val:
        make_jpeg_folder(a.out, images=a.val, size=a.size, classes=a.classes, split="val")
    print(a.out)


if __name__ == "__main__":
    main()
