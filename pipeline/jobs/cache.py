"""The job runner's step cache, and the job outputs a user can move.

    CACHE/steps/KIND-NAME-KEY.json   a finished step's record: its key, options and outputs
    CACHE/steps/KIND-NAME-KEY.lock   held (flock) while a process runs that step
    CACHE/runs/, stores/, evaluate/, diagnose/   the steps' outputs
    CACHE/jobs/ID.json (+ .lock)     each job output folder that uses the cache: its --out and
                                     the keys of its steps; the lock is held while it runs

A job's `--out` holds real files: a step's output is *published* there as hard links to the
cached files where both are on one filesystem (no space used), else as copies; small result
folders are always copied. So `cp -r`, `tar` or `shutil.copytree` of a job folder carries
everything, and removing the cache never breaks one. `OUT/.enspipe/published.json` lists what
enspipe published, which is all it ever replaces there.

`gc` removes the cached steps that no existing job output references and no process holds;
nothing outside the cache's own folders (e.g. CACHE/data, the default data root) is touched.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from enspipe.util.errors import ConfigError
from enspipe.util.fileio import FOLDER_LOCK, atomic_write_json, dir_bytes, file_lock, process_umask
from enspipe.stores.registry import format_of

__all__ = ["CacheEntry", "cache_entries", "default_cache", "gc", "is_cache_link", "publish", "register_job"]

OUTPUT_DIRS = ("runs", "stores", "evaluate", "diagnose")  # what a step may write under the cache
PUBLISHED = Path(".enspipe") / "published.json"


def default_cache() -> Path:
    return Path(os.environ.get("ENSPIPE_CACHE", Path.home() / ".cache" / "enspipe"))


# --- Locks ----------------------------------------------------------------------------------


def _held(path: Path) -> bool:
    """Does another process hold the lock at `path`?"""
    if not path.exists():
        return False
    with file_lock(path) as got:
        return not got


# --- Job registrations (what gc keeps) ------------------------------------------------------

def _job_id(out: Path) -> str:
    return hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]


@contextlib.contextmanager
def register_job(cache: Path, out: Path, *, name: str, spec: Path, keys: dict[str, str]) -> Iterator[None]:
    """Record that the job output `out` uses the steps `keys` ({step id: key}); hold its
    lock while the job runs, so that gc keeps every step of a running job."""
    base = cache / "jobs" / _job_id(out)
    with file_lock(base.with_suffix(".lock"), blocking=True):
        atomic_write_json(base.with_suffix(".json"), {"out": str(out.resolve()), "name": name,
                                                      "spec": str(spec.resolve()), "steps": keys,
                                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        yield


def _registrations(cache: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((cache / "jobs").glob("*.json")):
        try:
            reg = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        reg["_path"], reg["_running"] = path, _held(path.with_suffix(".lock"))
        # A job output still references its steps while its folder holds what enspipe published.
        reg["_live"] = reg["_running"] or (Path(reg.get("out", "")) / PUBLISHED).is_file()
        out.append(reg)
    return out


# --- Publishing -----------------------------------------------------------------------------

def _published(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / PUBLISHED).read_text())
    except (OSError, ValueError):
        return {}


def _copy_tree(src: Path, dest: Path, *, link: bool) -> None:
    """src's files into the new folder dest: hard links if `link` and the filesystem allows
    them (same filesystem), else copies. Symlinks inside src are copied as what they point to."""
    can_link = link
    for dirpath, dirnames, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        dirnames[:] = [d for d in dirnames if not (d.startswith(".") and d.endswith(".tmp"))]
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if (name.startswith(".") and name.endswith(".tmp")) or name == FOLDER_LOCK:
                continue  # a writer's temporary; the lock of the run that wrote the folder
            s, d = Path(dirpath) / name, dest / rel / name
            if can_link and not s.is_symlink():
                try:
                    os.link(s, d)
                    continue
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                        raise
                    can_link = False  # another filesystem (or one without hard links): copy the rest
            shutil.copy2(s, d)


def is_cache_link(path: Path, cache: Path) -> bool:
    """Is `path` a symlink into the cache (what earlier versions published, so enspipe's to replace)?"""
    if not path.is_symlink():
        return False
    target = Path(os.readlink(path))
    return any(_inside(t, cache) for t in (Path(os.path.abspath(target)), path.parent / target))


def _remove_stale_temporaries(dest: Path) -> None:
    """The `.NAME.*.tmp` folders an interrupted publish of `dest` left beside it. Only one
    process publishes into a job folder at a time (register_job's lock), so none is live."""
    with contextlib.suppress(OSError):
        for p in dest.parent.iterdir():
            if p.name.startswith(f".{dest.name}.") and p.name.endswith(".tmp") and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def publish(src: str | os.PathLike, out: Path, rel: str, *, key: str, link: bool, cache: Path) -> Path:
    """Publish the cached output `src` at `out/rel` as real files (see the module docstring).
    An existing `out/rel` is replaced only if enspipe published it (or it is a symlink into
    the cache, as earlier versions published); anything else there is an error."""
    src, dest = Path(src), out / rel
    book = _published(out)
    entry = book.get(rel)
    # A step whose publishing was interrupted (killed between the rename and the final
    # record) is recorded as `publishing`: the folder is enspipe's, and published again.
    if dest.is_symlink():
        if not is_cache_link(dest, cache) and entry is None:
            raise ConfigError(f"{dest} exists and was not written by enspipe; move it away or choose another `out`")
    elif dest.exists():
        if entry is None:
            raise ConfigError(f"{dest} exists and was not written by enspipe; move it away or choose another `out`")
        if entry.get("key") == key and not entry.get("publishing"):
            return dest  # already published
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dest)
    # Intent first: once the record says enspipe is publishing `rel`, whatever a kill leaves
    # at `dest` (the new folder, or none) is recognised as enspipe's by the next run.
    book[rel] = {"key": key, "source": str(src), "publishing": True}
    atomic_write_json(out / PUBLISHED, book)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp makes 0700; a job folder is as shareable as any other
    try:
        _copy_tree(src, tmp, link=link)
        if dest.is_symlink():
            dest.unlink()
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", suffix=".tmp", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    book[rel] = {"key": key, "source": str(src)}
    atomic_write_json(out / PUBLISHED, book)
    return dest


