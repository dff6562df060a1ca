"""Store URLs under throttling: which failures of a remote call a later try may not meet, and the
loop that tries such a call again within `remote_settings`; every failure in the end is one
StoreError line naming the URL. See `remote` for the contract.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import time
from typing import Callable, Iterator, NamedTuple, TypeVar

from enspipe.util.errors import StoreError

__all__ = ["BOTOCORE_ATTEMPTS", "RETRIES", "RETRY_MODE", "RETRY_S", "TIMEOUT_S", "RemoteSettings", "remote_settings"]


# Chosen from `bench_object_store.py --throttle` (BENCHMARKS.md, "object storage under throttling").
# The wait before try k+2 is drawn in [0, min(RETRY_MAX_WAIT_S, RETRY_BASE_S * 2**k)] (AWS's "full
# jitter": ranks throttled together do not all come back together).
RETRIES, RETRY_S, RETRY_MODE = 12, 60.0, "standard"
TIMEOUT_S = 10.0  # each connect and read of a remote call
RETRY_BASE_S, RETRY_MAX_WAIT_S = 0.2, 20.0
# botocore's attempts of a request inside each try (its `total_max_attempts`: before, `max_attempts` 2
# meant 3): one, so that the waits are this module's (botocore's first wait is up to 1 s whatever the
# error) and a dead endpoint costs one connect, not RETRIES.
BOTOCORE_ATTEMPTS = 1

# The waits' own source: the module-level `random` is seeded alike on every rank (`seed_everything`)
# and in loader worker i of every rank, so its draws would bring throttled ranks back in lockstep and
# would move the training's random stream. SystemRandom reads os.urandom: no state to share or fork.
_rng = random.SystemRandom()


def _wait(k: int) -> float:
    """Seconds to wait after try k+1 failed transiently: full jitter in [0, min(max, base * 2**k)]."""
    return _rng.uniform(0, min(RETRY_MAX_WAIT_S, RETRY_BASE_S * 2 ** k))


class RemoteSettings(NamedTuple):
    """A store URL's remote-call settings, read once per `Remote` (not on every call)."""
    timeout: float  # seconds of a connect or a read (ENSPIPE_REMOTE_TIMEOUT)
    tries: int  # tries of a transiently failing call at most (ENSPIPE_REMOTE_RETRIES)
    wait: float  # seconds of waiting between them at most (ENSPIPE_REMOTE_RETRY_S)
    mode: str  # botocore's retry mode (ENSPIPE_REMOTE_RETRY_MODE: standard or adaptive)


def env_number(name: str, default: float, kind: type, least: float, what: str):
    """The environment's NAME as a KIND of at least LEAST (DEFAULT when unset); a bad one is one
    StoreError line naming the variable (remote calls' settings, the store cache's cap)."""
    raw = os.environ.get(name)
    try:
        value = kind(raw) if raw is not None else kind(default)
    except ValueError:
        value = None
    if value is None or not value >= least:  # `not >=`: NaN refused too
        raise StoreError(f"{name} must be {what}, not {raw!r}")
    return value


def remote_settings() -> RemoteSettings:
    """The settings from the environment; a bad one is one StoreError line naming its variable."""
    env, number = os.environ, env_number
    timeout = number("ENSPIPE_REMOTE_TIMEOUT", TIMEOUT_S, float, 1e-3, "a number of seconds above 0")
    tries = number("ENSPIPE_REMOTE_RETRIES", RETRIES, int, 1, "a whole number of tries, at least 1")
    wait = number("ENSPIPE_REMOTE_RETRY_S", RETRY_S, float, 0, "a number of seconds, at least 0")
    mode = env.get("ENSPIPE_REMOTE_RETRY_MODE", RETRY_MODE)
    if mode not in ("adaptive", "standard"):
        raise StoreError(f"ENSPIPE_REMOTE_RETRY_MODE must be adaptive or standard, not {mode!r}")
    return RemoteSettings(timeout, tries, wait, mode)


# What a later try of the same call may not meet: S3's throttling and server errors (s3fs turns a
# 503 SlowDown into OSError EBUSY and a 500 InternalError into EREMOTEIO; a HEAD's answer has no
# body, so only its status) and connections the server cut off.
_THROTTLED = ("SlowDown", "reduce your request rate", "(503)", "ServiceUnavailable", "Service Unavailable")
_SERVER = ("InternalError", "internal error", "(500)", "(502)", "(504)", "Bad Gateway", "Gateway Timeout")
_DROPPED = {"ClientPayloadError", "ServerDisconnectedError", "ConnectionClosedError", "IncompleteRead",
            "IncompleteReadError", "ResponseStreamingError", "ConnectionResetError", "ResponseParserError"}


