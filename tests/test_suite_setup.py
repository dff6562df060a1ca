"""The test suite's own setup: where it finds MNIST, and that the mutation table still applies."""
from __future__ import annotations

import importlib.util
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


def test_every_mutation_still_applies_to_this_tree():
    """tests/mutations.py's old texts occur exactly once in their files and its tests exist,
    so `python tests/mutations.py` plants every bug it lists (its run takes minutes; this
    check, milliseconds)."""
    spec = importlib.util.spec_from_file_location("mutations", Path(__file__).with_name("mutations.py"))
    mutations = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mutations  # dataclasses look their module up there
    spec.loader.exec_module(mutations)
    assert mutations.problems(mutations.MUTATIONS) == []
    issue_18 = {"label-leak", "online-perturbation-zeroed", "evaluate-counts-correct", "wilson-z-1",
                "truncnorm-ignored", "wds-reader-skips-sha256", "training-ascends-the-loss", "step-ll-sign-flipped",
                "no-clip", "ens-adv-static-only", "ranks-overlap", "optimizer-state-not-restored",
                "complete-before-every-shard", "verify-skips-deep-checksum"}
    assert issue_18 <= {m.name for m in mutations.MUTATIONS}
