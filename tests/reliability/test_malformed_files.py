"""Issue 25, item 9: a deep or truncated JSON/TOML file enspipe reads -- a job spec, model.json,
a safetensors header, a store manifest, a run's config.json on `--resume`, a cached step
record -- is one line naming the file (exit 1), no traceback.

Deep: 100,000 nested brackets, far past the recursion Python's json and tomllib parsers
allow (their RecursionError was a 40 to 3,000-line traceback). Truncated: the first half of
the real file. The oracle is the path the test wrote the damage into."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from enspipe.jobs import _record_path, load_job, resolve_keys

from .processes import enspipe, error_line

DEEP_JSON = "[" * 100_000
DEEP_TOML = "a = " + "[" * 100_000 + "\n"

JOB = """
[job]
name = "bad"

[data]
dataset = "digits"
train_limit = 64
test_limit = 32

[models.static]
arch = "D"
seed = 1
epochs = 1
"""


def _half(path: Path) -> str:
    text = path.read_text()
    return text[: len(text) // 2]


def _model_copy(static: Path, tmp: Path) -> Path:
    run = tmp / "static"
    shutil.copytree(static, run)
    return run


def _case(kind: str, damage: str, static: Path, tmp: Path) -> tuple[list, Path]:
    """(argv, the damaged file)."""
    if kind == "job spec":
        spec = tmp / "job.toml"
        spec.write_text(DEEP_TOML if damage == "deep" else JOB[: JOB.index("[models") + 8])
        return ["run", spec, "--dry-run", "--cache", tmp / "cache"], spec
    if kind == "model.json":
        run = _model_copy(static, tmp)
        bad = run / "model.json"
        bad.write_text(DEEP_JSON if damage == "deep" else _half(bad))
        return ["evaluate", "--model", run, "--dataset", "digits", "--limit", 32, "--device", "cpu",
                "--out", tmp / "ev"], bad
    if kind == "safetensors header":
        run = _model_copy(static, tmp)
        bad = run / "model.safetensors"
        raw = bad.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = DEEP_JSON.encode() if damage == "deep" else raw[8: 8 + n // 2]
        bad.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
        return ["evaluate", "--model", run, "--dataset", "digits", "--limit", 32, "--device", "cpu",
                "--out", tmp / "ev"], bad
    if kind == "manifest":
        store = tmp / "s.zarr"
        store.mkdir()
        bad = store / "manifest.json"
        bad.write_text(DEEP_JSON if damage == "deep" else '{"schema_version": 1, "format": "za')
        return ["verify", store], bad
    if kind == "config.json":
        run = tmp / "run"
        run.mkdir()
        bad = run / "config.json"
        bad.write_text(DEEP_JSON if damage == "deep" else '{"train": {"model": "D", "epo')
        return ["train", "--model", "D", "--dataset", "digits", "--limit", 64, "--epochs", 1, "--device", "cpu",
                "--out", run, "--resume"], bad
    if kind == "step record":
        spec = tmp / "job.toml"
        spec.write_text(JOB)
        job = load_job(spec)
        resolve_keys(job)
        bad = _record_path(tmp / "cache", job.steps[0])
        bad.parent.mkdir(parents=True)
        good = json.dumps({"step": job.steps[0].id, "key": job.steps[0].key, "outputs": {}})
        bad.write_text(DEEP_JSON if damage == "deep" else good[: len(good) // 2])
        return ["run", spec, "--cache", tmp / "cache", "--out", tmp / "out", "--device", "cpu"], bad
    raise AssertionError(kind)


KINDS = ["job spec", "model.json", "safetensors header", "manifest", "config.json", "step record"]


@pytest.mark.parametrize("damage", ["deep", "truncated"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_deep_or_truncated_file_is_one_line_naming_it(digits_static, tmp_path, kind, damage):
    argv, bad = _case(kind, damage, digits_static, tmp_path)
    r = enspipe(*argv)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text[-3000:]
    line = error_line(r.stderr) if kind != "manifest" else next(
        ln for ln in text.splitlines() if "manifest" in ln and str(bad.parent) in ln)
    assert str(bad) in line or (kind == "manifest" and str(bad.parent) in line), line
    assert len(line) < 2000, "the whole file echoed"
