"""Fixtures every reliability module shares, built once per run of the package: the
uninterrupted reference store and training run, and the end of run (the forked processes'
zygote closed, the counts written)."""
from __future__ import annotations

import pytest

from . import processes, sweep
from .reference import Ref, RefRun, make_ref, make_ref_run


@pytest.fixture(scope="package", autouse=True)
def _end_of_run():
    """After the last reliability test: close the zygote, remove the run logs, and add this
    run's counts to $ENSPIPE_RELIABILITY_COUNTS (read by reliability_sweep.py)."""
    yield
    processes.shutdown()
    sweep.write_counts()


@pytest.fixture(scope="package")
def ref(digits_static, tmp_path_factory) -> Ref:
    """The reference: `enspipe precompute --format both`, uninterrupted, in a subprocess."""
    return make_ref(digits_static, tmp_path_factory.mktemp("ref") / "root")


@pytest.fixture(scope="package")
def ref_run(ref, tmp_path_factory) -> RefRun:
    """The reference training run, uninterrupted, in a subprocess."""
    return make_ref_run(ref, tmp_path_factory.mktemp("ref-run") / "run")
