"""Side by side with the peers (issue #8): enspipe against ART and torchattacks.

    pip install adversarial-robustness-toolbox && pip install --no-deps torchattacks
    python benchmarks/bench_peers.py --quick                 # a few minutes on 2 CPU cores
    python benchmarks/bench_peers.py --full --device cuda    # GPU machine sizes
    python benchmarks/bench_peers.py --smoke                 # ~1.5 min: the test suite's check (figures meaningless)

Without ART or torchattacks installed (`--peers auto`, the default) every part still runs
enspipe's side and leaves the missing peer's rows out, saying so: the suite's smoke run
keeps parts 1-3 from rotting on a machine without the `bench` extra. `--peers all` refuses
to start without both.

(torchattacks 3.5.1 pins requests~=2.25.1 but never imports it: --no-deps keeps pip from
downgrading requests/idna/urllib3 under everything else; see BENCHMARKS.md `## peers`.)

Four measurements, all on real MNIST (torchvision layout under --data-root), the same
model, batch size, number of samples and device for every contender:

1. Ensemble adversarial training end to end: enspipe `ens-adv` (two precomputed stores),
   `clean` (the physical limit of an epoch), `adv` (online single-step), the reference
   code's pattern (every source's gradient online on every batch) and ART's
   AdversarialTrainer (which precomputes the static attacks in memory, per run). Wall time
   per epoch (with enspipe's precompute amortised over 1, 3 and 10 runs that reuse the
   stores), peak RSS, clean error and max black-box error from a holdout model.
2. Peak memory as N grows: enspipe's trainer vs ART's trainer, one fresh process each.
3. Attack throughput: enspipe fgsm / pgd / rand_fgsm vs torchattacks FGSM / PGD / RFGSM,
   with an agreement check of the outputs.
4. Store read throughput at ImageNet geometry (3x224x224) vs what a ResNet-50 training
   step consumes here and what an A100-class GPU needs.

The machine may be shared and noisy: every configuration is measured in interleaved
rounds inside one run and the tables report medians and ratios. Trainers run in fresh
subprocesses (benchmarks/peers_tasks.py) so their peak RSS is their own. Results go to
WORKDIR/results.json and a markdown section (WORKDIR/peers.md, or --markdown PATH).

Nothing here is imported by the enspipe package; the peers are imported only inside the
functions that use them.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # torch is imported inside functions: spawned store readers must not pay for it
    import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the peers_* helpers and _common sit beside this script
from _common import command_line, logger, machine, median, sync  # noqa: E402

TASKS_PY = HERE / "peers_tasks.py"
TRAINED = "B"                      # the architecture being trained (paper Table 5)
STATICS = {"static_B": ("B", 101), "static_D": ("D", 102)}  # pre-trained static models: (arch, seed)
HOLDOUT = ("A", 103)               # black-box source, never seen in training
EPS = 0.3                          # MNIST eps of the paper
BATCH = 64                         # enspipe's default training batch (the reference code's)
PRECOMPUTE_BATCH = 256
AMORTISE_RUNS = (1, 3, 10)
GPU_IMAGES_PER_S = (2500, 3000)    # ResNet-50 AMP training per A100 (NOTES: DALI, FFCV)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between --quick (2 CPU cores) and --full (a GPU machine)."""

    name: str
    n_train: int                   # training samples of part 1
    n_test: int                    # test samples for the training result
    epochs: int                    # epochs per training run in part 1
    rounds: int                    # interleaved repetitions of part 1
    setup_limit: int               # samples the static/holdout models are trained on
    setup_epochs: int
    memory_ns: tuple[int, ...]     # N of part 2
    memory_steps: int | None       # enspipe training steps per memory run (None: a whole epoch)
    memory_art_steps: int | None   # ART steps after its precompute (None: a whole epoch)
    attack_batch: int
    attack_rounds: int
    store_n: int                   # samples in each synthetic 3x224x224 store
    store_read_n: int | None       # samples delivered per read measurement (None: the whole store)
    store_rounds: int
    resnet_batch: int
    resnet_steps: int


QUICK = Sizes(name="quick", n_train=1024, n_test=500, epochs=1, rounds=3, setup_limit=1024, setup_epochs=1,
              memory_ns=(1024, 4096, 16384), memory_steps=34, memory_art_steps=1, attack_batch=64, attack_rounds=6,
              store_n=2048, store_read_n=1024, store_rounds=2, resnet_batch=4, resnet_steps=2)
# The test suite's smoke run (tests/bench/test_benchmarks_smoke.py): every code path of the chosen
# parts at the smallest sizes that still run them (one N in part 2: each N is two fresh
# processes); its figures mean nothing.
SMOKE = Sizes(name="smoke", n_train=128, n_test=64, epochs=1, rounds=1, setup_limit=128, setup_epochs=1,
              memory_ns=(128,), memory_steps=2, memory_art_steps=1, attack_batch=16, attack_rounds=1,
              store_n=64, store_read_n=32, store_rounds=1, resnet_batch=1, resnet_steps=1)
FULL = Sizes(name="full", n_train=60000, n_test=10000, epochs=1, rounds=3, setup_limit=60000, setup_epochs=3,
             memory_ns=(10000, 30000, 60000), memory_steps=None, memory_art_steps=None, attack_batch=256,
             attack_rounds=10, store_n=8192, store_read_n=None, store_rounds=3, resnet_batch=128, resnet_steps=20)
STORE_SHARD = 1024                 # precompute's default shard size
PACKAGES = ("adversarial-robustness-toolbox", "torchattacks", "zarr", "webdataset", "enspipe")  # versions reported
TRAIN_BLOCK = 256                  # TrainConfig.block_size default


