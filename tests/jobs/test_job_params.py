"""Issue 24: a job's [params] — `${NAME}` in its values, `enspipe run --set NAME=VALUE` — the
mechanism by which the ImageNet jobs take the validation folder and the weight files."""
from __future__ import annotations

from pathlib import Path

import pytest

from enspipe.util.errors import ConfigError
from enspipe.jobs.params import parse_set
from enspipe.jobs import load_job, resolve_keys
from cli_runner import run_cli

SPEC = """\
[params]
root = "/nowhere"
n = 64
[data]
dataset = "digits"
train_limit = "${n}"

[models.static]
arch = "D"
epochs = 1
seed = "${n}"
description = "trained on ${n} of ${root}"
"""


def _job(tmp_path: Path, text: str = SPEC, params: dict | None = None):
    spec = tmp_path / "p.toml"
    spec.write_text(text)
    return load_job(spec, params)


def test_a_whole_reference_keeps_its_type_and_text_is_substituted(tmp_path):
    job = _job(tmp_path)
    assert job.data["train_limit"] == 64 and isinstance(job.data["train_limit"], int)
    (step,) = job.steps
    assert step.options["seed"] == 64
    assert step.options["description"] == "trained on 64 of /nowhere"


def test_set_overrides_and_changes_the_keys(tmp_path):
    a = _job(tmp_path)
    b = _job(tmp_path, params=parse_set(["n=32"]))
    assert b.data["train_limit"] == 32
    resolve_keys(a)
    resolve_keys(b)
    assert a.steps[0].key != b.steps[0].key  # the substituted value is what the key hashes
    same = _job(tmp_path, params={"n": 64})
    resolve_keys(same)
    assert same.steps[0].key == a.steps[0].key


def test_set_values_are_toml_values_or_text():
    assert parse_set(["n=96", "x=0.5", "p=/data/in1k", "s=\"a b\"", "empty="]) == \
        {"n": 96, "x": 0.5, "p": "/data/in1k", "s": "a b", "empty": ""}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_set(["noequals"])


def test_unknown_and_undeclared_names_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'nn' is not declared in the job's \[params\] \(declared: n, root\)"):
        _job(tmp_path, params={"nn": 3})
    with pytest.raises(ConfigError, match=r"p\.toml:\d+: data\.dataset uses \$\{where\}, but \[params\] declares no 'where'"):
        _job(tmp_path, SPEC.replace('dataset = "digits"', 'dataset = "imagefolder:${where}"'))


def test_cli_set_and_its_error(tmp_path):
    spec = tmp_path / "p.toml"
    spec.write_text(SPEC)
    ok = run_cli("run", str(spec), "--dry-run", "--set", "n=16", "--cache", str(tmp_path / "c"), timeout=600)
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("run", str(spec), "--dry-run", "--set", "m=16", "--cache", str(tmp_path / "c"), timeout=600)
    assert bad.returncode != 0
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1 and "'m' is not declared" in lines[0], bad.stderr
