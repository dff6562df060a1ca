"""Benchmark: what a precomputed store costs on disk and in time (DESIGN §2-3).

    python benchmarks/bench_precompute.py --quick
    python benchmarks/bench_precompute.py --limit 60000 --rounds 3
    python benchmarks/bench_precompute.py --attacks       # two attacks: one decode per image, before vs after

Measured side by side in one process on real MNIST (`--data-root`, default the shared copy),
with a Step-LL store of the paper's architecture B, trained briefly first (1 epoch on a
4,096-sample subset, `enspipe.train`):

  bits/element   stored (compressed) direction bytes x 8 / (N x C x H x W), from the
                 stores' shard records: zarr (int8, blosc zstd bit-shuffle) and wds (two
                 packed bit planes, gzip, per sample). Target for zarr: <= 0.8.
  bare           `attacks.direction()` in a loop over the same images and batch size,
                 images already in memory as float, no I/O: the compute floor.
  precompute     `precompute()` in-process into a fresh store root, with the background
                 writer thread (overlap) and without it (each shard written by the computing
                 thread), zarr and wds: samples / wall time of the whole call (store
                 creation, compute, writing, and the finalize that re-hashes every file).
                 Target: zarr with overlap / bare >= 0.85.
  2 workers      `precompute(dask_workers=2)`: a dask LocalCluster of 2 single-threaded worker
                 processes against in-process (2 torch threads). End to end (cluster start-up
                 and each worker loading data and model included), and steady state: shards
                 completed per second between the workers' first and last shard, read from
                 the shard records' mtimes, against the same figure for the in-process run.

Wall-clock ratios are paired: each round runs every configuration once, interleaved, and a
configuration's ratio is the median over rounds of (bare time / its time) in that round.
This machine is shared, so CPU time (this process, all threads) is reported beside the wall
time for the in-process runs: it is much less disturbed by other people's jobs.

Writes OUT/bench_precompute.json, prints a markdown table and rewrites the `## precompute`
section of BENCHMARKS.md (other sections are left as they are).

`--attacks`: a two-attack precompute (Step-LL and FGSM, zarr) over ImageNet-like JPEGs
(`gpu_data.py`'s, 400-500 px, to 3x224x224) with a small torchvision model (mobilenet_v3_small,
fixed random weights: its input gradient costs about what a decode does on a CPU, as a GPU's
does against its host's cores), three ways: `once` as precompute runs it (each shard decoded
once, each batch's attacks sharing one forward pass), `forward_per_attack` (decoded once, a
forward per attack: `attacks.directions` replaced by one `direction()` per attack here), and
`per_attack` the way it ran before: one stream, one loader and one sink thread, the jobs lacking a
shard grouped per attack, not per sample range, so each attack's shards are decoded (and attacked)
on their own (`compute.stream_shards` compiled here from its own source with the attack added to
the grouping key: the mutation row `precompute-decodes-per-attack`). Decoding runs in one loader
worker process, so its CPU-seconds are the children's (getrusage) and the driving process's are the
compute's and the writer's. Paired interleaved rounds (the order rotates), medians. Then the compute
alone, on one batch in memory (no decode, no store): `attacks.directions` against one `direction()`
per attack, for mobilenet_v3_small at 224 and the paper's C at 32, in interleaved rounds.
It rewrites the section `## precompute: several attacks, one decode per image` (OUT/bench_precompute_attacks.json).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from enspipe import attacks
from enspipe.data import create_dataset
from enspipe.models import resolve_model
from enspipe.precompute import PrecomputeConfig, _open_inputs, precompute
from enspipe.stores import open_store, store_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, logger, machine, timed, train_clean, update_section  # noqa: E402
IN_PROCESS = ("bare", "zarr", "zarr_sync", "wds", "wds_sync")  # (name, format, overlap) below
RUNS = {"zarr": ("zarr", True), "zarr_sync": ("zarr", False), "wds": ("wds", True), "wds_sync": ("wds", False)}
BITS_TARGET = 0.8
THROUGHPUT_TARGET = 0.85


log = logger("bench_precompute")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="4,096 images, 2 rounds (about 3 minutes on 2 idle cores); --limit/--rounds still apply")
    p.add_argument("--data-root", default=os.environ.get("ENSPIPE_TEST_MNIST", str(REPO.parent / "shared" / "data")))
    p.add_argument("--limit", type=int, default=None, help="MNIST training images to precompute over (16384; quick: 4096)")
    p.add_argument("--train-limit", type=int, default=4096, help="images B is trained on (1 epoch)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; quick: 2)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(REPO / ".benchmarks"))
    p.add_argument("--keep", action="store_true", help="keep the stores and the trained model")
    p.add_argument("--no-md", dest="update_md", action="store_false", help="do not rewrite BENCHMARKS.md")
    p.add_argument("--attacks", action="store_true",
                   help="measure a two-attack precompute on ImageNet-like JPEGs: one decode per image vs one per attack")
    p.add_argument("--images", type=int, default=None, help="--attacks: JPEGs (512; quick: 64)")
    argv = sys.argv[1:] if argv is None else argv
    opts = p.parse_args(argv)
    # --quick picks the sizes that are not given: an explicit --limit/--rounds wins (the test
    # suite's smoke run is --quick at a few hundred images).
    opts.limit = opts.limit if opts.limit is not None else 4096 if opts.quick else 16384
    opts.rounds = opts.rounds if opts.rounds is not None else 2 if opts.quick else 3
    opts.images = opts.images if opts.images is not None else 64 if opts.quick else 512
    return opts, command_line("bench_precompute.py", argv)


# --- The measurements ---------------------------------------------------------------------------

def bare_loop(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """The compute floor: Step-LL directions batch by batch, nothing stored."""
    for b in range(0, len(x), batch_size):
        attacks.direction(model, x[b:b + batch_size], attack="step_ll")


def run_precompute(cfg: PrecomputeConfig, **kw: Any) -> tuple[float, float, Path]:
    shutil.rmtree(cfg.out, ignore_errors=True)
    wall, cpu, (path,) = timed(lambda: precompute(cfg, **kw))
    return wall, cpu, path


def steady_rate(store: Path, workers: int) -> float | None:
    """Samples/s between the workers' first shards and the last one, from the records' mtimes."""
    m = open_store(store).manifest
    stamps = sorted(p.stat().st_mtime for p in (store / "shards").glob("*.json"))
    if len(stamps) <= workers or stamps[-1] <= stamps[workers - 1]:
        return None
    return (len(stamps) - workers) * m["shard_size"] / (stamps[-1] - stamps[workers - 1])


def measure(opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    log(f"training architecture B: 1 epoch on {opts.train_limit} MNIST images")
    run_dir = work / "B"
    train_s = train_clean(run_dir, "B", data_root=opts.data_root, limit=opts.train_limit, epochs=1, seed=0,
                          batch_size=64, device="cpu", log_every=10_000)
    base = dict(model=str(run_dir), dataset="mnist", data_root=opts.data_root, limit=opts.limit,
                attacks=("step_ll",), shard_size=opts.shard_size, batch_size=opts.batch_size, device="cpu")
    # Load once: precompute caches the dataset and model per process, so timing excludes loading.
    _open_inputs(str(run_dir.resolve()), None, False, "mnist", "train", opts.limit,
                 str(Path(opts.data_root).resolve()), torch.device("cpu"))
    x = create_dataset("mnist", data_root=opts.data_root, limit=opts.limit).images(slice(0, opts.limit))
    model = resolve_model(str(run_dir)).eval().requires_grad_(False)
    bare_loop(model, x[: opts.batch_size * 2], opts.batch_size)  # kernels' warm-up

    wall: dict[str, list[float]] = {k: [] for k in IN_PROCESS}
    cpu: dict[str, list[float]] = {k: [] for k in IN_PROCESS}
    stores: dict[str, Path] = {}
    for r in range(opts.rounds):
        log(f"round {r + 1}/{opts.rounds}: bare loop; precompute into zarr and wds, with and without overlap")
        w, c, _ = timed(lambda: bare_loop(model, x, opts.batch_size))
        wall["bare"].append(w)
        cpu["bare"].append(c)
        for name, (fmt, overlap) in RUNS.items():
            w, c, stores[name] = run_precompute(PrecomputeConfig(**base, out=str(work / name), format=fmt),
                                                overlap=overlap)
            wall[name].append(w)
            cpu[name].append(c)
    log(f"precompute on {opts.workers} dask workers")
    dask_s, _, stores["dask"] = run_precompute(PrecomputeConfig(**base, out=str(work / "dask"),
                                                                  dask_workers=opts.workers))

    a, b = open_store(stores["zarr"]).read(0, opts.limit), open_store(stores["dask"]).read(0, opts.limit)
    return {
        "train_s": train_s, "wall_s": wall, "cpu_s": cpu, "dask_s": dask_s,
        "steady": {"zarr": steady_rate(stores["zarr"], 1), "dask": steady_rate(stores["dask"], opts.workers)},
        "bits_zarr": float(store_info(stores["zarr"]).bits_per_element),
        "bits_wds": float(store_info(stores["wds"]).bits_per_element),
        "zero_fraction": float((a["direction"] == 0).mean()),
        "dask_equals_in_process": all(np.array_equal(a[k], b[k]) for k in a),
    }


def analyse(opts: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    n, wall, cpu = opts.limit, m["wall_s"], m["cpu_s"]
    paired = lambda t: {k: statistics.median(b / x for b, x in zip(t["bare"], t[k])) for k in RUNS}  # noqa: E731
    steady = m["steady"]
    return {
        "samples_per_s": {**{k: n / statistics.median(v) for k, v in wall.items()}, "dask": n / m["dask_s"]},
        "ratio_wall": paired(wall),
        "ratio_cpu": paired(cpu),
        "dask_end_to_end": statistics.median(wall["zarr"]) / m["dask_s"],
        "dask_steady": steady["dask"] / steady["zarr"] if steady["dask"] and steady["zarr"] else None,
        "bits_target_met": m["bits_zarr"] <= BITS_TARGET,
        "throughput_target_met": paired(wall)["zarr"] >= THROUGHPUT_TARGET,
    }


# --- Report ---------------------------------------------------------------------------------------

def render(opts: argparse.Namespace, command: str, info: dict[str, Any], m: dict[str, Any],
           res: dict[str, Any]) -> str:
    sps, rw, rc = res["samples_per_s"], res["ratio_wall"], res["ratio_cpu"]
    ok = lambda met: "met" if met else "**missed**"  # noqa: E731
    rows = [
        ("bits per direction element, zarr", f"{m['bits_zarr']:.3f}",
         f"target ≤ {BITS_TARGET}: {ok(res['bits_target_met'])}"),
        ("bits per direction element, wds", f"{m['bits_wds']:.3f}", "—"),
        ("bare `direction()` loop, no I/O", f"{sps['bare']:.0f} samples/s", "1.00"),
    ]
    for name, label in (("zarr", "zarr, overlapped writer"), ("zarr_sync", "zarr, writes in the compute thread"),
                        ("wds", "wds, overlapped writer"), ("wds_sync", "wds, writes in the compute thread")):
        target = f"; target ≥ {THROUGHPUT_TARGET}: {ok(res['throughput_target_met'])}" if name == "zarr" else ""
        rows.append((f"precompute → {label}", f"{sps[name]:.0f} samples/s",
                     f"{rw[name]:.2f} × bare (CPU time: {rc[name]:.2f}){target}"))
    steady = f"{res['dask_steady']:.2f}" if res["dask_steady"] else "n/a"
    rows.append((f"precompute → zarr, {opts.workers} dask workers", f"{sps['dask']:.0f} samples/s end to end",
                 f"{res['dask_end_to_end']:.2f} × in-process end to end; {steady} × in steady state"))
    gain = lambda k: 100 * (rw[k] / rw[f"{k}_sync"] - 1)  # noqa: E731
    lines = [
        f"Machine: {info['nproc']} cores ({info['cpu']}), {info['torch_threads']} torch threads, no GPU; torch "
        f"{info['torch']}, Python {info['python']}; {info['date']}. Load average {info['loadavg_start'][0]:.1f} at "
        f"the start and {info['loadavg_end'][0]:.1f} at the end (the machine is shared with other jobs: absolute "
        "rates are noisy; ratios are paired per round, and CPU-time ratios are given beside them).",
        "",
        f"Command: `{command}`",
        "",
        f"Step-LL store of architecture B (trained 1 epoch on {opts.train_limit} MNIST images in "
        f"{m['train_s']:.0f} s) over {opts.limit} real MNIST training images; batch size {opts.batch_size}, shard "
        f"size {opts.shard_size}; rates are medians of {opts.rounds} interleaved rounds, ratios the median of "
        "the per-round ratios to that round's bare loop.",
        "",
        "| measure | value | ratio / target |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Directions are {100 * m['zero_fraction']:.2f}% zeros. The {opts.workers}-worker store equals the "
        f"in-process one array for array: {'yes' if m['dask_equals_in_process'] else '**no**'}. "
        f"The background writer thread changes wall-clock throughput by {gain('zarr'):+.1f}% (zarr) and "
        f"{gain('wds'):+.1f}% (wds) against writing in the compute thread. With torch already on both cores "
        "the writer can only use the gaps in the compute, so it runs at a lower priority (nice 10; at equal "
        "priority it preempted torch's threads and was slower than writing inline); zarr's blosc encoding "
        "is a few percent of the compute, wds's per-sample PNG + gzip much more. "
        "wds spends more bits than zarr because each sample's direction is its own gzip'd .npy member: at "
        "28×28 the npy header and gzip framing are as large as the 98-byte sign plane (at 3×224×224 they "
        "are negligible). "
        f"The {opts.workers} dask workers (1 torch thread each) are compared with one process using 2 torch "
        "threads on the same 2 cores; end to end their figure carries the cluster's start-up and each worker "
        "loading the data and model, a fixed cost of several seconds that larger runs amortise.",
        "",
    ]
    return "\n".join(lines)


# --- Several attacks: one decode per image ----------------------------------------------------------

ATTACKS_HEADING = "precompute: several attacks, one decode per image"
ATTACKS_SIDES = ("per_attack", "forward_per_attack", "once")
ATTACKS_LABELS = {"per_attack": "a decode and a forward per attack (before)",
                  "forward_per_attack": "one decode per image, a forward per attack",
                  "once": "one decode per image, one forward per batch (now)"}


def _forward_per_attack(model, x, y=None, *, attacks, label="true", autocast=None):
    """attacks.directions without the shared forward: one direction() per attack."""
    from enspipe.attacks import direction

    return [direction(model, x, y, attack=a, label=label, autocast=autocast) for a in attacks]


GROUP_BY_RANGE = "groups.setdefault((*writers[0].shard_range(s), job.batch_size), [])"
GROUP_BY_ATTACK = "groups.setdefault((*writers[0].shard_range(s), job.batch_size, job.attack), [])"


def _stream_per_attack():
    """`compute.stream_shards` as it ran before: one stream (one loader, one sink thread), the jobs
    lacking a shard grouped per attack: each (attack, shard) decoded on its own and attacked alone
    (one forward per attack). Compiled from stream_shards' own source with the attack added to the
    group key, as the mutation row `precompute-decodes-per-attack` does, so nothing else differs."""
    import __future__
    import inspect

    from enspipe.precompute import compute

    src = inspect.getsource(compute.stream_shards)
    if src.count(GROUP_BY_RANGE) != 1:
        raise RuntimeError("bench_precompute: compute.stream_shards no longer groups its jobs by "
                           f"`{GROUP_BY_RANGE}`; update _stream_per_attack")
    namespace = dict(vars(compute))
    exec(compile(src.replace(GROUP_BY_RANGE, GROUP_BY_ATTACK), compute.__file__, "exec",
                 flags=__future__.annotations.compiler_flag, dont_inherit=True), namespace)
    return namespace["stream_shards"]


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure_attacks(opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    import enspipe.attacks as attacks_mod
    from enspipe.models import create_model, save_model
    from enspipe.precompute import compute
    from gpu_data import IMAGENET, make_jpeg_folder

    log(f"making {opts.images} ImageNet-like JPEGs ({IMAGENET[0]}-{IMAGENET[1]} px)")
    jpegs = make_jpeg_folder(work / "jpegs", images=opts.images, size=IMAGENET, classes=16, workers=2)
    torch.manual_seed(0)
    model = save_model(create_model("mobilenet_v3_small", num_classes=16), work / "mobilenet")
    base = dict(model=str(model), dataset=f"imagefolder:{jpegs}", image_size=224, attacks=("step_ll", "fgsm"),
                format="zarr", shard_size=64, batch_size=32, device="cpu", loader_workers=1)
    real, per_attack, shared = compute.stream_shards, _stream_per_attack(), attacks_mod.directions

    def run(side: str) -> tuple[float, float, float, list[Path]]:
        out = work / side
        shutil.rmtree(out, ignore_errors=True)
        compute.stream_shards = per_attack if side == "per_attack" else real  # run_in_process's stream
        attacks_mod.directions = shared if side == "once" else _forward_per_attack
        try:
            before = _children_cpu()
            wall, cpu, paths = timed(lambda: precompute(PrecomputeConfig(**base, out=str(out))))
            return wall, cpu, _children_cpu() - before, paths
        finally:
            compute.stream_shards, attacks_mod.directions = real, shared

    log("warm-up: both sides once (model and dataset loaded, kernels warm); their stores compared")
    stores = {side: run(side)[3] for side in ATTACKS_SIDES}
    records = lambda p: {s: r["files"] for s, r in open_store(p).manifest["shards"].items()}  # noqa: E731
    identical = all(records(a) == records(b) == records(c) for a, b, c in zip(*stores.values()))
    got: dict[str, dict[str, list[float]]] = {s: {"wall": [], "cpu": [], "decode_cpu": []} for s in ATTACKS_SIDES}
    for r in range(opts.rounds):
        order = ATTACKS_SIDES[r % 3:] + ATTACKS_SIDES[:r % 3]
        log(f"round {r + 1}/{opts.rounds}: {', then '.join(order)}")
        for side in order:
            wall, cpu, decode, _ = run(side)
            for k, v in (("wall", wall), ("cpu", cpu), ("decode_cpu", decode)):
                got[side][k].append(v)
    return {"sides": got, "identical": identical, "images": opts.images,
            "jpeg_kib": sum(p.stat().st_size for p in jpegs.rglob("*.JPEG")) / opts.images / 1024,
            "compute": measure_compute(opts)}


COMPUTE_CASES = {"mobilenet_v3_small at 224": ("mobilenet_v3_small", 224, 16), "C at 32": ("C", 32, 10)}


def measure_compute(opts: argparse.Namespace) -> dict[str, dict[str, dict[str, list[float]]]]:
    """The compute alone: wall and CPU seconds (this process, all threads) per batch (32 images in
    memory, or --images if fewer; the mean of 3 calls, 1 with --quick) of Step-LL and FGSM by
    `attacks.directions` (one forward) and by one `direction()` per attack, in eval mode with
    precompute's deterministic kernels, interleaved rounds (the order alternating)."""
    from enspipe.models import create_model
    from enspipe.precompute.compute import _deterministic

    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    n, calls = min(32, opts.images), 1 if opts.quick else 3
    for case, (name, size, classes) in COMPUTE_CASES.items():
        torch.manual_seed(0)
        model = create_model(name, num_classes=classes, input_size=(3, size, size)).eval().requires_grad_(False)
        x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))
        y = torch.arange(n) % classes
        sides = {"forward_per_attack": lambda: _forward_per_attack(model, x, y, attacks=("step_ll", "fgsm")),
                 "once": lambda: attacks.directions(model, x, y, attacks=("step_ll", "fgsm"))}
        out[case] = {side: {"wall": [], "cpu": []} for side in sides}
        with _deterministic():
            for fn in sides.values():
                fn()  # warm-up
            for r in range(max(3, opts.rounds)):
                for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    wall, cpu, _ = timed(lambda: [sides[side]() for _ in range(calls)])
                    out[case][side]["wall"].append(wall / calls)
                    out[case][side]["cpu"].append(cpu / calls)
    return out


