"""Issue 14's training knobs and run records: schedules and warmup, extending a finished run,
keeping the last K checkpoints, weight decay, held-out validation per epoch, metrics sinks and
the metrics cut back on resume."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from enspipe.config import OptionError
from enspipe.util.errors import ConfigError
from enspipe.train.schedule import learning_rate
from enspipe.train import TrainConfig, train
from cli_runner import run_cli
from run_files import metrics as _metrics
from run_files import same_weights as _same
from run_files import steady as _steady

BASE = dict(model="D", dataset="digits", device="cpu", seed=2, limit=256, batch_size=32, log_every=3)


def test_schedules_warmup_and_step_decay():
    lr = lambda **kw: learning_rate(1.0, batches=10, epochs=4, **kw)  # noqa: E731
    # step: StepLR's arithmetic, one multiplication per boundary
    assert [lr(schedule="step", epoch=e, batch=0, lr_decay=0.5, lr_decay_every=2) for e in range(4)] == [1, 1, .5, .5]
    # cosine: from base down towards 0 over the epochs, per batch
    assert lr(schedule="cosine", epoch=0, batch=0) == 1.0
    assert lr(schedule="cosine", epoch=2, batch=0) == pytest.approx(0.5)
    assert lr(schedule="cosine", epoch=3, batch=9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3.9 / 4)))
    # warmup: linear per batch over the warmup epochs, then the schedule (cosine over the rest)
    warm = [lr(schedule="cosine", epoch=0, batch=b, warmup_epochs=1) for b in range(10)]
    assert warm == pytest.approx([(b + 1) / 10 for b in range(10)])
    assert lr(schedule="cosine", epoch=1, batch=0, warmup_epochs=1) == 1.0
    assert lr(schedule="cosine", epoch=2, batch=5, warmup_epochs=1) == pytest.approx(0.5)


def test_bad_knobs_are_refused():
    for kw, field in ((dict(weight_decay=-1.0), "weight_decay"), (dict(schedule="linear"), "schedule"),
                      (dict(schedule="cosine", warmup_epochs=6), "warmup_epochs"),
                      (dict(keep_checkpoints=0), "keep_checkpoints"), (dict(precision="fp8"), "precision"),
                      (dict(val_limit=0), "val_limit"), (dict(log=("wandb",)), "log")):
        with pytest.raises(OptionError) as e:
            TrainConfig(**BASE, **kw)
        assert e.value.field == field


def test_a_finished_run_extended_equals_the_longer_run(tmp_path):
    """Step schedule: --resume with more epochs trains exactly as the longer run from the start
    (weights and metrics), and config.json records the extension."""
    cfg = TrainConfig(**BASE, epochs=2, lr_decay=0.5, lr_decay_every=1)
    train(cfg, tmp_path / "short")
    r = run_cli("train", "--model", "D", "--dataset", "digits", "--device", "cpu", "--seed", "2", "--limit", "256",
                "--batch-size", "32", "--log-every", "3", "--lr-decay", "0.5", "--lr-decay-every", "1", "--epochs", "3",
                "--resume", "--out", tmp_path / "short")  # forked from the zygote
    assert r.returncode == 0, r.stderr
    train(TrainConfig(**BASE, epochs=3, lr_decay=0.5, lr_decay_every=1), tmp_path / "long")
    assert _same(tmp_path / "short", tmp_path / "long")
    assert _steady(_metrics(tmp_path / "short")) == _steady(_metrics(tmp_path / "long"))
    conf = json.loads((tmp_path / "short" / "config.json").read_text())
    assert conf["train"]["epochs"] == 3
    assert conf["epochs_history"] == [{"epochs": 2, "from_epoch": 0}, {"epochs": 3, "from_epoch": 2}]
    assert json.loads((tmp_path / "short" / "model.json").read_text())["provenance"]["epochs_done"] == 3
    # Fewer epochs than are done is refused, in one line.
    with pytest.raises(ConfigError, match="epochs 2 is fewer than the 3 epochs .* has done"):
        train(cfg, tmp_path / "short", resume=True)


def test_an_extended_cosine_run_restarts_on_the_longer_curve(tmp_path):
    """Cosine: the epochs after the resume point get exactly the longer schedule's rates (a warm
    restart from ~0); the result is not the longer run's, as documented."""
    cfg = dict(BASE, schedule="cosine", warmup_epochs=1, optimizer="sgd")
    train(TrainConfig(**cfg, epochs=2), tmp_path / "ext")
    train(TrainConfig(**cfg, epochs=4), tmp_path / "ext", resume=True)
    train(TrainConfig(**cfg, epochs=4), tmp_path / "long")
    lrs = lambda run, epochs: [r["lr"] for r in _metrics(run) if r["epoch"] in epochs]  # noqa: E731
    assert lrs(tmp_path / "ext", (3, 4)) == lrs(tmp_path / "long", (3, 4))
    assert lrs(tmp_path / "ext", (2,))[-1] < 0.1 * lrs(tmp_path / "long", (2,))[-1]  # the short curve ended near 0
    assert not _same(tmp_path / "ext", tmp_path / "long")


