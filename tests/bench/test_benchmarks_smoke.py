"""Every benchmark that has a `--quick` or `--small` mode runs here, at its smallest sizes, so a
benchmark cannot rot unseen (issue 26: `bench_train.py --quick` once crashed on a renamed
option for weeks). A smoke run checks that the script runs end to end and writes its results;
no timing is asserted (the figures of such tiny runs mean nothing, and the machine is shared).
Each run prints one line in the session's summary ("benchmark smoke runs", conftest.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


# script -> its smoke command line after the script (MNIST's root and the output paths are filled
# in: {data}, {out}), and the results file it must write under {out}.
SMOKE = {
    "bench_train.py": (["--quick", "--limit", "256", "--arch", "D", "--rounds", "1", "--static-epochs", "1",
                        "--reader-seconds", "0.1", "--threads", "1", "--data-root", "{data}", "--out", "{out}",
                        "--no-md"], "bench_train.json"),
    "bench_precompute.py": (["--quick", "--limit", "512", "--train-limit", "256", "--rounds", "1",
                             "--batch-size", "128", "--shard-size", "128", "--workers", "1", "--data-root", "{data}",
                             "--out", "{out}", "--no-md"], "bench_precompute.json"),
    # a mode of its own (two attacks over ImageNet-like JPEGs): the key's first word is the script
    "bench_precompute.py --attacks": (["--attacks", "--quick", "--images", "16", "--rounds", "1", "--out", "{out}",
                                       "--no-md"], "bench_precompute_attacks.json"),
    # every part; enspipe's side alone where ART / torchattacks (the `bench` extra) are not installed
    "bench_peers.py": (["--smoke", "--parts", "1,2,3,4", "--peers", "auto", "--threads", "1", "--device", "cpu",
                        "--data-root", "{data}", "--workdir", "{out}", "--json", "{out}/peers.json"], "peers.json"),
    "bench_stream.py": (["--quick", "--out", "{out}/bench_stream.json"], "bench_stream.json"),
    "bench_decode.py": (["--quick", "--no-md", "--out", "{out}"], "bench_decode.json"),
    "bench_device_step.py": (["--quick", "--no-md", "--out", "{out}"], "bench_device_step.json"),
    "bench_evaluate.py": (["--quick", "--no-md", "--out", "{out}"], "bench_evaluate.json"),
    # its own S3-compatible server (moto, the `s3` extra) on 127.0.0.1, one round on digits
    "bench_object_store.py": (["--quick", "--rounds", "1", "--out", "{out}"],
                              "bench_object_store.json"),
}
# Benchmarks whose small mode runs elsewhere in the suite: bench_gpu.py --small --part all (the
# shared `bench_gpu_small` fixture) runs both of its parts, gpu_precompute.py and gpu_train.py.
VIA_BENCH_GPU = ("bench_gpu.py", "gpu_precompute.py", "gpu_train.py")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_every_benchmark_with_a_small_mode_is_smoke_tested():
    """A new benchmark with --quick/--small joins SMOKE (or runs through bench_gpu.py)."""
    small = sorted(p.name for p in BENCH.glob("*.py")
                   if re.search(r"""\badd(_argument)?\(\s*["']--(quick|small)["']""", p.read_text()))
    assert small, "no benchmark with a small mode found: the pattern above is stale"
    missing = [name for name in small if name not in SMOKE and name not in VIA_BENCH_GPU]
    assert not missing, f"benchmarks with a --quick/--small mode but no smoke run: {missing}"


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_run(script, tmp_path, mnist_root, smoke_log):
    argv, result = SMOKE[script]
    out = tmp_path / "out"
    args = [a.format(data=mnist_root, out=out) for a in argv]
    md = REPO / "BENCHMARKS.md"
    before = _md5(md)
    env = {**os.environ, "ENSPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           # the benchmarks speak the current option names: a deprecated one fails the run
           "PYTHONWARNINGS": "error:TrainConfig(:DeprecationWarning,error:PrecomputeConfig(:DeprecationWarning"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(BENCH / script.split()[0]), *args], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=1200)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, f"{script} {' '.join(args)}\n{r.stderr[-4000:]}"
    doc = json.loads((out / result).read_text())
    assert doc, f"{script} wrote an empty {result}"
    if script == "bench_object_store.py":  # --quick also counts a train start's requests (--start-check)
        assert json.loads((out / "bench_object_store_start.json").read_text())["rows"]
        assert json.loads((out / "bench_object_store_throttle.json").read_text())["rows"]  # and --throttle
    if script == "bench_peers.py":  # parts 1-3 run without the peers too
        assert {"part1", "part2", "part3", "part4"} <= set(doc), sorted(doc)
    assert _md5(md) == before, f"{script}'s smoke run rewrote BENCHMARKS.md"
    smoke_log(f"{script.split()[0]} {' '.join(argv).replace('{data}', 'MNIST').replace('{out}', 'OUT')}: ok, "
              f"{result} written ({seconds:.0f} s wall)")


def test_bench_gpu_small_smoke(bench_gpu_small, smoke_log):
    """bench_gpu.py --small --part all: both parts (gpu_precompute.py, gpu_train.py) on the CPU;
    test_bench_gpu*.py check what they write."""
    out, r = bench_gpu_small
    assert r.returncode == 0, r.stderr[-4000:]
    doc = json.loads((out / "bench_gpu.json").read_text())
    assert set(doc["parts"]) == {"precompute", "train"}
    smoke_log(f"bench_gpu.py --small --part all: ok, both parts ({doc['wall_s']:.0f} s wall)")
