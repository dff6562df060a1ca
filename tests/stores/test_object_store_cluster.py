"""Object storage with real processes: a precompute killed mid-store and resumed, a permission
error from a server that enforces IAM, and README's cluster commands (dask scheduler and
workers that share nothing with the client but the bucket, then torchrun on two nodes).

The server is moto's standalone S3 server (tests/stores/test_object_store.py's fixtures); the oracles
are an uninterrupted run to local disk (byte for byte), the objects and their LastModified read
back from the server, the PUTs the client itself logged, and a one-node run on local disk.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from cli_runner import outputs, run_cli, spawn  # `enspipe` forked from the session's zygote, S3 credentials in env
from loopback import free_port

pytest.importorskip("s3fs", reason="object-store tests need pip install -e '.[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need pip install -e '.[s3]'")

README = Path(__file__).resolve().parents[2] / "README.md"
LONG = 600  # bounds far above any run under load, never timings

# The real CLI with one seam: every object the client PUTs is logged, and the PUT of $HOLD_AT
# (a completion record) never returns, so the process can be killed with that shard's data
# objects uploaded and its record not.
PUT_SEAM = textwrap.dedent("""
    import os, sys, time
    from enspipe.stores import remote
    from enspipe.cli import main

    log, hold = os.environ["PUT_LOG"], os.environ.get("HOLD_AT")
    real_file, real_bytes = remote.Remote.put_file, remote.Remote.put_bytes

    def note(rel):
        with open(log, "a") as f:
            f.write(rel + "\\n")

    def put_file(self, local, rel):
        note(rel)
        return real_file(self, local, rel)

    def put_bytes(self, rel, data):
        if rel == hold:
            note("HOLDING " + rel)
            time.sleep(3600)
        note(rel)
        return real_bytes(self, rel, data)

    remote.Remote.put_file, remote.Remote.put_bytes = put_file, put_bytes
    main(sys.argv[1:])
