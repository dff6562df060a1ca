"""What a new user meets in the first hour (issue 28): a store of other data says what differs, an
empty class folder is no silent class, a second precompute of a store being written waits for
it, ImageNet weights over a class subset get a way forward that exists, `--help` is quick."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from enspipe.data import create_dataset
from enspipe.util.errors import DataError, ModelError
from enspipe.stores.base import data_difference

from cli_runner import outputs, run_cli, spawn  # noqa: E402 -- enspipe forked from the session's zygote
ENV = {**os.environ, "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _folder(root: Path, classes: dict[str, int], size: int = 40) -> Path:
    """Class folders of small PNGs (each image its own colour), `classes` = {name: count}."""
    from PIL import Image

    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.full((size, size + 8, 3), (40 * c + 10 * i) % 256, np.uint8)
            Image.fromarray(img).save(root / name / f"img{i}.png")
    return root


# --- a store of other data names what differs ---------------------------------------------------

def test_a_store_of_other_data_names_the_field(tmp_path):
    base = create_dataset("digits", limit=50).identity()
    assert "limit is 50 but the data's is 60 (field: dataset.limit)" in data_difference(
        base, create_dataset("digits", limit=60).identity())
    assert "split is train but the data's is test (field: dataset.split)" in data_difference(
        base, create_dataset("digits", split="test", limit=50).identity())
    a, b = _folder(tmp_path / "a", {"cat": 2, "dog": 2}), _folder(tmp_path / "b", {"cat": 2, "dog": 2})
    fa = create_dataset(f"imagefolder:{a}", image_size=32)
    assert f"source is imagefolder:{a} but the data's is imagefolder:{b} (field: dataset.source)" in data_difference(
        fa.identity(), create_dataset(f"imagefolder:{b}", image_size=32).identity())
    other_size = data_difference(fa.identity(), create_dataset(f"imagefolder:{a}", image_size=24).identity())
    assert other_size.startswith("its geometry is 3x32x32") and "but the data's is 3x24x24" in other_size
    assert other_size.endswith("(field: dataset.geometry)")
    # A re-saved image: same names, sizes and order, another mtime -> only the contents differ,
    # and the files modified after the store was made are named.
    from datetime import datetime, timezone

    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    later = time.time() + 5
    os.utime(a / "dog" / "img1.png", (later, later))
    again = create_dataset(f"imagefolder:{a}", image_size=32)
    assert again.fingerprint != fa.fingerprint
    assert "an image file changed" in data_difference(fa.identity(), again.identity())
    named = data_difference(fa.identity(), again, made)
    assert named.endswith("modified after the store was made: dog/img1.png (field: dataset.fingerprint); "
                          "re-run precompute for this data"), named


# --- an empty class folder ---------------------------------------------------------------------

def test_an_empty_class_folder_is_refused_not_a_silent_class(tmp_path):
    root = _folder(tmp_path / "flat", {"cat": 2, "dog": 2})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*/empty has no images.*extra class"):
        create_dataset(f"imagefolder:{root}", image_size=32)
    (root / "empty").rmdir()
    assert create_dataset(f"imagefolder:{root}", image_size=32).num_classes == 2


def test_a_class_only_another_split_has_keeps_its_label_with_a_warning(tmp_path, caplog):
    root = tmp_path / "split"
    _folder(root / "train", {"cat": 2, "dog": 2})
    _folder(root / "val", {"cat": 1, "dog": 1, "eel": 1})
    (root / "train" / "eel").mkdir()
    with caplog.at_level("WARNING"):
        train = create_dataset(f"imagefolder:{root}", split="train", image_size=32)
    assert train.num_classes == 3 and sorted(set(train.labels.tolist())) == [0, 1]
    (line,) = [r.getMessage() for r in caplog.records if "no images" in r.getMessage()]
    assert "eel" in line and "val" in line and "\n" not in line


# --- one writer per store ----------------------------------------------------------------------

def _precompute_args(static: Path, root: Path) -> list[str]:
    return ["precompute", "--model", str(static), "--dataset", "digits", "--limit", "128", "--attacks", "fgsm",
            "--shard-size", "64", "--device", "cpu", "--out", str(root)]


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the store's lock (as a precompute writing it would), until killed."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.truncate(0); f.write('pid holder'); f.flush(); print('held', flush=True); time.sleep(3600)")
    path.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_precompute_waits_for_the_store_being_written(digits_static, tmp_path):
    from enspipe.precompute import PrecomputeConfig, precompute
    from enspipe.precompute.plan import lock_path

    cfg = PrecomputeConfig(model=str(digits_static), dataset="digits", limit=128, attacks=("fgsm",), shard_size=64,
                           device="cpu", out=str(tmp_path / "stores"))
    (store,) = precompute(cfg)
    shutil.move(store, tmp_path / "finished")   # what the first writer will have finished
    holder = _hold_lock(lock_path(store))
    second = spawn(*_precompute_args(digits_static, tmp_path / "stores"), env=ENV, cwd=tmp_path,
                   log=tmp_path / "second")   # forked from the zygote: stdout to second.out, stderr second.err
    log = tmp_path / "second.err"
    try:
        deadline = time.monotonic() + 600   # far above any load
        while not log.exists() or "waiting for it to finish" not in log.read_text():
            assert second.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        (line,) = [ln for ln in log.read_text().splitlines() if "waiting" in ln]
        assert str(store) in line and "another precompute (pid holder)" in line
        assert not store.exists()   # it waits: nothing written beside the other writer
        shutil.move(tmp_path / "finished", store)
        holder.kill()
        holder.wait()
        second.wait(timeout=600)
        out, _ = outputs(second)
    finally:
        holder.kill()
        second.kill()
    assert second.returncode == 0, log.read_text()
    assert out.strip() == str(store)
    text = log.read_text()
    assert f"reused {store}" in text and "shard(s) to compute" not in text   # nothing computed twice


def test_a_dead_writers_lock_is_no_lock(digits_static, tmp_path, capsys):
    """kill -9 of the writer: the OS drops its flock, and the next precompute does not wait."""
    from enspipe.precompute import PrecomputeConfig, precompute, plan_stores  # noqa: F401
    from enspipe.precompute.plan import lock_path

    cfg = PrecomputeConfig(model=str(digits_static), dataset="digits", limit=128, attacks=("fgsm",), shard_size=64,
                           device="cpu", out=str(tmp_path / "stores"))
    (store,) = precompute(cfg)
    shutil.rmtree(store)
    holder = _hold_lock(lock_path(store))
    holder.kill()
    holder.wait()
    capsys.readouterr()
    assert precompute(cfg) == [store]
    err = capsys.readouterr().err
    assert "waiting" not in err and "shard(s) to compute" in err


# --- ImageNet weights over a class subset -------------------------------------------------------

def test_a_1000_class_head_over_3_classes_names_a_command_that_exists(tmp_path):
    """A torchvision resnet's 1000-class weights over a 3-class folder: precompute's error names
    `enspipe train ... --new-head`, which exists, and following it gives a run precompute takes."""
    import click
    import torch
    import torchvision
    from safetensors.torch import save_file

    from enspipe.cli import cli
    from enspipe.precompute import PrecomputeConfig, precompute
    from enspipe.train import TrainConfig, train

    data = _folder(tmp_path / "three", {"ant": 2, "bee": 2, "cow": 2})
    weights = tmp_path / "in1k.safetensors"
    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(num_classes=1000).state_dict(), str(weights))
    ds = f"imagefolder:{data}"
    res = run_cli("precompute", "--model", "resnet18", "--weights", str(weights), "--dataset", ds,
                  "--image-size", "32", "--device", "cpu", "--out", str(tmp_path / "stores"), env=ENV, timeout=900)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    line = res.stderr.strip()
    assert "predicts 1000 classes" in line and "has 3" in line, line
    named = line[line.index("`enspipe train` with"):]
    for flag in ("--model", "--weights", "--new-head", "--dataset"):
        assert flag in named, line
    train_cmd = cli.get_command(click.Context(cli), "train")
    have = {o for p in train_cmd.params for o in p.opts}
    assert {"--model", "--weights", "--new-head", "--dataset"} <= have
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").rglob("*.zarr"))
    # Following it: a fine-tuned 3-class run, which precompute takes.
    run = train(TrainConfig(model="resnet18", weights=str(weights), new_head=True, dataset=ds, image_size=32,
                            epochs=1, batch_size=6, device="cpu", out=str(tmp_path / "ft")))
    (store,) = precompute(PrecomputeConfig(model=str(run.run_dir), dataset=ds, image_size=32, attacks=("step_ll",),
                                           device="cpu", out=str(tmp_path / "stores")))
    assert store.exists()
    # `verify --recompute` after an image was re-saved: the problem says what differs, not two hashes.
    from enspipe.precompute import recompute_check

    assert recompute_check(str(store), k=2, device="cpu") == []
    later = time.time() + 5   # re-saved after the store was made
    os.utime(data / "bee" / "img1.png", (later, later))
    (problem,) = recompute_check(str(store), k=2, device="cpu")
    assert "an image file changed" in problem and "field: dataset.fingerprint" in problem, problem
    assert "modified after the store was made: bee/img1.png (field" in problem, problem


def test_the_head_mismatch_is_a_model_error_with_the_counts():
    import torch
    import torchvision

    from enspipe.models import HeadMismatch, create_model

    with pytest.raises(HeadMismatch) as e:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"r18-{os.getpid()}.pth"
        torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
        try:
            create_model("resnet18", num_classes=3, input_size=(3, 32, 32), weights=path)
        finally:
            path.unlink()
    assert isinstance(e.value, ModelError) and (e.value.file_classes, e.value.model_classes) == (1000, 3)


# --- the report opens with its headline ---------------------------------------------------------

def _entry(errors: int, n: int = 200) -> dict:
    return {"errors": errors, "n": n, "error": errors / n}


def _results(names: tuple[str, str]) -> dict:
    a, b = names
    return {"config": {"attacks": ["fgsm", "pgd"], "eps": 0.3, "sources": [b]}, "dataset": {"source": "digits"},
            "models": {a: {"clean": _entry(4), "whitebox": {"fgsm": _entry(30), "pgd": _entry(150)},
                           "blackbox": {b: {"fgsm": _entry(20), "pgd": _entry(12)}},
                           "blackbox_max": 20 / 200, "blackbox_avg": 16 / 200}}}


def test_the_report_opens_with_its_headline_and_promises_no_paper_value_it_lacks(tmp_path):
    from enspipe.report import write_report

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(__import__("json").dumps(_results(("A_ens", "D"))))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"kind": "train", "epoch": 1, "step": 4, "loss": 1.5}\n')
    text = write_report(tmp_path).read_text()
    sections = [s.split("\n")[0] for s in text.split("\n## ")]
    assert sections[1] == "Headline", sections   # before training and evaluation details
    # clean 4/200, strongest white-box PGD 150/200, worst transfer 20/200: computed here.
    assert "| A_ens | 2.0 | 75.0 (PGD) | 10.0 |" in text.replace("PGD (CE)", "PGD"), text[:1500]
    assert "paper" not in text.lower().replace("paper's table 6", "")   # no --paper: no paper value promised
    # With the paper's table and models it has numbers for, the captions say where they are.
    (tmp_path / "eval" / "results.json").write_text(__import__("json").dumps(_results(("A", "B"))))
    text = write_report(tmp_path, paper="mnist").read_text()
    assert "the paper's value in parentheses" in text and "(64.7)" in text


def test_evaluate_says_at_once_what_it_does_when_redirected(digits_static, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "ENSPIPE_PROGRESS"}
    r = run_cli("evaluate", "--model", str(digits_static), "--dataset", "digits", "--limit", "64",
                "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "e"), env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln[:2] == "20"]   # timestamped
    assert lines[0].endswith("evaluate: 64 samples in 4 batch(es) of 16; 1 model(s), 0 source(s), attacks fgsm")
    assert "evaluate: batch 1/4 (25%)" in lines[1] and "ETA" in lines[1], lines


def test_stage_help_does_not_import_torch(tmp_path):
    """`enspipe STAGE --help` builds the command from the torch-free config module and imports the
    stage only when it runs: no call of --help / -h imports torch, and both print the same text."""
    code = ("import sys; from enspipe.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    env = {**ENV, "ENSPIPE_CACHE": str(tmp_path / "cache"), "COLUMNS": "100"}
    for command in ("train", "evaluate", "diagnose"):
        runs = [subprocess.run([sys.executable, "-c", code, command, flag], env=env, capture_output=True, text=True,
                               timeout=600) for flag in ("--help", "-h")]
        for r in runs:
            assert r.returncode == 0 and "--out" in r.stdout and "Examples:" in r.stdout, r.stderr
        assert [r.stderr.strip().splitlines()[-1] for r in runs] == ["False", "False"], command
        assert runs[0].stdout == runs[1].stdout