log = logger("bench_peers")


# --- child processes -----------------------------------------------------------------------

THREADS: int | None = None  # --threads: torch intra-op threads in every process (None: torch's default)


def run_child(task: str, args: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Run one task of peers_tasks.py in a fresh interpreter; its result dict."""
    args = {**args, "threads": THREADS}
    tag = uuid.uuid4().hex[:8]
    args_path, result_path = tmp / f"{task}-{tag}.args.json", tmp / f"{task}-{tag}.result.json"
    args_path.write_text(json.dumps(args))
    env = {k: v for k, v in os.environ.items() if k != "ENSPIPE_PROGRESS"}  # no progress bars in logs
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(TASKS_PY), task, str(args_path), str(result_path)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child task {task} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = time.perf_counter() - t0
    return result


# --- setup ---------------------------------------------------------------------------------

def setup_models(work: Path, sizes: Sizes, data_root: str, device: str, tmp: Path) -> dict[str, str]:
    """Train (or reuse from WORKDIR) the static models and the holdout with enspipe clean."""
    specs = {role: {"arch": arch, "seed": seed, "run_dir": str(work / "models" / role)}
             for role, (arch, seed) in {**STATICS, "holdout": HOLDOUT}.items()}
    res = run_child("setup", {"models": specs, "data_root": data_root, "limit": sizes.setup_limit,
                              "epochs": sizes.setup_epochs, "batch_size": BATCH, "device": device}, tmp)
    for role, r in res["models"].items():
        log(f"setup {role}: " + ("reused" if r["reused"] else f"trained in {r['seconds']:.1f} s"))
    return {role: r["run_dir"] for role, r in res["models"].items()}


# --- part 1: ensemble adversarial training end to end ------------------------------------

CONTENDERS = ("enspipe ens-adv", "enspipe clean", "enspipe adv", "reference pattern", "ART AdversarialTrainer")
# The peers measured in this run (`--peers`): the import name of each that is installed.
PEER_MODULES = {"art": "adversarial-robustness-toolbox", "torchattacks": "torchattacks"}
PEERS: set[str] = set(PEER_MODULES)


def contenders() -> tuple[str, ...]:
    """Part 1's contenders in this run: ART's only when it is measured."""
    return tuple(c for c in CONTENDERS if c != "ART AdversarialTrainer" or "art" in PEERS)


def part1_training(work: Path, sizes: Sizes, data_root: str, device: str, models: dict[str, str],
                   tmp: Path) -> dict[str, Any]:
    statics = [models[k] for k in STATICS]
    common = {"data_root": data_root, "limit": sizes.n_train, "arch": TRAINED, "eps": EPS, "epochs": sizes.epochs,
              "batch_size": BATCH, "seed": 0, "device": device}
    active = contenders()
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in active}
    precomputes: list[dict[str, Any]] = []
    for r in range(sizes.rounds):
        # A fresh store root per round: precompute finds complete stores and would skip them.
        shutil.rmtree(work / "stores" / f"round{r}", ignore_errors=True)
        pre = run_child("precompute", {"statics": statics, "out": str(work / "stores" / f"round{r}"),
                                       "data_root": data_root, "limit": sizes.n_train,
                                       "batch_size": PRECOMPUTE_BATCH, "device": device}, tmp)
        precomputes.append(pre)
        log(f"round {r}: precompute of {len(statics)} stores {pre['seconds']:.1f} s")
        runs = work / "runs" / f"round{r}"
        jobs: dict[str, tuple[str, dict[str, Any]]] = {
            "enspipe ens-adv": ("enspipe_train", {"mode": "ens-adv", "shards": pre["stores"]}),
            "enspipe clean": ("enspipe_train", {"mode": "clean"}),
            "enspipe adv": ("enspipe_train", {"mode": "adv"}),
            "reference pattern": ("reference_train", {"statics": statics}),
            "ART AdversarialTrainer": ("art_train", {"statics": statics, "precompute_batch_size": PRECOMPUTE_BATCH}),
        }
        order = list(active[r % len(active):] + active[:r % len(active)])  # rotate against drift
        for name in order:
            task, extra = jobs[name]
            run_dir = runs / name.replace(" ", "_")
            shutil.rmtree(run_dir, ignore_errors=True)  # a kept WORKDIR holds the last run's
            res = run_child(task, {**common, **extra, "run_dir": str(run_dir)}, tmp)
            rows[name].append(res)
            log(f"round {r}: {name}: {res['seconds']:.1f} s, peak RSS {res['rss_peak_mb']:.0f} MiB")
    quality = evaluate_models({c: rows[c][0]["run_dir"] for c in active}, models["holdout"], sizes, data_root,
                              device)
    return {"rows": rows, "precompute": precomputes, "quality": quality, "device": device}


def evaluate_models(runs: dict[str, str], holdout: str, sizes: Sizes, data_root: str,
                    device: str) -> dict[str, dict[str, float]]:
    """Clean error and black-box error (FGSM and Step-LL crafted on the holdout, eps 0.3).

    This is the black-box half of enspipe.evaluate (same attacks, same eps, labels and
    Wilson intervals), without the white-box attacks that table does not need.
    """
    import torch

    from enspipe import attacks
    from enspipe.data import create_dataset
    from enspipe.evaluate import wilson_interval
    from enspipe.models import load_model

    dev = torch.device(device)
    data = create_dataset("mnist", split="test", data_root=data_root, limit=sizes.n_test)
    targets = {name: load_model(path).to(dev).eval() for name, path in runs.items()}
    source = load_model(holdout).to(dev).eval()
    errors = {name: {"clean": 0, "fgsm": 0, "step_ll": 0} for name in targets}
    for s in range(0, len(data), 256):
        sl = slice(s, min(len(data), s + 256))
        x, y = data.images(sl).to(dev), torch.as_tensor(data.labels[sl], device=dev)
        crafted = {"clean": x, "fgsm": attacks.fgsm(source, x, y, eps=EPS), "step_ll": attacks.step_ll(source, x, eps=EPS)}
        with torch.no_grad():
            for name, m in targets.items():
                for kind, xa in crafted.items():
                    errors[name][kind] += int((m(xa).argmax(1) != y).sum())
    n = len(data)
    out: dict[str, dict[str, float]] = {}
    for name, e in errors.items():
        worst = max(("fgsm", "step_ll"), key=lambda k: e[k])
        out[name] = {"n": n, "clean_error": e["clean"] / n, "clean_ci95": wilson_interval(e["clean"], n),
                     "blackbox_fgsm": e["fgsm"] / n, "blackbox_step_ll": e["step_ll"] / n,
                     "blackbox_max": e[worst] / n, "blackbox_max_attack": worst,
                     "blackbox_max_ci95": wilson_interval(e[worst], n)}
    return out


# --- part 2: memory as N grows ---------------------------------------------------------------

def part2_memory(work: Path, sizes: Sizes, data_root: str, device: str, models: dict[str, str],
                 tmp: Path) -> list[dict[str, Any]]:
    statics = [models[k] for k in STATICS]
    out = []
    for n in sizes.memory_ns:
        # Stores under round 0's root: a store that part 1 already made for this N is reused.
        pre = run_child("precompute", {"statics": statics, "out": str(work / "stores" / "round0"), "data_root": data_root,
                                       "limit": n, "batch_size": PRECOMPUTE_BATCH, "device": device}, tmp)
        common = {"data_root": data_root, "limit": n, "arch": TRAINED, "eps": EPS, "epochs": 1, "batch_size": BATCH,
                  "seed": 0, "device": device}
        run_dir = work / "runs" / "memory" / f"enspipe-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        ens = run_child("enspipe_train", {**common, "mode": "ens-adv", "shards": pre["stores"],
                                          "max_steps": sizes.memory_steps, "run_dir": str(run_dir)}, tmp)
        # ART allocates everything N-sized in its precompute, before its first step.
        art = run_child("art_train", {**common, "statics": statics, "precompute_batch_size": PRECOMPUTE_BATCH,
                                      "max_steps": sizes.memory_art_steps, "run_dir": None}, tmp) \
            if "art" in PEERS else None
        out.append({"n": n, "precompute": pre, "enspipe": ens, "art": art})
        log(f"memory N={n}: enspipe {ens['rss_peak_mb']:.0f} MiB ({ens['steps']} steps), "
            + (f"ART {art['rss_peak_mb']:.0f} MiB ({art['steps']} steps)" if art else "ART not measured"))
    return out


# --- part 3: attack throughput ---------------------------------------------------------------

def part3_attacks(sizes: Sizes, data_root: str, device: str, models: dict[str, str]) -> dict[str, Any]:
    """enspipe's attacks against torchattacks' on the same model, batch and device.

    Conventions made equal: both take [0, 1] input (enspipe models normalise inside; no
    torchattacks normalisation is set), both use the true labels, the model is in eval
    mode for both (torchattacks switches to eval itself), eps = 0.3, PGD alpha = 2.5*eps/10
    (enspipe's default, set explicitly on torchattacks), R+FGSM alpha = eps/2 with one
    gradient step (torchattacks' RFGSM is iterative, 10 steps by default: steps=1 is the
    paper's R+FGSM, eq. 7). Without torchattacks (`--peers`), enspipe's side alone is timed.
    """
    import torch

    from enspipe import attacks as E
    from enspipe.data import create_dataset
    from enspipe.models import load_model

    dev = torch.device(device)
    model = load_model(models["static_B"]).to(dev).eval()
    data = create_dataset("mnist", split="test", data_root=data_root, limit=sizes.attack_batch)
    x, y = data.images(slice(None)).to(dev), torch.as_tensor(data.labels, device=dev)
    alpha_pgd = 2.5 * EPS / 10

    gen = torch.Generator().manual_seed(0)
    ens_fns: dict[str, Callable[[], torch.Tensor]] = {
        "FGSM": lambda: E.fgsm(model, x, y, eps=EPS),
        "PGD, 10 steps": lambda: E.pgd(model, x, y, eps=EPS, steps=10, alpha=alpha_pgd, generator=gen),
        "R+FGSM": lambda: E.rand_fgsm(model, x, y, eps=EPS, alpha=EPS / 2, generator=gen),
    }
    calls = {"FGSM": "fgsm vs FGSM", "PGD, 10 steps": "pgd(steps=10) vs PGD(steps=10)",
             "R+FGSM": "rand_fgsm vs RFGSM(steps=1)"}
    ta_fns: dict[str, Callable[[], torch.Tensor]] = {}
    if "torchattacks" in PEERS:
        import torchattacks

        ta_fgsm = torchattacks.FGSM(model, eps=EPS)
        ta_pgd = torchattacks.PGD(model, eps=EPS, alpha=alpha_pgd, steps=10, random_start=True)
        ta_rfgsm = torchattacks.RFGSM(model, eps=EPS, alpha=EPS / 2, steps=1)
        ta_fns = {"FGSM": lambda: ta_fgsm(x, y), "PGD, 10 steps": lambda: ta_pgd(x, y),
                  "R+FGSM": lambda: ta_rfgsm(x, y)}
    wall: dict[str, dict[str, list[float]]] = {k: {"enspipe": [], "torchattacks": []} for k in ens_fns}
    cpu: dict[str, dict[str, list[float]]] = {k: {"enspipe": [], "torchattacks": []} for k in ens_fns}
    for fn in (*ens_fns.values(), *ta_fns.values()):  # warm-up: first-call allocations and lazy inits
        fn()
    for _ in range(sizes.attack_rounds):
        for name, ens in ens_fns.items():
            # A-B-B-A in every round: a linear drift of the shared machine's load hits both
            # libraries alike. CPU time (all of this process's threads) is recorded beside wall
            # time: it does not count the time the scheduler gives to other users' processes.
            ta = ta_fns.get(name)
            order = (("enspipe", ens), ("torchattacks", ta), ("torchattacks", ta), ("enspipe", ens)) if ta \
                else (("enspipe", ens), ("enspipe", ens))
            for lib, fn in order:
                sync(dev)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync(dev)
                wall[name][lib].append(time.perf_counter() - t0)
                cpu[name][lib].append(time.process_time() - c0)

    # Agreement. FGSM is deterministic. R+FGSM draws sign(N(0, I)): enspipe from its CPU
    # generator, torchattacks from the global generator; seeding both alike makes the noise
    # equal on CPU. PGD's random starts are drawn differently (uniform via rand*2-1 vs
    # uniform_(-eps, eps)), so its agreement is checked with random_start=False on both.
    # The error columns are those of the same compared outputs.
    agree: dict[str, dict[str, Any]] = {}
    if ta_fns:
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}
        outputs["FGSM"] = (E.fgsm(model, x, y, eps=EPS), ta_fgsm(x, y), "deterministic")
        torch.manual_seed(1234)
        b = ta_rfgsm(x, y)
        a = E.rand_fgsm(model, x, y, eps=EPS, alpha=EPS / 2, generator=torch.Generator().manual_seed(1234))
        outputs["R+FGSM"] = (a, b, "same seed" + (" (but CPU noise vs CUDA noise)" if dev.type == "cuda" else ""))
        a = E.pgd(model, x, y, eps=EPS, steps=10, alpha=alpha_pgd, random_start=False)
        b = torchattacks.PGD(model, eps=EPS, alpha=alpha_pgd, steps=10, random_start=False)(x, y)
        outputs["PGD, 10 steps"] = (a, b, "random_start=False on both")
        for name, (a, b, how) in outputs.items():
            agree[name] = _agreement(a, b, how)
            with torch.no_grad():
                agree[name]["error_enspipe"] = float((model(a).argmax(1) != y).float().mean())
                agree[name]["error_torchattacks"] = float((model(b).argmax(1) != y).float().mean())

    rows = []
    n = sizes.attack_batch
    for name, what in calls.items():
        e, ec = n / median(wall[name]["enspipe"]), n / median(cpu[name]["enspipe"])
        row: dict[str, Any] = {"attack": name, "calls": what, "enspipe_sps": e, "enspipe_sps_cpu": ec,
                               "spread": _rel_iqr(wall[name]["enspipe"]), "wall": wall[name], "cpu": cpu[name]}
        if ta_fns:
            t, tc = n / median(wall[name]["torchattacks"]), n / median(cpu[name]["torchattacks"])
            row.update(torchattacks_sps=t, ratio=e / t, torchattacks_sps_cpu=tc, ratio_cpu=ec / tc,
                       spread=max(row["spread"], _rel_iqr(wall[name]["torchattacks"])),
                       target_met=e / t >= 0.95, target_met_cpu=ec / tc >= 0.95, **agree[name])
            log(f"attack {name}: enspipe {e:.0f}/s, torchattacks {t:.0f}/s, ratio {e / t:.3f} (CPU time: {ec / tc:.3f})")
        else:
            log(f"attack {name}: enspipe {e:.0f}/s (torchattacks not measured)")
        rows.append(row)
    return {"batch": n, "model": f"{TRAINED} (static_B)", "rounds": sizes.attack_rounds, "rows": rows,
            "torchattacks": bool(ta_fns)}


def _rel_iqr(xs: list[float]) -> float:
    """Interquartile range over the median: the run-to-run spread of one timing."""
    q1, q3 = np.percentile(xs, [25, 75])
    return float((q3 - q1) / np.median(xs))


def _agreement(a: torch.Tensor, b: torch.Tensor, how: str) -> dict[str, Any]:
    import torch

    diff = (a - b).abs()
    return {"equal": bool(torch.equal(a, b)), "max_abs_diff": float(diff.max()),
            "elements_differing": int((diff > 0).sum()), "elements": a.numel(), "agreement_how": how}


# --- part 4: store throughput ---------------------------------------------------------------

STORE_ROWS = (
    # (format, block size, order, reader cache in shards or None for the default, what it stands for)
    ("zarr", TRAIN_BLOCK, "shuffled", None, "trainer default: 256-sample blocks, shuffled"),
    ("wds", STORE_SHARD, "shuffled", None, "whole 1024-sample tar shards, shuffled (wds best case)"),
    ("wds", TRAIN_BLOCK, "alternate", 1, "trainer default 256-sample blocks at ImageNet scale (every block misses the shard cache)"),
)


def part4_stores(work: Path, sizes: Sizes, device: str) -> dict[str, Any]:
    import peers_stores as S

    root = work / "stores" / "imagenet-geometry"
    shutil.rmtree(root, ignore_errors=True)  # built afresh: the build time is reported
    built: dict[str, dict[str, Any]] = {}
    for fmt in ("zarr", "wds"):
        path, seconds, size = S.build_store(root, fmt, sizes.store_n, STORE_SHARD)
        built[fmt] = {"path": str(path), "build_s": seconds, "bytes": size,
                      "kib_per_sample": size / sizes.store_n / 1024}
        log(f"store {fmt}: {sizes.store_n} samples of 3x224x224 in {seconds:.1f} s, "
            f"{built[fmt]['kib_per_sample']:.1f} KiB/sample")

    results: list[dict[str, Any]] = []
    for fmt, block, order, cache_shards, what in STORE_ROWS:
        blocks = S.read_order(sizes.store_n, block, STORE_SHARD, order, seed=0)
        if sizes.store_read_n is not None:  # a prefix of the epoch's order; >= 1 block per process
            blocks = blocks[:max(2, -(-sizes.store_read_n // block))]
        per: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for _ in range(sizes.store_rounds):
            for procs in (1, 2):
                per[procs].append(S.measure_readers(Path(built[fmt]["path"]), blocks, procs, cache_shards=cache_shards))
        row = {"format": fmt, "block": block, "order": order, "cache_shards": cache_shards, "what": what,
               "sps_1": median([m["samples_per_s"] for m in per[1]]),
               "sps_2": median([m["samples_per_s"] for m in per[2]]),
               "sps_per_cpu_s": median([m["samples_per_cpu_s"] for m in per[1] + per[2]]),
               "raw": per}
        results.append(row)
        log(f"store read {fmt} block {block} {order}: 1 proc {row['sps_1']:.0f}/s, 2 procs {row['sps_2']:.0f}/s, "
            f"{row['sps_per_cpu_s']:.0f}/CPU-s")
    resnet = resnet50_step(sizes, device)
    log(f"ResNet-50 training step: {resnet['images_per_s']:.1f} img/s at batch {resnet['batch']} on {device}")
    return {"stores": built, "rows": results, "resnet50": resnet}


def resnet50_step(sizes: Sizes, device: str) -> dict[str, Any]:
    """Images/s of a ResNet-50 training step at 224 px (SGD; on CUDA: bf16 autocast, channels_last)."""
    import torch
    import torchvision

    dev = torch.device(device)
    model = torchvision.models.resnet50(weights=None).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(sizes.resnet_batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (sizes.resnet_batch,), device=dev)
    if dev.type == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(sizes.resnet_steps):
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"batch": sizes.resnet_batch, "steps": sizes.resnet_steps, "images_per_s": sizes.resnet_batch / median(times),
            "precision": "bf16 autocast, channels_last" if dev.type == "cuda" else "fp32"}


# --- report ---------------------------------------------------------------------------------

def fmt_s(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def report(res: dict[str, Any]) -> str:
    m, sizes = res["machine"], res["sizes"]
    lines = [
        f"Measured {res['date']} with `{res['command']}` in {res['total_s'] / 60:.1f} min.",
        f"Machine: {m['nproc']} CPU cores ({m['cpu']}), {m['memory_gib']} GiB, device `{m['device']}`"
        + (f" ({m['gpu']})" if m.get("gpu") else "") + f"; torch {m['torch']} ({m['torch_threads']} intra-op thread(s)), "
        f"Python {m['python']}, ART {m['adversarial-robustness-toolbox']}, torchattacks {m['torchattacks']}, "
        f"zarr {m['zarr']}. Load average at start {m['loadavg_start'][0]:.1f}, at end {res['loadavg_end'][0]:.1f} "
        "(shared machine: rounds are interleaved; medians shown).",
        "",
    ]
    if "part1" in res:
        lines += _report_part1(res["part1"], sizes)
    if "part2" in res:
        lines += _report_part2(res["part2"], sizes, res.get("part1"))
    if "part3" in res:
        lines += _report_part3(res["part3"])
    if "part4" in res:
        lines += _report_part4(res["part4"], sizes)
    return "\n".join(lines) + "\n"


def _report_part1(p: dict[str, Any], sizes: dict[str, Any]) -> list[str]:
    e = sizes["epochs"]
    rows = p["rows"]
    # Epoch = the training loop alone (enspipe: its metrics window; ART: fit() minus the
    # time inside the static attacks' generate(), i.e. its precompute).
    wall = {c: median([r["loop_seconds"] for r in rs]) / e for c, rs in rows.items()}
    best = {c: min(r["loop_seconds"] for r in rs) / e for c, rs in rows.items()}
    cpu = {c: median([r["loop_cpu_seconds"] for r in rs]) / e for c, rs in rows.items()}
    pre = {"wall": median([r["seconds"] for r in p["precompute"]]),
           "cpu": median([r["cpu_seconds"] for r in p["precompute"]])}
    art = rows.get("ART AdversarialTrainer")  # None: ART not measured (`--peers`)
    art_pre = {"wall": median([r["precompute_seconds"] for r in art]),
               "cpu": median([r["precompute_cpu_seconds"] for r in art])} if art else None
    rss = {c: max(r["rss_peak_mb"] for r in rs) for c, rs in rows.items()}
    overhead = median([r["seconds"] - r["loop_seconds"] for c in CONTENDERS if c.startswith("enspipe") for r in rows[c]])

    def per_epoch(c: str, k: int, clock: str = "wall") -> float:
        base = (wall if clock == "wall" else cpu)[c]
        if c == "enspipe ens-adv":
            return base + pre[clock] / (k * e)       # the stores are reused by k runs
        if c == "ART AdversarialTrainer" and art_pre is not None:
            return base + art_pre[clock] / e         # recomputed in memory by every run
        return base

    ref = {k: per_epoch("enspipe ens-adv", k) for k in AMORTISE_RUNS}
    # Input gradients per epoch (samples), the work that separates the contenders (DESIGN §4):
    # on the trained model (online) and on the static models (precompute or online).
    n, k_static = sizes["n_train"], len(STATICS)
    batches = -(-n // BATCH)
    half = round(BATCH / 2)
    ens_online = median([r.get("online_passes", 0) for r in rows["enspipe ens-adv"]]) / e
    grads = {
        "enspipe ens-adv": (ens_online * half, k_static * n, "precompute, once for all runs"),
        "enspipe clean": (0, 0, ""),
        "enspipe adv": (batches * half, 0, ""),
        "reference pattern": (batches * half, k_static * batches * half, "online, every batch"),
        "ART AdversarialTrainer": (-(-batches // (1 + k_static)) * half, k_static * n, "precompute, every run"),
    }
    q = p["quality"]
    out = [
        "### 1. Ensemble adversarial training, end to end",
        "",
        f"MNIST train[:{sizes['n_train']}], model {TRAINED} from the same initial weights (seed 0) for every "
        f"contender, batch {BATCH}, eps {EPS}, FGSM with the model's predicted label, half of each batch "
        f"adversarial, {e} epoch(s) per run, {sizes['rounds']} rounds in rotated order, each run in a fresh process "
        f"on `{p.get('device', 'cpu')}`. Static models: pre-trained B and D (enspipe clean, {sizes['setup_epochs']} "
        f"epoch(s) on train[:{sizes['setup_limit']}]); holdout: A (another seed), never seen in training.",
        "",
        f"- enspipe precompute of both stores (zarr, batch {PRECOMPUTE_BATCH}): {fmt_s(pre['wall'])} s wall, "
        f"{fmt_s(pre['cpu'])} CPU-s, peak RSS {max(r['rss_peak_mb'] for r in p['precompute']):.0f} MiB; "
        + (f"ART's in-memory precompute inside every fit(): {fmt_s(art_pre['wall'])} s wall, "
           f"{fmt_s(art_pre['cpu'])} CPU-s." if art_pre else "ART not measured (not installed; `--peers`)."),
        f"- 'epoch' is the training loop alone; enspipe's train() adds {fmt_s(overhead)} s per run around it "
        "(dataset fingerprint, store checks, checkpoint), not counted below.",
        "- 'per epoch, k runs' adds the precompute: enspipe's divided by k runs that reuse the stores, ART's paid by "
        "every run. Ratios are to enspipe ens-adv (> 1: slower than enspipe).",
        "",
        "| contender | input gradients per epoch: trained / static models | epoch s, wall: median (best) | epoch CPU-s | "
        "per epoch, 1 / 3 / 10 runs (wall s) | × ens-adv, 1 / 3 / 10 runs (wall) | × ens-adv, 1 run (CPU) | "
        "peak RSS MiB (× ens-adv) | clean error | max black-box error, holdout A |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        vals = [per_epoch(c, k) for k in AMORTISE_RUNS]
        ratios = " / ".join(f"{v / ref[k]:.2f}" for v, k in zip(vals, AMORTISE_RUNS))
        cpu_ratio = per_epoch(c, 1, "cpu") / per_epoch("enspipe ens-adv", 1, "cpu")
        qq = q[c]
        g_self, g_static, how = grads[c]
        g = f"{g_self:,.0f} / {g_static:,.0f}" + (f" ({how})" if how else "")
        out.append(f"| {c} | {g} | {fmt_s(wall[c])} ({fmt_s(best[c])}) | {fmt_s(cpu[c])} | {' / '.join(fmt_s(v) for v in vals)} | {ratios} | "
                   f"{cpu_ratio:.2f} | {rss[c]:.0f} ({rss[c] / rss['enspipe ens-adv']:.2f}) | "
                   f"{qq['clean_error'] * 100:.1f}% | {qq['blackbox_max'] * 100:.1f}% ({qq['blackbox_max_attack']}) |")
    out += ["", f"Errors on MNIST test[:{q['enspipe ens-adv']['n']}] of the round-0 models; black-box = FGSM and "
            f"Step-LL (eps {EPS}) crafted on the holdout, the larger shown. Epoch seconds per round (wall): " + "; ".join(
                f"{c}: " + ", ".join(fmt_s(r["loop_seconds"] / e) for r in rs) for c, rs in rows.items()) + ".", ""]
    return out


def _report_part2(rows: list[dict[str, Any]], sizes: dict[str, Any], part1: dict[str, Any] | None) -> list[str]:
    def steps(n: int | None) -> str:
        return "a whole epoch" if n is None else f"{n} training steps"

    out = [
        "### 2. Peak memory as N grows",
        "",
        f"Peak RSS (VmHWM of a fresh process per configuration): enspipe ens-adv over "
        f"{steps(sizes['memory_steps'])}, ART over its precompute plus {steps(sizes['memory_art_steps'])} (ART "
        "allocates all its N-sized arrays in the precompute, before its first step). 'Growth' is the peak minus the "
        "same process's peak after imports and two warm-up training steps on random data (allocator arenas, kernel "
        "scratch and code pages: ~150-250 MiB that no contender can avoid and that does not depend on N), before any "
        "data is loaded. Same models, batch and eps as part 1. ART gets the first N samples as the one float32 "
        "array its fit(x, y) takes, streamed from the IDX files; enspipe loads its dataset source as it always does.",
        "",
        "| N | enspipe peak MiB | enspipe growth MiB | ART peak MiB | ART growth MiB | ART / enspipe growth | "
        "precompute of both static models, wall s: enspipe (stores) / ART (in fit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, a = r["enspipe"], r["art"] or {}  # {}: ART not measured (`--peers`)
        eg = e["rss_peak_mb"] - e["rss_imports_mb"]
        ag = a["rss_peak_mb"] - a["rss_imports_mb"] if a else float("nan")
        pre = f"{fmt_s(r['precompute']['seconds'])}"
        if part1 is not None and r["n"] == sizes["n_train"]:
            # The stores of this N were made in part 1 and only found again here: show part 1's time.
            pre = f"{fmt_s(median([p['seconds'] for p in part1['precompute']]))} (part 1)"
        ratio = f"{ag / eg:.2f}" if eg > 0 and a else "—"
        art_cols = f"{a['rss_peak_mb']:.0f} | {ag:.0f}" if a else "— | —"
        out.append(f"| {r['n']:,} | {e['rss_peak_mb']:.0f} | {eg:.0f} | {art_cols} | {ratio} | "
                   f"{pre} / {fmt_s(a['precompute_seconds']) if a else '—'} |")
    out.append("")
    if len(rows) >= 2:
        ns = np.array([r["n"] for r in rows], dtype=float)
        for who, label in (("enspipe", "enspipe"), ("art", "ART")):
            if not all(r[who] for r in rows):
                continue
            ys = np.array([r[who]["rss_peak_mb"] - r[who]["rss_imports_mb"] for r in rows])
            slope, icpt = np.polyfit(ns, ys, 1)
            line = (f"- {label}: growth {ys.min():.0f}–{ys.max():.0f} MiB over N = {int(ns.min()):,}–{int(ns.max()):,}; "
                    f"least squares {icpt:.0f} MiB + {slope * 2**20 / 1e3:.2f} KB per sample")
            if max(ns) < 60000 and slope * 2**20 > 500:  # extrapolate a real slope only, not noise
                line += f", i.e. {icpt + slope * 60000:.0f} MiB at N = 60,000 (a linear extrapolation, not measured)"
            elif max(ns) < 60000:
                line += " (flat: no growth with N to extrapolate)"
            out.append(line + ".")
        k = len(STATICS)
        per = (1 + k) * 4 * 28 * 28
        out += [f"- What ART must hold by construction: x as float32 plus one float32 adversarial copy per static "
                f"attack = (1 + {k}) × 4 B × 784 = {per / 1e3:.1f} KB per sample, {per * 60000 / 2**20:.0f} MiB at "
                "N = 60,000, before its attacks' temporary copies.", ""]
    return out


def _report_part3(p: dict[str, Any]) -> list[str]:
    out = [
        "### 3. Attack throughput",
        "",
        f"Model {p['model']} in eval mode, batch {p['batch']} of MNIST test images, eps {EPS}, true labels; "
        f"{p['rounds']} rounds of enspipe-torchattacks-torchattacks-enspipe; median samples/s by wall time and by "
        "CPU time of the process (all threads; it leaves out time given to other users' processes on a shared "
        "machine). Target: enspipe within 5% of torchattacks or faster (ratio ≥ 0.95).",
        "",
        "| attack: enspipe vs torchattacks | enspipe samples/s | torchattacks samples/s | ratio (wall) | "
        "ratio (CPU time) | spread (IQR/median) | target | x_adv agreement | "
        "error of the model on these x_adv (enspipe / torchattacks) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        if "torchattacks_sps" not in r:  # torchattacks not measured (`--peers`)
            out.append(f"| {r['attack']}: {r['calls']} | {r['enspipe_sps']:.0f} | — | — | — | "
                       f"±{r['spread'] * 100:.0f}% | — | — | — |")
            continue
        agree = ("identical (torch.equal)" if r["equal"] else
                 f"max abs diff {r['max_abs_diff']:.2g} in {r['elements_differing']} of {r['elements']} elements") \
            + f"; {r['agreement_how']}"
        verdict = "met" if r["target_met"] and r["target_met_cpu"] else (
            "**missed**" if not (r["target_met"] or r["target_met_cpu"]) else
            f"met by {'wall' if r['target_met'] else 'CPU'} time only")
        if verdict != "met" and abs(1 - r["ratio"]) < r["spread"]:
            verdict += " (within the run-to-run spread)"
        out.append(f"| {r['attack']}: {r['calls']} | {r['enspipe_sps']:.0f} | {r['torchattacks_sps']:.0f} | "
                   f"{r['ratio']:.3f} | {r['ratio_cpu']:.3f} | ±{r['spread'] * 100:.0f}% | {verdict} | {agree} | "
                   f"{r['error_enspipe'] * 100:.1f}% / {r['error_torchattacks'] * 100:.1f}% |")
    out.append("")
    return out


def _report_part4(p: dict[str, Any], sizes: dict[str, Any]) -> list[str]:
    rn = p["resnet50"]
    lo, hi = GPU_IMAGES_PER_S
    k = len(STATICS)
    out = [
        "### 4. Store read throughput at ImageNet geometry",
        "",
        f"Synthetic stores of {sizes['store_n']} samples of 3x224x224 directions, written by enspipe's store writer "
        f"(shard size {STORE_SHARD}): **random ±1 sign maps** (i.i.d., the codecs' worst case; real maps are "
        "spatially correlated and compress better), logits float16 [1000]; the wds store also carries each "
        "sample's clean image as a ~150 KB noise PNG, as precompute writes them. "
        + ", ".join(f"{f}: {b['kib_per_sample']:.1f} KiB/sample" for f, b in p["stores"].items())
        + ". Reads go through `open_store(...).read()` the way `BatchStream` does (groups of 8 blocks concatenated, "
        "then permuted in memory), from a warm page cache (decode-bound, not disk-bound), in 1 and 2 reader "
        "processes started together"
        + (f", {sizes['store_read_n']} samples (at least 2 blocks) of the epoch's block order per measurement"
           if sizes.get("store_read_n") else ", the whole store per measurement")
        + f"; median of {sizes['store_rounds']} rounds.",
        "",
        f"A ResNet-50 training step at 224 px on this machine ({rn['precision']}, batch {rn['batch']}) consumes "
        f"**{rn['images_per_s']:.1f} images/s**. An A100-class GPU needs about {lo:,}–{hi:,} images/s; "
        f"`BatchStream` reads every store for every sample, so with K = {k} stores the readers must deliver "
        f"K × that = {k * lo:,}–{k * hi:,} directions/s per GPU.",
        "",
        "| store, read pattern | 1 process, samples/s | 2 processes, samples/s | samples per CPU-second | "
        f"× ResNet-50 here | reader processes for 1 GPU, K = 1 / K = {k} (linear extrapolation) |",
        "|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        per_proc = r["sps_1"]
        need1 = lo / per_proc, hi / per_proc
        needk = k * lo / per_proc, k * hi / per_proc
        out.append(f"| {r['format']}: {r['what']} | {r['sps_1']:.0f} | {r['sps_2']:.0f} | {r['sps_per_cpu_s']:.0f} | "
                   f"{r['sps_1'] / rn['images_per_s']:.0f} | {need1[0]:.1f}–{need1[1]:.1f} / {needk[0]:.1f}–{needk[1]:.1f} |")
    out += ["", "The worker counts divide the GPU's need by the measured 1-process rate (an extrapolation: only 1 "
            "and 2 processes were measured, on 2 shared cores).", ""]
    return out


# --- main ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU sizes, a few minutes on 2 cores (default)")
    size.add_argument("--full", action="store_true", help="GPU machine sizes (60k MNIST, full epochs)")
    size.add_argument("--smoke", action="store_true",
                      help="the smallest sizes that run every code path (the test suite's check; figures meaningless)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for every contender (default: torch's own, one per core). "
                         "On a shared, oversubscribed CPU, 1 keeps threads from spinning on each other.")
    ap.add_argument("--data-root", default=os.environ.get("ENSPIPE_DATA", "/work/shared/data"),
                    help="directory holding MNIST/raw/*.gz (default $ENSPIPE_DATA or /work/shared/data)")
    ap.add_argument("--workdir", default=None,
                    help="keep models, stores and results here (default: a temporary directory, removed)")
    ap.add_argument("--parts", default="1,2,3,4", help="which measurements to run, e.g. 3,4 (default all)")
    ap.add_argument("--peers", choices=("auto", "all", "none"), default="auto",
                    help="measure the peers installed (auto, default), both or refuse to start (all), or none: "
                         "enspipe's side of every part runs regardless")
    ap.add_argument("--markdown", default=None, help="also write the markdown section to this file")
    ap.add_argument("--json", default=None, help="also write the raw results to this file")
    ap.add_argument("--report-from", default=None, metavar="RESULTS_JSON",
                    help="only print the markdown of an earlier run's results (no measuring)")
    args = ap.parse_args(argv)
    if args.report_from:
        print(report(json.loads(Path(args.report_from).read_text())))
        return 0

    import torch

    from enspipe.util.runtime import resolve_device

    global THREADS
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        THREADS = args.threads
        torch.set_num_threads(args.threads)  # parts 3 and 4 run in this process
    installed = {m for m in PEER_MODULES if importlib.util.find_spec(m) is not None}
    if args.peers == "all" and installed != set(PEER_MODULES):
        missing = ", ".join(PEER_MODULES[m] for m in sorted(set(PEER_MODULES) - installed))
        ap.error(f"--peers all: not installed: {missing} "
                 "(pip install adversarial-robustness-toolbox && pip install --no-deps torchattacks)")
    PEERS.clear()
    PEERS.update(installed if args.peers != "none" else set())
    sizes = FULL if args.full else SMOKE if args.smoke else QUICK
    device = resolve_device(args.device)
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    keep = args.workdir is not None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-peers-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    command = command_line("bench_peers.py", argv)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": command.strip(),
                           "sizes": dataclasses.asdict(sizes), "machine": machine(device, PACKAGES)}
    log(f"{sizes.name} sizes on {device}; workdir {work}; peers measured: "
        + (", ".join(PEER_MODULES[m] for m in sorted(PEERS)) or "none"))
    res["peers"] = sorted(PEERS)
    try:
        models = setup_models(work, sizes, args.data_root, str(device), tmp) if parts & {1, 2, 3} else {}
        if 1 in parts:
            res["part1"] = part1_training(work, sizes, args.data_root, str(device), models, tmp)
        if 2 in parts:
            res["part2"] = part2_memory(work, sizes, args.data_root, str(device), models, tmp)
        if 3 in parts:
            res["part3"] = part3_attacks(sizes, args.data_root, str(device), models)
        if 4 in parts:
            res["part4"] = part4_stores(work, sizes, str(device))
        res["total_s"] = time.perf_counter() - t_start
        res["loadavg_end"] = os.getloadavg()
        (work / "results.json").write_text(json.dumps(res, indent=2, default=str))
        md = report(res)
        (work / "peers.md").write_text(md)
        if args.markdown:
            Path(args.markdown).write_text(md)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        print(md)
        log(f"done in {res['total_s'] / 60:.1f} min; results in {work / 'results.json'}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
