"""The trainer's clean images decoded in the step (issue 26: `decoder` of TrainConfig).

No GPU here: the device path runs on the CPU (decode_batch with device="cpu"), selected by making
`decoder` resolve as it does on CUDA. The oracle of each batch is the PIL stream's batch for the
same seed and epoch (the stream as it was): the same samples, labels, sources, eps and directions,
and clean images within the tolerance of tests/data/test_device_decode.py (mean |diff| < 0.5 levels, none
off by more than 4), after the crops and flips, which the step applies on the device.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from jpeg_folders import assert_close_to_pil, make_jpeg_folder, wds_shard_of
import torch



@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), images=24, size=48, classes=4, workers=1)


def test_augment_on_device_is_the_streams_augment():
    """augment_on_device (torch) equals stream.apply_augment (numpy) bit for bit, crops and flips."""
    from enspipe.data.decode import augment_on_device
    from enspipe.stream import apply_augment, augment_params

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 3, 9, 7), dtype=np.uint8)
    aug = augment_params(rng, 6, "crop+flip", 2)
    assert aug[:, 2].any() and (aug[:, :2] != 2).any()  # some flips, some moved crops
    got = augment_on_device(torch.from_numpy(x), torch.from_numpy(aug), 2).numpy()
    assert np.array_equal(got, apply_augment(x, aug, 2))


@pytest.mark.parametrize("kind", ["imagefolder", "wds"])
def test_the_step_decodes_the_streams_batches_as_pil_would(jpegs, tmp_path, kind):
    from enspipe.data import create_dataset
    from enspipe.data.decode import EncodedChunk
    from enspipe.train.device_batches import DeviceDecodedBatchStream, clean_images
    from enspipe.train import BatchStream, TrainConfig

    source = f"imagefolder:{jpegs}" if kind == "imagefolder" else f"wds:{wds_shard_of(jpegs, tmp_path / 'a.tar')}"
    ds = create_dataset(source, image_size=32)
    cfg = TrainConfig(model="C", dataset=source, image_size=32, batch_size=5, block_size=8,
                      augment="crop+flip", crop_padding=3, device="cpu", mode="adv")
    pil = list(BatchStream(ds, (), cfg, epoch=1))
    dev = list(DeviceDecodedBatchStream(ds, (), cfg, epoch=1))
    assert len(pil) == len(dev) > 3
    for a, b in zip(pil, dev):
        assert isinstance(b["x"], EncodedChunk) and b["x"].indices == a["index"].tolist()
        for k in ("index", "y", "aug", "eps"):
            assert torch.equal(a[k], b[k]), k
        assert (a["seq"], a["source"], a["n_adv"]) == (b["seq"], b["source"], b["n_adv"])
        x = clean_images(b["x"], torch.device("cpu"), b["aug"], cfg.crop_padding)
        assert x.dtype == torch.uint8 and x.shape == a["x"].shape
        assert_close_to_pil(x.numpy(), a["x"].numpy())


def test_train_with_the_device_decoder_runs_and_records_it(jpegs, tmp_path, monkeypatch):
    """A run whose decoder resolves to nvjpeg (as on CUDA; here on the CPU) trains through the
    encoded stream with a loader worker; its config records `decoder`."""
    import json

    from enspipe.data import decode as decode_mod
    from enspipe.train import TrainConfig, train

    real = decode_mod.resolve_decoder
    monkeypatch.setattr(decode_mod, "resolve_decoder", lambda name, device, decodes=True: real(name, "cuda", decodes))
    seen = []
    import enspipe.train.device_batches as db

    orig = db.clean_images
    monkeypatch.setattr(db, "clean_images", lambda *a, **k: seen.append(1) or orig(*a, **k))
    res = train(TrainConfig(model="C", dataset=f"imagefolder:{jpegs}", image_size=32, batch_size=8, epochs=1,
                            mode="adv", augment="flip", device="cpu", loader_workers=1, out=str(tmp_path / "run")))
    assert len(seen) == 3  # 24 images in batches of 8, each decoded in the step
    saved = json.loads((Path(res.run_dir) / "config.json").read_text())
    assert saved["train"]["decoder"] == "auto" and saved["decoder"] == "nvjpeg"  # the option, and what it resolved to


def test_nvjpeg_without_cuda_fails_train_in_one_line(jpegs, tmp_path):
    from enspipe.config import OptionError
    from enspipe.train import TrainConfig, train

    with pytest.raises(OptionError) as e:
        train(TrainConfig(model="C", dataset=f"imagefolder:{jpegs}", image_size=32, epochs=1, device="cpu",
                          decoder="nvjpeg", out=str(tmp_path / "run")))
    assert e.value.field == "decoder" and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
