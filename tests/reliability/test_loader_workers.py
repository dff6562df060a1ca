"""Issue 25 item 3: `--loader-workers` changes nothing a run computes. The reference ens-adv run
(two stores, zarr and wds) with `--loader-workers 0`, made again with 2 loader workers, ends with
the same weights bit for bit and the same steps; and a run killed after its second epoch with 2
workers, resumed with 0, ends as the reference does (the option stays runtime-only, so such a
resume is accepted and must be exact). Blocks of 64 in windows of 2 give 4 windows an epoch,
so 2 workers each make half of every epoch's batches."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .processes import outputs, spawn
from .reference import EPOCHS, RefRun, assert_same_run, final_weights, train_args

SMALL_WINDOWS = ("--block-size", 64, "--buffer-blocks", 2)


def _train(args: list, log: Path) -> None:
    proc = spawn(*args, log=log)
    proc.wait(timeout=1200)
    assert proc.returncode == 0, outputs(proc)[1]


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "train"]


def test_two_loader_workers_train_the_same_weights_and_resume_across_counts(ref, tmp_path):
    zero = tmp_path / "zero-workers"
    _train(train_args(ref, zero, *SMALL_WINDOWS, "--loader-workers", 0), tmp_path / "zero.log")
    ref_run = RefRun(zero, final_weights(zero), 0.0)
    two = tmp_path / "two-workers"
    _train(train_args(ref, two, *SMALL_WINDOWS, "--loader-workers", 2), tmp_path / "two.log")
    want = ref_run.weights
    got = final_weights(two)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _steps(two) == _steps(ref_run.path)  # no worker ends its share with a partial batch of its own
    assert_same_run(two, ref_run)

    # Killed after epoch 2 of 4 with 2 workers, resumed with 0.
    killed = tmp_path / "killed"
    shutil.copytree(two, killed)
    for ck in sorted((killed / "checkpoints").glob("epoch-*.pt"))[2:]:
        ck.unlink()
    assert len(list((killed / "checkpoints").glob("epoch-*.pt"))) == 2 < EPOCHS
    _train(train_args(ref, killed, *SMALL_WINDOWS, "--loader-workers", 0, "--resume"), tmp_path / "resume.log")
    assert_same_run(killed, ref_run)
