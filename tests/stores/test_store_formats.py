"""Store formats declared once (stores.registry) and each store opened once per run.

The first test adds a format in a scratch copy of the package, touching only the files the
README's layout section names for it (a backend module, one registry row, the manifest
schema's format list), and checks that every part that recognises stores by format then
knows it: create/open/verify, `ls`, the output guards, the run listing, the job cache's
store walk, precompute's `format` choices. The second counts, across the trainer's loader
worker processes, how often a store's manifest is read during a training run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

NEW_BACKEND = '''"""A test format: zarr's layout under another name."""
from . import zarr_store as _z
from .zarr_store import chunk_samples_for, create_layout, store_problems, check_shard  # noqa: F401


class Writer(_z.ZarrWriter):
    fmt = "zarrx"


class Reader(_z.ZarrReader):
    fmt = "zarrx"
'''

CHECK = r'''
import json, sys
from pathlib import Path
import numpy as np
import enspipe
from enspipe.stores import StoreIdentity, create_store, list_stores, open_store, store_path, verify_store
from enspipe.paths import is_store_dir, check_output
from enspipe.jobs.runs import list_runs
from enspipe.jobs.cache import _stores_under
from enspipe.precompute.config import FORMATS

root = Path(sys.argv[1])
assert Path(enspipe.__file__).resolve().is_relative_to(Path(sys.argv[2]).resolve()), enspipe.__file__
n = 300
ident = StoreIdentity(dataset={"source": "digits", "split": "train", "num_samples": n, "fingerprint": "f1" * 32},
                      geometry=(1, 4, 4), preprocess="none", num_classes=3, model_name="m", weights_sha256="ab" * 32,
                      attack="fgsm", attack_params={}, label_mode="pred")
path = store_path(root, ident, "zarrx")
w = create_store(path, ident, fmt="zarrx", shard_size=128)
rng = np.random.default_rng(0)
d = rng.integers(-1, 2, (n, 1, 4, 4)).astype(np.int8)
for s in range(w.num_shards):
    a, b = w.shard_range(s)
    w.write_shard(s, direction=d[a:b], logits=np.zeros((b - a, 3), np.float16), label=np.zeros(b - a, np.int64),
                  keys=[f"k{i}" for i in range(a, b)])
w.finalize()
r = open_store(path)
out = {
    "suffix": path.suffix,
    "read_ok": bool((r.read_directions(0, n) == d).all()),
    "verify_ok": verify_store(path).ok,
    "ls": [(str(i.path), i.fmt, i.complete) for i in list_stores(root)],
    "is_store_dir": is_store_dir(path),
    "runs": [str(i.path) for i in list_runs(root)],
    "cache_walk": [str(p) for p in _stores_under(root)],
    "precompute_formats": sorted(FORMATS),
    "keeps_clean_images": w.keeps_clean_images,
}
try:
    check_output(path / "run")
    out["guard"] = None
except Exception as e:
    out["guard"] = type(e).__name__
