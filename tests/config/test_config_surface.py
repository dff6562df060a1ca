"""The library speaks in config fields: no stage's error names a command-line flag; a field says
itself whether it changes only how a run goes (left out of a job step's cache key); job outputs on
another filesystem than the cache are copies, not links."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from enspipe.config import runtime_fields
from enspipe.jobs import load_job, resolve_keys
from cli_runner import run_cli

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
ENV = {**os.environ, "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _texts(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _messages(tree: ast.AST) -> list[tuple[int, str]]:
    """The text of every error a module raises: `raise XError("...")` and `check(cond, field, "...")`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            out += [(node.lineno, t) for arg in node.exc.args for t in _texts(arg)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "check":
            out += [(node.lineno, t) for arg in node.args[2:] for t in _texts(arg)]
    return out


def test_no_stage_error_names_a_flag():
    """The CLI shows fields as flags (`--adv-fraction must ...`); the library itself must not,
    or a job spec's error would name a flag its user never typed."""
    offenders = []
    for path in sorted(PIPELINE.rglob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for line, text in _messages(ast.parse(path.read_text())):
            if FLAG.search(text):
                offenders.append(f"{path.relative_to(PIPELINE)}:{line}: {text!r}")
    assert not offenders, "\n".join(offenders)


def test_runtime_fields_are_declared_on_the_configs():
    from enspipe.diagnostics import DiagnoseConfig
    from enspipe.evaluate import EvalConfig
    from enspipe.precompute import PrecomputeConfig
    from enspipe.train import TrainConfig

    # What the job runner left out of its keys before it read them from the fields, and what
    # only says how a run is watched or kept (a resumed run may change it).
    assert runtime_fields(TrainConfig) == {"loader_workers", "keep_checkpoints", "val_limit", "log"}
    assert runtime_fields(PrecomputeConfig) == {"dask_workers", "scheduler", "loader_workers"}
    assert runtime_fields(EvalConfig) == runtime_fields(DiagnoseConfig) == {"loader_workers"}


SPEC = """\
[data]
dataset = "digits"
train_limit = 128

[models.static]
arch = "D"
epochs = 1
{model_extra}

[stores.static_fgsm]
model = "static"
attacks = ["fgsm"]
shard_size = 64
{store_extra}
"""


def _keys(tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    spec = tmp_path / f"{name}.toml"
    spec.write_text(SPEC.format(model_extra=extra.get("model", ""), store_extra=extra.get("store", "")))
    job = load_job(spec)
    resolve_keys(job)
    return {s.id: s.key for s in job.steps}


def test_a_runtime_field_leaves_the_step_keys_alone(tmp_path):
    base = _keys(tmp_path, "base")
    assert _keys(tmp_path, "fast", model="loader_workers = 2", store="dask_workers = 3") == base
    assert _keys(tmp_path, "sched", store='scheduler = "tcp://127.0.0.1:8786"') == base
    other = _keys(tmp_path, "other", store='label = "true"')
    assert other["models.static"] == base["models.static"] and other["stores.static_fgsm"] != base["stores.static_fgsm"]
    seeded = _keys(tmp_path, "seeded", model="seed = 3")
    assert all(seeded[k] != base[k] for k in base)  # a store of another model is another store


def _device(path: Path) -> int:
    return os.stat(path).st_dev


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_outputs_on_another_filesystem_are_copies(tmp_path):
    """The cache on one filesystem, --out on another (tmpfs): hard links cannot cross, so every
    published file is a copy with the cache's bytes, and no symlink is left."""
    import tempfile

    out_root = Path(tempfile.mkdtemp(prefix="enspipe-test-", dir="/dev/shm"))
    try:
        if _device(out_root) == _device(tmp_path):
            pytest.skip("/dev/shm is on the same filesystem as the test's tmp_path")
        spec = tmp_path / "job.toml"
        spec.write_text(SPEC.format(model_extra="", store_extra=""))
        out, cache = out_root / "out", tmp_path / "cache"
        r = run_cli("run", spec, "--out", out, "--cache", cache, "--device", "cpu", env=ENV, timeout=600)  # forked
        assert r.returncode == 0, r.stderr
        assert not [p for p in out.rglob("*") if p.is_symlink()]
        pairs = [(out / "models" / "static", next((cache / "runs").glob("static-*"))),
                 (out / "stores" / "static_fgsm.zarr", next((cache / "stores").rglob("*.zarr")))]
        for published, cached in pairs:
            files = sorted(p.relative_to(cached) for p in cached.rglob("*") if p.is_file())
            assert files and files == sorted(p.relative_to(published) for p in published.rglob("*") if p.is_file())
            for rel in files:
                assert _device(published / rel) != _device(cached / rel)
                assert (published / rel).read_bytes() == (cached / rel).read_bytes(), rel
    finally:
        import shutil

        shutil.rmtree(out_root, ignore_errors=True)
