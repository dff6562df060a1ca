"""Issue 25, item 1: `enspipe run` killed while it publishes a step into its `--out`.

publish() renamed the step's folder into OUT/models/NAME and only then recorded it in
OUT/.enspipe/published.json; a kill between the two left a folder every later run refused
("exists and was not written by enspipe") until a person removed it. The kill points are
exact (faults.py: just after the rename into place, and in the middle of the record), and
the oracle is the cached step's own files: the re-run must finish and publish exactly them."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from .processes import ENV, enspipe

JOB = """
[job]
name = "pub"

[data]
dataset = "digits"
train_limit = 64
test_limit = 32

[models.static]
arch = "D"
seed = 1
epochs = 1
"""


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fault", ["kill-after-replace:*/out/models/static",
                                   "kill-mid-write:*/out/.enspipe/*published.json*#2"],
                         ids=["after-rename", "mid-record"])
def test_run_killed_while_publishing_finishes_when_run_again(tmp_path, fault):
    spec = tmp_path / "job.toml"
    spec.write_text(JOB)
    out, cache, log = tmp_path / "out", tmp_path / "cache", tmp_path / "faults.log"
    env = {**ENV, "ENSPIPE_FAULT_LOG": str(log)}
    args = ("run", spec, "--out", out, "--cache", cache, "--device", "cpu")
    first = enspipe(*args, faults=(fault,), env=env)
    assert first.returncode == -9, first.stderr
    assert log.read_text().startswith(f"FAULT FIRED {fault}")
    assert (out / "models" / "static").is_dir() or fault.startswith("kill-mid")

    again = enspipe(*args)
    assert again.returncode == 0, again.stderr
    cached = next(p for p in (cache / "runs").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert _digests(out / "models" / "static") == _digests(cached)
    assert not [p for p in (out / "models").iterdir() if p.name.startswith(".")], "a temporary left behind"
    # And a third run has nothing to do: the step was recorded as published.
    third = enspipe(*args)
    assert third.returncode == 0, third.stderr
    assert _digests(out / "models" / "static") == _digests(cached)
    assert os.path.samefile(next((out / "models" / "static").glob("*.safetensors")),
                            next(cached.glob("*.safetensors")))  # hard links: same filesystem
