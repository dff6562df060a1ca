"""Servers on 127.0.0.1 for tests: a free port, and moto's standalone S3 server with a fresh bucket
per test (the `s3_endpoint` / `s3` fixtures, registered once in tests/conftest.py so that one server
serves the whole session, not one per test module that imported them)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's standalone S3 server in its own process on a free loopback port."""
    pytest.importorskip("moto.server", reason="object-store tests need pip install -e '.[s3]'")
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a bound far above a start under load, not a timing
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """A fresh bucket; the environment a user sets (endpoint, credentials) and a private cache."""
    s3fs = pytest.importorskip("s3fs", reason="object-store tests need pip install -e '.[s3]'")

    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "ENSPIPE_STORE_CACHE": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing", skip_instance_cache=True)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return {"fs": fs, "bucket": bucket, "env": {**os.environ, **env}, "cache": tmp_path / "cache"}


# --------------------------------------------------------------------------- a throttling S3 proxy

_S3_ERRORS = {
    # S3's own answers (status, code, message) when a prefix is hot or a node fails.
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    # A bucket's owner denying these credentials (S3 answers a HEAD of an existing bucket so).
    "denied": (403, "AccessDenied", "Access Denied"),
}


class ThrottleProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint (the session's moto server) that
    answers some requests as a throttled S3 does, and forwards the rest unchanged.

    Which requests fail: `fraction` of them (drawn from `random.Random(seed)` in arrival order), or
    the first `first` requests of each (method, object) (deterministic whatever the order; a
    listing is one "object"), or `always` (after the first `after` requests), or those beyond `rps`
    requests a second (a token bucket holding one second's worth: how S3 throttles a hot prefix),
    only of `methods` and of paths holding `match` when given. How each fails, from `kinds` in turn
    (the k-th of an object's `first` refusals: kinds[k], whatever other objects' requests do):

    - "slowdown": 503 with S3's `SlowDown` error XML (a HEAD gets the status only, as S3 sends);
    - "internal": 500 with S3's `InternalError` XML;
    - "denied": 403 with S3's `AccessDenied` XML (not a throttling: what a bucket without the
      credentials' s3:ListBucket answers);
    - "drop": a GET of an object is forwarded and its answer cut off mid-body (the status and the
      full Content-Length sent, then half the bytes, then the connection closed); any other request
      is closed unanswered, before it reaches the server (nothing written);
    - "truncate": a GET of an object answered 200 with the first half of its bytes and a
      Content-Length that says so: only a checksum can tell (botocore checks the object's
      x-amz-checksum-* header when the object has one, as moto's and S3's new objects do);
    - "truncate-unchecked": the same, the object's checksum headers left out (objects written
      without one, or an S3-compatible server that keeps none): only enspipe's record can tell;
    - "flip-unchecked": a GET's body whole but its last byte changed, no checksum headers: only a
      sha256 can tell.

    `counts` holds what the proxy saw: requests (all), by method, faults by kind, forwarded."""

    def __init__(self, upstream: str, *, fraction: float = 0.0, first: int = 0, always: bool = False,
                 after: int = 0, rps: float = 0.0, methods: tuple[str, ...] | None = None,
                 match: str | None = None, seed: int = 0,
                 kinds: tuple[str, ...] = ("slowdown",)) -> None:
        import http.server
        import random
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.fraction, self.first, self.always, self.kinds = float(fraction), int(first), bool(always), tuple(kinds)
        self.after, self.rps, self.methods, self.match = int(after), float(rps), methods, match
        self._tokens, self._filled = self.rps, time.monotonic()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}
        self._turn = 0
        self.counts: dict = {}
        self.reset()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pooled connections expect

            def log_message(self, *a) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="throttle-proxy", daemon=True)
        self._thread.start()

    def reset(self) -> dict:
        """The counts so far, and zero them (and each object's count of `first`)."""
        with self._lock:
            out = self.counts
            self.counts = {"requests": 0, "forwarded": 0, "methods": {}, "faults": {}}
            self._seen = {}
            return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            self.counts["methods"][method] = self.counts["methods"].get(method, 0) + 1
            n = self._seen.get((method, path), 0)
            self._seen[(method, path)] = n + 1
            hit = (self.always and self.counts["requests"] > self.after) or (
                self.fraction > 0 and self._rng.random() < self.fraction)
            if self.rps > 0:
                now = time.monotonic()
                self._tokens = min(self.rps, self._tokens + (now - self._filled) * self.rps)
                self._filled = now
                if self._tokens >= 1:
                    self._tokens -= 1
                else:
                    hit = True
            if (self.methods is not None and method not in self.methods) or (self.match and self.match not in path):
                hit = False
            turn = None
            if n < self.first and not (self.methods is not None and method not in self.methods) and not (
                    self.match and self.match not in path):
                hit, turn = True, n
            if not hit:
                self.counts["forwarded"] += 1
                return None
            if turn is None:
                turn = self._turn
                self._turn += 1
            kind = self.kinds[turn % len(self.kinds)]
            self.counts["faults"][kind] = self.counts["faults"].get(kind, 0) + 1
            return kind

    def _handle(self, h) -> None:
        import http.client
        import uuid

        body = b""
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = _read_chunked_raw(h.rfile)
        elif h.headers.get("Content-Length"):
            body = h.rfile.read(int(h.headers["Content-Length"]))
        kind = self._fault(h.command, h.path.split("?", 1)[0])
        if kind in _S3_ERRORS:
            status, code, message = _S3_ERRORS[kind]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId><HostId>proxy</HostId></Error>").encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", "0" if h.command == "HEAD" else str(len(xml)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(xml)
            return
        if kind in ("truncate", "truncate-unchecked", "flip-unchecked") and h.command != "GET":
            kind = None  # only a body can be cut short
        if kind == "drop" and h.command != "GET":
            h.close_connection = True  # closed unanswered: the request never reaches the server
            return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)  # far above any load
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in ("connection", "keep-alive"):
                    conn.putheader(k, v)
            conn.endheaders()
            if body:
                conn.send(body)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        headers = resp.getheaders()
        if kind in ("truncate", "truncate-unchecked", "flip-unchecked") and resp.status == 200 and data:
            data = data[:-1] + bytes([data[-1] ^ 1]) if kind == "flip-unchecked" else data[:len(data) // 2]
            if kind.endswith("-unchecked"):
                headers = [(k, v) for k, v in headers if not k.lower().startswith("x-amz-checksum")]
        h.send_response(resp.status, resp.reason)
        for k, v in headers:
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"):
                h.send_header(k, v)
        # A HEAD's Content-Length is the object's size (its answer has no body).
        h.send_header("Content-Length", resp.getheader("Content-Length", "0") if h.command == "HEAD" else str(len(data)))
        if kind == "drop":
            h.send_header("Connection", "close")
        h.end_headers()
        if h.command == "HEAD":
            return
        if kind == "drop" and len(data) > 1:
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data)


def _read_chunked_raw(rfile) -> bytes:
    """A chunked request body as it came (forwarded verbatim, with its Transfer-Encoding header)."""
    out = bytearray()
    while True:
        line = rfile.readline()
        out += line
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the empty line
                line = rfile.readline()
                out += line
                if line in (b"\r\n", b"\n", b""):
                    return bytes(out)
        out += rfile.read(size + 2)


@pytest.fixture
def throttled(s3, monkeypatch):
    """A factory of ThrottleProxy in front of the session's moto server; the first one made becomes the
    client's endpoint (AWS_ENDPOINT_URL, also in s3["env"] for subprocesses). Each closed at the end."""
    made: list[ThrottleProxy] = []

    def make(**kw) -> ThrottleProxy:
        proxy = ThrottleProxy(s3["env"]["AWS_ENDPOINT_URL"] if not made else made[0].upstream.geturl(), **kw)
        made.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3["env"] = {**s3["env"], "AWS_ENDPOINT_URL": proxy.url}
        return proxy

    yield make
    for p in made:
        p.close()
