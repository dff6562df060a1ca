"""ImageNet-like JPEG class folders for tests: benchmarks/gpu_data.py's maker (the images the GPU
benchmarks decode), imported from benchmarks/ without leaving it on sys.path."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_jpeg_folder(root: Path, **kw) -> Path:
    """gpu_data.make_jpeg_folder(root, images=, size=, classes=, workers=): the folder it wrote."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_data import make_jpeg_folder as make
    finally:
        sys.path.pop(0)
    return make(root, **kw)
