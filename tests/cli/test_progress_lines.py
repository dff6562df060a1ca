"""What long commands say while they run: with stderr redirected (nohup, SLURM, CI) one
timestamped line per epoch / shard / attack / diagnostic; on a terminal bars, and train leaves
one summary line per epoch; ENSPIPE_PROGRESS=0 silences both."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from enspipe.util.runtime import Progress
from cli_runner import run_cli

STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def _run(*args, progress: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ENSPIPE_PROGRESS"}
    if progress is not None:
        env["ENSPIPE_PROGRESS"] = progress
    # A real process forked from the suite's pre-imported zygote: the mode is chosen when a
    # command runs (ENSPIPE_PROGRESS, whether stderr is a terminal), not when enspipe is imported.
    r = run_cli(*map(str, args), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _lines(stderr: str, what: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if re.match(STAMP + re.escape(what), ln)]


def test_train_logs_one_line_per_epoch_with_rate_and_eta(tmp_path):
    r = _run("train", "--model", "D", "--dataset", "digits", "--limit", "256", "--epochs", "3", "--device", "cpu",
             "--val-limit", "50", "--out", tmp_path / "run")
    lines = _lines(r.stderr, "train run: epoch ")
    assert len(lines) == 3, r.stderr
    assert "epoch 1/3 (33%)" in lines[0] and "ETA" in lines[0] and "epoch 3/3 (100%)" in lines[2]
    for ln in lines:
        assert re.search(r"loss [\d.]+, accuracy [\d.]+, samples/s \d+", ln) and "val_fgsm_error" in ln
    assert "batch/s]" not in r.stderr  # no bars in a log


def test_precompute_evaluate_and_diagnose_log_their_units(digits_static, tmp_path):
    r = _run("precompute", "--model", digits_static, "--dataset", "digits", "--limit", "600", "--attack", "fgsm",
             "--shard-size", "256", "--device", "cpu", "--out", tmp_path / "stores")
    assert len(_lines(r.stderr, "precompute: shard ")) == 3, r.stderr  # one per shard
    r = _run("evaluate", "--model", digits_static, "--dataset", "digits", "--limit", "300", "--attacks",
             "fgsm,pgd", "--device", "cpu", "--out", tmp_path / "eval")
    assert [ln.split(" ")[3] for ln in _lines(r.stderr, "evaluate ") if ":" in ln.split(" ")[3]] == ["fgsm:", "pgd:"]
    assert len(_lines(r.stderr, "evaluate: batch 2/2")) == 1  # the last batch always has its line
    r = _run("diagnose", "--model", digits_static, "--dataset", "digits", "--limit", "8", "--device", "cpu",
             "--out", tmp_path / "diag")
    lines = _lines(r.stderr, "diagnose: diagnostic ")
    assert len(lines) == 4 and all(f"diagnostic {k}/4" in ln for k, ln in zip(range(1, 5), lines)), r.stderr
    assert "measure loss surface" in lines[2]


def test_on_a_terminal_bars_stay_and_each_epoch_leaves_a_line(tmp_path):
    r = _run("train", "--model", "D", "--dataset", "digits", "--limit", "128", "--epochs", "2", "--device", "cpu",
             "--out", tmp_path / "run", progress="1")
    assert "2/2 [" in r.stderr and "batch/s]" in r.stderr    # the bars (they stay)
    assert len(_lines(r.stderr, "train run: epoch ")) == 2   # the summary lines, above them
    quiet = _run("train", "--model", "D", "--dataset", "digits", "--limit", "128", "--epochs", "1", "--device",
                 "cpu", "--out", tmp_path / "quiet", progress="0")
    assert quiet.stderr == ""


def test_progress_lines_are_spaced_by_min_interval(monkeypatch, capsys):
    monkeypatch.setenv("ENSPIPE_PROGRESS", "lines")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    p = Progress(total=50, desc="work", unit="item", min_interval=3600)
    for _ in range(50):
        p.update(1, phase="x")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and re.match(STAMP + r"work: item 50/50 \(100%\), .*phase x$", err[0]), err


@pytest.mark.parametrize("setting", ["0"])
def test_enspipe_progress_0_silences_lines(monkeypatch, capsys, setting):
    monkeypatch.setenv("ENSPIPE_PROGRESS", setting)
    p = Progress(total=2, desc="work", unit="item")
    p.update(2)
    p.write("said")
    assert capsys.readouterr().err == ""
