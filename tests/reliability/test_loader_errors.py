"""Issue 25, item 8: with loader workers, a bad image names its file.

torch re-raises a worker's exception as "Caught DataError in DataLoader worker process 0."
with the worker's traceback in the message; the CLI's one line was that first line. With
`--loader-workers 0` the same image gave a line naming the file, which is the oracle here:
both runs must print it (the path the test corrupted)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .processes import enspipe, error_line

SIZE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """A two-class image folder with one image that is not an image (its path returned too)."""
    root = tmp_path_factory.mktemp("imgs") / "DATA"
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "train" / cls / f"{i}.png")
    bad = root / "train" / "dog" / "5.png"
    bad.write_bytes(bad.read_bytes()[:40])  # the header survives, the pixels do not
    return root, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_image_is_named_with_and_without_loader_workers(data, tmp_path, workers):
    root, bad = data
    r = enspipe("train", "--model", "resnet18", "--dataset", f"imagefolder:{root}", "--image-size", SIZE,
                "--device", "cpu", "--epochs", 1, "--batch-size", 4, "--loader-workers", workers,
                "--out", tmp_path / "run")
    assert r.returncode == 1, r.stderr[-3000:]
    line = error_line(r.stderr)
    assert str(bad) in line, line
    assert "DataLoader worker" not in line, line
