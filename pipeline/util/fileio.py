"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file enspipe writes goes through here: the bytes go to a unique temporary name in the
target's directory (so two writers of one file never share a temporary), are flushed and
fsynced, get the process umask's permissions (a temporary from mkstemp is 0600; the result
must be readable by whoever may read the target, as `open()` would make it), and are
renamed over the target. On any error the temporary is removed and the target is left as
it was, and an OSError that names no file (a `write()` into a full disk) is raised again
naming the target, so the user's one line says which file could not be written.
Temporaries are named `.NAME.PID.HEX.tmp`, which readers and listings skip.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_target", "atomic_write", "atomic_write_json", "dir_bytes", "file_lock", "hold_folder", "is_temporary", "naming",
           "parse_json", "process_umask", "read_text_file", "release_folder"]


def process_umask() -> int:
    """The process umask, read without changing it (Linux exposes it in /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, once
    os.umask(mask)
    return mask


_UMASK = process_umask()


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under path (links not followed; a file hard-linked twice counts twice)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def naming(err: OSError, path: str | os.PathLike) -> OSError:
    """`err`, or when it names no file (ENOSPC from a write(), EIO, ...), the same error
    naming `path`: what the CLI's one line prints after the message."""
    if err.filename is not None or err.errno is None:
        return err
    return type(err)(err.errno, err.strerror or os.strerror(err.errno), os.fspath(path))


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to (for writers that take a file
    name: torch.save, safetensors, matplotlib); on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        raise naming(e, path)  # the original stays its __context__
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = True) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically; return the path."""
    path = Path(path)
    with atomic_target(path, fsync=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      strict: bool = False) -> Path:
    """JSON to `path` atomically. `strict` refuses NaN/inf and non-JSON types (stored
    artefacts); otherwise those are written as JSON's extensions / their str()."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=not strict,
                      default=None if strict else str)
    return atomic_write(path, text + "\n")


def read_text_file(path: str | os.PathLike, *, limit: int | None = None) -> str:
    """A small text file (a job spec), refused in one line naming it when it is larger than
    `limit` bytes (default: the metadata cap) or not UTF-8 text, before it is read whole."""
    from enspipe.util.errors import ConfigError
    from enspipe.util.limits import current_limits

    path = Path(path)
    cap = current_limits().max_metadata_bytes if limit is None else limit
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ConfigError(f"{path}: larger than the limit of {cap} bytes (raise it with ENSPIPE_MAX_METADATA_BYTES)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_json(text: str | bytes, path: str | os.PathLike, error: type[Exception] | None = None) -> Any:
    """json.loads that fails with one line naming `path`: truncated or malformed JSON, and
    JSON nested so deeply that Python's parser runs out of recursion (a RecursionError, which
    json raises for a few thousand nested brackets), are `error` (default ConfigError)."""
    if error is None:
        from enspipe.util.errors import ConfigError as error
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{path}: nested too deeply to be read as JSON") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


# --- One writer per folder --------------------------------------------------------------------

FOLDER_LOCK = ".enspipe.lock"  # in the folder it guards; hidden, and never a result file
_held_folders: dict[str, Any] = {}  # resolved folder -> the open lock file (its flock is held)


def hold_folder(folder: str | os.PathLike, *, what: str, field: str) -> None:
    """Take an exclusive flock on FOLDER/.enspipe.lock for this process, until
    `release_folder` (or the process dies: the OS drops the lock, so a SIGKILLed run never
    blocks its resume). Holding it already is fine. Another process holding it is one line
    (a ConfigError naming `field`, the option that chose the folder) and nothing is written.
    The folder must exist."""
    import fcntl

    from enspipe.util.errors import ConfigError

    key = os.path.realpath(folder)
    if key in _held_folders:
        return
    path = Path(folder) / FOLDER_LOCK
    while True:
        try:
            f = open(path, "a+")
        except OSError:
            # A folder this user cannot write: flock needs only a readable file, and where
            # there is none the command fails on its own first write, naming the file.
            try:
                f = open(path)
            except OSError:
                return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(64).strip()
            f.close()
            raise ConfigError(f"{folder} is in use by another {what}{f' (pid {holder})' if holder.isdigit() else ''}; "
                              f"wait for it to end or choose another `{field}`") from None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # its holder removed the file we locked as it ended: lock the new one
    with contextlib.suppress(OSError):  # the holder's pid, for the refusal's line
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
    _held_folders[key] = f


def release_folder(folder: str | os.PathLike) -> None:
    """Drop this process's lock on `folder` (if held) and remove its file, so a finished
    folder holds only results (a killed process leaves the file; the next one reuses it)."""
    key = os.path.realpath(folder)
    f = _held_folders.pop(key, None)
    if f is not None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(key, FOLDER_LOCK))  # while held: see hold_folder's inode check
        f.close()  # closing the last descriptor releases the flock


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = False) -> Iterator[bool]:
    """An advisory flock on `path` (created if missing), released on exit or when the
    process dies, so a killed job never leaves a stale lock. Yields whether it is held.
    A lock file that another process removed while we waited is opened again, so two
    processes never hold locks on two different files of one name."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:
                    continue  # gc removed the file we locked: lock the new one
            except FileNotFoundError:
                continue
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            return
