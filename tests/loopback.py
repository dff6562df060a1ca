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