""")


def _wait_for(what: str, ok, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + LONG
    while not ok():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}: {err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def _objects(s3, prefix: str) -> dict[str, dict]:
    fs = s3["fs"]
    fs.invalidate_cache()
    root = prefix[len("s3://"):].rstrip("/")
    return {k[len(root) + 1:]: v for k, v in fs.find(root, detail=True).items()}


def test_a_precompute_to_s3_killed_after_its_first_shards_resumes_without_rewriting_them(s3, digits_static, tmp_path):
    common = ["precompute", "--model", str(digits_static), "--dataset", "digits", "--shard-size", "256",
              "--device", "cpu"]
    # The oracle: the same precompute, uninterrupted, to local disk.
    local = run_cli(*common, "--out", str(tmp_path / "local"), env=s3["env"], timeout=LONG)
    assert local.returncode == 0, local.stderr[-3000:]
    (path,) = [Path(ln) for ln in local.stdout.splitlines() if ln.startswith("/")]
    records = {int(k): v for k, v in json.loads((path / "manifest.json").read_text())["shards"].items()}
    assert len(records) >= 4
    name = path.relative_to(tmp_path / "local").as_posix()
    url = f"s3://{s3['bucket']}/st/{name}"  # content-addressed: the same name under any root

    seam = tmp_path / "seam.py"
    seam.write_text(PUT_SEAM)
    log1 = tmp_path / "puts1.log"
    env = {**s3["env"], "PUT_LOG": str(log1), "HOLD_AT": "shards/000002.json"}
    proc = subprocess.Popen([sys.executable, str(seam), *common, "--out", f"s3://{s3['bucket']}/st"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for("shard 2's record upload", lambda: log1.exists() and "HOLDING" in log1.read_text(), proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=LONG)
    before = _objects(s3, url)
    assert {f"shards/{s:06d}.json" for s in (0, 1)} <= set(before) and "shards/000002.json" not in before
    assert set(records[2]["files"]) <= set(before)  # shard 2's data is there, without its record
    finished = {rel for s in (0, 1) for rel in [*records[s]["files"], f"shards/{s:06d}.json"]}
    assert not json.loads(s3["fs"].cat_file(f"{url[5:]}/manifest.json"))["complete"]

    log2 = tmp_path / "puts2.log"
    again = subprocess.run([sys.executable, str(seam), *common, "--out", f"s3://{s3['bucket']}/st"],
                           env={**s3["env"], "PUT_LOG": str(log2)}, capture_output=True, text=True, timeout=LONG)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split() == [url]
    puts = log2.read_text().split()
    assert not finished & set(puts), sorted(finished & set(puts))  # the finished shards were not rewritten
    assert set(records[2]["files"]) <= set(puts)  # the half-uploaded shard was
    after = _objects(s3, url)
    for rel in finished:
        assert after[rel]["LastModified"] == before[rel]["LastModified"], rel
    # The resumed store is the uninterrupted one, byte for byte.
    assert json.loads(s3["fs"].cat_file(f"{url[5:]}/manifest.json"))["shards"] == \
        {f"{s:06d}": rec for s, rec in records.items()}
    for rec in records.values():
        for rel in rec["files"]:
            assert s3["fs"].cat_file(f"{url[5:]}/{rel}") == (path / rel).read_bytes(), rel


# --------------------------------------------------------------------------- permissions


@pytest.fixture
def iam_endpoint(tmp_path):
    """A moto server of its own (authorization is server-wide) that enforces IAM once set up."""
    port = free_port()
    log = open(tmp_path / "moto-iam.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for("the moto server", lambda: _answers(url), proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=LONG)
        log.close()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/moto-api/", timeout=5).read()
        return True
    except OSError:
        return False


def test_a_denied_write_or_read_is_one_line_naming_the_url(iam_endpoint, digits_static, tmp_path):
    """moto's server enforces IAM policies after /moto-api/reset-auth: a user allowed only to
    read the bucket cannot precompute into it, and a user with no policy cannot list it."""
    import botocore.session

    session = botocore.session.get_session()
    root = dict(endpoint_url=iam_endpoint, region_name="us-east-1", aws_access_key_id="root",
                aws_secret_access_key="root")
    iam, s3c = session.create_client("iam", **root), session.create_client("s3", **root)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    s3c.create_bucket(Bucket=bucket)
    keys = {}
    # Read-only: moto names a listing's action after the API call (s3:ListObjectsV2, not AWS's
    # s3:ListBucket), so wildcards over reads.
    for user, actions in (("reader", ["s3:Get*", "s3:List*", "s3:Head*"]), ("nobody", None)):
        iam.create_user(UserName=user)
        if actions:
            iam.put_user_policy(UserName=user, PolicyName="ro", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = {"AWS_ACCESS_KEY_ID": k["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": k["SecretAccessKey"]}
    req = urllib.request.Request(iam_endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})  # not a form: moto reads the raw body
    urllib.request.urlopen(req, timeout=30).read()  # from now on every request is authorized

    env = {**os.environ, "AWS_ENDPOINT_URL": iam_endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           "ENSPIPE_STORE_CACHE": str(tmp_path / "cache"), "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}

    def one_line(*argv: str, user: str) -> str:
        p = run_cli(*argv, env={**env, **keys[user]}, timeout=LONG)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode != 0 and len(lines) == 1, p.stderr[-3000:]
        return lines[0]

    out = f"s3://{bucket}/stores"
    line = one_line("precompute", "--model", str(digits_static), "--dataset", "digits", "--device", "cpu",
                    "--out", out, user="reader")
    assert out in line and "permission denied" in line and "cannot write" in line, line
    line = one_line("ls", out, user="nobody")
    assert out in line and "permission denied" in line, line
    # The reader may read: the same bucket lists (empty) with its key.
    p = run_cli("ls", out, env={**env, **keys["reader"]}, timeout=LONG)
    assert p.returncode == 0, p.stderr[-3000:]


# --------------------------------------------------------------------------- README's cluster


def readme_cluster_commands() -> list[str]:
    """The shell block of README's "Beyond one machine" section, one command per line."""
    text = README.read_text()
    section = text.split("## Beyond one machine", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [ln.split("  #", 1)[0].strip() for ln in block.replace("\\\n", " ").splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def _argv(line: str, subs: dict[str, str]) -> list[str]:
    for k, v in subs.items():
        line = line.replace(k, v)
    return line.split()


def test_readme_cluster_commands_run_a_dask_cluster_on_s3_and_train_on_two_nodes(s3, digits_static, tmp_path):
    """README's cluster block, each command as written (hosts, ports, bucket and paths put in):
    a dask scheduler and two workers, each in its own working directory with its own TMPDIR (the
    client's stays empty), precompute onto the bucket, ls, verify, and torchrun on two nodes (two
    launches, node rank 0 and 1, one process each, each node its own store cache) training
    ens-adv from the store URL; each rank reads only its own blocks (recorded sample orders are
    disjoint) and each node downloads each object once. The oracle: the store equals a local
    precompute byte for byte, and the two-node weights equal a one-node two-process run from the
    local store bit for bit."""
    cmds = readme_cluster_commands()
    assert [c.split()[:2] for c in cmds] == [["export", "AWS_ENDPOINT_URL=https://s3.example.org"],
                                              ["dask", "scheduler"], ["dask", "worker"], ["enspipe", "precompute"],
                                              ["enspipe", "ls"], ["enspipe", "verify"], ["torchrun", "--nnodes"]]
    sched_port, master_port = free_port(), free_port()
    subs = {"tcp://HEAD:8786": f"tcp://127.0.0.1:{sched_port}", "--port 8786": f"--port {sched_port}",
            "s3://bucket": f"s3://{s3['bucket']}", "runs/static": str(digits_static), "HEAD": "127.0.0.1",
            "29500": str(master_port), "runs/ens": str(tmp_path / "ens")}
    venv_bin = str(Path(sys.executable).parent)
    base = {**s3["env"], "PATH": f"{venv_bin}:{os.environ['PATH']}", "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    try:
        sched = subprocess.Popen([*_argv(cmds[1], subs), "--host", "127.0.0.1", "--no-dashboard"], env=base,
                                 cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(sched)
        tmps = []
        for w in range(2):  # each "machine": its own working directory and temp dir
            home = tmp_path / f"worker{w}"
            (home / "tmp").mkdir(parents=True)
            tmps.append(home / "tmp")
            procs.append(subprocess.Popen([*_argv(cmds[2], subs), "--no-dashboard", "--local-directory",
                                           str(home / "dask")], env={**base, "TMPDIR": str(home / "tmp")},
                                          cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        client_tmp = tmp_path / "client-tmp"
        client_tmp.mkdir()
        pre = subprocess.run(_argv(cmds[3], subs), env={**base, "TMPDIR": str(client_tmp)}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=LONG)
        assert pre.returncode == 0, pre.stderr[-3000:]
        assert "on 2 dask worker(s)" in pre.stderr, pre.stderr[-2000:]
        # One machine cannot hide the client's files from its workers; what can be seen: the
        # client left nothing in its temp dir (no staged shard, no model copy for the workers).
        assert list(client_tmp.iterdir()) == []
        (url,) = [ln for ln in pre.stdout.splitlines() if ln.startswith("s3://")]
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=LONG)
    local = run_cli("precompute", "--model", str(digits_static), "--dataset", "digits", "--device", "cpu",
                    "--out", str(tmp_path / "local"), env=base, timeout=LONG)
    assert local.returncode == 0, local.stderr[-3000:]
    (path,) = [Path(ln) for ln in local.stdout.splitlines() if ln.startswith("/")]
    assert url.endswith(path.relative_to(tmp_path / "local").as_posix())
    for rec in json.loads((path / "manifest.json").read_text())["shards"].values():
        for rel in rec["files"]:
            assert s3["fs"].cat_file(f"{url[5:]}/{rel}") == (path / rel).read_bytes(), rel

    ls = subprocess.run(_argv(cmds[4], subs), env=base, capture_output=True, text=True, timeout=LONG)
    assert ls.returncode == 0 and url in ls.stdout, ls.stdout + ls.stderr
    subs = {"s3://bucket/stores/.../X.zarr": url, **subs}
    ver = subprocess.run(_argv(cmds[5], subs), env=base, capture_output=True, text=True, timeout=LONG)
    assert ver.returncode == 0 and ver.stdout.startswith("OK"), ver.stdout + ver.stderr

    # Two nodes: the same line launched twice, node rank 0 and 1, each with its own cache.
    nodes = []
    for rank in (0, 1):
        line = cmds[6].replace("--node-rank 0", f"--node-rank {rank}")
        cache = tmp_path / f"node{rank}-cache"
        nodes.append((cache, subprocess.Popen([*_argv(line, subs), "--record-indices"],
                                              env={**base, "ENSPIPE_STORE_CACHE": str(cache)},
                                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True)))
    for _, p in nodes:
        _, err = p.communicate(timeout=LONG)
        assert p.returncode == 0, err[-4000:]
    run = tmp_path / "ens"
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    orders = [set(np.load(run / "indices" / f"rank{r}-epoch0000.npy").tolist()) for r in (0, 1)]
    assert orders[0] and orders[1] and not orders[0] & orders[1]  # each rank read only its own blocks
    objects = {rel for rec in json.loads((path / "manifest.json").read_text())["shards"].values()
               for rel in rec["files"]}
    keys = sorted(rel for rel in objects if rel.startswith("keys/"))
    for cache, _ in nodes:
        # Each node downloaded what its start check and its rank's reads need: every shard's keys
        # object (the check) and direction objects (the reads), never a logits or label object.
        (mirror,) = [p for p in cache.iterdir() if p.name.endswith(".zarr")]
        got = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file()
                     and p.relative_to(mirror).as_posix() in objects)
        directions = [rel for rel in got if rel.startswith("direction/")]
        assert directions and sorted(set(got) - set(directions)) == keys, got

    # One node, two processes, the local store: the same weights, bit for bit. The two ranks are
    # the command's `enspipe train` with the rendezvous variables torchrun gives its processes
    # (the trainer reads RANK, WORLD_SIZE, LOCAL_RANK; torch's env:// the master's address),
    # forked from the zygote: the same run without a launcher and three imports of torch.
    train_argv = _argv(cmds[6], subs)[_argv(cmds[6], subs).index("-m") + 2:]  # after `-m enspipe`
    i = train_argv.index("--shards")
    train_argv[i + 1] = str(path)
    train_argv[train_argv.index("--out") + 1] = str(tmp_path / "one")
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [spawn(*train_argv, log=tmp_path / f"one-rank{r}", cwd=tmp_path,
                   env={**base, **rendezvous, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:  # as torchrun would: the first rank to fail ends the other (blocked in the rendezvous otherwise)
        deadline = time.monotonic() + LONG
        while any(p.poll() is None for p in ranks) and time.monotonic() < deadline:
            failed = [p for p in ranks if p.poll() not in (None, 0)]
            assert not failed, outputs(failed[0])[1][-4000:]
            time.sleep(0.2)
        for p in ranks:
            assert p.returncode == 0, outputs(p)[1][-4000:]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert json.loads((tmp_path / "one" / "config.json").read_text())["world_size"] == 2
    assert (run / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- file://


def test_a_file_url_is_the_local_store(tmp_path):
    """`file://` URLs (README names them tested): the local store at that path, written,
    listed, verified and read through the URL as through the path."""
    import numpy as np

    from enspipe.stores import create_store, list_stores, open_store, store_path, verify_store
    from test_object_store import N, SHARD, _arrays, _identity, _write

    a = _arrays()
    root = f"file://{tmp_path}/stores"
    w = create_store(store_path(root, _identity(), "zarr"), _identity(), fmt="zarr", shard_size=SHARD)
    _write(w, a)
    w.finalize()
    path = store_path(tmp_path / "stores", _identity(), "zarr")
    assert (Path(path) / "manifest.json").is_file()  # written at the path the URL names
    url = f"file://{path}"
    np.testing.assert_array_equal(open_store(url).read_directions(0, N), a["direction"])
    assert verify_store(url).ok
    (info,) = list_stores(root)
    assert Path(info.path) == Path(path) and info.complete
