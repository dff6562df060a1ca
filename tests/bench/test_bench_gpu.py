"""benchmarks/bench_gpu.py --small keeps working: the precompute half runs on the CPU end to end
and records every field the GPU run reports (no timing is asserted: this machine is shared)."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_gpu_small_precompute(bench_gpu_small):
    out, r = bench_gpu_small  # one --small --part all run, shared with test_bench_gpu_train.py (conftest.py)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "bench_gpu.json").read_text())
    assert doc["small"] and doc["machine"]["device"] == "cpu" and doc["data"]["images"] == 64
    res = doc["parts"]["precompute"]
    assert {"fp32", "fp32_deterministic"} <= set(res["bare"])
    runs = res["precompute"]
    assert {"zarr_fp32", "wds_fp32", "dask_zarr_fp32"} <= set(runs)
    for run in runs.values():
        assert run["end_to_end"] > 0 and run["shards"] == 4 and {"steady", "startup_s"} <= set(run)
    st = res["stores"]
    assert st["dask_equals_in_process"] and st["wds_equals_zarr"]
    assert 0 < st["bits_wds"] <= 1.1 and st["bits_wds_with_images"] > st["bits_wds"]
    if "bf16_skipped" not in res:  # a CPU without bf16 measures fp32 only, and says why
        assert "zarr_bf16" in runs and 0 <= st["bf16_flip_share"] < 1
    assert res["rows"] and all(len(row) == 3 for row in res["rows"])
    assert "| measure | value | ratio / target |" in r.stdout  # the compact table, printed last
    assert "## gpu precompute" in (out / "bench_gpu.md").read_text()
    assert not (REPO / "BENCHMARKS.md").read_text().count("bench_gpu.py --small")  # never written by --small