# --- Listing and gc -------------------------------------------------------------------------

@dataclass
class CacheEntry:
    """One cached step (or an output folder no step record names: `orphan`)."""

    kind: str
    name: str
    key: str
    outputs: list[Path]
    bytes_on_disk: int
    record: Path | None
    lock: Path | None
    jobs: list[str] = field(default_factory=list)   # job outputs (--out) that reference it
    running: bool = False

    @property
    def status(self) -> str:
        if self.running:
            return "running"
        if self.record is None:
            return "orphan"
        return "used" if self.jobs else "unused"


def _inside(path: Path, cache: Path) -> bool:
    try:
        return path.resolve().is_relative_to(cache.resolve()) and path.resolve() != cache.resolve()
    except OSError:
        return False


def cache_entries(cache: str | os.PathLike) -> list[CacheEntry]:
    """Every cached step with its size, the job outputs that use it and whether it runs."""
    cache = Path(cache)
    regs = _registrations(cache)
    users: dict[str, list[str]] = {}
    for reg in regs:
        if reg["_live"]:
            for key in reg.get("steps", {}).values():
                users.setdefault(key, []).append(reg.get("out", "?"))
    entries, named = [], set()
    for rec_path in sorted((cache / "steps").glob("*.json")):
        try:
            rec = json.loads(rec_path.read_text())
            kind, name = rec["step"].split(".", 1)
            outputs = [Path(p) for p in rec.get("outputs", {}).values()]
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        # A results file stands for its step's folder (results.json, diagnostics.json + figures).
        outputs = [p.parent if p.suffix == ".json" and p.parent.parent.name in ("evaluate", "diagnose") else p
                   for p in outputs if _inside(p, cache)]
        named.update(p.resolve() for p in outputs)
        lock = rec_path.with_suffix(".lock")
        entries.append(CacheEntry(kind, name, rec.get("key", ""), outputs,
                                  sum(dir_bytes(p) if p.is_dir() else _size(p) for p in outputs), rec_path, lock,
                                  users.get(rec.get("key", ""), []), _held(lock)))
    # Output folders no record names: a step killed before it finished (or a record removed).
    for kind_dir, kind in (("runs", "models"), ("evaluate", "evaluate"), ("diagnose", "diagnose")):
        for p in sorted((cache / kind_dir).glob("*")):
            if p.is_dir() and not p.name.startswith(".") and p.resolve() not in named:
                name, _, key = p.name.rpartition("-")
                lock = cache / "steps" / f"{kind}-{p.name}.lock"
                entries.append(CacheEntry(kind, name or p.name, key, [p], dir_bytes(p), None, lock,
                                          [], _held(lock)))
    for p in sorted(_stores_under(cache / "stores")):
        if p.resolve() not in named:
            entries.append(CacheEntry("stores", p.name, "", [p], dir_bytes(p), None, None, []))
    return entries


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _stores_under(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        keep = []
        for d in dirnames:
            if format_of(d) is not None:
                found.append(Path(dirpath) / d)
            elif not d.startswith("."):
                keep.append(d)
        dirnames[:] = keep
    return found


def gc(cache: str | os.PathLike, *, dry_run: bool = False) -> list[CacheEntry]:
    """Remove the cached steps that no existing job output references and no process holds
    (and the registrations of job outputs that are gone); return what was (with dry_run:
    would be) removed. Orphan outputs are removed only while no job runs on the cache."""
    cache = Path(cache)
    regs = _registrations(cache)
    any_running = any(r["_running"] for r in regs) or any(
        _held(p) for p in (cache / "steps").glob("*.lock"))
    removed = []
    for entry in cache_entries(cache):
        if entry.jobs or entry.running or (entry.record is None and any_running):
            continue
        removed.append(entry)
        if dry_run:
            continue
        with contextlib.ExitStack() as stack:
            if entry.lock is not None and entry.lock.exists():
                if not stack.enter_context(file_lock(entry.lock)):
                    removed.pop()  # a process took it meanwhile
                    continue
            for p in entry.outputs:
                if _inside(p, cache):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if entry.record is not None:
                entry.record.unlink(missing_ok=True)
            if entry.lock is not None:
                entry.lock.unlink(missing_ok=True)
    if not dry_run:
        for reg in regs:
            if not reg["_live"]:
                reg["_path"].unlink(missing_ok=True)
                reg["_path"].with_suffix(".lock").unlink(missing_ok=True)
    return removed
