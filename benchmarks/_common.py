"""Shared by the benchmark scripts: the machine, clocks, small MNIST models and stores, the
timing of train()'s epoch loop, and the BENCHMARKS.md section writer.

Only the standard library is imported at the top: bench_peers.py's store readers are
spawned processes that re-import their parent script, and must not pay for torch.
"""
from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from enspipe.data import SampleSource
    from enspipe.train import StreamFactory, TrainConfig

REPO = Path(__file__).resolve().parents[1]


# --- Logging and the command line ------------------------------------------------------------

def logger(name: str) -> Callable[[str], None]:
    """A `log(msg)` that prints `[name HH:MM:SS] msg` to stderr (stdout carries the results)."""
    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    return log


def command_line(script: str, argv: list[str] | None) -> str:
    """How the benchmark was invoked, as a person would retype it (recorded beside results)."""
    args = sys.argv[1:] if argv is None else argv
    return f"python benchmarks/{script} {' '.join(shlex.quote(a) for a in args)}".strip()


# --- The machine -----------------------------------------------------------------------------

def machine(device: torch.device | None = None, packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, torch and its thread count, the
    load at the start (the machines are shared), and the device and package versions asked for."""
    import numpy as np
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "numpy": np.__version__,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": os.getloadavg(),
    }
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    from importlib.metadata import PackageNotFoundError, version

    for pkg in packages:
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- Clocks ----------------------------------------------------------------------------------

def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall s, CPU s of this process (all threads), fn's result)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def median_time(fn: Callable[[], Any], *, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class LoopClock:
    """The process CPU time of train()'s epoch loop, through its seams, window by window.

    train() makes a metrics record per log window (its `seconds` is the window's wall time;
    the windows tile the epoch loop). Pass `stream_factory` and `on_metrics` to train():
    a window's CPU time runs from the previous record, or from the epoch's stream being made
    (right before train() builds the epoch's loader and window), to this record; `records`
    holds every record with a `cpu_s` field added. On a shared machine CPU time is the
    cross-check that other people's load moves far less than wall time (with --workers 0
    the whole pipeline runs in this process). On CUDA the window's wall time already counts
    the step's kernels: the loop reads the loss with .item() after each step.
    """

    def __init__(self, stream: StreamFactory | None = None) -> None:
        self.stream = stream
        self.records: list[dict[str, Any]] = []
        self._c0 = time.process_time()

    def stream_factory(self, dataset: SampleSource, cfg: TrainConfig, epoch: int, rank: int,
                       world: int) -> torch.utils.data.IterableDataset:
        from enspipe.train import batch_stream

        self._c0 = time.process_time()
        return (self.stream or batch_stream)(dataset, cfg, epoch, rank, world)

    def on_metrics(self, record: dict[str, Any]) -> None:
        now = time.process_time()
        self.records.append({**record, "cpu_s": now - self._c0})
        self._c0 = now


# --- Small MNIST models and stores -------------------------------------------------------------

def train_clean(run_dir: Path | str, arch: str, *, data_root: str, limit: int, epochs: int, seed: int,
                **options: Any) -> float:
    """Train `arch` clean on the first `limit` MNIST training images into `run_dir` (a static
    model or a holdout for the measurements); returns the wall seconds it took."""
    from enspipe.train import TrainConfig, train

    cfg = TrainConfig(model=arch, dataset="mnist", data_root=data_root, limit=limit, mode="clean", epochs=epochs,
                      seed=seed, **options)
    t0 = time.perf_counter()
    train(cfg, run_dir)
    return time.perf_counter() - t0


def precompute_fgsm(model: Path | str, out: Path | str, *, data_root: str, limit: int, **options: Any) -> list[Path]:
    """The FGSM directions (predicted labels) of `model` over the first `limit` MNIST training
    images, as stores under `out`; returns their paths."""
    from enspipe.precompute import PrecomputeConfig, precompute

    return precompute(PrecomputeConfig(model=str(model), out=str(out), dataset="mnist", data_root=data_root,
                                       limit=limit, attacks=("fgsm",), label="pred", **options))


# --- BENCHMARKS.md -----------------------------------------------------------------------------

def update_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) the `## {heading}` section; every other section is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"## {heading}"), None)
    new = [f"## {heading}\n", "\n", section]
    if start is None:
        body = "".join(lines).rstrip("\n") + "\n\n" + "".join(new)
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        tail = lines[end:]
        body = "".join(lines[:start] + new + (["\n"] if tail else []) + tail)
    path.write_text(body)


def publish(out: str | Path, name: str, doc: dict[str, Any], md: str, heading: str, *, no_md: bool) -> None:
    """What a benchmark does with its results: OUT/name.json (every number, the command, the
    machine), the markdown printed, and BENCHMARKS.md's `## {heading}` section replaced by it
    unless `no_md` (CI's smoke runs leave BENCHMARKS.md alone)."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(md)
    if not no_md:
        update_section(REPO / "BENCHMARKS.md", heading, md)

