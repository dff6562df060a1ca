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


def photo(seed: int, w: int, h: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """Smooth noise with some texture, encoded (JPEG quality 90, or PNG): compresses like a photograph."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 8 + 1, w // 8 + 1, 3))
    img = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w] * 0.8 + rng.random((h, w, 3)) * 0.2
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).convert(mode).save(
        buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def pil_crop(data: bytes, short: int, crop: int):
    """The ImageNet eval transform with PIL alone, on one encoded image: shorter side to `short`
    (bilinear), centre crop `crop`; uint8 [3, crop, crop]."""
    import io

    import numpy as np
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    return np.asarray(im.crop((left, top, left + crop, top + crop))).transpose(2, 0, 1)


def assert_close_to_pil(a, b) -> None:
    """Another decoder's pixels against PIL's: under half a level on average, no pixel off by more than 4."""
    import numpy as np

    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.mean() < 0.5, f"mean |diff| {diff.mean():.2f} levels"
    assert diff.max() <= 4, f"a pixel off by {diff.max()} levels"


def wds_shard_of(folder: Path, tar: Path) -> Path:
    """The folder's train JPEGs as one WebDataset shard (image + .cls per sample)."""
    import io
    import tarfile

    with tarfile.open(tar, "w") as tf:
        for i, f in enumerate(sorted(folder.glob("train/*/*.JPEG"))):
            for name, payload in ((f"s{i:04d}.jpg", f.read_bytes()), (f"s{i:04d}.cls", f.parent.name[-1:].encode())):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(payload), 1_700_000_000
                tf.addfile(ti, io.BytesIO(payload))
    return tar

