"""An evaluate step's stores are set by their config fields' names (`source_stores`,
`whitebox_stores`: one name per concept, as on `EvalConfig` and the CLI's --source-store /
--whitebox-store); the old job keys `stores` / `own_stores` still work, with one deprecation
line each naming FILE:LINE and the new key, and give the same step (the same cache key, so a
cache made with the old names is reused)."""
from __future__ import annotations

from pathlib import Path

import pytest

from enspipe.util.errors import ConfigError
from enspipe.jobs import load_job, resolve_keys, run_job

SPEC = """\
[job]
name = "keys"
[data]
dataset = "digits"
train_limit = 256
test_limit = 64
[models.static]
arch = "D"
seed = 1
[stores.static_test]
model = "static"
attack = "fgsm"
split = "test"
[models.cand]
arch = "D"
[evaluate.main]
targets = ["cand", "static"]
attacks = ["fgsm"]
"""
NEW = 'source_stores = ["static_test"]\nwhitebox_stores = ["static_test"]\n'
OLD = 'stores = ["static_test"]\nown_stores = ["static_test"]\n'


def _job(tmp_path: Path, name: str, keys: str):
    path = tmp_path / f"{name}.toml"
    path.write_text(SPEC + keys)
    return path, load_job(path)


def test_new_keys_fill_the_fields_of_the_same_name(tmp_path):
    from enspipe.jobs.spec import step_config

    _, job = _job(tmp_path, "new", NEW)
    (main,) = (s for s in job.steps if s.id == "evaluate.main")
    cfg = step_config(job, main)
    assert cfg.source_stores == cfg.whitebox_stores == ("<stores.static_test>",)
    assert ("stores", "static_test") in main.deps and job.notes == []


def test_old_keys_still_work_with_one_deprecation_line_each(tmp_path):
    new_path, new = _job(tmp_path, "new", NEW)
    old_path, old = _job(tmp_path, "old", OLD)
    for job in (new, old):
        resolve_keys(job)
    assert {s.id: s.key for s in old.steps} == {s.id: s.key for s in new.steps}
    assert {s.id: s.options for s in old.steps} == {s.id: s.options for s in new.steps}
    # The key the code before the rename (commit efca49e) gave this step: a cache it filled is reused.
    assert next(s.key for s in new.steps if s.id == "evaluate.main")[:16] == "031df26b54019978"
    # Lines 19 and 20 of the file: SPEC has 18 lines, then the two keys.
    assert old.notes == [f"{old_path}:19: evaluate.main.stores is deprecated: use source_stores (the same list)",
                         f"{old_path}:20: evaluate.main.own_stores is deprecated: use whitebox_stores (the same list)"]
    lines: list[str] = []
    run_job(old_path, cache=tmp_path / "cache", out=tmp_path / "out", dry_run=True, log=lines.append)
    assert old.notes[0] in lines and old.notes[1] in lines
    lines.clear()
    run_job(new_path, cache=tmp_path / "cache", out=tmp_path / "out", dry_run=True, log=lines.append)
    assert not any("deprecated" in line for line in lines)


def test_the_key_as_written_is_what_errors_name(tmp_path):
    path = tmp_path / "both.toml"
    path.write_text(SPEC + 'stores = ["static_test"]\nsource_stores = ["static_test"]\n')
    with pytest.raises(ConfigError, match="evaluate.main: source_stores and stores are one option; keep one"):
        load_job(path)
    path.write_text(SPEC + 'own_stores = ["nope"]\n')
    with pytest.raises(ConfigError, match=r":19: evaluate.main.own_stores names 'nope', but there is no \[stores.nope\]"):
        load_job(path)


def test_the_repo_job_files_use_the_field_names():
    jobs = Path(__file__).resolve().parents[2] / "jobs"
    for spec in sorted(jobs.glob("*.toml")):
        table = ""
        for line in spec.read_text().splitlines():
            if line.startswith("["):
                table = line
            # a models step's `stores` is its training shards, not an evaluate key
            assert not (table.startswith("[evaluate.") and line.startswith(("stores =", "own_stores ="))), (spec, line)


def test_models_is_the_evaluate_key_targets_under_its_fields_name(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(SPEC.replace('targets = ["cand", "static"]', 'models = ["cand", "static"]') + NEW)
    (by_field,) = (s for s in load_job(path).steps if s.id == "evaluate.main")
    (by_key,) = (s for s in _job(tmp_path, "targets", NEW)[1].steps if s.id == "evaluate.main")
    assert by_field.options == by_key.options and by_field.deps == by_key.deps
