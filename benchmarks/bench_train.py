"""Benchmark: what ensemble adversarial training costs with precomputed stores (DESIGN §4).

    python benchmarks/bench_train.py --quick
    python benchmarks/bench_train.py                  # full: 60000 samples, model A (about 2 hours on 2 cores)

Measured side by side in one process, on the same model architecture (`--arch`), the same
real MNIST subset (`--limit`), batch size 64, eps 0.3, FGSM, one device and one torch
thread count:

  clean        train() --mode clean
  adv          train() --mode adv: an online FGSM pass on the adversarial half of every batch
  ens-adv      train() --mode ens-adv with two precomputed stores (static models D and B*):
               n = 3 sources; only batches that draw the model itself make an online pass
  reference    the reference code's pattern: every batch computes the FGSM direction of the
               model itself AND of every static model online, then uses the drawn source's
  drawn-only   online, but only the drawn source's direction (a static model's gradient is
               computed online only when that model is drawn)

All five train the same thing (same data order, same per-batch source draws, same
adversarial fraction and eps); only where the directions come from, and so the cost,
differs. The two online baselines run inside train() itself, through its seams: an
`adversarial` function that computes the static models' directions online, and a
`stream_factory` whose stream draws the sources exactly as the ens-adv stream does but
reads no store (the reference code read clean images only).

Timing: an epoch's time is the wall time of train()'s epoch loop, from the metrics records
train() hands `on_metrics` (its log windows tile the loop: samples / samples_per_s summed
over an epoch's windows), so model building, dataset loading and per-epoch checkpoint
writing are excluded. Configurations are interleaved in rounds (the start rotates each round) and the
median over rounds is reported, because this machine is shared and noisy. The process CPU
time of the same loop is logged beside it: on a loaded machine, `--threads 1` CPU-time
ratios are the stable ones (two threads that wait on each other under load inflate both).

Also measured: precompute time of the two stores (one-time, amortised over 1, 3 and 10
training runs), the per-batch costs that the cost model needs (so every ratio has a
prediction beside it), and the reader's throughput alone (BatchStream with both stores,
0 and 2 DataLoader workers) as a multiple of what the ens-adv trainer consumes.

Writes BENCH_DIR/bench_train.json, prints a markdown table and rewrites the `## train`
section of BENCHMARKS.md (other sections are left as they are).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from enspipe import attacks
from enspipe.data import SampleSource, create_dataset
from enspipe.models import resolve_model
from enspipe.stores import open_store
from enspipe.train import SELF, BatchStream, TrainConfig, batch_loader, batch_stream, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, LoopClock, command_line, logger, machine, median_time,  # noqa: E402
                     precompute_fgsm, train_clean, update_section)
STATIC_ARCHS = ("D", "B*")          # the two static models behind the stores (paper's Table 7 holdouts)
CONFIGS = ("clean", "adv", "ens-adv", "reference", "drawn-only")
ENS_ADV_TARGET = 1.25               # the target for ens-adv / clean with n = 3 sources
READER_TARGET = 3.0                 # the reader must outrun the trainer by this factor
RUN_EPOCHS = 6                      # epochs of one training run when amortising precompute (TrainConfig's default, the paper's MNIST setting)


# --- Options -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    data_root: str
    limit: int
    arch: str
    epochs: int            # timed epochs per run
    warmup_epochs: int     # untimed epochs at the start of every run
    rounds: int
    static_epochs: int     # clean epochs to train each static model before precomputing it
    batch_size: int
    threads: int
    reader_seconds: float  # minimum time spent measuring each reader setting
    out: str
    keep: bool
    update_md: bool
    from_json: tuple[str, ...] | None = None  # re-render these saved results instead of measuring


def parse_args(argv: list[str] | None = None) -> tuple[Options, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small settings: about 3 minutes on 2 idle CPU cores (much longer under load)")
    p.add_argument("--limit", type=int, help="MNIST training samples (quick: 4096, full: 60000)")
    p.add_argument("--arch", help="architecture being trained (quick: C, full: A)")
    p.add_argument("--epochs", type=int, help="timed epochs per run (default 1)")
    p.add_argument("--warmup-epochs", type=int, help="untimed epochs at the start of every run (default 0: the process-wide warm-up suffices)")
    p.add_argument("--rounds", type=int, help="interleaved repetitions of every configuration (quick: 3, full: 3)")
    p.add_argument("--static-epochs", type=int, help="clean epochs for each static model (quick: 1, full: 6)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--reader-seconds", type=float, help="time spent on each reader setting (quick: 3, full: 10)")
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--out", default=str(REPO / "out" / "bench-train"), help="results directory (BENCH_DIR)")
    p.add_argument("--keep", action="store_true", help="keep the run dirs and stores under BENCH_DIR/work")
    p.add_argument("--no-md", action="store_true", help="do not rewrite BENCHMARKS.md")
    p.add_argument("--from-json", metavar="PATH", nargs="+",
                   help="re-render saved bench_train.json file(s), one subsection each (measures nothing)")
    a = p.parse_args(argv)
    quick = a.quick
    pick = lambda value, q, full: value if value is not None else (q if quick else full)  # noqa: E731
    opts = Options(
        data_root=a.data_root, limit=pick(a.limit, 4096, 60000), arch=pick(a.arch, "C", "A"),
        epochs=pick(a.epochs, 1, 1), warmup_epochs=pick(a.warmup_epochs, 0, 0), rounds=pick(a.rounds, 3, 3),
        static_epochs=pick(a.static_epochs, 1, 6), batch_size=a.batch_size, threads=a.threads,
        reader_seconds=pick(a.reader_seconds, 3.0, 10.0), out=a.out, keep=a.keep, update_md=not a.no_md,
        from_json=tuple(a.from_json) if a.from_json else None)
    if opts.epochs < 1 or opts.rounds < 1 or opts.limit < opts.batch_size or opts.warmup_epochs < 0:
        p.error("--epochs and --rounds must be >= 1, --warmup-epochs >= 0, --limit >= --batch-size")
    return opts, command_line("bench_train.py", argv)


log = logger("bench_train")


# --- The online baselines (the reference code's cost pattern) ----------------------------

class StaticModels:
    """The static models behind the stores, loaded as precompute uses them: eval mode, no
    parameter gradients, and each with its store's label mode, so that an online direction
    is the one the store holds (up to the sign of near-zero gradients)."""

    def __init__(self, run_dirs: list[Path], store_paths: list[Path], device: torch.device):
        self.models = [resolve_model(str(d)).eval().requires_grad_(False).to(device) for d in run_dirs]
        self.labels = [open_store(p).identity.label_mode for p in store_paths]


def online_inputs(static: StaticModels, *, every_source: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor, bool]]:
    """train()'s `adversarial` seam with the static models' directions got online instead of
    streamed. every_source=True: the reference code, every source's direction on every
    batch; False: only the drawn source's."""

    def adversarial_inputs(model: torch.nn.Module, batch: dict[str, Any], cfg: TrainConfig,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
        # Same conversions as enspipe.train.adversarial_inputs, so only the direction's origin differs.
        x = batch["x"].to(device, non_blocking=True).float().div_(255.0)
        y = batch["y"].to(device, non_blocking=True)
        n_adv, source = batch["n_adv"], batch["source"]
        if n_adv == 0:
            return x, y, False
        x_part = x[:n_adv]
        wanted = range(1 + len(static.models)) if every_source else (source,)
        directions: dict[int, torch.Tensor] = {}
        for s in wanted:
            if s == SELF:  # the model being trained, in train mode, its predicted label (as train.py)
                directions[s], _, _ = attacks.direction(model, x_part, attack=cfg.attack, label="pred")
            else:
                directions[s], _, _ = attacks.direction(static.models[s - 1], x_part, attack=cfg.attack,
                                                        label=static.labels[s - 1])
        x_adv = attacks.apply_direction(x_part, directions[source], batch["eps"].to(device))
        return torch.cat([x_adv, x[n_adv:]]), y, source == SELF

    return adversarial_inputs


class CleanOnlyStream(BatchStream):
    """The ens-adv stream without its store reads: identical sample order and source draws
    (the draws depend only on the seed and the number of sources), but no direction is read
    or decoded, as in the reference code whose input pipeline is the clean images only."""

    class _NoStore:
        def prefetch(self, blocks: Any) -> None:  # the stream's read-ahead hint: nothing to fetch
            pass

    def _readers(self) -> list[Any]:
        return [self._NoStore() for _ in self.stores]  # a source per store, no store opened

    def _read_block(self, reader: Any, start: int, stop: int) -> np.ndarray:
        # The online baselines never use batch["d"]: a zero placeholder (no I/O) stands in.
        return np.zeros((stop - start, *self.dataset.geometry.shape), np.int8)


def clean_only_stream(dataset: SampleSource, cfg: TrainConfig, epoch: int, rank: int, world: int) -> CleanOnlyStream:
    """train()'s `stream_factory` seam for the online baselines (as enspipe.train.batch_stream)."""
    return CleanOnlyStream(dataset, cfg.shards, cfg, epoch=epoch, rank=rank, world_size=world,
                           full_batches_only=world > 1)


# --- Timing ----------------------------------------------------------------------------------

def epoch_stats(records: list[dict[str, Any]], *, num_samples: int, batch_size: int,
                skip_epochs: int) -> list[dict[str, float]]:
    """Per timed epoch: wall and CPU seconds of train()'s epoch loop, batches, online passes,
    from a run's metrics records (LoopClock's: metrics.jsonl's lines plus `cpu_s`).

    train()'s log windows tile its epoch loop (a window's clock starts where the previous
    one stopped; the first starts before the loader is iterated), so the loop's wall time
    is the sum over windows of samples / samples_per_s. A window logs its batch count, not
    its sample count: every batch is full except an epoch's last when batch_size does not
    divide N, and that one is in the epoch's last window.
    """
    per: dict[int, list[dict[str, Any]]] = {}
    for rec in records:
        per.setdefault(rec["epoch"], []).append(rec)
    short = math.ceil(num_samples / batch_size) * batch_size - num_samples  # missing from the last batch
    out = []
    for epoch in sorted(per)[skip_epochs:]:
        windows = per[epoch]
        samples = [w["batches"] * batch_size for w in windows]
        samples[-1] -= short
        assert sum(samples) == num_samples, f"epoch {epoch} saw {sum(samples)} samples, not {num_samples}"
        out.append({
            "seconds": sum(n / w["samples_per_s"] for n, w in zip(samples, windows)),
            "cpu_seconds": sum(w["cpu_s"] for w in windows),
            "batches": sum(w["batches"] for w in windows),
            "online_passes": sum(w["online_passes"] for w in windows),
            "source_counts": [sum(c) for c in zip(*(w["source_counts"] for w in windows))],
        })
    return out


# --- Setup: static models and their stores (one-time costs, reported) ---------------------

@dataclass
class Setup:
    dataset: SampleSource
    static_dirs: list[Path]
    stores: list[Path]
    static_train_s: dict[str, float]
    precompute_s: dict[str, float]


def base_config(opts: Options, **changes: Any) -> TrainConfig:
    """The one training configuration every measurement shares; only `changes` differ."""
    cfg = TrainConfig(model=opts.arch, dataset="mnist", data_root=opts.data_root, limit=opts.limit,
                      attack="fgsm", eps=0.3, batch_size=opts.batch_size, epochs=1, seed=0, device="cpu",
                      loader_workers=0)
    return replace(cfg, **changes)


def prepare(opts: Options, work: Path) -> Setup:
    dataset = create_dataset("mnist", data_root=opts.data_root, limit=opts.limit)
    static_dirs, stores, train_s, pre_s = [], [], {}, {}
    for k, arch in enumerate(STATIC_ARCHS):
        run_dir = work / "static" / arch.replace("*", "star")
        log(f"training static model {arch} ({opts.static_epochs} clean epoch(s) on {opts.limit} samples)")
        train_s[arch] = train_clean(run_dir, arch, data_root=opts.data_root, limit=opts.limit,
                                    epochs=opts.static_epochs, seed=100 + k, batch_size=opts.batch_size,
                                    device="cpu", loader_workers=0)
        log(f"precomputing {arch}'s FGSM directions")
        # A fresh store root per benchmark run, so precompute computes instead of reusing.
        t0 = time.perf_counter()
        paths = precompute_fgsm(run_dir, work / "stores", data_root=opts.data_root, limit=opts.limit, device="cpu")
        pre_s[arch] = time.perf_counter() - t0
        static_dirs.append(run_dir)
        stores.append(paths[0])
    return Setup(dataset, static_dirs, stores, train_s, pre_s)


# --- Per-batch costs: the cost model's inputs (this also warms every kernel up) ------------

def batch_costs(opts: Options, setup: Setup, static: StaticModels) -> dict[str, float]:
    """Median seconds per batch of: the training step (c), the online direction of the
    trained model on the adversarial half (a), and of each static model (s_D, s_B*)."""
    torch.manual_seed(0)
    n_adv = max(1, round(0.5 * opts.batch_size))
    x = setup.dataset.images(slice(0, opts.batch_size))
    y = torch.from_numpy(setup.dataset.labels[:opts.batch_size].astype(np.int64))
    model = resolve_model(opts.arch, num_classes=setup.dataset.num_classes, input_size=setup.dataset.geometry.shape)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    repeats = 15
    costs = {"c": median_time(step, repeats=repeats),
             "a": median_time(lambda: attacks.direction(model, x[:n_adv], attack="fgsm", label="pred"), repeats=repeats)}
    for arch, net, label in zip(STATIC_ARCHS, static.models, static.labels):
        costs[f"s_{arch}"] = median_time(lambda: attacks.direction(net, x[:n_adv], attack="fgsm", label=label),
                                         repeats=repeats)
    return costs


# --- The reader alone ----------------------------------------------------------------------

def reader_throughput(opts: Options, setup: Setup, workers: int) -> dict[str, Any]:
    """Samples/s of the ens-adv BatchStream with both stores, iterated through a DataLoader
    exactly as train() builds it (a fresh loader per epoch), with no training step."""
    cfg = base_config(opts, mode="ens-adv", shards=tuple(map(str, setup.stores)), loader_workers=workers)
    rates: list[float] = []
    spent, epoch = 0.0, 0
    while (spent < opts.reader_seconds or epoch < 2) and epoch < 100:
        loader = batch_loader(batch_stream(setup.dataset, cfg, epoch), cfg, torch.device("cpu"))
        t0 = time.perf_counter()
        n = sum(len(batch["y"]) for batch in loader)
        seconds = time.perf_counter() - t0
        assert n == len(setup.dataset), f"the reader yielded {n} samples, not {len(setup.dataset)}"
        rates.append(n / seconds)
        spent += seconds
        epoch += 1
    return {"workers": workers, "epochs": epoch, "samples_per_s": statistics.median(rates),
            "samples_per_s_all": rates}


# --- Training runs ---------------------------------------------------------------------------

def run_config(name: str, opts: Options, setup: Setup, static: StaticModels, run_dir: Path,
               seed: int) -> list[dict[str, float]]:
    shards = tuple(map(str, setup.stores))
    mode = {"clean": "clean", "adv": "adv"}.get(name, "ens-adv")
    cfg = base_config(opts, mode=mode, shards=shards if mode == "ens-adv" else (),
                      epochs=opts.warmup_epochs + opts.epochs, seed=seed)
    online = name in ("reference", "drawn-only")
    clock = LoopClock(clean_only_stream if online else None)
    train(cfg, run_dir, stream_factory=clock.stream_factory, on_metrics=clock.on_metrics,
          adversarial=online_inputs(static, every_source=name == "reference") if online else None)
    return epoch_stats(clock.records, num_samples=len(setup.dataset), batch_size=opts.batch_size,
                       skip_epochs=opts.warmup_epochs)


def run_rounds(opts: Options, setup: Setup, static: StaticModels, work: Path) -> dict[str, list[dict[str, Any]]]:
    """Every configuration once per round; the starting configuration rotates each round so
    no configuration always runs first (or right after the most expensive one).

    Round r uses seed r for every configuration: within a round all of them see the same
    initial weights, data order and source draws (so paired ratios compare like with like),
    while across rounds the share of batches drawing the model itself varies around 1/n
    instead of repeating one seed's draw."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for r in range(opts.rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for name in order:
            run_dir = work / "runs" / f"{name}-round{r}"
            t0, load = time.perf_counter(), os.getloadavg()[0]
            epochs = run_config(name, opts, setup, static, run_dir, seed=r)
            seconds = statistics.mean(e["seconds"] for e in epochs)
            cpu = statistics.mean(e["cpu_seconds"] for e in epochs)
            results[name].append({"round": r, "seed": r, "epoch_s": seconds, "epoch_cpu_s": cpu, "epochs": epochs,
                                  "call_s": time.perf_counter() - t0, "loadavg_1min_at_start": load})
            log(f"round {r + 1}/{opts.rounds} {name:>10}: {seconds:6.2f} s/epoch, {cpu:6.2f} CPU s "
                f"({epochs[0]['online_passes']} online passes in {epochs[0]['batches']} batches, load {load:.1f})")
            if not opts.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
    return results


# --- Analysis --------------------------------------------------------------------------------

def paired_ratio(results: dict[str, list[dict[str, Any]]], num: str, den: str,
                 key: str = "epoch_s") -> dict[str, float]:
    """num/den per round (both measured in the same round), then median and range: pairing
    cancels the slow drift of a shared machine's load between rounds."""
    per_round = [a[key] / b[key] for a, b in zip(results[num], results[den])]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "per_round": per_round}


