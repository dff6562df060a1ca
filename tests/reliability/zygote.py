"""Start `enspipe` processes without paying for the imports every time (tests only).

    python tests/reliability/zygote.py      # JSON requests on stdin, JSON events on stdout

A fresh `python -m enspipe` spends ~3.5 s of CPU importing torch, zarr, sklearn and
friends before it does anything; the reliability tests start dozens of them. This
"zygote" imports enspipe and those dependencies once, runs no computation (so no thread
pool exists to be broken by fork), and then forks one child per request. Each child is a
real, separate enspipe process: it resets its environment and working directory,
redirects stdout/stderr to the files named in the request, optionally installs the fault
hooks of faults.py (beside this file) and drops to another uid, and calls
`enspipe.cli.main(argv)` exactly as `python -m enspipe` does (an escaping exception is
printed as the interpreter would, exit status 1). The tests signal children by pid (SIGKILL, SIGSTOP, ...).

Request:  {"id": 1, "argv": [...], "env": {...}, "cwd": "...", "out": "...", "err": "...",
           "faults": ["kill-mid-write:..."], "uid": null}
Events:   {"id": 1, "pid": 1234}           once the child exists
          {"id": 1, "exit": -9, "maxrss": 812345}
                                           when it ends (negative: killed by that signal);
                                           maxrss: its peak resident memory in KiB (wait4)

The full sweep (ENSPIPE_SWEEP=full) does not use this: it starts every process as a fresh
`python -m enspipe` interpreter.
"""
from __future__ import annotations

import json
import os
import select
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def preload() -> None:
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import torch  # noqa: F401
    import torchvision.transforms.functional  # noqa: F401
    import zarr  # noqa: F401

    import enspipe.cli  # noqa: F401
    import enspipe.data  # noqa: F401
    import enspipe.diagnostics  # noqa: F401
    import enspipe.evaluate  # noqa: F401
    import enspipe.jobs  # noqa: F401
    import enspipe.precompute  # noqa: F401
    import enspipe.report  # noqa: F401
    import enspipe.stores.verify  # noqa: F401
    import enspipe.stores.wds.store  # noqa: F401
    import enspipe.stores.zarr_store  # noqa: F401
    import enspipe.train  # noqa: F401
    from enspipe.stores.manifest import _validator

    for name in ("manifest.v1.json", "zarr_layout.v1.json", "wds_layout.v1.json", "wds_layout.v2.json"):
        _validator(name)  # schemas are read lazily: read them now (a child may run as nobody)
    _validator("manifest.v1.json", "shard_record")
    _validator("manifest.v1.json", "identity")


def child(req: dict) -> None:
    code = 1
    try:
        fo = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        fe = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fo, 1)
        os.dup2(fe, 2)
        for fd in (fo, fe, null):
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        if req.get("faults"):
            sys.path.insert(0, HERE)
            import faults

            faults.install(req["faults"])
        if req.get("uid") is not None:
            os.setgroups([])
            os.setgid(req["uid"])
            os.setuid(req["uid"])
        from enspipe.cli import main

        argv = [str(a) for a in req["argv"]]
        sys.argv = ["enspipe", *argv]
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    preload()
    children: dict[int, int] = {}  # pid -> request id
    buf = b""
    out = sys.stdout

    def emit(event: dict) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    stdin_open = True
    while stdin_open or children:
        ready = select.select([0], [], [], 0.01)[0] if stdin_open else []
        if ready:
            data = os.read(0, 65536)
            if not data:
                stdin_open = False
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                out.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    child(req)
                children[pid] = req["id"]
                emit({"id": req["id"], "pid": pid})
        if not stdin_open and children:
            # The tests are gone: do not leave their processes behind.
            for pid in list(children):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        while children:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            rid = children.pop(pid, None)
            if rid is not None:
                emit({"id": rid, "exit": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss})


if __name__ == "__main__":
    sys.path[0] = os.getcwd()
    serve()
