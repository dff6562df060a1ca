"""Job specs speak the configs' names; names that would leave --out / --cache are refused; job
outputs are real files a user can move; `enspipe cache ls|gc`; `enspipe ls` of a job folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from enspipe.util.errors import ConfigError
from enspipe.jobs import load_job, resolve_keys
from cli_runner import run_cli

ENV = {**os.environ, "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

MINI = """\
[job]
name = "mini"

[data]
dataset = "digits"
train_limit = 256
test_limit = 64

[defaults]
epochs = 1

[models.static]
arch = "D"
seed = 1

[stores.static_fgsm]
model = "static"
attack = "fgsm"
shard_size = 128

[models.cand]
arch = "D"
mode = "ens-adv"
shards = ["static_fgsm"]

[evaluate.main]
targets = ["cand"]
sources = ["static"]
attacks = ["fgsm"]

[diagnose.masking]
models = ["cand"]
other = "static"
limit = 8
steps = 2
subspace_points = 1
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _enspipe(*args, check: bool = True) -> subprocess.CompletedProcess:
    r = run_cli(*map(str, args), env=ENV, timeout=600)  # a real process, forked from the pre-imported zygote
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("edit, line", [
    (lambda t: t.replace("[models.static]", '[models."../../victim"]').replace('"static"', '"../../victim"'), 12),
    (lambda t: t.replace("[models.static]", '[models."/tmp/enspipe-absolute"]')
     .replace('"static"', '"/tmp/enspipe-absolute"'), 12),
    (lambda t: t.replace("[stores.static_fgsm]", '[stores."..hidden"]').replace('"static_fgsm"', '"..hidden"'), 16),
    (lambda t: t.replace('name = "mini"', 'name = "../outside"'), 2),
])
def test_names_that_would_leave_out_or_cache_are_refused(tmp_path, edit, line):
    victim = _write(tmp_path / "victim", "the user's file\n")
    work = tmp_path / "a" / "b"
    spec = _write(work / "job.toml", edit(MINI))
    r = _enspipe("run", spec, "--out", work / "out", "--cache", work / "cache", "--device", "cpu", check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"enspipe: error: {spec}:{line}: ") and "is not a valid name" in lines[0], lines[0]
    assert victim.read_text() == "the user's file\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "job.toml", "victim"]
    assert not Path("/tmp/enspipe-absolute").exists()


def test_job_keys_are_the_config_fields_and_old_names_are_aliases(tmp_path):
    base = load_job(_write(tmp_path / "a.toml", MINI))
    old = load_job(_write(tmp_path / "b.toml", MINI.replace("shards = [", "stores = [")
                          .replace("[models.cand]", "[models.cand]\nworkers = 2")))
    for job in (base, old):
        resolve_keys(job)
    assert [s.key for s in base.steps] == [s.key for s in old.steps]  # workers / loader_workers: speed only
    cand = next(s for s in old.steps if s.id == "models.cand")
    assert cand.options["shards"] == ["static_fgsm"] and cand.options["loader_workers"] == 2
    both = _write(tmp_path / "c.toml", MINI.replace('shards = ["static_fgsm"]',
                                                    'shards = ["static_fgsm"]\nstores = ["static_fgsm"]'))
    with pytest.raises(ConfigError, match="stores and shards are one option"):
        load_job(both)
    plural = load_job(_write(tmp_path / "d.toml", MINI.replace('attack = "fgsm"', 'attacks = ["fgsm"]')))
    resolve_keys(plural)
    assert [s.key for s in plural.steps] == [s.key for s in base.steps]
    two = _write(tmp_path / "e.toml", MINI.replace('attack = "fgsm"', 'attacks = ["fgsm", "step_ll"]'))
    with pytest.raises(ConfigError, match=r"e.toml:18: stores.static_fgsm.attacks must name one attack"):
        load_job(two)


@pytest.mark.parametrize("edit, where, message", [
    (lambda t: t.replace('mode = "ens-adv"', 'mode = "ens-adv"\nadv_fraction = 1.5'), 24,
     "models.cand.adv_fraction must be in (0, 1], not 1.5"),
    (lambda t: t.replace("epochs = 1", 'epochs = 1\neps = "1/0"'), 11, "defaults.eps must be a number in (0, 1]"),
    (lambda t: t.replace("seed = 1", "seed = 1\nloader_workers = -1"), 15,
     "models.static.loader_workers must be 0 or more, not -1"),
    (lambda t: t.replace('mode = "ens-adv"', 'mode = "ens-adv"\nattack = "pgd"'), 24,
     "models.cand.attack must be one of fgsm, step_ll, not 'pgd'"),
    (lambda t: t.replace("limit = 8", "limit = 8\nsingle = \"pgd\""), 35, "diagnose.masking.single must be one of"),
    (lambda t: t.replace('attacks = ["fgsm"]', 'attacks = ["fgsm"]\nensemble_source = true'), 30,
     "evaluate.main.ensemble_source needs at least two sources"),
])
def test_a_bad_value_names_its_job_key_and_line(tmp_path, edit, where, message):
    spec = _write(tmp_path / "job.toml", edit(MINI))
    with pytest.raises(ConfigError) as e:
        load_job(spec)
    assert str(e.value).startswith(f"{spec}:{where}: {message}"), str(e.value)