def _compute_ratio(case: dict[str, dict[str, list[float]]], k: str) -> float:
    return statistics.median(p / q for p, q in zip(case["forward_per_attack"][k], case["once"][k]))


def render_attacks(opts: argparse.Namespace, command: str, info: dict[str, Any], m: dict[str, Any]) -> str:
    n, sides = m["images"], m["sides"]
    med = lambda side, k: statistics.median(sides[side][k])  # noqa: E731
    ratio = lambda k, a="per_attack", b="once": statistics.median(  # noqa: E731
        p / q for p, q in zip(sides[a][k], sides[b][k]))
    rows = []
    for side, label in ATTACKS_LABELS.items():
        rows.append(f"| {label} | {1000 * med(side, 'decode_cpu') / n:.2f} | {1000 * med(side, 'cpu') / n:.2f} | "
                    f"{n / med(side, 'wall'):.1f} | {med(side, 'wall'):.1f} "
                    f"({min(sides[side]['wall']):.1f}–{max(sides[side]['wall']):.1f}) |")
    load = ", ".join(f"{x:.1f}" for x in info["loadavg_start"])
    return "\n".join([
        f"`{command}` on {info['cpu']} ({info['nproc']} cores, shared: load {load} at the start, "
        f"{info['loadavg_end'][0]:.1f} at the end), torch {info['torch']}; {info['date']}.",
        "",
        f"Step-LL and FGSM stores (zarr) of mobilenet_v3_small (fixed random weights) over {n} ImageNet-like "
        f"JPEGs (`gpu_data.py`, 400-500 px, {m['jpeg_kib']:.0f} KiB mean) to 3x224x224; shard 64, batch 32, "
        f"one loader worker process (its CPU is the decode), {opts.rounds} interleaved rounds, the order rotating; "
        "medians (wall: range).",
        "",
        "| side | decode CPU-ms / image | driving process CPU-ms / image | images / s (wall) | wall s |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Medians of the per-round ratios:",
        "",
        f"- **Decode CPU per image: {ratio('decode_cpu'):.2f}x less** now than before (2 attacks: the ideal is "
        f"2). Wall: **{ratio('wall'):.2f}x faster** than before; the driving process's CPU: {ratio('cpu'):.2f}x less.",
        f"- The decode alone (a forward per attack on both sides): decode CPU "
        f"{ratio('decode_cpu', 'per_attack', 'forward_per_attack'):.2f}x less, wall "
        f"{ratio('wall', 'per_attack', 'forward_per_attack'):.2f}x. The shared forward alone (one decode on "
        f"both sides): wall {ratio('wall', 'forward_per_attack', 'once'):.2f}x, the driving process's CPU "
        f"{ratio('cpu', 'forward_per_attack', 'once'):.2f}x less.",
        f"- The stores of the three sides are identical (every shard's file records): "
        f"{'yes' if m['identical'] else '**no**'}.",
        f"- The compute alone (one batch of {min(32, n)} in memory, Step-LL and FGSM, eval mode, "
        f"{len(next(iter(m['compute'].values()))['once']['cpu'])} interleaved rounds; medians of the per-round "
        "ratios, one forward for both against a forward per attack): "
        + "; ".join(f"{case}: CPU {_compute_ratio(c, 'cpu'):.2f}x less ({1000 * statistics.median(c['once']['cpu']):.0f} "
                    f"vs {1000 * statistics.median(c['forward_per_attack']['cpu']):.0f} CPU-ms a batch), "
                    f"wall {_compute_ratio(c, 'wall'):.2f}x"
                    for case, c in m["compute"].items()) + ".",
        "- Before = one stream, one loader and one sink thread, as the old code ran, with the jobs lacking a shard "
        "grouped per attack (`compute.stream_shards` compiled from its own source with the attack in the group "
        "key): every (attack, shard) decoded its pixels and ran its own forward. "
        "On a GPU host the decode is the bound: on the H200 (DESIGN §4, issue 26) ResNet-50's input gradient "
        "runs 3,404 img/s and a core decodes ~182 ImageNet-sized JPEGs/s, so 16 cores decode less than one "
        "attack computes, and each further attack cost another full decode of the data set before. Here the one "
        "loader worker decodes on the second core while the first computes, so the wall clock follows the "
        "compute: the decode's saving is CPU time freed, which becomes wall-clock time where decoding is the bound.",
        "",
    ])