def predictions(costs: dict[str, float], shares: list[float]) -> dict[str, float]:
    """Per-batch time predicted by the cost model, as a multiple of clean's.

    c: training step on the batch; a: online direction of the trained model on the
    adversarial half; s_k: static model k's direction on the half. shares: the fraction of
    batches that drew each source (self first) in the ens-adv runs; the baselines use the
    very same draws. Data loading and Python overhead are not in the model."""
    c, a = costs["c"], costs["a"]
    s = [costs[f"s_{arch}"] for arch in STATIC_ARCHS]
    per_batch = {
        "clean": c,
        "adv": c + a,
        "ens-adv": c + shares[0] * a,
        "reference": c + a + sum(s),
        "drawn-only": c + shares[0] * a + sum(p * sk for p, sk in zip(shares[1:], s)),
    }
    return {k: v / c for k, v in per_batch.items()}


def analyse(num_samples: int, num_stores: int, precompute_s: dict[str, float], costs: dict[str, float],
            readers: list[dict[str, Any]], results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    epoch_s = {k: statistics.median(r["epoch_s"] for r in v) for k, v in results.items()}
    epoch_cpu_s = {k: statistics.median(r["epoch_cpu_s"] for r in v) for k, v in results.items()}
    batches = sum(e["batches"] for r in results["ens-adv"] for e in r["epochs"])
    counts = [sum(x) for x in zip(*(e["source_counts"] for r in results["ens-adv"] for e in r["epochs"]))]
    shares = [c / batches for c in counts]
    n_sources = 1 + num_stores
    others = ("clean", "adv", "reference", "drawn-only")
    ratios = {f"ens-adv/{o}": paired_ratio(results, "ens-adv", o) for o in others}
    ratios_cpu = {f"ens-adv/{o}": paired_ratio(results, "ens-adv", o, "epoch_cpu_s") for o in others}
    to_clean = {k: paired_ratio(results, k, "clean") for k in CONFIGS}
    to_clean_cpu = {k: paired_ratio(results, k, "clean", "epoch_cpu_s") for k in CONFIGS}
    consumption = num_samples / epoch_s["ens-adv"]  # samples/s the ens-adv trainer eats
    precompute_total = sum(precompute_s.values())
    amortised = []
    for runs in (1, 3, 10):
        per_epoch = epoch_s["ens-adv"] + precompute_total / (runs * RUN_EPOCHS)
        amortised.append({"runs": runs, "ens_adv_epoch_s": per_epoch,
                          "x_clean": per_epoch / epoch_s["clean"], "x_adv": per_epoch / epoch_s["adv"],
                          "x_reference": per_epoch / epoch_s["reference"],
                          "x_drawn_only": per_epoch / epoch_s["drawn-only"]})
    return {
        "epoch_s": epoch_s,
        "epoch_cpu_s": epoch_cpu_s,
        "to_clean": to_clean,
        "to_clean_cpu": to_clean_cpu,
        "ratios": ratios,
        "ratios_cpu": ratios_cpu,
        "ens_adv_target_met_cpu": ratios_cpu["ens-adv/clean"]["median"] <= ENS_ADV_TARGET,
        "source_shares": shares,
        "n_sources": n_sources,
        # Cost model, a priori: the online pass is one fwd+bwd on the adversarial half (a = c/2),
        # made on a 1/n share of the batches: 1 + (1/2)(1/n).
        "predicted_a_priori": {"adv": 1.5, "ens-adv": 1 + 0.5 / n_sources},
        "predicted_from_costs": predictions(costs, shares),
        "ens_adv_target": ENS_ADV_TARGET,
        "ens_adv_target_met": ratios["ens-adv/clean"]["median"] <= ENS_ADV_TARGET,
        "trainer_consumption_samples_per_s": consumption,
        "reader": [{**r, "x_consumption": r["samples_per_s"] / consumption,
                    "target_met": r["samples_per_s"] / consumption >= READER_TARGET} for r in readers],
        "precompute_total_s": precompute_total,
        "amortised": amortised,
    }


# --- Report ----------------------------------------------------------------------------------

DESCRIPTIONS = {
    "clean": "no adversarial examples",
    "adv": "online FGSM on the model itself, every batch",
    "ens-adv": "drawn source; stored directions, online only when the model itself is drawn",
    "reference": "every source's direction online on every batch, drawn one used",
    "drawn-only": "drawn source's direction online (static models too), no store",
}


def _range(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no (missed)**"


def _verdict(r: dict[str, float], bound: float) -> str:
    """Met by the median; said plainly when the rounds' range straddles the bound."""
    if r["max"] <= bound:
        return "yes"
    if r["min"] > bound:
        return "**no (missed)**"
    return ("yes by the median, range straddles it" if r["median"] <= bound
            else "**no by the median**, range straddles it")


def render(opts: Options, command: str, info: dict[str, Any], static_train_s: dict[str, float],
           precompute_s: dict[str, float], costs: dict[str, float], res: dict[str, Any],
           results: dict[str, list[dict[str, Any]]]) -> str:
    num_stores = res["n_sources"] - 1
    n = res["n_sources"]
    pred = res["predicted_from_costs"]
    lines = [
        f"Measured {info['date']} on {info['nproc']} CPU cores ({info['cpu']}), torch {info['torch']}, "
        f"{info['torch_threads']} torch thread(s), no GPU. The machine is shared: load average "
        f"{info['loadavg_start'][0]:.1f} at the start and {info['loadavg_end'][0]:.1f} at the end, so wall times are "
        "noisy; every ratio is measured side by side in one run, and process CPU time is given as a cross-check.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Real MNIST (first {opts.limit} training samples), model `{opts.arch}` trained in every row, batch "
        f"{opts.batch_size}, FGSM, eps 0.3, adversarial half of each batch, `--workers 0`. ens-adv has "
        f"n = {n} sources: the model itself + {num_stores} stores of static models "
        f"{' and '.join(STATIC_ARCHS)} (each trained {opts.static_epochs} clean epoch(s), then precomputed). "
        "Epoch = wall time of train()'s epoch loop from its metrics.jsonl (setup and checkpoints excluded); "
        f"{opts.warmup_epochs} untimed warm-up epoch(s) per run after a process-wide warm-up, {opts.epochs} timed; "
        f"{opts.rounds} interleaved rounds (round r: seed r for every configuration, so the same weights, data order "
        "and source draws within a round): median (min–max). Ratios are paired within a round.",
        "",
        "| configuration | adversarial half from | online passes / batch | epoch wall (s) | × clean (wall) "
        "| epoch CPU (s) | × clean (CPU) | predicted × clean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        ep = [e for r in results[name] for e in r["epochs"]]
        online_per_batch = sum(e["online_passes"] for e in ep) / sum(e["batches"] for e in ep)
        if name == "reference":
            online_per_batch = 1 + num_stores  # self + every static model, each batch
        elif name == "drawn-only":
            online_per_batch = 1.0                    # the drawn source, whichever it is
        wall = [r["epoch_s"] for r in results[name]]
        cpu = [r["epoch_cpu_s"] for r in results[name]]
        lines.append(f"| {name} | {DESCRIPTIONS[name]} | {online_per_batch:.2f} | "
                     f"{res['epoch_s'][name]:.2f} ({min(wall):.2f}–{max(wall):.2f}) | {_range(res['to_clean'][name])} | "
                     f"{res['epoch_cpu_s'][name]:.2f} ({min(cpu):.2f}–{max(cpu):.2f}) | "
                     f"{_range(res['to_clean_cpu'][name])} | {pred[name]:.2f} |")
    shares = ", ".join(f"{s:.2f}" for s in res["source_shares"])
    lines += [
        "",
        f"Predicted × clean: per-batch model compute only, from medians measured in the same run: training step "
        f"c = {costs['c'] * 1e3:.0f} ms, online direction on the adversarial half a = {costs['a'] * 1e3:.0f} ms "
        "(trained model), " + ", ".join(f"s_{a} = {costs[f's_{a}'] * 1e3:.0f} ms" for a in STATIC_ARCHS)
        + f" (static models), with the observed source shares (self, {', '.join(STATIC_ARCHS)}) = ({shares}).",
        "",
        "| ratio: paired median (min–max) | wall | CPU | target | met (wall / CPU) |",
        "|---|---|---|---|---|",
    ]
    verdicts = {"ens-adv/clean": (f"≤ {ENS_ADV_TARGET} (cost model: 1 + ½·1/{n} = "
                                  f"{res['predicted_a_priori']['ens-adv']:.2f})", ENS_ADV_TARGET),
                "ens-adv/adv": ("< 1", 1.0), "ens-adv/reference": ("< 1", 1.0), "ens-adv/drawn-only": ("< 1", 1.0)}
    labels = {"ens-adv/reference": "ens-adv / reference (every gradient online)",
              "ens-adv/drawn-only": "ens-adv / drawn-only (drawn source online)"}
    for key, (target, bound) in verdicts.items():
        w, c = res["ratios"][key], res["ratios_cpu"][key]
        lines.append(f"| {labels.get(key, key.replace('/', ' / '))} | {_range(w)} | {_range(c)} | {target} | "
                     f"{_verdict(w, bound)} / {_verdict(c, bound)} |")
    cons = res["trainer_consumption_samples_per_s"]
    for r in res["reader"]:
        lines.append(f"| reader alone ({r['workers']} DataLoader workers, {r['samples_per_s']:.0f} samples/s) / "
                     f"ens-adv trainer ({cons:.0f} samples/s) | {r['x_consumption']:.1f}× | | ≥ {READER_TARGET:.0f}× | "
                     f"{_yes(r['target_met'])} |")
    pre = ", ".join(f"{a}: {s:.1f} s" for a, s in precompute_s.items())
    lines += [
        "",
        f"Precompute (one-time, both stores, {opts.limit} samples, in-process, wall): "
        f"{res['precompute_total_s']:.1f} s ({pre}). Training the static models, which every approach needs, took "
        + ", ".join(f"{a}: {s:.1f} s" for a, s in static_train_s.items())
        + f". Precompute amortised over training runs of {RUN_EPOCHS} epochs that share the stores (wall):",
        "",
        "| runs sharing the stores | ens-adv epoch + precompute share (s) | × clean | × adv | × reference | × drawn-only |",
        "|---|---|---|---|---|---|",
    ]
    for a in res["amortised"]:
        lines.append(f"| {a['runs']} | {a['ens_adv_epoch_s']:.2f} | {a['x_clean']:.2f} | {a['x_adv']:.2f} | "
                     f"{a['x_reference']:.2f} | {a['x_drawn_only']:.2f} |")
    lines += ["", *interpretation(res, costs, results, info)]
    return "\n".join(lines) + "\n"


def interpretation(res: dict[str, Any], costs: dict[str, float], results: dict[str, list[dict[str, Any]]],
                   info: dict[str, Any]) -> list[str]:
    """A short reading of the numbers, generated from them (so it cannot drift from the table)."""
    r = res["ratios"]
    n = res["n_sources"]
    ens = r["ens-adv/clean"]["median"]
    out = [
        "Reading: per batch, clean costs one training step c; an online single-step pass on the "
        "adversarial half costs about one more forward+backward on half the batch, a ≈ c/2 "
        f"(measured a/c = {costs['a'] / costs['c']:.2f}), so adv ≈ 1.5× clean. With stores only the batches that "
        f"draw the model itself (1/n of them) pay a, so ens-adv ≈ 1 + (a/c)/n = 1 + ½·1/{n} ≈ "
        f"{res['predicted_a_priori']['ens-adv']:.2f}× clean (DESIGN §4's 1 + 1/n is the whole-batch case, "
        "a = c, which would miss 1.25 for n = 3). "
        f"Measured (wall): ens-adv is {ens:.2f}× clean "
        + ("(target ≤ 1.25 met)" if res["ens_adv_target_met"] else "(**target ≤ 1.25 missed**)")
        + f", {r['ens-adv/adv']['median']:.2f}× adv, {r['ens-adv/reference']['median']:.2f}× the reference "
        f"pattern and {r['ens-adv/drawn-only']['median']:.2f}× the online drawn-source variant; in CPU time "
        f"ens-adv is {res['ratios_cpu']['ens-adv/clean']['median']:.2f}× clean "
        + ("(met)." if res["ens_adv_target_met_cpu"] else "(**missed**)."),
        "",
        # Why drawn-only can be close to ens-adv: what the stores save over it is only the static
        # models' share, which is small when they are cheap beside the trained model.
        f"Against drawn-only, the stores save only the static models' online passes, "
        f"Σ p_k·s_k = {sum(p * costs[f's_{a}'] for p, a in zip(res['source_shares'][1:], STATIC_ARCHS)) / costs['c']:.0%} "
        f"of a training step here ({', '.join(STATIC_ARCHS)} are cheap beside the trained model), which streaming the "
        f"directions costs back in part: measured ens-adv / drawn-only = {r['ens-adv/drawn-only']['median']:.2f} (wall), "
        f"{res['ratios_cpu']['ens-adv/drawn-only']['median']:.2f} (CPU). The gain grows with the static models' cost "
        "(the paper's ImageNet static models are as large as the trained one) and is largest against the reference "
        "pattern, which pays every source's pass on every batch.",
        "",
    ]
    out += noise_warning(res, results, info)
    best = max(res["reader"], key=lambda x: x["x_consumption"])
    worst = min(res["reader"], key=lambda x: x["x_consumption"])
    out.append(
        f"The reader alone delivers {worst['x_consumption']:.1f}×–{best['x_consumption']:.1f}× what the ens-adv "
        "trainer consumes "
        + ("(≥ 3× with every worker setting: the stream is not the bottleneck here)."
           if worst["target_met"] else
           f"(**below 3× with {worst['workers']} workers**)." if best["target_met"] else "(**below 3×: missed**).")
        + f" On {info['nproc']} cores reader workers would compete with the {info['torch_threads']} torch thread(s), "
        "so the training runs use `--workers 0` (the reader's cost is inside their epochs).")
    return out


def noise_warning(res: dict[str, Any], results: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> list[str]:
    """Say so when the numbers cannot be right: every adversarial configuration does all of
    clean's work and more, and reference does all of drawn-only's and more, so a ratio
    below 1 there can only be the machine's load moving the epochs more than the effect."""
    impossible = [f"{k} / clean" for k in CONFIGS[1:] if res["to_clean"][k]["median"] < 1]
    if paired_ratio(results, "reference", "drawn-only")["median"] < 1:
        impossible.append("reference / drawn-only")
    def worst(key: str) -> tuple[float, str]:
        """The largest max/min - 1 of one configuration's epoch between rounds."""
        return max((max(r[key] for r in v) / min(r[key] for r in v) - 1, k) for k, v in results.items())

    (wall, wall_k), (cpu, cpu_k) = worst("epoch_s"), worst("epoch_cpu_s")
    loads = [r["loadavg_1min_at_start"] for v in results.values() for r in v if "loadavg_1min_at_start" in r]
    loads = loads or [info["loadavg_start"][0], info["loadavg_end"][0]]
    spread = (f"one configuration's epoch varied between rounds by up to {wall:.0%} in wall time ({wall_k}) and "
              f"{cpu:.0%} in CPU time ({cpu_k}), under a 1-minute load average of {min(loads):.1f}–{max(loads):.1f} "
              f"on {info['nproc']} cores")
    if not impossible:
        return [f"Noise: {spread}.", ""]
    return [f"**Noise warning**: {', '.join(impossible)} came out below 1, which no real cost can give. {spread[0].upper() + spread[1:]}; "
            "the load moved the epochs by more than the effects being measured, so on this run the ratios (and "
            "the verdicts above) are not evidence for or against the targets; rerun `--quick` on a quiet "
            "machine.", ""]


# --- Main ------------------------------------------------------------------------------------

def measure(opts: Options, command: str) -> dict[str, Any]:
    """Run every measurement; return the results document (what bench_train.json holds)."""
    torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
    info = {**machine(), "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    t_start = time.perf_counter()
    try:
        setup = prepare(opts, work)
        static = StaticModels(setup.static_dirs, setup.stores, torch.device("cpu"))
        log("per-batch costs (also the kernels' warm-up)")
        costs = batch_costs(opts, setup, static)
        log("reader throughput, 0 and 2 DataLoader workers")
        readers = [reader_throughput(opts, setup, w) for w in (0, 2)]
        log(f"training runs: {len(CONFIGS)} configurations x {opts.rounds} rounds")
        results = run_rounds(opts, setup, static, work)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    return {"command": command, "machine": info, "options": asdict(opts), "wall_s": time.perf_counter() - t_start,
            "num_samples": len(setup.dataset), "num_stores": len(setup.stores),
            "static_train_s": setup.static_train_s, "precompute_s": setup.precompute_s, "batch_costs_s": costs,
            "readers": readers, "runs": results}


def report(opts: Options, doc: dict[str, Any]) -> str:
    """Analyse a results document (adding `analysis` to it) and render its markdown."""
    # (Older result files lack num_samples/num_stores/readers: fall back to what they hold.)
    num_samples = doc.get("num_samples", opts.limit)
    num_stores = doc.get("num_stores", doc.get("analysis", {}).get("n_sources", 3) - 1)
    readers = doc.get("readers") or doc["analysis"]["reader"]
    doc["analysis"] = analyse(num_samples, num_stores, doc["precompute_s"], doc["batch_costs_s"], readers, doc["runs"])
    return render(opts, doc["command"], doc["machine"], doc["static_train_s"], doc["precompute_s"],
                  doc["batch_costs_s"], doc["analysis"], doc["runs"])


def main(argv: list[str] | None = None) -> int:
    opts, command = parse_args(argv)
    if opts.from_json:
        # Re-render saved runs (e.g. after improving the report's wording): nothing is
        # measured; each run keeps its own numbers, options and command.
        parts = []
        for path in opts.from_json:
            doc = json.loads(Path(path).read_text())
            saved = replace(Options(**{**doc["options"], "from_json": None}), update_md=opts.update_md)
            parts.append((doc["command"], report(saved, doc)))
        section = parts[0][1] if len(parts) == 1 else "\n".join(
            f"### {i}. `{cmd}`\n\n{text}" for i, (cmd, text) in enumerate(parts, 1))
    else:
        doc = measure(opts, command)
        section = report(opts, doc)
        path = Path(opts.out) / "bench_train.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {path} ({doc['wall_s']:.0f} s in all)")
    print(section)
    if opts.update_md:
        update_section(REPO / "BENCHMARKS.md", "train", section)
        log(f"updated the '## train' section of {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
