"""Issue 25, item 5: an output inside an image folder would become a class of that dataset.

`train --out DATA` made DATA/checkpoints a class (every label shifted by one for whoever
reads DATA next); `precompute --out DATA/train` put the store ROOT among the training
classes, changing the dataset's fingerprint under the store just written. Both are refused
in one line, and the folder stays exactly as the test made it (the oracle: its files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .processes import enspipe, error_line

SIZE = 16


def _files(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder`: a file's bytes, None for a folder."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs") / "DATA"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _data_args(data: Path) -> list:
    return ["--dataset", f"imagefolder:{data}", "--image-size", SIZE, "--device", "cpu"]


@pytest.fixture(scope="module")
def static(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("static") / "run"
    r = enspipe("train", "--model", "resnet18", *_data_args(data), "--epochs", 1, "--batch-size", 8, "--out", run)
    assert r.returncode == 0, r.stderr
    return run


@pytest.mark.parametrize("where", ["DATA", "DATA/train", "DATA/train/cat/run"])
def test_train_refuses_an_out_inside_its_image_folder(data, where):
    before = _files(data)
    out = data.parent / where
    r = enspipe("train", "--model", "resnet18", *_data_args(data), "--epochs", 1, "--batch-size", 8, "--out", out)
    assert r.returncode == 1, r.stderr
    line = error_line(r.stderr)
    assert "--out" in line and str(out) in line and "inside the image folder" in line, line
    assert _files(data) == before


@pytest.mark.parametrize("where", ["DATA/train", "DATA/stores"])
def test_precompute_refuses_a_store_root_inside_its_image_folder(data, static, where):
    before = _files(data)
    out = data.parent / where
    r = enspipe("precompute", "--model", static, *_data_args(data), "--shard-size", 8, "--out", out)
    assert r.returncode == 1, r.stderr
    line = error_line(r.stderr)
    assert "--out" in line and str(out) in line and "inside the image folder" in line, line
    assert _files(data) == before


def test_an_out_beside_the_image_folder_is_fine(data, static, tmp_path):
    r = enspipe("precompute", "--model", static, *_data_args(data), "--shard-size", 8, "--out", data.parent / "DATA-stores")
    assert r.returncode == 0, r.stderr


def test_an_object_store_root_is_never_inside_a_local_image_folder(tmp_path, monkeypatch):
    """`precompute --out s3://...` beside `--dataset imagefolder:.`: a URL names no local folder, so
    it is not refused as inside the image folder (resolved as a path it would be CWD/s3:/...)."""
    from enspipe.config import OptionError
    from enspipe.paths import check_outside_dataset

    monkeypatch.chdir(tmp_path)
    check_outside_dataset("s3://bucket/stores", "imagefolder:.", field="out")
    with pytest.raises(OptionError):  # the same folder given as a path is refused
        check_outside_dataset(tmp_path / "stores", "imagefolder:.", field="out")
