"""Precompute's loader is `data.loader.open_loader`, the one every stage uses: a source held in memory
is sliced, never forked for (whatever loader_workers says), and a dask worker process keeps its
loader across tasks, forking again only when a task needs the files its chunks do not carry."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from jpeg_folders import make_jpeg_folder

from enspipe.data import create_dataset
from enspipe.precompute import PrecomputeConfig, precompute
from enspipe.precompute import compute


def test_an_in_memory_source_forks_no_loader_workers(tmp_path, monkeypatch):
    import torch.utils.data as tud

    from enspipe.models import create_model, save_model

    made = []
    real = tud.DataLoader

    class Spy(real):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("num_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tud, "DataLoader", Spy)
    torch.manual_seed(0)
    model = save_model(create_model("C", num_classes=10, input_size=(1, 28, 28)), tmp_path / "C")
    (store,) = precompute(PrecomputeConfig(model=str(model), dataset="digits", limit=64, shard_size=32, batch_size=16,
                                           device="cpu", attacks=("fgsm",), loader_workers=2, out=str(tmp_path / "s")))
    assert store.exists() and made == []  # digits is sliced in the process that computes


@pytest.fixture
def jpegs(tmp_path) -> object:
    return create_dataset(f"imagefolder:{make_jpeg_folder(tmp_path, images=8, size=40, classes=2, workers=1)}",
                          image_size=32)


def test_a_dask_workers_loader_is_kept_until_a_task_needs_files_it_does_not_carry(jpegs, monkeypatch):
    from enspipe.data import decode as decode_mod

    real = decode_mod.resolve_decoder  # as `auto` resolves on CUDA: the device path
    monkeypatch.setattr(decode_mod, "resolve_decoder", lambda name, device, decodes=True: real(name, "cuda", decodes))
    job = SimpleNamespace(loader_workers=0, torch_threads=None, decoder="nvjpeg")
    cpu = torch.device("cpu")
    try:
        plain = compute._worker_loader(jpegs, job, cpu, False)
        assert not plain.files and compute._worker_loader(jpegs, job, cpu, False) is plain
        with_files = compute._worker_loader(jpegs, job, cpu, True)
        assert with_files is not plain and with_files.files
        (chunk,) = with_files([(0, 4)])
        assert [b for _, b in chunk.files] == [(jpegs.folder / f).read_bytes() for f in jpegs._files[:4]]
        # One that carries files serves every later task, with or without files.
        assert compute._worker_loader(jpegs, job, cpu, False) is with_files
        assert compute._worker_loader(jpegs, job, cpu, True) is with_files
    finally:
        for loader in compute._WORKER_LOADER.values():
            loader.close()
        compute._WORKER_LOADER.clear()
