"""Killing runs: SIGKILL a real enspipe process at an exact point or a seeded moment, check
what it left, re-run it, and count what fired."""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .processes import ENV, enspipe, outputs, spawn
from .sweep import TALLY


@dataclass(frozen=True)
class Kill:
    """Where a run is killed: an exact point (a faults.py spec), a moment: `delay`
    seconds after `started` says the run began its work (the timing of imports and of a
    loaded machine varies far more than the work itself), or an event: as soon as `when()`
    is seen true (e.g. the k-th shard record on disk), wherever the run is by then. An event
    is independent of the machine's load, so work is always left after it; moments are for
    the full sweep's random kills."""

    name: str
    fault: str | None = None
    delay: float | None = None
    started: Callable[[Path, int], bool] | None = None
    when: Callable[[], bool] | None = None


def run_killed(args, kill: Kill, work: Path) -> tuple[bool, str]:
    """Run enspipe and SIGKILL it at `kill`. Returns (fired, stderr): fired is False when the
    run ended on its own first (a moment after its end, or a point it never reached)."""
    log = work / f"kill-{time.monotonic_ns()}.log"
    env = {**ENV, "ENSPIPE_FAULT_LOG": str(log.with_suffix(".fired"))}
    t0_ns = time.time_ns()
    proc = spawn(*args, faults=(kill.fault,) if kill.fault else (), env=env, log=log)
    try:
        if kill.when is not None:
            while not kill.when() and proc.poll() is None:
                time.sleep(0.002)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True, outputs(proc)[1]
        elif kill.delay is not None:
            while kill.started is not None and not kill.started(log, t0_ns) and proc.poll() is None:
                time.sleep(0.002)
            try:
                proc.wait(timeout=kill.delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True, outputs(proc)[1]
        else:
            proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, err = outputs(proc)
    if proc.returncode == -signal.SIGKILL:
        fired = log.with_suffix(".fired")
        assert fired.exists() and kill.fault in fired.read_text(), f"killed, but not at {kill.name}: {err}"
        return True, err
    assert proc.returncode == 0, f"{kill.name}: the run failed instead of being killed:\n{err}"
    return False, err


def kill_chain(args: Callable[[], list], kills: list[Kill], work: Path, check: Callable[[], None],
               *, require_exact: bool = True) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the command once per kill point, each run killed at its point and the leftovers
    checked with `check`; each run after the first is a re-run of the killed one. Then run
    it once more, uninterrupted. Returns the kill points that fired and the last run."""
    fired = []
    for kill in kills:
        did, err = run_killed(args(), kill, work)
        if did:
            fired.append(kill.name)
            check()
        elif kill.fault and require_exact:
            raise AssertionError(f"kill point never reached: {kill.name} ({kill.fault})\n{err}")
    final = enspipe(*args())
    assert final.returncode == 0, final.stderr
    return fired, final


def tally_kinds(command: str, kills: list[Kill], fired: list[str]) -> None:
    """Count the exact points and random moments tried and fired (RELIABILITY.md's table)."""
    for k in kills:
        kind = "exact points" if k.fault else "random moments"
        TALLY[f"{kind} tried: {command}"] += 1
        TALLY[f"{kind} fired: {command}"] += k.name in fired


def random_moments(work: float, seed: int) -> tuple[float, float]:
    """Two seeded moments (seconds after the work began): one in a run, one in its re-run,
    which has only what the first kill left to do."""
    u1, u2 = np.random.default_rng([7, seed]).uniform(size=2)
    return float(u1 * work), float(u2 * max(0.25, 1 - u1) * work)
