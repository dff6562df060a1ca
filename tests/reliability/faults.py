"""Run the real `enspipe` command line with a fault injected at an exact point (tests only).

    python tests/reliability/faults.py --fault SPEC [--fault SPEC ...] -- precompute --model ... --out ...

The product has no fault hooks and must not get any, so this wrapper installs them from
outside: it patches `os.replace`/`os.rename` and `open` (which `pathlib`, zarr's LocalStore,
tarfile and enspipe's JSON writers all go through) in a fresh interpreter, then calls
`enspipe.cli.main` exactly as `python -m enspipe` does. Everything else is the unmodified
product. SPEC is one of

  kill-before-replace:GLOB[#N]  SIGKILL this process just before the N-th (default 1st)
                                os.replace/os.rename whose *destination* path matches GLOB
  kill-after-replace:GLOB[#N]   ... just after it
  kill-mid-write:GLOB[#N]       ... in the middle of writing the N-th file opened for writing
                                whose path matches GLOB: half of its first write reaches the
                                disk, then SIGKILL (a torn temporary file is left behind)
  enospc-after:BYTES:GLOB       once BYTES bytes have been written in total to files matching
                                GLOB, every further write raises OSError(ENOSPC) (a full disk)

GLOB is an fnmatch pattern on the absolute path (`*` crosses `/`). When a kill fires, the line
`FAULT FIRED <spec>` is first appended to the file named by $ENSPIPE_FAULT_LOG (if set), so the
test knows the kill happened where it asked and not somewhere else. The full sweep runs this
file as a fresh interpreter; in the CI subset tests/reliability/zygote.py calls `install()` in
the processes it forks.
"""
from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import signal
import sys
import threading

_lock = threading.Lock()


def _fired(spec: str) -> None:
    log = os.environ.get("ENSPIPE_FAULT_LOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"FAULT FIRED {spec}\n".encode())
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


class _Counter:
    def __init__(self, spec: str, glob: str, nth: int) -> None:
        self.spec, self.glob, self.nth, self.seen = spec, glob, nth, 0

    def hit(self, path) -> bool:
        """True exactly on the nth matching call."""
        if not fnmatch.fnmatchcase(os.path.abspath(os.fspath(path)), self.glob):
            return False
        with _lock:
            self.seen += 1
            return self.seen == self.nth


class _File:
    """A file object whose writes go through a hook; everything else is the real file."""

    def __init__(self, f, on_write) -> None:
        self._f, self._on_write = f, on_write

    def write(self, data):
        return self._on_write(self._f, data)

    def writelines(self, lines):  # the wds tar writer's way: each piece counts as a write
        for data in lines:
            self._on_write(self._f, data)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def install(specs: list[str]) -> None:
    real_replace, real_rename, real_open = os.replace, os.rename, builtins.open
    before: list[_Counter] = []
    after: list[_Counter] = []
    mid: list[_Counter] = []
    enospc: list[tuple[int, str]] = []
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if kind == "enospc-after":
            budget, _, glob = rest.partition(":")
            enospc.append((int(budget), glob))
            continue
        glob, _, nth = rest.partition("#")
        counter = _Counter(spec, glob, int(nth or 1))
        {"kill-before-replace": before, "kill-after-replace": after, "kill-mid-write": mid}[kind].append(counter)

    def replacing(real):
        def patched(src, dst, *a, **kw):
            for c in before:
                if c.hit(dst):
                    _fired(c.spec)
            result = real(src, dst, *a, **kw)
            for c in after:
                if c.hit(dst):
                    _fired(c.spec)
            return result
        return patched

    written = [0]

    def patched_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        # Only files opened to be written anew count: fileio.atomic_target reopens each
        # temporary "rb+" just to fsync it, which writes nothing and must not take a kill's turn.
        if not isinstance(file, (str, bytes, os.PathLike)) or not any(m in mode for m in "wax"):
            return f
        path = os.path.abspath(os.fspath(file))
        kill = next((c for c in mid if c.hit(path)), None)
        budgets = [b for b, g in enospc if fnmatch.fnmatchcase(path, g)]
        if kill is None and not budgets:
            return f

        def on_write(real_file, data):
            if kill is not None:
                part = data[: max(1, len(data) // 2)] if isinstance(data, str) else \
                    memoryview(data).cast("B")[: max(1, memoryview(data).nbytes // 2)]
                real_file.write(part)
                real_file.flush()
                _fired(kill.spec)
            n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
            with _lock:
                if written[0] + n > min(budgets):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written[0] += n
            return real_file.write(data)

        return _File(f, on_write)

    os.replace, os.rename = replacing(real_replace), replacing(real_rename)
    builtins.open = io.open = patched_open


def main(argv: list[str]) -> None:
    if "--" not in argv:
        sys.exit("usage: faults.py [--fault SPEC]... -- ENSPIPE-ARGS")
    split = argv.index("--")
    opts, rest = argv[:split], argv[split + 1:]
    specs = [opts[i + 1] for i, o in enumerate(opts) if o == "--fault"]
    install(specs)
    from enspipe.cli import main as enspipe_main

    sys.argv = ["enspipe", *rest]
    enspipe_main(rest)


if __name__ == "__main__":
    # The tests' directory must not shadow anything: run the CLI with the repo's usual path.
    sys.path[0] = os.getcwd()
    main(sys.argv[1:])
