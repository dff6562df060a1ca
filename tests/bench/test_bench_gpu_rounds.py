"""bench_gpu's rounds (issue 26): several rounds of a part combine into medians, number by number,
with the spread shown; and gpu_train judges the first metrics window of each epoch. Pure
functions on hand-made results: the values expected are worked out here, not by the code."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

bench_gpu = pytest.importorskip("bench_gpu")
gpu_train = pytest.importorskip("gpu_train")


def _round(rate: float, ratio: float, ok: bool, epochs: list[float]) -> dict:
    return {"config": {"batch_size": 256, "model": "resnet50"}, "loader_images_per_s": rate, "same": ok,
            "name": "zarr", "ratios": {"zarr_fp32_vs_bare": ratio, "missing_here": None if rate == 30 else 1.0},
            "epoch_img_per_s": epochs}


def test_rounds_combine_into_medians_and_keep_settings_as_given():
    rounds = [_round(10, 0.5, True, [1, 4]), _round(30, 0.9, True, [2, 6]), _round(14, 0.6, False, [3, 5])]
    got = bench_gpu.combine(rounds)
    assert got["loader_images_per_s"] == 14 and got["ratios"]["zarr_fp32_vs_bare"] == 0.6
    assert got["ratios"]["missing_here"] == 1.0  # the median of the rounds that have it
    assert got["same"] is False  # a yes holds only if it held in every round
    assert got["epoch_img_per_s"] == [2, 5]
    assert got["config"] == {"batch_size": 256, "model": "resnet50"} and got["name"] == "zarr"
    assert bench_gpu.combine([_round(10, 0.5, True, [1, 4])] * 2)["config"]["batch_size"] == 256


def test_the_spread_table_gives_median_and_range_of_rates_and_ratios():
    rounds = [_round(10, 0.5, True, [1, 4]), _round(30, 0.9, True, [2, 6]), _round(14, 0.6, False, [3, 5])]
    table = bench_gpu.spread_table(rounds)
    assert "| loader_images_per_s | 14 | 10-30 |" in table
    assert "| ratios.zarr_fp32_vs_bare | 0.600 | 0.500-0.900 |" in table
    assert "batch_size" not in table  # settings are not results


def _window(epoch: int, samples: int, seconds: float) -> dict:
    return {"epoch": epoch, "samples": samples, "seconds": seconds, "online_passes": 0, "batches": 1}


def test_the_first_window_of_each_epoch_is_judged_against_the_steady_rate():
    # Epoch 2's later windows: 200 samples in 2 s, the steady rate 100 img/s. Its first window took
    # 1.5 s for 100 samples: 0.5 s lost, 0.5 * 100 / 50,000 = 0.1% of a 50,000-image epoch.
    windows = [_window(1, 100, 2.0), _window(1, 100, 1.0), _window(2, 100, 1.5), _window(2, 100, 1.0),
               _window(2, 100, 1.0)]
    out = gpu_train.window_rates(windows)
    assert out["steady_img_per_s"] == pytest.approx(100)
    assert out["first_window_lost_s"] == {1: pytest.approx(1.0), 2: pytest.approx(0.5)}
    assert out["first_window_stall_share_50k_epoch"] == pytest.approx(0.001)
    res = {"ens-adv": out, "bare bf16": {"img_per_s": 200.0}}
    assert gpu_train.ratios(res)["first-window stall, 50k-image epoch"] == pytest.approx(0.001)
    assert gpu_train.rows({"models": {"resnet50": {"ratios": gpu_train.ratios(res)}}})[-1] == [
        "resnet50 first-window stall, 50k-image epoch", "0.10%", "< 2%"]
