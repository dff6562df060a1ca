"""The trainer: modes, streaming join, resume, DDP, refusals (real stores, real subprocesses)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from enspipe import attacks
from enspipe.data import create_dataset
from enspipe.util.errors import EnspipeError, StoreError
from enspipe.models import load_model
from enspipe.train import SELF, BatchStream, TrainConfig, adversarial_inputs, train
from cli_runner import run_cli

from cli_runner import CLI  # noqa: E402 -- a fresh interpreter


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _store(static: Path, root: Path, **kw) -> Path:
    from enspipe.precompute import PrecomputeConfig, precompute

    (path,) = precompute(PrecomputeConfig(model=str(static), dataset=kw.pop("dataset", "digits"),
                                          attacks=("fgsm",), out=str(root), shard_size=256,
                                          device="cpu", **kw))
    return path


@pytest.fixture(scope="module")
def two_stores(digits_static, digits_static2, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stores")
    return _store(digits_static, root), _store(digits_static2, root)


def test_clean_makes_no_online_pass_and_writes_a_run(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model="D", dataset="digits", epochs=1, device="cpu", log_every=5), run)
    for name in ("model.safetensors", "model.json", "config.json", "metrics.jsonl", "checkpoints/epoch-0000.pt"):
        assert (run / name).exists(), name
    recs = _metrics(run)
    assert sum(r["online_passes"] for r in recs) == 0
    assert sum(sum(r["source_counts"]) for r in recs) == 0
    assert sum(r["batches"] for r in recs) == int(np.ceil(1500 / 64))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["mode"] == "clean" and cfg["dataset"]["source"] == "digits"
    assert load_model(run).config.name == "D"


def test_adv_makes_an_online_pass_every_batch(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model="D", dataset="digits", mode="adv", epochs=1, device="cpu", log_every=5), run)
    recs = _metrics(run)
    batches = sum(r["batches"] for r in recs)
    assert sum(r["online_passes"] for r in recs) == batches > 0


def test_ens_adv_draws_sources_uniformly(two_stores, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model="D", dataset="digits", mode="ens-adv", shards=tuple(map(str, two_stores)),
                      epochs=3, batch_size=16, device="cpu", log_every=10), run)
    recs = _metrics(run)
    batches = sum(r["batches"] for r in recs)
    online = sum(r["online_passes"] for r in recs)
    counts = np.sum([r["source_counts"] for r in recs], axis=0)
    assert batches == 3 * int(np.ceil(1500 / 16))
    assert counts.sum() == batches and online == counts[SELF]
    # 282 draws from three sources: the self share is 1/3 +- 0.09 (> 3 sigma).
    assert abs(online / batches - 1 / 3) < 0.09, counts
    assert all(c > 0 for c in counts)


@pytest.mark.parametrize("augment", ["none", "crop+flip"])
def test_every_adversarial_half_matches_its_source(two_stores, digits_static, augment):
    from enspipe.stores import open_store

    ds = create_dataset("digits")
    cfg = TrainConfig(model="D", dataset="digits", mode="ens-adv", shards=tuple(map(str, two_stores)),
                      attack="fgsm", batch_size=32, augment=augment, eps=0.25, eps_dist="truncnorm")
    readers = [open_store(p) for p in two_stores]
    model = load_model(digits_static).train()
    seen, sources = set(), set()
    for batch in BatchStream(ds, cfg.shards, cfg, epoch=1):
        idx, n_adv, src = batch["index"].numpy(), batch["n_adv"], batch["source"]
        seen.update(idx.tolist())
        sources.add(src)
        assert n_adv == round(0.5 * len(idx))
        x, y, online = adversarial_inputs(model, batch, cfg, torch.device("cpu"))
        assert online == (src == SELF)
        assert torch.equal(y, torch.as_tensor(ds.labels[idx]))
        eps = batch["eps"]
        assert (eps >= 0).all() and (eps <= 0.25).all()
        clean = batch["x"].float() / 255
        if augment == "none":
            assert torch.equal(batch["x"], torch.as_tensor(ds.images_uint8(idx)))
        assert torch.equal(x[n_adv:], clean[n_adv:])
        if src == SELF:
            continue
        # The streamed direction is the drawn store's, transformed like the image.
        d_store = readers[src - 1].read_indices(idx[:n_adv])["direction"]
        d = batch["d"].numpy()
        if augment == "none":
            np.testing.assert_array_equal(d, d_store)
        else:
            for i in range(n_adv):
                dy, dx, flip = batch["aug"][i].tolist()
                ref = np.pad(d_store[i], ((0, 0), (2, 2), (2, 2)))[:, dy:dy + 28, dx:dx + 28]
                img = np.pad(ds.images_uint8(idx[i:i + 1])[0], ((0, 0), (2, 2), (2, 2)))[:, dy:dy + 28, dx:dx + 28]
                if flip:
                    ref, img = ref[..., ::-1], img[..., ::-1]
                np.testing.assert_array_equal(d[i], ref)
                np.testing.assert_array_equal(batch["x"][i].numpy(), img)
        expected = attacks.apply_direction(clean[:n_adv], batch["d"], eps)
        assert torch.equal(x[:n_adv], expected)
    assert seen == set(range(len(ds)))
    assert sources == {0, 1, 2}


def test_mismatched_store_is_refused_before_training(digits_static, tmp_path):
    small = _store(digits_static, tmp_path / "stores", limit=500)
    with pytest.raises(StoreError, match=r"field: dataset\.limit"):
        train(TrainConfig(model="D", dataset="digits", mode="ens-adv", shards=(str(small),), epochs=1,
                          device="cpu"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_store_of_another_attack_is_refused(two_stores, tmp_path):
    with pytest.raises(StoreError, match="`attack` step_ll conflicts with the stores, which hold fgsm directions"):
        train(TrainConfig(model="D", dataset="digits", mode="ens-adv", attack="step_ll",
                          shards=(str(two_stores[0]),), epochs=1, device="cpu"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    with pytest.raises(EnspipeError, match="loss became nan"):
        train(TrainConfig(model="D", dataset="digits", epochs=2, lr=1e30, optimizer="sgd", device="cpu"),
              tmp_path / "run")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = ["train", "--model", "D", "--dataset", "digits", "--epochs", "3", "--mode", "adv",
            "--device", "cpu", "--seed", "3"]
    assert run_cli(*args, "--out", tmp_path / "full", env=dict(os.environ)).returncode == 0  # forked: zygote
    run = tmp_path / "killed"
    p = subprocess.Popen(CLI + args + ["--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # an event wait: the cap is only for a hang
    while not (run / "checkpoints" / "epoch-0000.pt").exists():
        assert p.poll() is None, p.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "checkpoints" / "epoch-0002.pt").exists()
    assert run_cli(*args, "--out", run, "--resume", env=dict(os.environ)).returncode == 0
    full, resumed = _weights(tmp_path / "full"), _weights(run)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# DDP under torchrun (disjoint samples per rank, synchronised weights): tests/test_ddp.py.


@pytest.mark.parametrize("argv, message", [
    (["--mode", "ens-adv"], "needs at least one --shards"),
    (["--mode", "ens-adv", "--shards", "/nonexistent/store.zarr"], "does not exist"),
    (["--adv-fraction", "1.5", "--mode", "adv"], "adv-fraction"),
    (["--eps", "1/0"], "eps"),
    (["--model", "Z"], "unknown model"),
    (["--epochs", "0"], "epochs"),
])
def test_bad_input_gets_one_line(tmp_path, argv, message):
    base = ["train", "--model", "D", "--dataset", "digits", "--device", "cpu", "--out", str(tmp_path / "r")]
    r = run_cli(*base, *argv, env=dict(os.environ))  # a real process, forked from the pre-imported zygote
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_resume_from_another_configuration_is_refused(tmp_path):
    run = tmp_path / "r"
    base = ["train", "--model", "D", "--dataset", "digits", "--device", "cpu", "--epochs", "1", "--out", str(run)]
    assert run_cli(*base, env=dict(os.environ)).returncode == 0
    r = run_cli(*base, "--resume", "--lr", "0.01", env=dict(os.environ))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "another configuration" in r.stderr and "lr" in r.stderr
