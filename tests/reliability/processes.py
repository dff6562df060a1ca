"""Running enspipe as real processes: every run in the reliability tests is a separate
process running the real command line.

In the full sweep each is a fresh `python -m enspipe` interpreter (or faults.py, which
installs fault hooks and then runs the same CLI). In the CI subset they are forked from
zygote.py, which has done the ~3.5 s of imports once (ENSPIPE_REL_FRESH=1 turns that off):
the same code from `enspipe.cli.main` on, at a third of the CPU cost. The command-line tests
outside this package use the same zygote through `run_cli` (one per pytest session; conftest.py
ends it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .sweep import FULL

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FAULTS = HERE / "faults.py"
ZYGOTE = HERE / "zygote.py"

# One thread per process: the machine is shared, and a fixed thread count keeps CPU results
# bit-identical between a reference run and its killed-and-resumed twin.
ENV = {**os.environ, "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONDONTWRITEBYTECODE": "1"}
ENV.pop("ENSPIPE_FAULT_LOG", None)

FRESH = FULL or os.environ.get("ENSPIPE_REL_FRESH") == "1"
_LOGS: list[Path] = []  # a temp dir for the logs of `enspipe()` runs, made on first use


class Forked:
    """The part of subprocess.Popen the tests use, for a process forked by the zygote."""

    def __init__(self, zygote: "Zygote", rid: int, pid: int, args: list, log: Path) -> None:
        self.zygote, self.rid, self.pid, self.args, self.log = zygote, rid, pid, args, log

    @property
    def returncode(self) -> int | None:
        return self.zygote.exits.get(self.rid)

    @property
    def peak_rss(self) -> int | None:
        """Bytes: the child's peak resident memory, once it has ended."""
        kib = self.zygote.maxrss.get(self.rid)
        return None if kib is None else kib * 1024

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.zygote.cond:
            if not self.zygote.cond.wait_for(lambda: self.rid in self.zygote.exits, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """A client of zygote.py: forks enspipe processes on request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=ENV, cwd=REPO)
        self.cond = threading.Condition()
        self.pids: dict[int, int] = {}
        self.exits: dict[int, int] = {}
        self.maxrss: dict[int, int] = {}
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            event = json.loads(line)
            with self.cond:
                if "maxrss" in event:
                    self.maxrss[event["id"]] = event["maxrss"]
                (self.pids if "pid" in event else self.exits)[event["id"]] = event.get("pid", event.get("exit"))
                self.cond.notify_all()

    def spawn(self, args: list, *, log: Path, faults=(), env: dict, cwd: Path, uid: int | None = None) -> Forked:
        with self.cond:
            rid, self.next_id = self.next_id, self.next_id + 1
        request = {"id": rid, "argv": [str(a) for a in args], "env": env, "cwd": str(cwd), "faults": list(faults),
                   "uid": uid, "out": str(log.with_suffix(".out")), "err": str(log.with_suffix(".err"))}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        with self.cond:
            assert self.cond.wait_for(lambda: rid in self.pids, 120), "the zygote does not answer"
        return Forked(self, rid, self.pids[rid], args, log)

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)


_zygote: Zygote | None = None


def spawn(*args, log: Path, faults: tuple[str, ...] = (), env: dict | None = None, cwd: Path = REPO,
          uid: int | None = None, fresh: bool | None = None):
    """Start enspipe ARGS without waiting; stdout/stderr go to LOG.out / LOG.err. The result
    has Popen's pid, poll, wait, send_signal, kill and returncode (negative: the signal)."""
    global _zygote
    fresh = FRESH if fresh is None else fresh
    if fresh:
        assert uid is None, "a fresh interpreter cannot run as another user (the venv is under /root)"
        if faults:
            cmd = [sys.executable, str(FAULTS), *[x for f in faults for x in ("--fault", f)], "--", *map(str, args)]
        else:
            cmd = [sys.executable, "-m", "enspipe", *map(str, args)]
        proc = subprocess.Popen(cmd, stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"),
                                stdin=subprocess.DEVNULL, env=env or ENV, cwd=cwd)
        proc.log = log  # type: ignore[attr-defined]
        return proc
    if _zygote is None:
        _zygote = Zygote()
    return _zygote.spawn(list(args), log=log, faults=faults, env=env or ENV, cwd=cwd, uid=uid)


def enspipe(*args, faults: tuple[str, ...] = (), timeout: float = 600, cwd: Path = REPO,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run enspipe ARGS to the end; stdout and stderr as text, and in `.peak_rss` the process's
    peak resident memory in bytes (from wait4: exact, not sampled)."""
    if not _LOGS:
        _LOGS.append(Path(tempfile.mkdtemp(prefix="enspipe-rel-logs-")))
    proc = spawn(*args, faults=faults, log=_LOGS[0] / f"run-{time.monotonic_ns()}.log", cwd=cwd, env=env)
    peak = None
    try:
        if isinstance(proc, Forked):
            proc.wait(timeout=timeout)
            peak = proc.peak_rss
        else:
            peak = _wait4(proc, timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = outputs(proc)
    done = subprocess.CompletedProcess(list(args), proc.returncode, out, err)
    done.peak_rss = peak  # type: ignore[attr-defined]
    return done


def run_cli(*args, env: dict | None = None, timeout: float = 600, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m enspipe ARGS` for the suite's command-line tests (outside this package too), at
    a third of the CPU: forked from the zygote, whose imports are paid once per session, unless
    ENSPIPE_REL_FRESH=1. For tests of what a command does, not of how it starts: a test of what
    `python -m enspipe` imports, of its start-up time, or of a variable a library reads when it
    is imported (HF_HOME, TORCH_HOME, OMP_NUM_THREADS) runs a fresh interpreter instead.
    Returns stdout and stderr as text and the exit status (negative: killed by that signal)."""
    env = {**os.environ, "ENSPIPE_PROGRESS": "0"} if env is None else env
    return enspipe(*args, env=env, timeout=timeout, cwd=Path.cwd() if cwd is None else cwd)


def _wait4(proc: subprocess.Popen, timeout: float) -> int | None:
    """Wait for a Popen child with wait4 (Popen.wait discards the rusage); its peak RSS in bytes."""
    deadline = time.monotonic() + timeout
    while (peak := _reaped(proc)) is False:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.01)
    return peak  # type: ignore[return-value]


def outputs(proc: subprocess.Popen) -> tuple[str, str]:
    log: Path = proc.log  # type: ignore[attr-defined]
    return log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def error_line(stderr: str, info_prefixes: tuple[str, ...] = ("precompute: ", "reused ")) -> str:
    """The one error line of a failed command: no traceback, nothing but enspipe's own
    progress lines before it. Returns the line."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    *before, last = lines
    assert last.startswith("enspipe") and ": error: " in last, stderr
    assert all(ln.startswith(info_prefixes) for ln in before), stderr
    return last


def run_many(cases: list[dict], work: Path, *, fresh: bool, parallel: int = 2) -> list[dict]:
    """Run each case ({"argv", "cwd", "uid"}, optionally "env") as its own enspipe process,
    `parallel` at a time; returns each one's {"rc", "stdout", "stderr", "peak_rss"} (bytes)."""
    results: list[dict | None] = [None] * len(cases)
    pending = list(enumerate(cases))
    running: list[tuple[int, object]] = []
    while pending or running:
        while pending and len(running) < parallel:
            i, case = pending.pop(0)
            log = work / f"{'fresh' if fresh else 'forked'}{i}.log"
            running.append((i, spawn(*case["argv"], log=log, cwd=Path(case["cwd"]), uid=case["uid"], fresh=fresh,
                                     env=case.get("env"))))
        time.sleep(0.01)
        for item in list(running):
            i, proc = item
            peak = _reaped(proc)
            if peak is not False:
                out, err = outputs(proc)  # type: ignore[arg-type]
                results[i] = {"rc": proc.returncode, "stdout": out, "stderr": err,  # type: ignore[attr-defined]
                              "peak_rss": peak}
                running.remove(item)
    return results  # type: ignore[return-value]


def _reaped(proc) -> int | None | bool:
    """False while PROC runs; once it has ended, its peak RSS in bytes (None if unknown)."""
    if isinstance(proc, Forked):
        return False if proc.poll() is None else proc.peak_rss
    if proc.returncode is not None:
        return None
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if not pid:
        return False
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024


def shutdown() -> None:
    """End the zygote (and with it any child still running) and remove the run logs."""
    global _zygote
    if _zygote is not None:
        _zygote.close()
        _zygote = None
    while _LOGS:
        shutil.rmtree(_LOGS.pop(), ignore_errors=True)