# What to do when a transient failure outlasts the tries, by what it was: the request rate is the
# user's to change only when the store throttled it; a gateway or node failing is an outage.
_RATE = ("the object store fails this request rate: run fewer ranks, loader or dask workers on it, or raise "
         "ENSPIPE_REMOTE_RETRIES / ENSPIPE_REMOTE_RETRY_S")
_HEALTH = ("check the endpoint (AWS_ENDPOINT_URL), the network and the store's health, or raise "
           "ENSPIPE_REMOTE_RETRIES / ENSPIPE_REMOTE_RETRY_S")
_THROTTLING = "throttled by the object store (503 SlowDown)"


def _transient(e: BaseException) -> str | None:
    """What a failure that a later try may not meet was; None for any other."""
    if isinstance(e, (FileNotFoundError, PermissionError)):
        return None
    text, code = str(e), getattr(e, "errno", None)
    if code == errno.EBUSY or any(t in text for t in _THROTTLED):
        return _THROTTLING
    if code == getattr(errno, "EREMOTEIO", 121) or any(t in text for t in _SERVER):
        return "the object store's server error (500 InternalError)"
    if type(e).__name__ in _DROPPED or isinstance(e, ConnectionResetError):
        return "the connection was cut off"
    if type(e).__name__ == "ReadTimeoutError":  # an overloaded store stalls a body: tried again (s3fs no longer
        # does, it makes one attempt); a connect timeout (ConnectTimeoutError) is the endpoint's and is not
        return "a read stalled past ENSPIPE_REMOTE_TIMEOUT"
    if type(e).__name__ == "FlexibleChecksumError":  # botocore's check of the object's S3 checksum
        return "the bytes arrived damaged (their S3 checksum does not match)"
    return None


T = TypeVar("T")


class _ObjectFailed(Exception):
    """One object of a call on many failed (`Remote.cat_many`): its line names the object."""

    def __init__(self, url: str, error: BaseException) -> None:
        super().__init__(url)
        self.url, self.error = url, error


class _Transient(Exception):
    """A try's transient failure, with the StoreError line it ends in when no try is left."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


def _retrying(url: str, doing: str, fn: Callable[[], T], settings: RemoteSettings) -> T:
    """fn(), tried again after a jittered wait while it fails transiently (`_transient`), within
    `settings` (its tries and wait); any failure in the end is one StoreError line naming the URL."""
    tries, budget = settings.tries, settings.wait
    waited = 0.0
    for k in range(tries):
        try:
            with _calling(url, doing, tried=(k + 1, waited)):
                return fn()
        except _Transient as t:
            wait = _wait(k)
            if k + 1 == tries or waited + wait > budget:
                raise t.error from None
            time.sleep(wait)
            waited += wait
    raise AssertionError("unreachable: the last try returns or raises")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 300 else text[:297] + "..."


@contextlib.contextmanager
def _calling(url: str, doing: str, tried: tuple[int, float]) -> Iterator[None]:
    """Any failure of a try of `_retrying` (`tried`: this try's number and the seconds waited before
    it) -> one StoreError line naming the URL and what to check; a transient failure is raised as
    `_Transient`, carrying its line."""
    try:
        yield
    except StoreError:
        raise
    except _ObjectFailed as failed:
        with _calling(failed.url, "read", tried):
            raise failed.error from None
    except FileNotFoundError as e:
        raise StoreError(f"cannot {doing} {url}: not found ({_one_line(e)}); check the bucket and prefix") from None
    except PermissionError as e:
        raise StoreError(f"cannot {doing} {url}: permission denied ({_one_line(e)}); check the credentials "
                         "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the fsspec config) and the bucket's policy") from None
    except Exception as e:  # botocore/aiohttp/... errors: one line, never a traceback
        name = type(e).__name__
        why = _transient(e)
        if why is not None:
            n, waited = tried
            raise _Transient(StoreError(
                f"cannot {doing} {url}: {why}, {n} tr{'y' if n == 1 else 'ies'} over {waited:.1f} s ({name}: "
                f"{_one_line(e)}); {_RATE if why == _THROTTLING else _HEALTH}")) from None
        hint = ("set credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the fsspec config)"
                if "Credential" in name or "credential" in str(e)
                else "check the endpoint (AWS_ENDPOINT_URL), the network and the credentials")
        raise StoreError(f"cannot {doing} {url}: {name}: {_one_line(e)}; {hint}") from None