def test_keep_checkpoints_keeps_the_last_k_and_resume_still_works(tmp_path):
    cfg = TrainConfig(**BASE, epochs=4, keep_checkpoints=2)
    train(cfg, tmp_path / "full")
    names = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert names == ["epoch-0002.pt", "epoch-0003.pt"]
    run = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", run)
    (run / "checkpoints" / "epoch-0003.pt").unlink()
    train(cfg, run, resume=True)
    assert _same(tmp_path / "full", run)
    # How many are kept is not the run's identity: a resume may change it.
    train(TrainConfig(**{**BASE, "epochs": 5, "keep_checkpoints": 1}), run, resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0004.pt"]


def test_weight_decay_spares_biases_and_is_part_of_the_run(tmp_path):
    from enspipe.models import create_model
    from enspipe.train.schedule import param_groups

    model = create_model("D", num_classes=10, input_size=(1, 28, 28))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    train(TrainConfig(**BASE, epochs=1, weight_decay=0.05, optimizer="sgd"), tmp_path / "wd")
    train(TrainConfig(**BASE, epochs=1, optimizer="sgd"), tmp_path / "plain")
    assert not _same(tmp_path / "wd", tmp_path / "plain")
    with pytest.raises(ConfigError, match="differs in: `weight_decay`"):
        train(TrainConfig(**BASE, epochs=2, optimizer="sgd"), tmp_path / "wd", resume=True)


def test_validation_metrics_appear_every_epoch(tmp_path):
    train(TrainConfig(**BASE, epochs=3, val_limit=64, mode="adv"), tmp_path / "run")
    val = [r for r in _metrics(tmp_path / "run") if r.get("kind") == "val"]
    assert [r["epoch"] for r in val] == [1, 2, 3]
    steps = {r["epoch"]: r["step"] for r in _metrics(tmp_path / "run") if r.get("kind") == "train"}
    for r in val:
        assert r["n"] == 64 and r["eps"] == 0.3 and r["step"] == steps[r["epoch"]]
        assert 0 <= r["clean_error"] <= r["fgsm_error"] <= 1
    # Validation does not change training: the same weights as without it.
    train(TrainConfig(**BASE, epochs=3, mode="adv"), tmp_path / "plain")
    assert _same(tmp_path / "run", tmp_path / "plain")


def test_csv_log_and_the_metrics_cut_back_on_resume(tmp_path):
    cfg = TrainConfig(**BASE, epochs=3, log=("csv",), val_limit=32, keep_checkpoints=3)  # every epoch's: a kill is simulated
    train(cfg, tmp_path / "full")
    run = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", run)
    (run / "checkpoints" / "epoch-0002.pt").unlink()
    (run / "checkpoints" / "epoch-0001.pt").unlink()
    with open(run / "metrics.jsonl", "a") as f:  # what the killed epoch had logged, and a torn line
        f.write(json.dumps({"kind": "train", "epoch": 2, "step": 999, "loss": 1.0}) + "\n" + '{"kind": "tr')
    train(cfg, run, resume=True)
    recs = _metrics(run)
    assert _steady(recs) == _steady(_metrics(tmp_path / "full"))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows and set(rows[0]) == {"time", "epoch", "step", "name", "value"}
    keys = [(r["step"], r["name"]) for r in rows]
    assert len(keys) == len(set(keys))  # no step logged twice
    assert {"train/loss", "train/accuracy", "val/clean_error", "val/fgsm_error"} <= {r["name"] for r in rows}
    full_rows = list(csv.DictReader((tmp_path / "full" / "metrics.csv").open()))
    assert [(r["step"], r["name"], r["value"]) for r in rows if r["name"] != "train/samples_per_s"] == \
        [(r["step"], r["name"], r["value"]) for r in full_rows if r["name"] != "train/samples_per_s"]


def test_tensorboard_without_its_package_is_one_clear_line(tmp_path):
    pytest.importorskip("click")
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    r = run_cli("train", "--model", "D", "--dataset", "digits", "--device", "cpu", "--epochs", "1", "--log",
                "tensorboard", "--out", tmp_path / "r")  # forked from the zygote
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "pip install tensorboard" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


def test_report_draws_a_runs_curves_without_torch(tmp_path):
    train(TrainConfig(**BASE, epochs=2, val_limit=32), tmp_path / "run")
    code = ("import sys; from enspipe.report import write_report; "
            f"p = write_report({str(tmp_path / 'run')!r}); assert 'torch' not in sys.modules; print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    text = Path(out).read_text()
    assert "## Training: run" in text and "| epoch | step | loss |" in text and "val FGSM error" in text
    assert (tmp_path / "run" / "report-run-training.png").stat().st_size > 1000
