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


def pil_eval_images(split_dir: Path, size: int):
    """The ImageNet evaluation transform written out here with PIL + torchvision's functions (RGB, the
    shorter side to round(size / 0.875) bilinear, center crop `size`), independent of enspipe: (uint8
    [N, 3, size, size], labels [N]) in the canonical order of a folder whose classes hold equally many
    files (class-interleaved is then a round robin: file 0 of each sorted class, then file 1, ...)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    classes = sorted(d for d in Path(split_dir).iterdir() if d.is_dir())
    files = [sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")) for d in classes]
    assert len({len(f) for f in files}) == 1, "a round robin needs equally many files per class"
    xs, ys = [], []
    for k in range(len(files[0])):
        for label, per_class in enumerate(files):
            im = Image.open(per_class[k]).convert("RGB")
            im = TF.center_crop(TF.resize(im, round(size / 0.875), interpolation=InterpolationMode.BILINEAR),
                                [size, size])
            xs.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)
