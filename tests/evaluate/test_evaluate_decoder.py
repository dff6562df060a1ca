"""Evaluate's decoder (the review's finding: evaluate switched to nvJPEG by itself on CUDA under an
unchanged job key).

- `decoder` defaults to cpu for evaluate: on a CUDA device it still decodes with PIL unless nvjpeg
  (or auto) is asked for, and results.json records the decoder the batches were decoded with.
- A direction store computed on another decoder's pixels is said in one line, as train says it.

No GPU here: "as on CUDA" is `resolve_decoder` answering for a CUDA device while the device path runs
on the CPU (torchvision's decode_jpeg on CPU tensors), as tests/train/test_train_decoder_record.py does.
The oracles are the decoders the tests ask for.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from jpeg_folders import make_jpeg_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    import torch

    from enspipe.models import create_model, save_model

    work = tmp_path_factory.mktemp("eval-decoder")
    root = make_jpeg_folder(work / "data", images=16, size=40, classes=4, split="val", workers=1)
    torch.manual_seed(0)
    model = save_model(create_model("C", num_classes=4, input_size=(3, 32, 32)), work / "C")
    return {"work": work, "root": root, "model": model}


@pytest.fixture
def as_cuda(monkeypatch):
    """`auto` resolves as on a CUDA device (nvjpeg, run here by the CPU fallback); .undo() ends it."""
    from enspipe.data import decode

    real = decode.resolve_decoder
    monkeypatch.setattr(decode, "resolve_decoder", lambda name, device, decodes=True: real(name, "cuda", decodes))
    return monkeypatch


def _cfg(setup: dict, **kw):
    from enspipe.evaluate import EvalConfig

    return EvalConfig(**{**dict(models=(str(setup["model"]),), dataset=f"imagefolder:{setup['root']}", image_size=32,
                                attacks=("fgsm",), batch_size=8, device="cpu", loader_workers=0), **kw})


def test_evaluate_decodes_with_pil_on_cuda_unless_asked(setup, as_cuda):
    from enspipe.evaluate import evaluate

    assert evaluate(_cfg(setup))["decoder"] == "cpu"  # the default: PIL even where auto would be nvjpeg
    assert evaluate(_cfg(setup, decoder="auto"))["decoder"] == "nvjpeg"  # asked for: decoded on the "device"


def test_a_store_of_another_decoder_is_one_line(setup, as_cuda, caplog):
    from enspipe.evaluate import evaluate
    from enspipe.precompute import PrecomputeConfig, precompute

    (store,) = precompute(PrecomputeConfig(model=str(setup["model"]), dataset=f"imagefolder:{setup['root']}",
                                           split="test", image_size=32, out=str(setup["work"] / "s"), batch_size=8,
                                           device="cpu", attacks=("fgsm",)))  # auto as on CUDA: nvJPEG's pixels
    as_cuda.undo()
    with caplog.at_level(logging.WARNING, logger="enspipe.evaluate"):
        res = evaluate(_cfg(setup, source_stores=(str(store),), whitebox_stores=(str(store),), attacks=("step_ll",)))
    lines = [r.getMessage() for r in caplog.records if "decoder" in r.getMessage()]
    assert len(lines) == 1, caplog.text  # one line, though the store is named twice
    assert lines[0].startswith("evaluate:") and f"{Path(store)} (nvjpeg)" in lines[0] and "with cpu" in lines[0]
    assert [r["decoder"] for r in res["stores"].values()] == ["nvjpeg"] and res["decoder"] == "cpu"


def test_evaluate_decodes_in_its_own_process_on_a_cpu_device(setup, monkeypatch):
    """On a CPU device the models' threads use every core: no loader workers unless asked. Beside a
    CUDA device, every core but the one that drives it (at least one, at most the loader's cap)."""
    import os

    import torch

    from enspipe import evaluate as ev
    from enspipe.data import create_dataset
    from enspipe.data.loader import MAX_WORKERS

    data = create_dataset(f"imagefolder:{setup['root']}", split="test", image_size=32)
    assert ev.eval_workers(torch.device("cpu"), data) == 0
    assert ev.eval_workers(torch.device("cuda"), data) == max(1, min(MAX_WORKERS, os.cpu_count() - 1))
    assert ev.eval_workers(torch.device("cuda"), create_dataset("digits", split="test", limit=8)) == 0  # in memory

    asked = []
    real = ev.batches
    monkeypatch.setattr(ev, "batches", lambda *a, **kw: asked.append(kw["workers"]) or real(*a, **kw))
    ev.evaluate(_cfg(setup, loader_workers=None))
    ev.evaluate(_cfg(setup, loader_workers=1))
    assert asked == [0, 1]
