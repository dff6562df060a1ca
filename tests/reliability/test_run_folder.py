"""Issue 25, items 2 and 10: one train per run folder, a process group stopped quietly, and a
resumed run's metrics.csv.

- Two trains with one `--out`: the second is refused in one line while the first holds the
  folder (suspended with SIGSTOP, as a requeued job's slow first copy may be) and changes
  nothing there; the first SIGKILLed, its resume is not blocked (the OS dropped the flock).
- SIGTERM to a train's whole process group (scancel, a container stop) with loader workers:
  the resume line is the last thing on stderr, no DataLoader traceback after it.
- A run logged to csv and resumed without `--log csv`: metrics.csv holds a row for every
  step of metrics.jsonl, none stale (the oracle is metrics.jsonl itself).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .processes import ENV, REPO, enspipe, error_line


def _train(out: Path, *extra, limit=512, epochs=4) -> list:
    return ["train", "--model", "D", "--dataset", "digits", "--limit", limit, "--epochs", epochs, "--batch-size", 16,
            "--device", "cpu", "--log-every", 1, "--out", out, *extra]


def _start(args: list, log: Path) -> subprocess.Popen:
    """A fresh `python -m enspipe` leading its own process group (as a batch scheduler starts it)."""
    return subprocess.Popen([sys.executable, "-m", "enspipe", *map(str, args)], stdout=open(log.with_suffix(".out"), "w"),
                            stderr=open(log.with_suffix(".err"), "w"), stdin=subprocess.DEVNULL, env=ENV, cwd=REPO,
                            start_new_session=True)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.02)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _metrics_started(run: Path):
    return lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0


def test_a_second_train_on_one_out_is_refused_while_the_first_holds_it(tmp_path):
    run = tmp_path / "run"
    first = _start(_train(run, "--seed", 1), tmp_path / "first")
    try:
        _wait_for(_metrics_started(run), first, "metrics line")
        first.send_signal(signal.SIGSTOP)
        before = _files(run)
        for extra in (("--seed", 2), ("--seed", 1, "--resume")):
            r = enspipe(*_train(run, *extra))
            assert r.returncode == 1, r.stderr
            line = error_line(r.stderr)
            assert str(run) in line and "in use by another train" in line and f"pid {first.pid}" in line, line
            assert _files(run) == before, "the refused run changed the folder"
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    # The SIGKILLed run's lock went with it: its resume runs to the end.
    r = enspipe(*_train(run, "--seed", 1, "--resume"))
    assert r.returncode == 0, r.stderr
    assert (run / "model.safetensors").is_file() and (run / "model.json").is_file()


def test_sigterm_to_the_process_group_prints_no_loader_traceback(tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "term"
    proc = _start(_train(run, "--loader-workers", 2, limit=1024, epochs=200), log)
    try:
        _wait_for(_metrics_started(run), proc, "metrics line")
        time.sleep(0.5)  # the workers are up and feeding batches
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = log.with_suffix(".err").read_text()
    assert proc.returncode == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("enspipe: train interrupted (SIGTERM); resume with: "), err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


def test_a_resume_without_csv_keeps_metrics_csv_consistent(tmp_path):
    run = tmp_path / "run"
    r = enspipe(*_train(run, "--log", "csv", limit=128, epochs=2))
    assert r.returncode == 0, r.stderr
    r = enspipe(*_train(run, "--resume", limit=128, epochs=4))  # extends the finished run, no csv asked
    assert r.returncode == 0, r.stderr
    jsonl_steps = {json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()}
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(jsonl_steps) == 4 * 128 // 16
    assert {int(row["step"]) for row in rows} == jsonl_steps