# --- Main ------------------------------------------------------------------------------------------

def _measured(opts: argparse.Namespace, out: Path, prefix: str, measure_fn) -> tuple[dict, dict]:
    """measure_fn(opts, work) in a scratch folder under OUT (removed unless --keep), and the machine's
    description with the load at the start and the end."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=out))
    info = {**machine(), "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    try:
        m = measure_fn(opts, work)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    return m, info


def main_attacks(opts: argparse.Namespace, command: str) -> int:
    from _common import publish

    out = Path(opts.out)
    m, info = _measured(opts, out, "precompute-attacks-", measure_attacks)
    md = render_attacks(opts, command, info, m)
    publish(out, "bench_precompute_attacks", {"command": command, "machine": info, "options": vars(opts),
                                              "measurements": m}, md, ATTACKS_HEADING, no_md=not opts.update_md)
    return 0


def main(argv: list[str] | None = None) -> int:
    opts, command = parse_args(argv)
    if opts.attacks:
        return main_attacks(opts, command)
    out = Path(opts.out)
    t_start = time.perf_counter()
    m, info = _measured(opts, out, "precompute-", measure)
    res = analyse(opts, m)
    section = render(opts, command, info, m, res)
    print(section)
    doc = {"command": command, "machine": info, "options": vars(opts), "wall_s": time.perf_counter() - t_start,
           "measurements": m, "analysis": res}
    (out / "bench_precompute.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    log(f"wrote {out / 'bench_precompute.json'} ({doc['wall_s']:.0f} s in all)")
    if opts.update_md:
        update_section(REPO / "BENCHMARKS.md", "precompute", section)
        log(f"updated the '## precompute' section of {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
