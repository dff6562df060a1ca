"""Benchmark: DirectionStream read throughput from a local S3 server vs local disk (issue 23).

    python benchmarks/bench_object_store.py --quick              # digits (1,500 samples), 3 rounds, + a 16-shard start check, + --throttle (128 samples)
    python benchmarks/bench_object_store.py --dataset mnist --data-root DIR --rounds 3
    python benchmarks/bench_object_store.py --start-check       # requests of a train start's check
    python benchmarks/bench_object_store.py --throttle --rates 0.1,0.3,0.5   # steps through a throttled S3
    python benchmarks/bench_object_store.py --throttle --edges-only [--settings before]   # a dead endpoint, SlowDown always

Starts moto's standalone S3 server on 127.0.0.1 (`pip install -e '.[s3]'`), writes one zarr and
one wds store of random sign directions (the worst case for compression) for the dataset's
samples, byte-identical on local disk and in the bucket, then reads each with `DirectionStream`
(one process, no loader workers, batch 256, shuffled blocks; each store opened once before the
timed epochs, as train() does) and reports samples/s of the epoch's iteration:

  local        the store on local disk;
  s3 first     the store URL with an empty cache: every shard object downloaded whole,
               sha256-checked, then read (what a first epoch costs); the stream hands the
               reader its block order, so the next shards download while one is read;
  s3 cached    the same URL again with the cache the first epoch left (a second epoch).

Then precompute itself (`enspipe.precompute`, one process, fgsm, of a model D trained one epoch
here) into a local root and into the bucket, side by side (wall seconds of the whole call:
model and data loading, attack, shard writing, uploads, finalize).

`--throttle` instead runs precompute to an s3:// store, a train reading one and `enspipe verify URL`
through a throttling proxy (tests/loopback.py `ThrottleProxy`: a share of requests answered with
S3's 503 SlowDown, 500 InternalError, or cut off mid-body) at each `--rates` share, and reports
whether each completed, its wall seconds and the requests the proxy saw (counted there, failed ones
included), beside the same step unthrottled.

`--start-check` instead counts (no clock) what a train start costs the object store: the
requests (by S3 operation, counted at s3fs's one entry for every call) and the object bytes
downloaded by `open_store(url)` and by `check_against(reader, dataset)`, the two steps train and
evaluate take on a store before their first step, on a store of 64 shards per format (the first
1,024 digits, shard size 16).

Rounds are interleaved (local, s3 first, s3 cached per round, per format; precompute local,
precompute s3 per round) and the median of each is reported with the ratio to local. Loopback
only: a real object store adds latency. Prints markdown tables and writes
OUT/bench_object_store.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine  # noqa: E402


def _server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=5).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto server did not start")


def _build(root: str, dataset, fmt: str, shard_size: int):
    from enspipe.stores import StoreIdentity, create_store, store_path

    ident = StoreIdentity(dataset=dataset.identity(), geometry=dataset.geometry.shape,
                          preprocess=dataset.geometry.preprocess, num_classes=dataset.num_classes,
                          model_name="bench", weights_sha256="0" * 64, attack="fgsm", attack_params={},
                          label_mode="pred")
    path = store_path(root, ident, fmt)
    w = create_store(path, ident, fmt=fmt, shard_size=shard_size)
    rng = np.random.default_rng(0)
    n = len(dataset)
    for s in w.pending_shards():
        lo, hi = w.shard_range(s)
        w.write_shard(s, direction=rng.integers(-1, 2, (hi - lo, *dataset.geometry.shape)).astype(np.int8),
                      logits=np.zeros((hi - lo, dataset.num_classes), np.float16),
                      label=dataset.labels[lo:hi].astype(np.int64), keys=list(dataset.keys[lo:hi]))
    w.finalize()
    assert n == w.num_samples
    return path


def _epoch(dataset, reader, epoch: int) -> float:
    """One epoch over a store already opened (as train() opens each store once per run)."""
    from enspipe.stream import DirectionStream

    stream = DirectionStream(dataset, [reader], batch_size=256, seed=0, epoch=epoch, check=False)
    t = time.perf_counter()
    n = sum(len(b["index"]) for b in stream)
    return n / (time.perf_counter() - t)


def _fast_path_us(reader, n: int = 20_000) -> float:
    """Microseconds a read of a cached shard spends in the cache (its shared lock and eviction
    count; what a cached epoch adds to a local read), each read on another shard."""
    src, shards = reader.source, sorted(reader.records)
    t = time.perf_counter()
    for i in range(n):
        with src.local(reader.records, [shards[i % len(shards)]], reader.records, only=reader._direction_files):
            pass
    return (time.perf_counter() - t) / n * 1e6


def _precompute(dataset_name: str, args, model: Path, out: str, fmt: str) -> float:
    from enspipe.precompute import PrecomputeConfig, precompute

    cfg = PrecomputeConfig(model=str(model), dataset=dataset_name, data_root=args.data_root, limit=args.limit,
                           attacks=("fgsm",), format=fmt, shard_size=args.shard_size, device="cpu", out=out)
    t = time.perf_counter()
    precompute(cfg)
    return time.perf_counter() - t


class _Requests:
    """Counts every S3 request s3fs makes ({operation: n}) and the object bytes its GETs return:
    s3fs sends each call through `S3FileSystem._call_s3`, which this wraps."""

    def __init__(self) -> None:
        import s3fs

        self.calls: dict[str, int] = {}
        self.bytes = 0
        real = s3fs.S3FileSystem._call_s3
        counter = self

        async def _call_s3(fs, method, *args, **kwargs):
            out = await real(fs, method, *args, **kwargs)
            counter.calls[method] = counter.calls.get(method, 0) + 1
            if method == "get_object":
                counter.bytes += int(out.get("ContentLength") or 0)
            return out

        s3fs.S3FileSystem._call_s3 = _call_s3

    def take(self) -> dict:
        out = {"requests": dict(sorted(self.calls.items())), "total": sum(self.calls.values()),
               "bytes_downloaded": self.bytes}
        self.calls, self.bytes = {}, 0
        return out


def _start_check(args, samples: int = 1024) -> None:
    """Requests and bytes of open_store + check_against (train's start) on a store URL of
    samples / 16 shards (64; --quick's smoke run: 16, every step the same, a quarter of the uploads)."""
    from enspipe.data import create_dataset
    from enspipe.stores import check_against, open_store

    dataset = create_dataset("digits", split="train", limit=samples)
    proc, endpoint = _server()
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    rows = {}
    try:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        import s3fs

        bucket = f"bench{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
        for fmt in args.formats.split(","):
            url = _build(f"s3://{bucket}/stores", dataset, fmt, 16)
            counter = _Requests()  # after the writes: only the reader's requests
            reader = open_store(url, cache_dir=work / f"cache-{fmt}")
            opened = counter.take()
            check_against(reader, dataset)
            checked = counter.take()
            stored = sum(m["bytes"] for rec in reader.records.values() for m in rec["files"].values())
            rows[fmt] = {"shards": reader.num_shards, "store_bytes": stored, "open": opened, "check": checked}
    finally:
        proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"train start on a store URL (open_store + check_against), digits {samples:,} samples, shard size 16; "
             f"moto S3 on loopback; {stamp}", "",
             "| format | shards | store bytes | step | requests | by operation | bytes downloaded |",
             "|---|---|---|---|---|---|---|"]
    for fmt, r in rows.items():
        for step in ("open", "check"):
            c = r[step]
            ops = ", ".join(f"{k} {v}" for k, v in c["requests"].items())
            lines.append(f"| {fmt} | {r['shards']} | {r['store_bytes']:,} | {step} | {c['total']} | {ops} | "
                         f"{c['bytes_downloaded']:,} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_object_store_start.json").write_text(json.dumps(
        {"date": stamp, "command": command_line("bench_object_store.py", None), "machine": machine(), "rows": rows},
        indent=2))


def _tree() -> dict:
    """The commit measured, and whether the work tree differed from it (a figure from an uncommitted
    tree is not reproducible)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, timeout=60,
                                  cwd=Path(__file__).resolve().parent.parent).stdout.strip()  # pathspecs: the root
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = git("status", "--porcelain", "--", "pipeline", "benchmarks", "tests/loopback.py")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(dirty)}


def _apply_settings(which: str) -> None:
    """--settings before: commit b384706's retry settings on this tree: botocore `max_attempts` 2 (3
    attempts a request), s3fs's own 5 tries of a SlowDown or a cut-off, no whole-call retries. Only
    the settings: this tree's one-HEAD exists()/size() and check_remote_root stay (b384706 used s3fs's
    info() and exists()), so it approximates b384706, it is not b384706."""
    if which == "now":
        return
    from enspipe.stores import remote, remote_retry

    remote_retry.BOTOCORE_ATTEMPTS = remote.BOTOCORE_ATTEMPTS = 3  # total_max_attempts 3 = max_attempts 2
    os.environ["ENSPIPE_REMOTE_RETRIES"] = "1"
    plain = remote._fs

    def fs_with_s3fs_retries(url, settings):
        fs, path = plain(url, settings)
        if hasattr(fs, "call_s3"):
            fs.retries = 5  # s3fs's default
        return fs, path

    remote._fs = fs_with_s3fs_retries


def _edges(endpoint: str, bucket: str) -> list[dict]:
    """Two failures timed, one call each through `Remote` (the current settings): a GET from an
    endpoint nobody listens on, and a GET that the store answers SlowDown every time."""
    from loopback import ThrottleProxy, free_port

    from enspipe.stores.remote import Remote
    from enspipe.util.errors import StoreError

    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint).pipe_file(f"{bucket}/edge/x", b"x")
    out = []
    for what in ("dead endpoint", "SlowDown every time"):
        proxy = None
        if what == "dead endpoint":
            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        else:
            proxy = ThrottleProxy(endpoint, always=True, kinds=("slowdown",))
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
        t = time.perf_counter()
        try:
            Remote(f"s3://{bucket}/edge").cat("x")
            line = "ok"
        except StoreError as e:
            line = str(e)
        wall = time.perf_counter() - t
        requests = proxy.reset()["requests"] if proxy else None
        if proxy:
            proxy.close()
        out.append({"edge": what, "wall_s": wall, "requests": requests, "line": line[:400]})
        print(f"{what}: {wall:.2f} s, {requests} requests: {line[:200]}", flush=True)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    return out


def _throttle(args) -> None:
    """Precompute to, train from and verify an s3:// store through a ThrottleProxy at each rate."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from loopback import ThrottleProxy

    from enspipe.precompute import PrecomputeConfig, precompute
    from enspipe.stores import verify_store
    from enspipe.train import TrainConfig, train
    from enspipe.util.errors import StoreError

    _apply_settings(args.settings)
    tree = _tree()  # before any step: what was measured
    proc, endpoint = _server()
    work = Path(tempfile.mkdtemp(prefix="bench-s3-throttle-"))
    kinds = tuple(args.kinds.split(","))
    rows: list[dict] = []
    edges: list[dict] = []
    steps: dict = {}
    try:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        import s3fs

        bucket = f"bench{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
        if args.edges:
            edges = _edges(endpoint, bucket)
        if args.edges_only:
            return _throttle_json(args, tree, kinds, rows, edges)
        model = work / "model-D"
        train(TrainConfig(model="D", dataset="digits", limit=args.limit, epochs=1, seed=0, device="cpu",
                          log_every=10_000, out=str(model)))

        def pre(out: str) -> str:
            return precompute(PrecomputeConfig(model=str(model), dataset="digits", limit=args.limit,
                                               attacks=("fgsm",), format="zarr", shard_size=args.shard_size,
                                               device="cpu", out=out))

        (store,) = [str(p) for p in _urls(pre(f"s3://{bucket}/base"))]  # unthrottled, for train and verify
        steps = {
            "precompute": lambda tag: pre(f"s3://{bucket}/{tag}"),
            "train": lambda tag: train(TrainConfig(model="A", dataset="digits", limit=args.limit, mode="ens-adv",
                                                   shards=(store,), epochs=1, seed=0, device="cpu",
                                                   log_every=10_000, out=str(work / tag))),
            "verify": lambda tag: _verified(verify_store(store, deep=True)),
        }
        for r in range(args.rounds):
            for rate in [0.0, *[float(x) for x in args.rates.split(",")]]:  # 0: not throttled
                for step, fn in steps.items():
                    proxy = (ThrottleProxy(endpoint, rps=rate, kinds=kinds) if args.rps else
                             ThrottleProxy(endpoint, fraction=rate, seed=r, kinds=kinds))
                    os.environ["AWS_ENDPOINT_URL"] = proxy.url  # a new endpoint: a new s3fs client
                    os.environ["ENSPIPE_STORE_CACHE"] = str(work / f"cache-{step}-{rate}-{r}")
                    t = time.perf_counter()
                    try:
                        fn(f"{step}-{rate}-{r}")
                        outcome = "ok"
                    except (StoreError, OSError, RuntimeError) as e:
                        outcome = " ".join(str(e).split())[:300]
                    wall = time.perf_counter() - t
                    c = proxy.reset()
                    proxy.close()
                    rows.append({"round": r, "rate": rate, "step": step, "outcome": outcome, "wall_s": wall,
                                 "requests": c["requests"], "faults": c["faults"]})
                    print(f"{step:10s} rate {rate:.2f} round {r}: {wall:6.2f} s, {c['requests']:5d} requests, "
                          f"faults {c['faults']}: {outcome}", flush=True)
    finally:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    settings = {k: v for k, v in os.environ.items() if k.startswith("ENSPIPE_REMOTE_")}
    lines = [f"digits{'' if args.limit is None else f' ({args.limit} samples)'}, zarr, shard size {args.shard_size}, "
             f"faults {args.kinds} in turn; moto S3 behind ThrottleProxy on loopback; settings {settings or 'default'}; "
             f"{stamp}", "", f"| step | {'requests/s allowed' if args.rps else 'share throttled'} | completed | wall s (median) | requests (median) | x unthrottled wall |",
             "|---|---|---|---|---|---|"]
    for step in steps:
        base = statistics.median(x["wall_s"] for x in rows if x["step"] == step and x["rate"] == 0) or 1.0
        for rate in sorted({x["rate"] for x in rows}):
            got = [x for x in rows if x["step"] == step and x["rate"] == rate]
            ok = sum(x["outcome"] == "ok" for x in got)
            wall = statistics.median(x["wall_s"] for x in got)
            limit = ("none" if not rate else f"{rate:g}") if args.rps else f"{rate:.0%}"
            lines.append(f"| {step} | {limit} | {ok} of {len(got)} | {wall:.2f} | "
                         f"{statistics.median(x['requests'] for x in got):.0f} | {wall / base:.2f}x |")
    print("\n".join(lines))
    failures = sorted({x["outcome"] for x in rows if x["outcome"] != "ok"})
    for f in failures[:5]:
        print(f"  failed: {f}")
    _throttle_json(args, tree, kinds, rows, edges)


