"""Job specs: strict parsing with line numbers, the step cache, and a real end-to-end run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from enspipe.util.errors import ConfigError
from enspipe.jobs import load_job, plan, run_job
from cli_runner import outputs, run_cli, spawn

REPO = Path(__file__).resolve().parents[2]

TINY = """
[job]
name = "tiny"

[data]
dataset = "digits"
train_limit = 512
test_limit = 128

[defaults]
epochs = 1
eps = 0.3

[models.static]
arch = "D"
seed = 1

[stores.static_fgsm]
model = "static"
attack = "fgsm"
shard_size = 256

[models.holdout]
arch = "D"
seed = 2

[models.cand]
arch = "D"
mode = "ens-adv"
stores = ["static_fgsm"]

[evaluate.main]
targets = ["cand"]
sources = ["holdout"]
attacks = ["fgsm"]
"""


def _write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("spec", sorted((REPO / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_specs_validate_and_dry_run(spec, tmp_path):
    r = run_cli("run", str(spec), "--dry-run", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "run " in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit, message, line", [
    (lambda t: t.replace("seed = 1", "seed = 1\nwarmup = 3"), "unknown key 'warmup'", 17),
    (lambda t: t.replace("seed = 1", 'seed = "one"'), "models.static.seed must be an integer", 16),
    (lambda t: t.replace('stores = ["static_fgsm"]', 'stores = ["nope"]'), "no [stores.nope]", 30),
    (lambda t: t.replace('model = "static"', 'model = "ghost"'), "no [models.ghost]", 19),
    (lambda t: t.replace('attacks = ["fgsm"]', 'attacks = ["fgsn"]'), "unknown attack", 35),
    (lambda t: t + "\n[extra]\nx = 1\n", "unknown table [extra]", 37),
    (lambda t: t.replace("eps = 0.3", "eps = \"1/0\""), "eps", None),
])
def test_broken_spec_names_the_problem_and_line(tmp_path, edit, message, line):
    path = _write(tmp_path, edit(TINY))
    with pytest.raises(ConfigError) as e:
        load_job(path)
    assert message in str(e.value)
    if line is not None:
        assert f"{path}:{line}:" in str(e.value)


def test_include_loop_is_an_error(tmp_path):
    _write(tmp_path, '[job]\ninclude = ["b.toml"]\n', "a.toml")
    _write(tmp_path, '[job]\ninclude = ["a.toml"]\n', "b.toml")
    with pytest.raises(ConfigError, match="include loop: a.toml -> b.toml -> a.toml"):
        load_job(tmp_path / "a.toml")


def test_include_merges_tables(tmp_path):
    _write(tmp_path, TINY.replace('[job]\nname = "tiny"', '[job]\nname = "base"'), "base.toml")
    child = _write(tmp_path, '[job]\nname = "child"\ninclude = ["base.toml"]\n\n[models.cand]\nadv_fraction = 0.25\n')
    job = load_job(child)
    cand = next(s for s in job.steps if s.id == "models.cand")
    assert job.name == "child" and cand.options["adv_fraction"] == 0.25 and cand.options["mode"] == "ens-adv"


def test_a_second_run_reuses_and_a_changed_input_recomputes(tmp_path):
    spec = _write(tmp_path, TINY)
    cache, out = tmp_path / "cache", tmp_path / "out"
    logs: list[str] = []
    first = run_job(spec, out=out, cache=cache, device="cpu", log=logs.append)
    assert Path(first["report"]).exists()
    results = json.loads(Path(first["steps"]["evaluate.main"]["outputs"]["results"]).read_text())
    assert set(results["models"]) == {"cand"} and "holdout" in results["models"]["cand"]["blackbox"]
    assert all(status == "reuse" for _, status in plan(load_job(spec), cache))

    logs.clear()
    second = run_job(spec, out=out, cache=cache, device="cpu", log=logs.append)
    assert sum(line.startswith("reused ") for line in logs) == 5
    assert not any(line.startswith("running ") for line in logs)
    assert second["steps"] == first["steps"]

    # A changed input of the static model re-runs it and everything downstream, not the holdout.
    _write(tmp_path, TINY.replace("seed = 1", "seed = 11"))
    status = {s.id: st for s, st in plan(load_job(spec), cache)}
    assert status == {"models.static": "run", "stores.static_fgsm": "run", "models.cand": "run",
                      "models.holdout": "reuse", "evaluate.main": "run"}

    # Another job sharing the static model and dataset reuses its checkpoint and store.
    other = _write(tmp_path, TINY.replace('name = "tiny"', 'name = "other"')
                   .replace("seed = 2", "seed = 3"), "other.toml")
    status = {s.id: st for s, st in plan(load_job(other), cache)}
    assert status["models.static"] == status["stores.static_fgsm"] == "reuse"
    assert status["models.holdout"] == "run"


def test_two_jobs_sharing_a_cache_build_each_step_once(tmp_path):
    spec = _write(tmp_path, TINY)
    other = _write(tmp_path, TINY.replace('name = "tiny"', 'name = "other"'), "other.toml")
    cache = tmp_path / "cache"
    # Two real processes at once, forked from the suite's pre-imported zygote.
    procs = [spawn("run", s, "--cache", cache, "--out", tmp_path / s.stem, "--device", "cpu", env=dict(os.environ),
                   log=tmp_path / f"{s.stem}.log", cwd=Path.cwd()) for s in (spec, other)]
    for p in procs:
        p.wait(timeout=600)
    logs = [outputs(p)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    ran = [line for log in logs for line in log.splitlines() if line.startswith("running ")]
    assert sorted(ran) == sorted(f"running {s} ..." for s in
                                 ("models.static", "stores.static_fgsm", "models.holdout", "models.cand",
                                  "evaluate.main"))
    # Each job still gets its own copy of the results and its own report.
    for s in (spec, other):
        assert (tmp_path / s.stem / "evaluate" / "main" / "results.json").exists()
        assert "cand" in (tmp_path / s.stem / "report.md").read_text()
