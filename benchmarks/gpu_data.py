"""Synthetic ImageNet-like data for the GPU benchmarks: class folders of JPEGs, made in parallel.

    python benchmarks/gpu_data.py OUT --images 4096 --size 400-500 --classes 16   # ImageNet-like
    python benchmarks/gpu_data.py OUT --images 4096 --size 256 --classes 16       # small squares

Each image is noise at three scales tinted by its class (so a model can learn it), written by a
pool of processes. `size` is a side in pixels (square images, smooth noise: ~15-25 KB at 256 px
and quality 90; 4,096 took 3.2 s over 16 processes on the H200 machine, NOTES.md) or a range
(lo, hi): each image then has its own width and height drawn from it and enough fine detail to
weigh what an ImageNet training JPEG weighs, ~100 KB at 400-500 px (`IMAGENET`; measured: 97-103 KB
a JPEG, and ~3x slower to decode and resize to 224 px than the 256 px squares, which is the
point: the benchmarks' decode load must be a real one). The layout is ImageFolder's:
OUT/train/CLASS/NNNNNN.JPEG (and OUT/val/... when --val is given).
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

IMAGENET = (400, 500)  # sides of ImageNet-like JPEGs (ImageNet's training images average ~400x350, ~110 KB)
FINE = 0.15            # the fine noise's weight in ImageNet-like images: ~100 KB at quality 90 (measured)


def _write(job: tuple[str, int, int, int, int | tuple[int, int]]) -> None:
    import numpy as np
    from PIL import Image

    path, index, label, classes, size = job
    rng = np.random.default_rng(index)
    if isinstance(size, int):
        coarse = rng.random((size // 16 + 1, size // 16 + 1, 3))
        # Upsampled coarse noise: photo-like low frequencies, so the JPEG size is realistic.
        img = np.kron(coarse, np.ones((16, 16, 1)))[:size, :size]
        img = 0.6 * img + 0.4 * rng.random((size, size, 3)) * 0.3
    else:
        w, h = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        coarse = np.kron(rng.random((h // 16 + 1, w // 16 + 1, 3)), np.ones((16, 16, 1)))[:h, :w]
        mid = np.kron(rng.random((h // 4 + 1, w // 4 + 1, 3)), np.ones((4, 4, 1)))[:h, :w]
        img = (0.5 * coarse + 0.25 * mid + FINE * rng.random((h, w, 3))) / (0.75 + FINE)
    img[..., label % 3] += 0.3 * (1 + label // 3) / (1 + classes // 3)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)


def make_jpeg_folder(root: str | os.PathLike, *, images: int = 4096, size: int | tuple[int, int] = 256,
                     classes: int = 16, split: str = "train", workers: int | None = None) -> Path:
    """ImageFolder `root/split/CLASS/*.JPEG` of `images` JPEGs (existing complete folders are kept);
    `size`: a side, or a (lo, hi) range of sides (ImageNet-like, see the module doc)."""
    root = Path(root)
    folder = root / split
    done = folder / ".complete"
    size = size if isinstance(size, int) else (int(size[0]), int(size[1]))
    if done.exists() and done.read_text().strip() == f"{images} {size_text(size)} {classes}":
        return root
    jobs = []
    for i in range(images):
        label = i % classes
        d = folder / f"class{label:03d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"{i:06d}.JPEG"), i + (0 if split == "train" else 10**7), label, classes, size))
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        list(pool.map(_write, jobs, chunksize=64))
    done.write_text(f"{images} {size_text(size)} {classes}\n")
    return root


def size_text(size: int | tuple[int, int] | list[int]) -> str:
    """"256" or "400-500": a folder's side(s) as `--size` takes them."""
    return str(size) if isinstance(size, int) else f"{size[0]}-{size[1]}"


def parse_size(text: str) -> int | tuple[int, int]:
    lo, _, hi = text.partition("-")
    return (int(lo), int(hi)) if hi else int(lo)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--size", type=parse_size, default=IMAGENET, help="a side, or LO-HI: ImageNet-like [400-500]")
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--val", type=int, default=0, help="also make OUT/val with this many images")
    a = ap.parse_args(argv)
    make_jpeg_folder(a.out, images=a.images, size=a.size, classes=a.classes)
    if a.val:
        make_jpeg_folder(a.out, images=a.val, size=a.size, classes=a.classes, split="val")
    print(a.out)


if __name__ == "__main__":
    main()
