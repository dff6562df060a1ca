"""benchmarks/gpu_train.py --small: the training half of bench_gpu runs end to end on the CPU and
writes every field the GPU run will fill (no timing is asserted: this checks the script)."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_train_small_writes_its_results(bench_gpu_small):
    tmp_path, r = bench_gpu_small  # one --small --part all run, shared with test_bench_gpu.py (conftest.py)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_train.json").read_text())
    assert doc["errors"] == [] and doc["settings"]["small"] and doc["machine"]["nproc"] >= 1
    assert doc["loader clean"]["img_per_s"] > 0 and doc["loader ens-adv"]["img_per_s"] > 0
    res = doc["models"]["D"]
    for key in ("bare fp32", "bare bf16"):
        assert res[key]["img_per_s"] > 0
    for key in ("clean-fp32", "clean", "adv", "ens-adv"):
        run = res[key]
        assert run["steady_img_per_s"] > 0 and run["boundary_s_median"] is not None
        assert set(run["epoch_img_per_s"]) == {"1", "2"} and run["batches"] == 2 * 4
    assert res["adv"]["online_passes"] == res["adv"]["batches"] and res["clean"]["online_passes"] == 0
    assert all(v is not None for v in res["ratios"].values())
    table = (tmp_path / "gpu_train.md").read_text().strip().splitlines()
    assert table[0].startswith("gpu_train:") and "| D | enspipe ens-adv |" in r.stdout and table[-1].startswith("Targets")
    assert (tmp_path / "gpu_train.md").read_text().strip() in r.stdout
    driver = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert driver["parts"]["train"]["settings"]["images"] == 64 and driver["data"]["images"] == 64
    assert driver["parts"]["train"]["rows"] and "## gpu train" in (tmp_path / "bench_gpu.md").read_text()