def _throttle_json(args, tree: dict, kinds: tuple, rows: list[dict], edges: list[dict]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_object_store_throttle.json").write_text(json.dumps(
        {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
         "command": command_line("bench_object_store.py", None), "machine": machine(), **tree,
         "settings_of": args.settings,
         "settings": {k: v for k, v in os.environ.items() if k.startswith("ENSPIPE_REMOTE_")},
         "kinds": kinds, "rows": rows, "edges": edges}, indent=2))


def _urls(printed) -> list[str]:
    """precompute's store paths (it returns them)."""
    return list(printed) if isinstance(printed, (list, tuple)) else [printed]


def _verified(report) -> None:
    if not report.ok:
        raise RuntimeError("; ".join(report.problems)[:300])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the bundled digits whatever --dataset says (seconds)")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--formats", default="zarr,wds", help="comma-separated store formats to measure")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--start-check", action="store_true",
                    help="only count the requests and bytes of a train start's store check (64 shards)")
    ap.add_argument("--throttle", action="store_true",
                    help="only precompute, train and verify an s3:// store through a throttling proxy at --rates")
    ap.add_argument("--rates", default="0.1,0.3,0.5", help="--throttle: shares of requests answered with a fault")
    ap.add_argument("--rps", action="store_true",
                    help="--throttle: --rates are requests a second the proxy lets through (a token bucket), the "
                         "rest answered with --kinds, as S3 throttles a hot prefix")
    ap.add_argument("--kinds", default="slowdown,slowdown,slowdown,internal,drop",
                    help="--throttle: the faults, in turn (slowdown: 503 SlowDown; internal: 500 InternalError; "
                         "drop: a GET cut off mid-body, any other request closed unanswered)")
    ap.add_argument("--settings", choices=("now", "before"), default="now",
                    help="--throttle: this tree's retry settings, or commit b384706's (botocore max_attempts 2, "
                         "s3fs's 5 tries, no whole-call retries) on this tree")
    ap.add_argument("--edges", action="store_true",
                    help="--throttle: also time a GET from a dead endpoint and one answered SlowDown every time")
    ap.add_argument("--edges-only", action="store_true", help="--throttle --edges, and no steps")
    args = ap.parse_args()
    args.edges = args.edges or args.edges_only
    if args.throttle:
        args.shard_size = args.shard_size if args.shard_size != 1024 else 128
        return _throttle(args)
    if args.start_check:
        return _start_check(args)
    if args.quick:
        args.dataset, args.data_root, args.limit = "digits", None, None
    from enspipe.data import create_dataset
    from enspipe.stores import open_store

    dataset = create_dataset(args.dataset, split="train", limit=args.limit, data_root=args.data_root)
    proc, endpoint = _server()
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    try:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        import s3fs

        bucket = f"bench{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
        rows = {}
        fast_us: list[float] = []
        for fmt in args.formats.split(","):
            local = _build(str(work / "local"), dataset, fmt, args.shard_size)
            url = _build(f"s3://{bucket}/stores", dataset, fmt, args.shard_size)
            times: dict[str, list[float]] = {"local": [], "s3 first": [], "s3 cached": []}
            for r in range(args.rounds):
                times["local"].append(_epoch(dataset, open_store(local), 0))
                cache = work / f"cache-{fmt}-{r}"
                remote = open_store(url, cache_dir=cache)  # manifest and listing: not timed
                times["s3 first"].append(_epoch(dataset, remote, 0))
                # A new reader on the cache the first epoch left (no shard decoded in memory), as
                # a loader worker's reader of the next epoch.
                times["s3 cached"].append(_epoch(dataset, remote.reopened(), 1))
                fast_us.append(_fast_path_us(remote))
                shutil.rmtree(cache, ignore_errors=True)
            rows[fmt] = {k: statistics.median(v) for k, v in times.items()}
        from enspipe.train import TrainConfig, train

        model = work / "model-D"
        train(TrainConfig(model="D", dataset=args.dataset, data_root=args.data_root, limit=args.limit, epochs=1,
                          seed=0, device="cpu", log_every=10_000, out=str(model)))
        pre: dict[str, dict[str, list[float]]] = {}
        for fmt in args.formats.split(","):
            pre[fmt] = {"local": [], "s3": []}
            _precompute(args.dataset, args, model, str(work / "warm"), fmt)  # data and model loaded once, not timed
            for r in range(args.rounds):
                pre[fmt]["local"].append(_precompute(args.dataset, args, model, str(work / f"pre-{r}"), fmt))
                pre[fmt]["s3"].append(_precompute(args.dataset, args, model, f"s3://{bucket}/pre-{r}", fmt))
        pre_rows = {fmt: {k: statistics.median(v) for k, v in t.items()} for fmt, t in pre.items()}
    finally:
        proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"DirectionStream, {args.dataset} ({len(dataset)} samples, {'x'.join(map(str, dataset.geometry.shape))}), "
             f"one process, batch 256, median of {args.rounds} interleaved rounds; moto S3 on loopback; "
             f"{platform.node()} {os.cpu_count()} cores, {stamp}", "",
             "| format | local samples/s | S3 first epoch | ratio | S3 cached epoch | ratio |", "|---|---|---|---|---|---|"]
    for fmt, r in rows.items():
        lines.append(f"| {fmt} | {r['local']:,.0f} | {r['s3 first']:,.0f} | {r['s3 first'] / r['local']:.2f}x | "
                     f"{r['s3 cached']:,.0f} | {r['s3 cached'] / r['local']:.2f}x |")
    lines += ["", f"cache fast path: {statistics.median(fast_us):.1f} us per read (median of {len(fast_us)}; "
                  "the cache's share of a cached read)"]
    lines += ["", f"precompute (fgsm, model D, shard size {args.shard_size}, one process, wall seconds), "
                  f"median of {args.rounds} interleaved rounds", "",
              "| format | to local disk s | to S3 s | ratio |", "|---|---|---|---|"]
    for fmt, r in pre_rows.items():
        lines.append(f"| {fmt} | {r['local']:.2f} | {r['s3']:.2f} | {r['s3'] / r['local']:.2f}x |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_object_store.json").write_text(json.dumps({"date": stamp, "dataset": args.dataset,
                                                             "command": command_line("bench_object_store.py", None),
                                                             "machine": machine(),
                                                             "n": len(dataset), "rows": rows,
                                                             "precompute_s": pre_rows,
                                                             "fast_path_us": statistics.median(fast_us)}, indent=2))
    if args.quick:  # the start check's counts and a throttled run too (seconds): the smoke run keeps them from rotting
        _start_check(args, samples=256)
        args.limit, args.rates, args.rounds, args.shard_size = 128, "0.3", 1, 64
        _throttle(args)


if __name__ == "__main__":
    main()
