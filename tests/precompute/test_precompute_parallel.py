"""precompute at the device's rate (issue 16): loader processes give the serial path's bytes
(the loader itself: tests/data/test_loader.py), bf16 stores beside fp32 ones (reused; resumed
bit-identically in test_precompute.py's kill test), dask workers streaming the same data path,
wds stores carrying the source's JPEG bytes, and bad input in one line."""
from __future__ import annotations

import hashlib
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from jpeg_folders import make_jpeg_folder
import torch

from enspipe.data import create_dataset
from enspipe.precompute import PrecomputeConfig, precompute
from enspipe.stores import open_store
from cli_runner import run_cli

REPO = Path(__file__).resolve().parents[2]
SIZE = 32  # --image-size: resize to round(32 / 0.875) = 37, center-crop 32


def _cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    # A real enspipe process, forked from the suite's pre-imported zygote (its imports paid once).
    return run_cli(*map(str, args), timeout=timeout)


def _records(path: Path) -> dict:
    """Per-shard files with their sha256: equal records mean bit-identical stores."""
    return {s: r["files"] for s, r in open_store(path).manifest["shards"].items()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    """An ImageFolder of 40 JPEGs of 48 px in 4 classes (benchmarks/gpu_data.py)."""
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), images=40, size=48, classes=4, workers=2)


@pytest.fixture(scope="module")
def conv_static(tmp_path_factory) -> Path:
    """A static convolutional model (architecture C, fixed random weights) for 3x32x32 images."""
    from enspipe.models import create_model, save_model

    torch.manual_seed(3)
    return save_model(create_model("C", num_classes=4, input_size=(3, SIZE, SIZE)), tmp_path_factory.mktemp("C"))


def _cfg(model: Path, jpegs: Path, out: Path, **kw) -> PrecomputeConfig:
    base = dict(model=str(model), dataset=f"imagefolder:{jpegs}", image_size=SIZE, out=str(out), shard_size=16,
                batch_size=8, device="cpu")
    return PrecomputeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def serial(conv_static, jpegs, tmp_path_factory) -> dict[str, Path]:
    """zarr + wds stores decoded in the computing process (--loader-workers 0): the reference."""
    zarr, wds = precompute(_cfg(conv_static, jpegs, tmp_path_factory.mktemp("serial"), fmt="both", loader_workers=0))
    return {"zarr": zarr, "wds": wds}


# --- Parallel decode is bit-identical to the serial path ----------------------------------------

def test_parallel_decode_gives_the_serial_store(conv_static, jpegs, serial, tmp_path):
    zarr, wds = precompute(_cfg(conv_static, jpegs, tmp_path, fmt="both", loader_workers=2))
    assert zarr.relative_to(tmp_path) == serial["zarr"].relative_to(serial["zarr"].parents[2])
    assert _records(zarr) == _records(serial["zarr"])
    assert _records(wds) == _records(serial["wds"])


def test_wds_images_are_the_source_jpeg_bytes(jpegs, serial):
    ds = create_dataset(f"imagefolder:{jpegs}", image_size=SIZE)
    want = [_sha((ds.folder / f).read_bytes()) for f in ds._files]
    r = open_store(serial["wds"])
    assert [(ext, _sha(data)) for ext, data in r.read_image_files(0, len(r))] == [("jpeg", h) for h in want]
    # In the tars themselves: one `src.jpeg` member per sample, byte for byte the file.
    got = []
    for tar in sorted(serial["wds"].glob("*.tar")):
        with tarfile.open(tar) as tf:
            got += [_sha(tf.extractfile(m).read()) for m in tf if m.name.endswith(".src.jpeg")]
    assert got == want
    # Nothing was re-encoded: no PNG member, and the directions are the zarr store's.
    zarr = open_store(serial["zarr"])
    np.testing.assert_array_equal(r.read(0, len(r))["direction"], zarr.read(0, len(r))["direction"])
    with pytest.raises(Exception, match="read_image_files"):
        r.read_images(0, 1)
    from enspipe.stores import verify_store

    assert verify_store(serial["wds"]).ok  # every tar decoded, every JPEG opened


