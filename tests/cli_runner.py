"""The one way the suite runs the `enspipe` command line: every command-line test outside
tests/reliability takes its runner from here (tests/reliability's own processes.py is the
machinery underneath: its zygote, fault hooks and sweep modes).

- `run_cli(*args, env=None, timeout=600, cwd=None)`: a real `enspipe ARGS` process, forked from
  the session's pre-imported zygote (tests/reliability/zygote.py; ENSPIPE_REL_FRESH=1: a fresh
  interpreter), stdout and stderr as text. For tests of what a command does.
- `CLI`, `fresh(*args, **kw)`: a fresh `python -m enspipe` interpreter, for tests of start-up
  itself (imports, --help, signals, variables a library reads when imported) and for commands
  that must run a scratch copy of the package (PYTHONPATH in `env`).
- `spawn(*args, log=PATH)`, `outputs(proc)`: a forked `enspipe ARGS` started without waiting
  (stdout/stderr to LOG.out / LOG.err), and what it wrote.
- `in_process(capsys, *args)`: `enspipe.cli.main(ARGS)` in the test's own process; (stdout,
  stderr); a non-zero exit fails the test with its stderr.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from reliability.processes import outputs, run_cli, spawn

__all__ = ["CLI", "fresh", "in_process", "outputs", "run_cli", "spawn"]

CLI = [sys.executable, "-m", "enspipe"]


def fresh(*args: object, **kwargs) -> subprocess.CompletedProcess:
    """`python -m enspipe ARGS` in a new interpreter (subprocess.run's keywords; text output captured)."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([*CLI, *map(str, args)], **kwargs)


def in_process(capsys: pytest.CaptureFixture, *args: object) -> tuple[str, str]:
    """`enspipe ARGS` in this process; (stdout, stderr). Fails on a non-zero exit."""
    from enspipe.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        err = capsys.readouterr().err
        pytest.fail(f"enspipe {' '.join(map(str, args))} exited {e.code}: {err[-2000:]}")
    return capsys.readouterr()
