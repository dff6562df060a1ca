"""Precompute reads each image file once, whatever the attacks it computes, also when a wds store
keeps the source's files beside its directions: the loader hands the bytes it read over to the sink,
which read every file a second time before (ImageNet on network storage: twice the input I/O), and
a shard is decoded once for every attack that lacks it (each attack read and decoded it before).

The counter is the operating system's door: every `open` of a file under the image folder, in this
process and in forked loader workers alike (each one appends its path to a log with os.write, which
the patched `open` does not go through). The oracles: each file's count, computed here; the wds
store's `src` members equal to the files' bytes read here; and the directions equal to those of a
zarr-only store, whose loader hands over pixels alone (the path that carries no files).
"""
from __future__ import annotations

import builtins
import collections
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from jpeg_folders import make_jpeg_folder

from enspipe.precompute import PrecomputeConfig, precompute
from enspipe.stores import open_store

SIZE = 32


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(an ImageFolder of 20 JPEGs and one PNG, a static model C for 3x32x32 images)."""
    from PIL import Image

    from enspipe.models import create_model, save_model

    root = tmp_path_factory.mktemp("once")
    jpegs = make_jpeg_folder(root / "jpegs", images=20, size=48, classes=4, workers=1)
    first = sorted(p.parent for p in jpegs.rglob("*.JPEG"))[0]  # a class folder
    pixels = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(first / "zz.png")  # the device path leaves it to PIL: read once too
    torch.manual_seed(3)
    return jpegs, save_model(create_model("C", num_classes=4, input_size=(3, SIZE, SIZE)), root / "C")


def _count_opens(monkeypatch, folder: Path, log: Path):
    """Patch `open` so that every open of a file under `folder` appends its path to `log`; returns
    a function giving {relative path: opens} so far."""
    real = builtins.open
    prefix = str(folder) + os.sep

    def counting_open(file, *args, **kwargs):
        name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if isinstance(name, str) and name.startswith(prefix):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, (name[len(prefix):] + "\n").encode())
            finally:
                os.close(fd)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # pathlib's read_bytes opens through io.open
    return lambda: collections.Counter(log.read_text().splitlines()) if log.exists() else collections.Counter()


def _images(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".JPEG", ".png"))


def _src_members(store: Path) -> list[bytes]:
    out = []
    for tar in sorted(store.glob("*.tar")):
        with tarfile.open(tar) as tf:
            out += [tf.extractfile(m).read() for m in tf if ".src." in m.name]
    return out


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_session.sh)")


@pytest.mark.parametrize("decoder,workers", [("pil", 2), ("device", 0), ("device", 2),
                                             pytest.param("cuda", 2, marks=CUDA)])
def test_each_image_file_is_read_once(inputs, tmp_path, monkeypatch, decoder, workers):
    """pil: the PIL path (2 loader workers); device: the device path's code on the CPU (as `auto`
    resolves on CUDA), in this process and through 2 forked workers (which inherit the patch: their
    chunks are pickled, each JPEG's file rebuilt from the shared tensor); cuda: nvJPEG itself, on a
    CUDA device (the GPU session runs it)."""
    jpegs, model = inputs
    if decoder == "device":  # as `auto` resolves on CUDA: the loader hands over the JPEGs' bytes
        from enspipe.data import decode as decode_mod

        real = decode_mod.resolve_decoder
        monkeypatch.setattr(decode_mod, "resolve_decoder",
                            lambda name, device, decodes=True: real(name, "cuda", decodes))
    cfg = dict(model=str(model), dataset=f"imagefolder:{jpegs}", image_size=SIZE, shard_size=16, batch_size=8,
               device="cuda" if decoder == "cuda" else "cpu", attacks=("fgsm",), loader_workers=workers)
    opens = _count_opens(monkeypatch, jpegs, tmp_path / "opens.log")
    zarr, wds = precompute(PrecomputeConfig(**cfg, format="both", out=str(tmp_path / "both")))
    files = _images(jpegs)
    assert len(files) == 21 and sum(f.endswith(".png") for f in files) == 1
    assert opens() == collections.Counter(files)  # each file once, for both stores

    # The store keeps the files as they are, in sample order (the source's order: its keys).
    from enspipe.data import create_dataset

    r = open_store(wds)
    assert r.identity.attack_params.get("decoder") == (None if decoder == "pil" else "nvjpeg")
    ds = create_dataset(f"imagefolder:{jpegs}", image_size=SIZE)
    want = [(ds.folder / f).read_bytes() for f in ds._files]
    assert _src_members(wds) == want
    assert [ext for ext, _ in r.read_image_files(0, len(r))] == [Path(f).suffix[1:].lower() for f in ds._files]
    np.testing.assert_array_equal(r.read(0, len(r))["direction"], open_store(zarr).read(0, len(r))["direction"])
    if decoder == "pil":
        # A zarr-only store: the loader hands over pixels alone (no files); the same directions.
        (only,) = precompute(PrecomputeConfig(**cfg, format="zarr", out=str(tmp_path / "zarr")))
        got, ref = open_store(only).read(0, len(r)), open_store(zarr).read(0, len(r))
        for name in ("direction", "logits", "label"):
            np.testing.assert_array_equal(got[name], ref[name])


def test_two_attacks_read_each_file_once(inputs, tmp_path, monkeypatch):
    """Two attacks, a zarr and a wds store each: every file is read once, for both attacks' four
    stores (a shard's batches are decoded once and attacked by each; once per attack before: 2, and
    4 before the wds stores took the loader's bytes). Decodes are counted in
    test_precompute_decodes_once.py."""
    jpegs, model = inputs
    opens = _count_opens(monkeypatch, jpegs, tmp_path / "opens.log")
    stores = precompute(PrecomputeConfig(model=str(model), dataset=f"imagefolder:{jpegs}", image_size=SIZE,
                                         shard_size=16, batch_size=8, device="cpu", attacks=("fgsm", "step_ll"),
                                         loader_workers=0, format="both", out=str(tmp_path / "s")))
    assert len(stores) == 4
    assert opens() == collections.Counter(_images(jpegs))