def test_wds_images_none_leaves_them_out(conv_static, jpegs, serial, tmp_path):
    (path,) = precompute(_cfg(conv_static, jpegs, tmp_path, fmt="wds", wds_images="none", loader_workers=0))
    with tarfile.open(next(path.glob("*.tar"))) as tf:
        names = tf.getnames()
    assert names[-1] == "__index__"  # the tar's member index (issue 26), then the samples' members
    exts = {n.partition(".")[2] for n in names[:-1]}
    assert exts == {"idx", "key", "cls", "label.cls", "dir.bits.gz", "logits.npy"}
    r = open_store(path)
    wds = open_store(serial["wds"])
    np.testing.assert_array_equal(r.read(0, len(r))["direction"], wds.read(0, len(r))["direction"])
    assert r.manifest["extra"]["config"]["wds_images"] == "none"


# --- dask: the same data path inside each worker --------------------------------------------------

def test_dask_worker_with_loader_processes_equals_in_process(conv_static, jpegs, serial, tmp_path):
    # The wds store too: its JPEGs come from the dask worker's loader processes, read once there.
    zarr, wds = precompute(_cfg(conv_static, jpegs, tmp_path, format="both", workers=1, loader_workers=1))
    assert _records(zarr) == _records(serial["zarr"])
    assert _records(wds) == _records(serial["wds"])


def test_task_groups_cover_every_shard_once():
    from enspipe.precompute.dask_runner import describe, task_groups

    class Job:  # only .attack is read
        def __init__(self, attack):
            self.attack = attack

    a, b = Job("step_ll"), Job("fgsm")
    units = [(a, s) for s in range(40)] + [(b, s) for s in range(3)]
    groups = task_groups(units, workers=2)
    assert [u for g in groups for u in g] == sorted(units, key=lambda u: u[1])  # in shard order, a shard's attacks together
    assert len(groups) >= 2 and max(map(len, groups)) <= 16
    assert describe([(a, 4), (a, 5), (a, 6), (a, 9), (b, 0)]) == "step_ll shard 4-6, step_ll shard 9, fgsm shard 0"


# --- bf16: stores of their own, reused, resumed bit-identically -----------------------------------

def test_bf16_store_lives_beside_the_fp32_one_and_both_are_reused(digits_static, tmp_path):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # precompute refuses bf16 there (test below)
        pytest.skip("this CPU has no native bf16")
    base = dict(model=str(digits_static), out=str(tmp_path), shard_size=512, batch_size=128, device="cpu")
    (fp32,) = precompute(PrecomputeConfig(**base))
    (bf16,) = precompute(PrecomputeConfig(**base, precision="bf16"))
    assert fp32 != bf16 and fp32.parent == bf16.parent
    ident = open_store(bf16).identity
    assert ident.attack_params["precision"] == "bf16" and "precision" not in open_store(fp32).identity.attack_params
    assert open_store(bf16).manifest["extra"]["config"]["precision"] == "bf16"
    flips = (open_store(bf16).read(0, 1500)["direction"] != open_store(fp32).read(0, 1500)["direction"]).mean()
    assert flips < 0.5  # bf16 moves some signs of a trained model's gradient, not most
    res = _cli("precompute", "--model", digits_static, "--out", tmp_path, "--shard-size", 512, "--batch-size", 128,
               "--device", "cpu", "--precision", "bf16")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(bf16)] and res.stderr.splitlines() == [f"reused {bf16}"]
    from enspipe.precompute import recompute_check

    assert recompute_check(bf16, k=20, device="cpu", seed=0) == []  # recomputed in bf16 again


# A killed bf16 precompute resumes bit-identically: test_precompute.py's kill test, run per precision.


# --- Bad input: one clear line --------------------------------------------------------------------

def test_negative_loader_workers_is_one_line(digits_static, tmp_path):
    res = _cli("precompute", "--model", digits_static, "--out", tmp_path, "--loader-workers", -1, "--device", "cpu")
    lines = res.stderr.splitlines()
    assert res.returncode != 0 and len(lines) == 1 and "--loader-workers" in lines[0], res.stderr
    with pytest.raises(Exception, match="loader_workers must be 0"):
        PrecomputeConfig(model="D", out="x", loader_workers=-1)


def test_bf16_on_a_cpu_without_it_is_one_line(digits_static, tmp_path, monkeypatch, capsys):
    from enspipe import cli

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a CPU without bf16
    with pytest.raises(SystemExit) as e:
        cli.main(["precompute", "--model", str(digits_static), "--out", str(tmp_path), "--device", "cpu",
                  "--precision", "bf16"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code != 0 and len(err) == 1, err
    assert err[0].startswith("enspipe: error: ") and "bf16 cannot run on device cpu" in err[0]
    assert not list(tmp_path.rglob("manifest.json"))  # refused before any store was created