def test_a_job_folder_is_real_files_that_survive_a_copy_and_a_gc(tmp_path):
    """Job outputs hard-link the cache (same filesystem): no symlinks; `shutil.copytree` of the
    folder keeps every file readable after the cache is gone; `cache ls` / `cache gc`."""
    from enspipe.models import load_model
    from enspipe.stores import open_store, verify_store

    spec = _write(tmp_path / "mini.toml", MINI)
    out, cache = tmp_path / "out", tmp_path / "cache"
    _write(cache / "data" / "keep.txt", "datasets live beside the step cache\n")
    first = _enspipe("run", spec, "--out", out, "--cache", cache, "--device", "cpu")
    assert first.stdout.strip() == str(out / "report.md")
    links = [p for p in out.rglob("*") if p.is_symlink()]
    assert not links, links
    weights = out / "models" / "static" / "model.safetensors"
    cached = next((cache / "runs").glob("static-*")) / "model.safetensors"
    assert os.stat(weights).st_ino == os.stat(cached).st_ino  # a hard link: no space used
    assert (out / "stores" / "static_fgsm.zarr" / "manifest.json").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o777 & ~umask for p in out.rglob("*") if p.is_dir()), \
        "published folders get the process umask's permissions"
    # A second run reuses every step and publishes nothing new.
    steps = [out / kind for kind in ("models", "stores", "evaluate", "diagnose")]
    before = {str(p): p.stat().st_ino for d in steps for p in d.rglob("*") if p.is_file()}
    again = _enspipe("run", spec, "--out", out, "--cache", cache, "--device", "cpu")
    assert "running " not in again.stderr
    assert before == {str(p): p.stat().st_ino for d in steps for p in d.rglob("*") if p.is_file()}

    # `enspipe ls` finds the job folder's runs and stores.
    listing = _enspipe("ls", out).stdout
    assert str(out / "models" / "static") in listing and str(out / "models" / "cand") in listing
    (store_line,) = [ln for ln in listing.splitlines() if ln.rstrip().endswith("static_fgsm.zarr")]
    assert "complete" in store_line

    # `cache ls`: every step used by this job's folder.
    ls = _enspipe("cache", "ls", "--cache", cache).stdout.splitlines()
    steps = [ln for ln in ls[1:] if ln.split()[0] in ("used", "unused", "running", "orphan")]
    assert len(steps) == 5 and all(ln.startswith("used") and str(out.resolve()) in ln for ln in steps), ls

    moved = tmp_path / "elsewhere" / "mini"
    shutil.copytree(out, moved, symlinks=True)  # as cp -r or tar would
    copy = _tree(moved)
    assert _enspipe("cache", "gc", "--cache", cache, "--dry-run").stdout == ""  # all in use
    shutil.rmtree(out)
    dry = _enspipe("cache", "gc", "--cache", cache, "--dry-run")
    assert len(dry.stdout.splitlines()) == 5 and all(ln.startswith("would remove ") for ln in dry.stdout.splitlines())
    assert len(list((cache / "steps").glob("*.json"))) == 5
    gone = _enspipe("cache", "gc", "--cache", cache)
    assert len(gone.stdout.splitlines()) == 5
    assert not list((cache / "steps").glob("*.json")) and not list((cache / "runs").iterdir())
    assert not list((cache / "stores").rglob("*.zarr"))
    assert (cache / "data" / "keep.txt").read_text() == "datasets live beside the step cache\n"

    # The copy holds every file, readable with the cache gone.
    assert _tree(moved) == copy
    for name in ("static", "cand"):
        assert load_model(moved / "models" / name).config.name == "D"
    store = moved / "stores" / "static_fgsm.zarr"
    assert verify_store(store).ok and open_store(store).read_directions(0, 4).shape == (4, 1, 28, 28)
    res = json.loads((moved / "evaluate" / "main" / "results.json").read_text())
    assert set(res["models"]) == {"cand"} and "static" in res["models"]["cand"]["blackbox"]
    diag = json.loads((moved / "diagnose" / "masking" / "diagnostics.json").read_text())
    assert set(diag["models"]) == {"cand"} and diag["models"]["cand"]["loss_surface"]["other"] == "static"
    assert "cand" in (moved / "report.md").read_text()


def test_publishing_replaces_only_what_enspipe_wrote(tmp_path):
    """A folder the user made where a step would be published is an error that leaves it
    alone; a symlink into the cache (how earlier versions published) is replaced by files."""
    spec = _write(tmp_path / "mini.toml", MINI.split("[models.cand]")[0])  # static model and its store
    cache = tmp_path / "cache"
    _enspipe("run", spec, "--out", tmp_path / "first", "--cache", cache, "--device", "cpu")
    mine = _write(tmp_path / "out" / "models" / "static" / "notes.txt", "mine\n")
    r = _enspipe("run", spec, "--out", tmp_path / "out", "--cache", cache, "--device", "cpu", check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (f"enspipe: error: {tmp_path / 'out' / 'models' / 'static'} exists "
                                                 "and was not written by enspipe; move it away or choose another --out")
    assert mine.read_text() == "mine\n" and sorted(p.name for p in mine.parent.iterdir()) == ["notes.txt"]

    old = tmp_path / "old"
    (old / "models").mkdir(parents=True)
    (old / "models" / "static").symlink_to(next((cache / "runs").glob("static-*")), target_is_directory=True)
    (old / "stores").mkdir()
    (old / "stores" / "static_fgsm").symlink_to(next((cache / "stores").rglob("*.zarr")), target_is_directory=True)
    _enspipe("run", spec, "--out", old, "--cache", cache, "--device", "cpu")
    assert not [p for p in old.rglob("*") if p.is_symlink()]
    assert (old / "models" / "static" / "model.safetensors").is_file()
    assert (old / "stores" / "static_fgsm.zarr" / "manifest.json").is_file()
