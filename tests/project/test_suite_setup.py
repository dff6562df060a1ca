"""The test suite's own setup: where it finds MNIST (and that not finding it fails), and that the
mutation table still applies."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO, has_mnist, mnist_candidates


def test_mnist_is_looked_for_where_enspipe_looks_first(monkeypatch, tmp_path):
    """--data-root, then $ENSPIPE_DATA (the product's order), then shared/data beside the
    checkout, then $ENSPIPE_TEST_MNIST; extracted or gzipped files both count."""
    shared = REPO.parent / "shared" / "data"
    monkeypatch.setenv("ENSPIPE_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("ENSPIPE_TEST_MNIST", str(tmp_path / "test"))
    assert mnist_candidates(str(tmp_path / "flag")) == [tmp_path / "flag", tmp_path / "env", shared, tmp_path / "test"]
    monkeypatch.delenv("ENSPIPE_DATA")
    monkeypatch.setenv("ENSPIPE_TEST_MNIST", "skip")
    assert mnist_candidates(None) == [shared]
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for i, stem in enumerate(("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte")):
        (raw / (stem + (".gz" if i % 2 else ""))).write_bytes(b"x")
    assert not has_mnist(tmp_path / "root")
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"x")
    assert has_mnist(tmp_path / "root")


def test_a_missing_mnist_fails_unless_skipping_is_asked_for(tmp_path):
    """The mnist_root fixture, in a pytest run of its own (the suite's conftest copied to a
    folder with no shared/ beside it): with MNIST nowhere, a test that needs it errors with a
    line saying where it looked (a CI machine that lost its data must not go green);
    ENSPIPE_TEST_MNIST=skip makes it a skip; $ENSPIPE_DATA and --data-root are where it finds it."""
    work = tmp_path / "suite" / "tests"
    work.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", work / "conftest.py")
    shutil.copy(REPO / "tests" / "loopback.py", work / "loopback.py")  # the fixtures conftest registers
    shutil.copy(REPO / "tests" / "xdist_order.py", work / "xdist_order.py")  # and its hooks
    (work / "test_needs_mnist.py").write_text(
        "import os\n\ndef test_it(mnist_root):\n    assert str(mnist_root) == os.environ['WANT']\n")
    data = tmp_path / "data"
    raw = data / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f"{stem}.gz").write_bytes(b"x")
    base = {k: v for k, v in os.environ.items() if k not in ("ENSPIPE_DATA", "ENSPIPE_TEST_MNIST", "PYTEST_ADDOPTS")}
    base["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # a plugin imports zarr: 8 s a run, not 1

    def run(*args, **env) -> tuple[int, str]:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(work),
                            *args, str(work)], cwd=work, env={**base, "WANT": str(data), **env},
                           capture_output=True, text=True, timeout=120)
        return r.returncode, r.stdout

    rc, out = run()
    assert rc == 1 and "1 error" in out and "real MNIST files (MNIST/raw/*-ubyte[.gz]) not found in" in out, out
    rc, out = run(ENSPIPE_TEST_MNIST="skip")
    assert rc == 0 and "1 skipped" in out, out
    assert run(ENSPIPE_DATA=str(data))[0] == 0
    assert run("--data-root", str(data), ENSPIPE_DATA=str(tmp_path / "empty"))[0] == 0


def test_every_mutation_still_applies_to_this_tree():
    """tests/mutations.py's old texts occur exactly once in their files and its tests exist,
    so `python tests/mutations.py` plants every bug it lists (its run takes minutes; this
    check, milliseconds)."""
    spec = importlib.util.spec_from_file_location("mutations", Path(__file__).resolve().parents[1] / "mutations.py")
    mutations = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mutations  # dataclasses look their module up there
    spec.loader.exec_module(mutations)
    assert mutations.problems(mutations.MUTATIONS) == []
    issue_18 = {"label-leak", "online-perturbation-zeroed", "evaluate-counts-correct", "wilson-z-1",
                "truncnorm-ignored", "wds-reader-skips-sha256", "training-ascends-the-loss", "step-ll-sign-flipped",
                "no-clip", "ens-adv-static-only", "ranks-overlap", "optimizer-state-not-restored",
                "complete-before-every-shard", "verify-skips-deep-checksum"}
    assert issue_18 <= {m.name for m in mutations.MUTATIONS}