print(json.dumps(out))
'''


def _scratch_package(dest: Path) -> Path:
    """pipeline/ and storage_schemas/ copied, importable as `enspipe` through a shim."""
    shutil.copytree(REPO / "pipeline", dest / "pipeline", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "storage_schemas", dest / "storage_schemas", ignore=shutil.ignore_patterns("__pycache__"))
    # As installed, the schemas are the subpackage `enspipe.storage_schemas`; without this link the
    # copy would import the installed (unedited) schemas through the editable install's finder.
    if not (dest / "pipeline" / "storage_schemas").exists():
        os.symlink("../storage_schemas", dest / "pipeline" / "storage_schemas")
    (dest / ".shim").mkdir()
    os.symlink("../pipeline", dest / ".shim" / "enspipe")
    return dest / ".shim"


def test_a_new_store_format_is_a_backend_module_a_registry_row_and_its_schema(tmp_path):
    shim = _scratch_package(tmp_path / "copy")
    pkg = tmp_path / "copy" / "pipeline"
    # 1. the backend module
    (pkg / "stores" / "zarrx_store.py").write_text(NEW_BACKEND)
    # 2. one row in the registry
    reg = pkg / "stores" / "registry.py"
    text = reg.read_text()
    anchor = "\n)\n_BY_NAME"
    assert text.count(anchor) == 1
    reg.write_text(text.replace(anchor, '\n    StoreFormat("zarrx", "zarrx_store", keeps_clean_images=False, '
                                        'description="test"),\n)\n_BY_NAME'))
    # 3. its name in the manifest schema (its layout is zarr's, already there)
    schema = tmp_path / "copy" / "storage_schemas" / "manifest.v1.json"
    doc = json.loads(schema.read_text())
    doc["properties"]["format"]["enum"].append("zarrx")
    schema.write_text(json.dumps(doc, indent=2))

    root = tmp_path / "stores"
    env = {**os.environ, "PYTHONPATH": str(shim)}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(root), str(pkg)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["suffix"] == ".zarrx"
    assert out["read_ok"] and out["verify_ok"]
    assert [(Path(p).suffix, fmt, done) for p, fmt, done in out["ls"]] == [(".zarrx", "zarrx", True)]
    assert out["is_store_dir"] and out["guard"] == "ConfigError"
    assert out["runs"] == []
    assert [Path(p).suffix for p in out["cache_walk"]] == [".zarrx"]
    assert out["precompute_formats"] == ["both", "wds", "zarr", "zarrx"]
    assert out["keeps_clean_images"] is False


def test_no_module_outside_the_registry_lists_store_suffixes_or_tests_a_format_by_name():
    """The source-level half of 'declared once': suffix tuples and `fmt == "wds"` tests are gone
    from everywhere but the backends themselves."""
    import re

    bad = re.compile(r"""\(\s*["']\.zarr["']\s*,\s*["']\.wds["']\s*\)|\bfmt\s*==\s*["'](zarr|wds)["']""")
    found = []
    for p in (REPO / "pipeline").rglob("*.py"):
        if p.relative_to(REPO / "pipeline").as_posix() in ("stores/registry.py", "stores/zarr_store.py",
                                                            "stores/wds/store.py"):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if bad.search(line):
                found.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not found, found


def test_the_manifest_schema_lists_the_registered_formats():
    from enspipe.stores.registry import FORMATS

    doc = json.loads((REPO / "storage_schemas" / "manifest.v1.json").read_text())
    assert doc["properties"]["format"]["enum"] == list(FORMATS)


# --------------------------------------------------------------------------- opened once per run


@pytest.fixture(scope="module")
def one_store(digits_static, tmp_path_factory) -> Path:
    from enspipe.precompute import PrecomputeConfig, precompute

    (path,) = precompute(PrecomputeConfig(model=str(digits_static), dataset="digits", attacks=("fgsm",),
                                          out=str(tmp_path_factory.mktemp("stores")), shard_size=256, device="cpu"))
    return Path(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_training_run_reads_each_store_manifest_once(one_store, tmp_path, monkeypatch, workers):
    """Before: resolve_attack, verify and the checks each opened the path (3 reads and schema
    checks before the first batch), then every epoch's stream in every loader worker again."""
    from enspipe.stores import manifest
    from enspipe.train import TrainConfig, train

    log = tmp_path / "reads.log"
    real = manifest.read_json

    def counting(path, what):
        if Path(path).name == manifest.MANIFEST_NAME:
            with open(log, "a") as f:  # a file: loader workers are other processes
                f.write(f"{os.getpid()} {path}\n")
        return real(path, what)

    monkeypatch.setattr(manifest, "read_json", counting)
    train(TrainConfig(model="D", dataset="digits", mode="ens-adv", shards=(str(one_store),), epochs=2,
                      batch_size=64, loader_workers=workers, device="cpu", log_every=1000, out=str(tmp_path / "run")))
    reads = log.read_text().splitlines()
    assert len(reads) == 1, reads
