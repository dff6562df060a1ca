"""The trainer's held-out validation reads its images through the run's loader workers and decoder
(`train.kit.Validation`): the same errors as a plain loop over PIL-decoded images (oracle:
tests/jpeg_folders.pil_eval_images and the model, in the validation's batches), whatever the
worker count; its processes are forked once for the run, not at every epoch's validation, and
end with it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jpeg_folders import make_jpeg_folder, pil_eval_images
from oracles import clean_and_fgsm_errors

from enspipe.data import create_dataset
from enspipe.train.kit import Validation, validate

SIZE, BATCH, EPS = 32, 16, 16 / 256
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val-jpegs")
    make_jpeg_folder(root, images=16, size=48, classes=4, split="train", workers=2)
    return make_jpeg_folder(root, images=40, size=48, classes=4, split="val", workers=2)


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 15 * 15, 4))


def _oracle(model: torch.nn.Module, root: Path) -> tuple[int, int]:
    u8, y = pil_eval_images(root / "val", SIZE)
    return clean_and_fgsm_errors(model, u8.float() / 255, y, EPS, BATCH)


def _children() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE}


def test_validation_counts_a_plain_loop_and_forks_its_workers_once(jpegs):
    model = _model()
    clean, adv = _oracle(model, jpegs)
    data = create_dataset(f"imagefolder:{jpegs}", split="test", image_size=SIZE)
    plain = validate(model.train(), data, eps=EPS, device=CPU, batch_size=BATCH)
    assert model.training  # its mode restored
    assert plain["n"] == 40 and round(plain["clean_error"] * 40) == clean
    assert abs(round(plain["fgsm_error"] * 40) - adv) <= 1  # one near-zero gradient's sign may differ
    before = _children()
    validation = Validation(data, eps=EPS, device=CPU, workers=2, batch_size=BATCH)
    try:
        made = _children() - before  # forked when made (before a training loader starts), not at the first call
        runs, forked = [], []
        for _ in range(2):  # two epochs' validations
            runs.append(validation(model))
            forked.append(_children() - before)
        assert len(made) == 2 and forked[0] == forked[1] == made  # the same two processes every time
    finally:
        validation.close()
    assert _children() <= before
    for r in runs:
        assert {k: r[k] for k in ("n", "clean_error", "fgsm_error")} == {k: plain[k] for k in ("n", "clean_error",
                                                                                                  "fgsm_error")}


def test_a_run_validates_the_same_with_loader_workers(jpegs, tmp_path):
    """Through `train`: the val records of a run with 2 loader workers equal those of the run decoding
    in its own process (`loader_workers` is runtime-only: it must change nothing a run computes)."""
    import json

    from enspipe.train import TrainConfig, train

    vals = {}
    for workers in (0, 2):
        cfg = TrainConfig(model="C", dataset=f"imagefolder:{jpegs}", image_size=SIZE, epochs=2, batch_size=8,
                          val_limit=24, loader_workers=workers, device="cpu", out=str(tmp_path / f"w{workers}"))
        train(cfg)
        lines = (tmp_path / f"w{workers}" / "metrics.jsonl").read_text().splitlines()
        vals[workers] = [{k: r[k] for k in ("epoch", "n", "clean_error", "fgsm_error")}
                         for r in map(json.loads, lines) if r.get("kind") == "val"]
    assert [v["epoch"] for v in vals[0]] == [1, 2] and vals[0][0]["n"] == 24
    assert vals[2] == vals[0]


def test_a_run_validates_with_its_recorded_decoder(jpegs, tmp_path, monkeypatch):
    """As on CUDA (`auto` resolves to nvjpeg; the device path runs on the CPU here): the validation's
    loader is opened once, with the decoder the run recorded (config.json's `decoder`), not the option."""
    import json

    from enspipe.data import decode, loader
    from enspipe.train import TrainConfig, train

    real_resolve, real_open = decode.resolve_decoder, loader.open_loader
    monkeypatch.setattr(decode, "resolve_decoder", lambda name, device, decodes=True: real_resolve(name, "cuda", decodes))
    opened = []
    monkeypatch.setattr(loader, "open_loader", lambda data, device, **kw: opened.append(kw["decoder"]) or
                        real_open(data, device, **kw))
    train(TrainConfig(model="C", dataset=f"imagefolder:{jpegs}", image_size=SIZE, epochs=2, batch_size=8,
                      val_limit=8, device="cpu", out=str(tmp_path / "run")))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["decoder"] == "nvjpeg"
    assert opened == ["nvjpeg"]
