"""The trainer's decoder recorded and compared (issue 26's device decode, the review's defects).

- config.json records the decoder a run's images were decoded with, resolved (`decoder`: cpu |
  nvjpeg, beside `device`), and from which epoch each one ran (`decoders`).
- A resume whose resolved decoder differs from the recorded one: refused in one line when only
  `auto` switched it (another kind of device), continued with one line when the user named it.
- A run saved before the record (config.json without it) resumes as before.
- A store whose directions were computed on another decoder's pixels: one informative line.
- A JPEG that passes the header check but does not decode in the step is named by file and sample.

No GPU here: "as on CUDA" is `resolve_decoder` answering for a CUDA device while the device path
runs on the CPU (torchvision's decode_jpeg on CPU tensors), as tests/train/test_device_decode_train.py
does. The oracles are the values the tests set themselves (which decoder each run was given, which
file they truncated).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from jpeg_folders import make_jpeg_folder, wds_shard_of


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), images=24, size=48, classes=4, workers=1)


@pytest.fixture
def as_cuda(monkeypatch):
    """`auto` resolves as on a CUDA device (nvjpeg, run here by the CPU fallback); .undo() ends it."""
    from enspipe.data import decode

    real = decode.resolve_decoder
    monkeypatch.setattr(decode, "resolve_decoder", lambda name, device, decodes=True: real(name, "cuda", decodes))
    return monkeypatch


def _cfg(jpegs: Path, out: Path, **kw):
    from enspipe.train import TrainConfig

    return TrainConfig(**{**dict(model="C", dataset=f"imagefolder:{jpegs}", image_size=32, batch_size=8, epochs=1,
                                 mode="clean", device="cpu", out=str(out)), **kw})


def _saved(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


@pytest.fixture(scope="module")
def cpu_run(jpegs, tmp_path_factory) -> Path:
    """One epoch with `auto` on this CPU: decoded by PIL."""
    from enspipe.train import train

    run = tmp_path_factory.mktemp("runs") / "cpu"
    train(_cfg(jpegs, run))
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_a_run_records_its_resolved_decoder(cpu_run):
    saved = _saved(cpu_run)
    assert saved["train"]["decoder"] == "auto"  # the option as given
    assert saved["decoder"] == "cpu" and saved["decoders"] == [{"decoder": "cpu", "from_epoch": 0}]


def test_auto_switching_the_decoder_on_resume_is_refused_and_a_named_one_continues(jpegs, tmp_path, as_cuda, caplog):
    """Started as on CUDA (nvjpeg), resumed on a CPU: `auto` would switch to PIL, so it is refused in one
    line naming both decoders; `decoder` cpu, named, continues with one line and both are recorded."""
    from enspipe.config import OptionError
    from enspipe.train import train

    run = tmp_path / "gpu"
    train(_cfg(jpegs, run))
    assert _saved(run)["decoder"] == "nvjpeg"
    as_cuda.undo()  # the machine it resumes on has no CUDA
    before = (run / "config.json").read_text()
    with pytest.raises(OptionError) as e:
        train(_cfg(jpegs, run, epochs=2, resume=True))
    msg = str(e.value)
    assert e.value.field == "decoder" and "\n" not in msg, msg
    assert "nvjpeg" in msg and "is cpu here" in msg and "`decoder` cpu" in msg, msg
    assert (run / "config.json").read_text() == before  # nothing written
    assert not (run / "checkpoints" / "epoch-0001.pt").exists()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="enspipe.train"):
        res = train(_cfg(jpegs, run, epochs=2, resume=True, decoder="cpu"))
    assert res.epochs_done == 2 and (run / "checkpoints" / "epoch-0001.pt").exists()
    lines = [r.getMessage() for r in caplog.records if "decoded its training images with nvjpeg" in r.getMessage()]
    assert len(lines) == 1 and "continues with cpu" in lines[0] and "\n" not in lines[0], caplog.text
    saved = _saved(run)
    assert saved["decoder"] == "cpu"
    assert saved["decoders"] == [{"decoder": "nvjpeg", "from_epoch": 0}, {"decoder": "cpu", "from_epoch": 1}]


def test_a_pil_run_resumed_on_cuda_keeps_pil_when_asked(cpu_run, jpegs, tmp_path, as_cuda, caplog):
    """Started on a CPU (PIL), resumed as on CUDA: `auto` (nvjpeg there) is refused, saying `decoder`
    cpu keeps the pixels; with it the run goes on through the PIL stream, silently, nothing switched."""
    from enspipe.config import OptionError
    from enspipe.train import train

    run = _copy(cpu_run, tmp_path / "r")
    with pytest.raises(OptionError, match=r"is nvjpeg here .*decoded its training images with cpu.*"
                                          r"pass `decoder` cpu to keep them") as e:
        train(_cfg(jpegs, run, epochs=2, resume=True))
    assert "\n" not in str(e.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="enspipe.train"):
        train(_cfg(jpegs, run, epochs=2, resume=True, decoder="cpu"))
    assert not [r for r in caplog.records if "decod" in r.getMessage()], caplog.text
    saved = _saved(run)
    assert saved["decoder"] == "cpu" and saved["decoders"] == [{"decoder": "cpu", "from_epoch": 0}]
    assert saved["train"]["decoder"] == "cpu"


@pytest.mark.parametrize("edit, resumes", [
    # a run saved by the code before the record: `auto` on a CPU (PIL) -> resumes on a CPU
    (lambda c: c["train"].__setitem__("decoder", "auto"), True),
    # the same on CUDA (nvjpeg, as `auto` resolved there) -> auto on this CPU would switch: refused
    (lambda c: c.__setitem__("device", "cuda:0"), False),
    # a run saved before the `decoder` option existed (PIL was the only decoder), even on CUDA
    (lambda c: (c["train"].pop("decoder"), c.__setitem__("device", "cuda:0")), True),
])
def test_a_run_saved_before_the_record_resumes_as_it_was_decoded(cpu_run, jpegs, tmp_path, edit, resumes):
    from enspipe.config import OptionError
    from enspipe.train import train

    run = _copy(cpu_run, tmp_path / "old")
    old = _saved(run)
    del old["decoder"], old["decoders"]  # what the old code wrote
    edit(old)
    (run / "config.json").write_text(json.dumps(old))
    if not resumes:
        with pytest.raises(OptionError, match="decoded its training images with nvjpeg"):
            train(_cfg(jpegs, run, epochs=2, resume=True))
        return
    res = train(_cfg(jpegs, run, epochs=2, resume=True))
    assert res.epochs_done == 2
    assert _saved(run)["decoders"] == [{"decoder": "cpu", "from_epoch": 0}]


def test_a_store_of_another_decoder_is_one_informative_line(jpegs, tmp_path, as_cuda):
    """Directions computed on nvJPEG's pixels (a store made as on CUDA), a trainer on this CPU (PIL):
    training goes on, and a real `enspipe train` process says so in one line naming the store."""
    import os

    import torch

    from cli_runner import run_cli
    from enspipe.models import create_model, save_model
    from enspipe.precompute import PrecomputeConfig, precompute

    torch.manual_seed(0)
    model = save_model(create_model("C", num_classes=4, input_size=(3, 32, 32)), tmp_path / "C")
    (store,) = precompute(PrecomputeConfig(model=str(model), dataset=f"imagefolder:{jpegs}", image_size=32,
                                           out=str(tmp_path / "s"), batch_size=8, device="cpu", attacks=("fgsm",)))
    as_cuda.undo()
    base = ["train", "--model", "C", "--dataset", f"imagefolder:{jpegs}", "--image-size", "32", "--batch-size", "8",
            "--epochs", "1", "--device", "cpu", "--mode", "ens-adv", "--shards", store]
    r = run_cli(*base, "--out", tmp_path / "ens", env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "decoder" in ln]
    assert len(lines) == 1 and str(store) in lines[0] and "(nvjpeg)" in lines[0] and "with cpu" in lines[0], r.stderr
    assert "not an error" in lines[0]
    saved = _saved(tmp_path / "ens")
    assert [s["decoder"] for s in saved["stores"]] == ["nvjpeg"] and saved["decoder"] == "cpu"


def test_a_store_of_the_same_decoder_says_nothing(jpegs, tmp_path, caplog):
    import torch

    from enspipe.models import create_model, save_model
    from enspipe.precompute import PrecomputeConfig, precompute
    from enspipe.train import train

    torch.manual_seed(0)
    model = save_model(create_model("C", num_classes=4, input_size=(3, 32, 32)), tmp_path / "C")
    (store,) = precompute(PrecomputeConfig(model=str(model), dataset=f"imagefolder:{jpegs}", image_size=32,
                                           out=str(tmp_path / "s"), batch_size=8, device="cpu", attacks=("fgsm",)))
    with caplog.at_level(logging.WARNING, logger="enspipe.train"):
        train(_cfg(jpegs, tmp_path / "ens", mode="ens-adv", shards=(str(store),)))
    assert not [r for r in caplog.records if "decoder" in r.getMessage()], caplog.text
    assert [s["decoder"] for s in _saved(tmp_path / "ens")["stores"]] == ["cpu"]


def _big_jpeg(seed: int) -> bytes:
    """A 160x120 photo-like JPEG: large enough that half of it keeps the whole header."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.kron(rng.random((16, 21, 3)), np.ones((8, 8, 1)))[:120, :160] * 0.8 + rng.random((120, 160, 3)) * 0.2
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["imagefolder", "wds"])
def test_a_jpeg_that_fails_in_the_step_is_named_by_file_and_sample(jpegs, tmp_path, as_cuda, capsys, kind):
    """A JPEG cut in half passes the loader's header check and fails the batched decode in the training
    step (the device path, here its CPU fallback): `enspipe train` ends with one line naming the file
    (imagefolder: its path; wds: its key and shard) and the sample's index."""
    from enspipe.cli import main
    from enspipe.data import create_dataset
    from enspipe.data.decode import check_jpeg
    from enspipe.util.limits import current_limits

    folder = _copy(jpegs, tmp_path / "jpegs")
    bad = sorted(folder.glob("train/*/*.JPEG"))[13]
    data = _big_jpeg(13)
    bad.write_bytes(data[: len(data) // 2])
    assert check_jpeg(bad.read_bytes(), "x", current_limits()) == (160, 120)  # the header still reads: the worker passes it
    if kind == "imagefolder":
        source, names = f"imagefolder:{folder}", str(bad)
        index = create_dataset(source, image_size=32)._files.index(str(bad.relative_to(folder / "train")))
    else:
        tar = wds_shard_of(folder, tmp_path / "a.tar")
        source, names = f"wds:{tar}", f"'s0013' in {tar}"  # the 14th file sorted is the tar's s0013
        index = create_dataset(source, image_size=32)._raw_keys.index("s0013")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "C", "--dataset", source, "--image-size", "32", "--batch-size", "8", "--epochs", "1",
              "--device", "cpu", "--decoder", "auto", "--mode", "clean", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("enspipe: error: "), err
    assert names in lines[0] and f"(sample {index})" in lines[0] and "truncated" in lines[0], err


def test_a_garbled_decoder_record_is_one_line(cpu_run, jpegs, tmp_path):
    from enspipe.train import train
    from enspipe.util.errors import ConfigError

    run = _copy(cpu_run, tmp_path / "r")
    saved = _saved(run)
    saved["decoders"] = [{"decoder": "pil"}]
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="`decoders` is not a list") as e:
        train(_cfg(jpegs, run, epochs=2, resume=True))
    assert "\n" not in str(e.value)


def test_a_decoder_recorded_for_an_epoch_that_died_does_not_count_on_resume(jpegs, tmp_path, as_cuda, caplog):
    """Trained as on CUDA (nvjpeg), resumed with `decoder` cpu, killed in that epoch before its checkpoint:
    config.json then records cpu from epoch 1, which decoded nothing that remains. Resumed with `auto`
    as on CUDA again, every kept epoch was nvjpeg: it goes on, silently, and the dead record is gone."""
    from enspipe.train import train

    run = tmp_path / "gpu"
    train(_cfg(jpegs, run))
    saved = _saved(run)
    assert saved["decoders"] == [{"decoder": "nvjpeg", "from_epoch": 0}]
    # What prepare_run wrote for the resume with `decoder` cpu before epoch 1 died (no epoch-0001.pt).
    saved["decoders"].append({"decoder": "cpu", "from_epoch": 1})
    saved["decoder"], saved["train"]["decoder"], saved["train"]["epochs"] = "cpu", "cpu", 2
    (run / "config.json").write_text(json.dumps(saved))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="enspipe.train"):
        res = train(_cfg(jpegs, run, epochs=2, resume=True))
    assert res.epochs_done == 2
    assert not [r for r in caplog.records if "decod" in r.getMessage()], caplog.text
    assert _saved(run)["decoders"] == [{"decoder": "nvjpeg", "from_epoch": 0}]
