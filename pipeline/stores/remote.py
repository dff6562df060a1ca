"""Stores on object storage (`s3://`, `gs://`, ... through fsspec): written whole-object, read
through a size-capped local cache.

A store URL names the same layout as a local store folder, object for file. The store's
promises hold because every write is a whole object and every read is a whole object checked
against its sha256:

- Writing (`remote_write.RemoteWriter`, in precompute's process or on any dask worker): the
  backend writes a shard into a private local staging folder exactly as it writes a local
  store, then each of the shard's files is uploaded as one object (a PUT is atomic: an object is
  visible only complete), then its completion record `shards/NNNNNN.json`, last. A killed upload
  leaves no record, so the shard is pending and rewritten on resume; finished shards are skipped.
  Two writers of one shard upload identical bytes. `finalize` checks every record's objects by
  size and writes the manifest last.
- Reading (`remote_read.open_remote`): the manifest is read and checked, the format's metadata
  (zarr.json, ...) is made locally from it in a mirror folder under `cache_dir`, and the
  backend's own reader runs on that mirror. Before a read touches a shard, its objects are
  downloaded whole, their sha256 checked against the record (a corrupt or half-written object
  is refused naming the URL), and kept: a second epoch reads them from disk. The cache is
  capped (`cache_bytes`): least recently used shard files are evicted under an exclusive lock
  that waits for reads in progress (they hold a shared lock), so a file is never removed under
  a reader in another process (loader workers and ranks of one machine share the cache).
  Whole objects, not zarr's byte ranges (zarr.storage.FsspecStore): a zarr shard's chunks carry
  no checksum (zarr_store.check_file_once), so only a whole object's sha256 can be checked.
- Checked when: opening a store URL lists it once and reads the manifest (an incomplete store's
  record objects too, fetched in one concurrent call; a complete store's never: it is read by its
  manifest's records); every recorded object must be listed with its recorded size. Train and
  evaluate then check it before their first step without downloading any shard payload
  (`verify.check_against`): the identity and zarr's keys objects. Each object's sha256 is
  checked when a read downloads it, before any of its bytes are used. `enspipe verify URL`
  downloads and hashes every object and decodes every shard.

Endpoint and credentials: fsspec's configuration and the usual environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...). Every remote call has a bounded timeout (`ENSPIPE_REMOTE_TIMEOUT`
seconds, default 10); every failure is one StoreError line naming the URL. The ENSPIPE_REMOTE_*
settings are read once per `Remote` (`remote_retry.remote_settings`).

Throttling (`remote_retry`): many ranks and dask workers on one bucket make S3 answer 503 SlowDown
(and now and then 500 InternalError, or cut a connection off). s3fs retries a SlowDown and a cut-off
body itself; here it and botocore make one attempt per request (`BOTOCORE_ATTEMPTS`), and a call
that ends in one of those failures (`remote_retry._transient`) is tried again, whole (every call is
idempotent: a GET, a listing, a HEAD, or a PUT of a whole object), after a jittered exponential wait:
ENSPIPE_REMOTE_RETRIES tries at most, ENSPIPE_REMOTE_RETRY_S seconds of waiting at most; then one
line that says the store was throttled. Anything else (no such endpoint, a connect timeout, denied,
not found) is not tried again: a dead endpoint fails after one connect. botocore's "standard" retry
mode, or "adaptive" (ENSPIPE_REMOTE_RETRY_MODE): its client-side rate limiter sent fewer requests
to a rate-limited proxy at the same speed, but slowed runs with a share of all requests refused
2-10x (BENCHMARKS.md, "object storage under throttling").
"""
from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

from enspipe.util.errors import StoreError

from .remote_retry import BOTOCORE_ATTEMPTS, RemoteSettings, env_number, _ObjectFailed, _one_line, _retrying, _transient, remote_settings

__all__ = ["Remote", "cache_settings", "check_remote_root", "fetch_records", "is_url", "join", "local_path",
           "open_remote", "remote_settings"]

MANIFEST = "manifest.json"
RECORDS = "shards"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(x: Any) -> bool:
    """A store URL on a remote filesystem (`file://` URLs are local paths: see `local_path`)."""
    return isinstance(x, str) and bool(_URL.match(x)) and not x.startswith("file://")


