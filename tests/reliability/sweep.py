"""The CI subset and the full sweep, and the counts RELIABILITY.md reports.

The default run is the CI subset; ENSPIPE_SWEEP=full adds the cases marked `full_sweep`
(and more trials inside some tests). Tests add what they tried and what held to TALLY;
`write_counts` adds a run's tally to $ENSPIPE_RELIABILITY_COUNTS, which
tests/reliability_sweep.py reads.
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest

FULL = os.environ.get("ENSPIPE_SWEEP", "") == "full"


FULL_ONLY = [pytest.mark.skipif(not FULL, reason="full sweep only: set ENSPIPE_SWEEP=full (RELIABILITY.md)"),
             pytest.mark.slow]


def full_sweep(fn):
    """Only in the full sweep (ENSPIPE_SWEEP=full); the default CI run skips it."""
    for mark in FULL_ONLY:
        fn = mark(fn)
    return fn


def full_sweep_case(value, *, ci: bool = False):
    """One case of a parametrized test: in the CI subset when `ci`, else full sweep only."""
    return pytest.param(value, marks=() if ci else FULL_ONLY)


TALLY: collections.Counter = collections.Counter()


def write_counts() -> None:
    """Add this run's counts to $ENSPIPE_RELIABILITY_COUNTS (read by reliability_sweep.py)."""
    path = os.environ.get("ENSPIPE_RELIABILITY_COUNTS")
    if path:
        p = Path(path)
        old = collections.Counter(json.loads(p.read_text())) if p.exists() else collections.Counter()
        p.write_text(json.dumps(dict(old + TALLY), indent=1, sort_keys=True))