def local_path(x: Any) -> Any:
    """`file:///a/b` -> `/a/b`; anything else unchanged."""
    return x[len("file://"):] if isinstance(x, str) and x.startswith("file://") else x


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def cache_settings() -> tuple[Path, int]:
    """Where remote stores are cached and how many bytes of shard files at most per store (environment:
    ENSPIPE_STORE_CACHE, default ~/.cache/enspipe/stores; ENSPIPE_STORE_CACHE_BYTES, default 20 GiB; each store's
    mirror is capped on its own, under its own lock)."""
    root = os.environ.get("ENSPIPE_STORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "enspipe", "stores")
    # A negative cap would evict everything on every read and never let a prefetch fit.
    return Path(root), env_number("ENSPIPE_STORE_CACHE_BYTES", 20 << 30, int, 0, "a number of bytes, at least 0")


# --------------------------------------------------------------------------- the filesystem


def _fs(url: str, settings: RemoteSettings):
    """(fsspec filesystem, path inside it) of a URL, with `settings`' timeouts and retries."""
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec
    except ImportError:
        raise StoreError(f"{url}: store URLs need fsspec (pip install 'enspipe[s3]')") from None
    opts: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        t = settings.timeout
        opts = {"config_kwargs": {"connect_timeout": t, "read_timeout": t,
                                  "retries": {"total_max_attempts": BOTOCORE_ATTEMPTS, "mode": settings.mode}}}
        if os.environ.get("AWS_ENDPOINT_URL"):
            opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        raise StoreError(f"{url}: no filesystem for {protocol}:// is installed ({e}); "
                         f"pip install the fsspec backend (s3fs for s3://, gcsfs for gs://)") from None
    except Exception as e:
        raise StoreError(f"{url}: {_one_line(e)}") from None
    if protocol in ("s3", "s3a"):
        # s3fs's own loop (5 tries of a SlowDown or a cut-off, fixed 0.1 * 1.7**i waits: in lockstep
        # across clients; 5 read timeouts on a hung endpoint) would multiply `_retrying`'s tries:
        # one try each, so the jittered whole-call retries are the only ones.
        fs.retries = 1
    return fs, path


class Remote:
    """One store URL and its filesystem: whole-object reads, writes and listings."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.settings = remote_settings()  # once: not re-read per shard object
        self.fs, self.root = _fs(self.url, self.settings)
        self.root = self.root.rstrip("/")
        # s3fs asks for an object's size (a HEAD) before every whole-object GET, to split large
        # ones into concurrent ranges; the objects `cat` fetches are small (records, manifests,
        # shard objects up to remote_cache's in-memory bound): one GET each.
        params = inspect.signature(self.fs._cat_file).parameters if hasattr(self.fs, "_cat_file") else {}
        self._one_get: dict[str, Any] = {"max_concurrency": 1} if "max_concurrency" in params else {}

    @property
    def on_s3(self) -> bool:
        """Whether the filesystem is s3fs: one botocore request by `_call_s3` (its exists() answers
        False for any failure, a SlowDown too; its info() of a missing key lists the prefix too)."""
        return hasattr(self.fs, "call_s3")

    def _call_s3(self, op: str, rel: str | None = None) -> Any:
        """s3fs's one botocore request `op` on the object `rel` of the store, or on its bucket (None)."""
        bucket, key, _ = self.fs.split_path(self._p(rel or ""))
        return self.fs.call_s3(op, Bucket=bucket, **({} if rel is None else {"Key": key}))

    def _retry(self, url: str, doing: str, fn):
        return _retrying(url, doing, fn, self.settings)

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def cat(self, rel: str) -> bytes:
        return self._retry(join(self.url, rel), "read", lambda: self.fs.cat_file(self._p(rel), **self._one_get))

    def cat_many(self, rels: list[str]) -> dict[str, bytes | None]:
        """{name: bytes, or None when there is no such object} of many objects, in one call:
        concurrent on async filesystems (s3fs, gcsfs: fsspec's `cat` of a list gathers the GETs;
        s3fs's botocore client has at most 10 connections per process, so ~10 in flight at once),
        one by one on others. Any other failure is one StoreError line naming
        the first object that failed."""
        if not rels:
            return {}
        paths = {self._p(rel): rel for rel in rels}
        got: dict[str, Any] = {}
        todo = list(paths)

        def fetch() -> None:
            # Tried again (`_retrying`): the objects whose GET failed; the first failure that is not
            # transient ends the call, naming its object.
            got.update(self.fs.cat(list(todo), on_error="return", **self._one_get))
            for p in list(todo):
                value = got.get(p, FileNotFoundError(p))
                if isinstance(value, FileNotFoundError):
                    value = got[p] = None  # no such object
                if not isinstance(value, BaseException):
                    todo.remove(p)
            for p in sorted(todo, key=lambda p: _transient(got[p]) is not None):
                raise _ObjectFailed(join(self.url, paths[p]), got[p])

        self._retry(self.url, "read objects of", fetch)
        return {rel: got.get(path) for path, rel in paths.items()}

    def _head(self, rel: str) -> int | None:
        """Bytes of one object, None when there is none: one HEAD on s3fs (its info() of a missing
        key lists the prefix too, a second request that a throttled bucket may refuse)."""
        if self.on_s3:
            try:
                return int(self._call_s3("head_object", rel)["ContentLength"])
            except FileNotFoundError:
                return None
        try:
            return int(self.fs.info(self._p(rel))["size"])
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return self._retry(join(self.url, rel), "reach", lambda: self._head(rel) is not None)

    def put_bytes(self, rel: str, data: bytes) -> None:
        self._retry(join(self.url, rel), "write", lambda: self.fs.pipe_file(self._p(rel), data))

    def put_file(self, local: Path, rel: str) -> None:
        self._retry(join(self.url, rel), "write", lambda: self.fs.put_file(str(local), self._p(rel)))

    def get_file(self, rel: str, local: Path) -> None:
        self._retry(join(self.url, rel), "read", lambda: self.fs.get_file(self._p(rel), str(local)))

    def size(self, rel: str) -> int | None:
        """Bytes of one object, None when there is none."""
        return self._retry(join(self.url, rel), "reach", lambda: self._head(rel))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{relative name: bytes} of every object under the store (or under `prefix` in it)."""
        base = self._p(prefix)

        def find() -> dict:
            try:
                return self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
            finally:
                self.fs.invalidate_cache()  # a listing cut short is not kept either

        found = self._retry(join(self.url, prefix), "list", find)
        out = {}
        for name, info in found.items():
            name = name.rstrip("/")
            if name.startswith(self.root + "/"):
                out[name[len(self.root) + 1:]] = int(info.get("size") or 0)
        return out

    def json(self, rel: str, what: str) -> Any:
        try:
            raw = self.cat(rel)
        except StoreError as e:
            if "not found" in str(e):
                raise StoreError(f"{what} {join(self.url, rel)} does not exist.") from None
            raise
        try:
            return json.loads(raw)
        except ValueError as e:
            raise StoreError(f"{what} {join(self.url, rel)} cannot be read: {e}.") from None


def _dump(doc: Any, indent: int | None) -> bytes:
    return json.dumps(doc, indent=indent, sort_keys=True, allow_nan=False).encode("utf-8")


def check_remote_root(url: str) -> None:
    """Fail fast (one line) when a store ROOT URL's bucket cannot be reached or does not exist."""
    r = Remote(url)
    bucket = r.root.split("/", 1)[0]

    def probe() -> bool:
        if r.on_s3:
            try:
                r._call_s3("head_bucket")
                return True
            except FileNotFoundError:
                return False
            except PermissionError:
                # S3 answers 403 only for a bucket that exists (no s3:ListBucket for these
                # credentials): the first real call names the denial. Not exists(): it answers
                # False for any failure, a SlowDown or a denial too.
                return True
        try:  # other filesystems: not exists(), which answers False for any failure (fsspec's bare except)
            r.fs.info(bucket)
            return True
        except FileNotFoundError:
            return False

    if not r._retry(url, "reach", probe):
        raise StoreError(f"cannot use {url}: the bucket {bucket} does not exist (or is not visible with "
                         "these credentials); create it first")


# --------------------------------------------------------------------------- manifests


def read_remote_manifest(url: str, sizes: dict[str, int] | None = None) -> dict:
    """The checked manifest of a store URL (`sizes`: the store's listing, when the caller has it)."""
    from .manifest import check_manifest

    r = Remote(url)
    if not (MANIFEST in sizes if sizes is not None else r.exists(MANIFEST)):
        if sizes if sizes is not None else r.sizes():
            raise StoreError(f"{url} exists but is not an enspipe store (no {MANIFEST}).")
        raise StoreError(f"store {url} does not exist.")
    manifest = r.json(MANIFEST, "store manifest")
    check_manifest(manifest, f"store {url}")
    return manifest


def existing_remote_manifest(url: str) -> dict | None:
    return read_remote_manifest(url) if Remote(url).exists(MANIFEST) else None


def fetch_records(r: Remote, manifest: dict, sizes: dict[str, int]) -> dict[int, Any]:
    """{shard: its completion record object parsed, None when it cannot be parsed} of every record
    object the listing `sizes` holds, fetched in one concurrent call (`Remote.cat_many`): ~1,250
    records of an ImageNet store in one round of GETs, not one after another."""
    names = {}
    for name in sizes:
        m = re.fullmatch(rf"{RECORDS}/(\d{{6}})\.json", name)
        if m and int(m.group(1)) < manifest["num_shards"]:
            names[name] = int(m.group(1))
    out: dict[int, Any] = {}
    for name, raw in r.cat_many(sorted(names)).items():
        if raw is None:
            continue  # removed since the listing: no record
        try:
            out[names[name]] = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # bad UTF-8 or JSON, nested too deeply: as a local read_record
            out[names[name]] = None
    return out


def _records(r: Remote, manifest: dict, sizes: dict[str, int] | None = None) -> dict[int, dict]:
    """The valid completion records: the manifest's once complete, else the record objects whose
    shard objects all exist with their recorded sizes (`manifest.store_records`, as a local
    store's; one listing of the store, or `sizes`; the records fetched in one call)."""
    if manifest["complete"]:
        return {int(k): v for k, v in manifest["shards"].items()}
    sizes = r.sizes() if sizes is None else sizes
    return valid_records(manifest, fetch_records(r, manifest, sizes), sizes)


def valid_records(manifest: dict, stored: dict[int, Any], sizes: dict[str, int]) -> dict[int, dict]:
    """The valid ones of an incomplete store's record objects `stored` (`fetch_records`), against
    the listing `sizes`."""
    from .manifest import store_records

    return {c.shard: c.rec for c in store_records(manifest, stored.get, sizes.get) if c.ok}


def open_remote(url: str, **kw: Any):
    """The backend's reader of a store URL on its local cache (see `remote_read.open_remote`)."""
    from .remote_read import open_remote as _open

    return _open(url, **kw)
